"""insitu.net.security: keygen, allow-list, challenge-response, TLS helpers and bind policy."""

from __future__ import annotations

import base64
import ipaddress
import json
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from insitu.net import security as sec
from insitu.net.security import (
    AllowListError,
    AuthenticationError,
    ClientFiles,
    FederationFiles,
    InsecureBindError,
    KeyFileError,
)

CLIENTS = ("alice", "bob.2", "carol_c-3")
SERVER = "fl.example:50051"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationFiles:
    """One federation shared by the read-only tests (tests that modify files make their own)."""
    return sec.generate_federation(tmp_path_factory.mktemp("fed") / "certs", CLIENTS)


# --------------------------------------------------------------------------------------------------
# generate_federation


def test_layout_and_permissions(fed: FederationFiles) -> None:
    root = fed.root
    assert fed.ca_cert == root / "ca.pem" and fed.ca_key == root / "keep-offline" / "ca.key"
    # The CA key sits alone in its own private folder, so it can be moved offline in one step;
    # nothing the server reads (--certs DIR) is in there.
    assert sorted(p.name for p in fed.ca_key.parent.iterdir()) == ["ca.key"]
    assert _mode(fed.ca_key.parent) == 0o700 and not (root / "ca.key").exists()
    assert fed.server_cert == root / "server.pem" and fed.server_key == root / "server.key"
    assert fed.allow_list == root / "allowed_clients.json"
    assert set(fed.clients) == set(CLIENTS)
    for path in (fed.ca_key, fed.server_key):
        assert _mode(path) == 0o600, path
    for path in (fed.ca_cert, fed.server_cert, fed.allow_list):
        assert path.is_file()
    for cid, cf in fed.clients.items():
        assert cf.dir == root / "clients" / cid
        assert cf.signing_key == cf.dir / "client.key" and _mode(cf.signing_key) == 0o600
        assert cf.tls_key == cf.dir / "tls.key" and _mode(cf.tls_key) == 0o600
        assert cf.tls_cert == cf.dir / "tls.pem" and cf.tls_cert.is_file()
        assert cf.ca_cert.read_bytes() == fed.ca_cert.read_bytes()  # folder is self-contained
        assert _mode(cf.dir) & 0o077 == 0
        assert ClientFiles.in_dir(cf.dir) == cf
        assert b"BEGIN PRIVATE KEY" in cf.signing_key.read_bytes()  # PKCS8 PEM
    assert FederationFiles.in_dir(root) == fed
    assert not list(root.rglob("*.tmp"))  # atomic writes leave no temp files behind


def test_server_certificate_san_and_chain(fed: FederationFiles) -> None:
    ca, server = _cert(fed.ca_cert), _cert(fed.server_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)
    assert server.public_key().curve.name == "secp256r1"
    # The CA's public key verifies the server certificate's signature ...
    ca.public_key().verify(
        server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm)
    )
    server.verify_directly_issued_by(ca)
    # ... and a full path validation accepts it for both names clients may dial.
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost"))
    verifier.verify(server, [])
    PolicyBuilder().store(Store([ca])).build_server_verifier(
        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    ).verify(server, [])
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_client_tls_certificates_chain_to_ca(fed: FederationFiles) -> None:
    ca = _cert(fed.ca_cert)
    verifier = PolicyBuilder().store(Store([ca])).build_client_verifier()
    for cid, cf in fed.clients.items():
        assert cf.tls_cert is not None
        cert = _cert(cf.tls_cert)
        cert.verify_directly_issued_by(ca)
        verifier.verify(cert, [])
        assert cert.subject.rfc4514_string() == f"CN={cid}"
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [sec.client_uri(cid)]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in eku


def test_allow_list_matches_client_keys(fed: FederationFiles) -> None:
    doc = json.loads(fed.allow_list.read_text())
    assert doc["version"] == 1 and set(doc["clients"]) == set(CLIENTS)
    allowed = sec.load_allow_list(fed.allow_list)
    for cid, cf in fed.clients.items():
        key = sec.load_signing_key(cf.signing_key)
        assert len(base64.b64decode(doc["clients"][cid])) == 32
        assert allowed[cid] == key.public_key()


def test_hosts_become_dns_and_ip_sans(tmp_path: Path) -> None:
    files = sec.generate_federation(
        tmp_path, ["a"], hosts=["fl.example.org", "10.0.0.7", "[::1]", "LOCALHOST", "localhost"]
    )
    san = _cert(files.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert [str(i) for i in san.value.get_values_for_type(x509.IPAddress)] == ["10.0.0.7", "::1"]
    with pytest.raises(ValueError, match="invalid host 'bad host'"):
        sec.generate_federation(tmp_path / "x", ["a"], hosts=["bad host"])
    with pytest.raises(ValueError, match="at least one"):
        sec.generate_federation(tmp_path / "y", ["a"], hosts=[])


def test_without_mutual_tls_clients_get_no_tls_pair(tmp_path: Path) -> None:
    files = sec.generate_federation(tmp_path, ["a", "b"], mutual_tls=False)
    for cf in files.clients.values():
        assert cf.tls_cert is None and cf.tls_key is None
        assert sorted(p.name for p in cf.dir.iterdir()) == ["ca.pem", "client.key"]
        assert ClientFiles.in_dir(cf.dir) == cf


@pytest.mark.parametrize(
    "ids, message",
    [
        (["a", "a"], "duplicate client id 'a'"),
        ([""], "invalid client id ''"),
        (["x" * 65], "invalid client id"),
        (["has space"], "invalid client id 'has space'"),
        (["a/b"], "invalid client id 'a/b'"),
        ([".."], "reserved"),
        (["é"], "invalid client id"),
    ],
)
def test_client_id_validation(tmp_path: Path, ids: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sec.generate_federation(tmp_path, ids)
    assert not (tmp_path / "ca.pem").exists()
    assert sec.validate_client_id("A-z_0.9" + "x" * 57) == "A-z_0.9" + "x" * 57  # 64 chars ok


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    first = sec.generate_federation(tmp_path, ["a", "b"])
    ca_before = first.ca_cert.read_bytes()
    with pytest.raises(FileExistsError, match=r"ca\.pem already exists"):
        sec.generate_federation(tmp_path, ["a", "b"])
    assert first.ca_cert.read_bytes() == ca_before
    second = sec.generate_federation(tmp_path, ["a", "b"], overwrite=True)
    assert second.ca_cert.read_bytes() != ca_before
    assert _mode(second.ca_key) == 0o600


def test_refusal_names_the_file_and_writes_nothing(tmp_path: Path) -> None:
    existing = tmp_path / "clients" / "b" / "client.key"
    existing.parent.mkdir(parents=True)
    existing.write_text("keep me")
    with pytest.raises(FileExistsError, match=str(existing)):
        sec.generate_federation(tmp_path, ["a", "b"])
    assert existing.read_text() == "keep me"
    assert not (tmp_path / "ca.pem").exists() and not (tmp_path / "clients" / "a").exists()


# --------------------------------------------------------------------------------------------------
# add_client


def test_add_client(tmp_path: Path) -> None:
    files = sec.generate_federation(tmp_path, ["a", "b"])
    dave = sec.add_client(tmp_path, "dave")
    allowed = sec.load_allow_list(files.allow_list)
    assert set(allowed) == {"a", "b", "dave"}
    key = sec.load_signing_key(dave.signing_key)
    assert allowed["dave"] == key.public_key() and _mode(dave.signing_key) == 0o600
    assert dave.tls_cert is not None and dave.tls_key is not None and _mode(dave.tls_key) == 0o600
    _cert(dave.tls_cert).verify_directly_issued_by(_cert(files.ca_cert))
    assert dave.ca_cert.read_bytes() == files.ca_cert.read_bytes()
    nonce = sec.new_challenge()
    sec.verify_challenge(
        allowed, "dave", nonce, SERVER, sec.sign_challenge(key, nonce, "dave", SERVER)
    )

    with pytest.raises(FileExistsError, match="'dave' is already in"):
        sec.add_client(tmp_path, "dave")
    sec.add_client(tmp_path, "dave", overwrite=True)  # rotates the key: the old one is revoked
    with pytest.raises(AuthenticationError):
        sec.verify_challenge(
            sec.load_allow_list(files.allow_list),
            "dave",
            nonce,
            SERVER,
            sec.sign_challenge(key, nonce, "dave", SERVER),
        )
    with pytest.raises(ValueError, match="invalid client id"):
        sec.add_client(tmp_path, "no/slash")


def test_add_client_needs_a_federation(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="insitu keygen"):
        sec.add_client(tmp_path, "a")
    files = sec.generate_federation(tmp_path / "f", ["a"])
    offline = tmp_path / "vault" / "ca.key"  # the user moved the CA key offline, as keygen advises
    offline.parent.mkdir()
    files.ca_key.rename(offline)
    with pytest.raises(FileNotFoundError, match=r"ca\.key not found.*--ca-key"):
        sec.add_client(files.root, "b")
    assert set(sec.load_allow_list(files.allow_list)) == {"a"}
    b = sec.add_client(files.root, "b", ca_key=offline)
    assert set(sec.load_allow_list(files.allow_list)) == {"a", "b"}
    assert b.tls_cert is not None
    _cert(b.tls_cert).verify_directly_issued_by(_cert(files.ca_cert))


def test_add_client_finds_the_ca_key_of_an_older_layout(tmp_path: Path) -> None:
    files = sec.generate_federation(tmp_path, ["a"])
    files.ca_key.rename(tmp_path / "ca.key")  # federations made before keep-offline/ existed
    assert sec.ca_key_path(tmp_path) == tmp_path / "ca.key"
    assert sec.FederationFiles.in_dir(tmp_path).ca_key == tmp_path / "ca.key"
    sec.add_client(tmp_path, "b")
    assert set(sec.load_allow_list(files.allow_list)) == {"a", "b"}
    fresh = sec.generate_federation(tmp_path, ["a"], overwrite=True)  # re-keying leaves one CA key, not two
    assert fresh.ca_key == tmp_path / "keep-offline" / "ca.key" and not (tmp_path / "ca.key").exists()


def test_reloading_allow_list_picks_up_added_and_removed_clients(tmp_path: Path, caplog) -> None:
    files = sec.generate_federation(tmp_path, ["a"], mutual_tls=False)
    allowed = sec.ReloadingAllowList(files.allow_list)
    assert set(allowed) == {"a"} and allowed.get("dave") is None
    dave = sec.add_client(tmp_path, "dave", mutual_tls=False)
    key = sec.load_signing_key(dave.signing_key)
    nonce = sec.new_challenge()
    # verify_challenge (what the server calls) now admits dave, with no restart of anything
    sec.verify_challenge(allowed, "dave", nonce, SERVER, sec.sign_challenge(key, nonce, "dave", SERVER))
    assert len(allowed) == 2
    files.allow_list.write_text("{ half a file")  # a broken edit keeps the last good list in force
    assert set(allowed) == {"a", "dave"}
    assert "cannot be read" in caplog.text
    sec.save_allow_list(files.allow_list, {"a": allowed["a"]})  # dave is removed: refused at once
    with pytest.raises(AuthenticationError, match="not allowed"):
        sec.verify_challenge(allowed, "dave", nonce, SERVER, sec.sign_challenge(key, nonce, "dave", SERVER))


# --------------------------------------------------------------------------------------------------
# Allow-list files


def test_allow_list_round_trip(tmp_path: Path) -> None:
    keys = {cid: Ed25519PrivateKey.generate().public_key() for cid in ("z", "a", "m.1")}
    path = tmp_path / "allow.json"
    sec.save_allow_list(path, keys)
    assert list(json.loads(path.read_text())["clients"]) == ["a", "m.1", "z"]  # sorted
    assert sec.load_allow_list(path) == keys
    sec.save_allow_list(path, {})
    assert sec.load_allow_list(path) == {}
    with pytest.raises(TypeError, match="Ed25519PublicKey"):
        sec.save_allow_list(path, {"a": Ed25519PrivateKey.generate()})  # type: ignore[dict-item]


_GOOD = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        (json.dumps({"version": 2, "clients": {}}), "unsupported allow-list version 2"),
        (json.dumps({"clients": {}}), "unsupported allow-list version None"),
        (json.dumps({"version": 1, "clients": ["a"]}), "'clients' must be an object"),
        (json.dumps({"version": 1, "clients": {"bad id": _GOOD}}), "bad entry 'bad id'"),
        (
            json.dumps({"version": 1, "clients": {"a": "!!notbase64"}}),
            "'a': public key is not valid base64",
        ),
        (
            json.dumps({"version": 1, "clients": {"a": base64.b64encode(bytes(31)).decode()}}),
            "'a': Ed25519 public key must be 32 bytes, got 31",
        ),
        (
            json.dumps({"version": 1, "clients": {"a": 5}}),
            "'a': public key must be a base64 string",
        ),
    ],
)
def test_bad_allow_list_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "allowed_clients.json"
    path.write_text(content)
    with pytest.raises(AllowListError) as info:
        sec.load_allow_list(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_allow_list(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json.*insitu keygen"):
        sec.load_allow_list(tmp_path / "nope.json")


# --------------------------------------------------------------------------------------------------
# Challenge-response


def test_sign_and_verify(fed: FederationFiles) -> None:
    allowed = sec.load_allow_list(fed.allow_list)
    key = sec.load_signing_key(fed.clients["alice"].signing_key)
    nonce = sec.new_challenge()
    assert len(nonce) == 32 and nonce != sec.new_challenge()
    sig = sec.sign_challenge(key, nonce, "alice", SERVER)
    assert len(sig) == 64
    sec.verify_challenge(allowed, "alice", nonce, SERVER, sig)

    msg = sec.challenge_message(nonce, "alice", SERVER)
    assert msg == b"insitu-auth-v1\0" + nonce + b"\0alice\0" + SERVER.encode()

    def rejected(cid: str, n: bytes, server: str, s: bytes) -> str:
        with pytest.raises(AuthenticationError) as info:
            sec.verify_challenge(allowed, cid, n, server, s)
        return str(info.value)

    assert "bad signature" in rejected("bob.2", nonce, SERVER, sig)  # alice's signature, bob's id
    assert "bad signature" in rejected("alice", sec.new_challenge(), SERVER, sig)  # other nonce
    assert "bad signature" in rejected("alice", nonce, "evil.example:50051", sig)  # other server
    tampered = bytes([sig[0] ^ 1]) + sig[1:]
    assert "bad signature" in rejected("alice", nonce, SERVER, tampered)
    assert "malformed" in rejected("alice", nonce, SERVER, sig[:-1])
    unknown = rejected("mallory", nonce, SERVER, sig)
    assert "'mallory' is not allowed" in unknown
    assert not any(cid in unknown for cid in CLIENTS)  # never leaks the allow-list
    assert "invalid client id" in rejected("../etc", nonce, SERVER, sig)
    # A key not in the allow-list signing for an allowed id is rejected too.
    other = Ed25519PrivateKey.generate()
    assert "bad signature" in rejected(
        "alice", nonce, SERVER, sec.sign_challenge(other, nonce, "alice", SERVER)
    )


def test_challenge_message_validation() -> None:
    nonce = sec.new_challenge()
    with pytest.raises(ValueError, match="32 bytes"):
        sec.challenge_message(nonce[:16], "a", SERVER)
    with pytest.raises(ValueError, match="invalid client id"):
        sec.challenge_message(nonce, "a\0b", SERVER)
    with pytest.raises(ValueError, match="server_name"):
        sec.challenge_message(nonce, "a", "x\0y")
    with pytest.raises(ValueError, match="server_name"):
        sec.challenge_message(nonce, "a", "")


def test_load_signing_key_errors(fed: FederationFiles, tmp_path: Path) -> None:
    missing = tmp_path / "client.key"
    with pytest.raises(FileNotFoundError, match=r"client\.key.*insitu keygen"):
        sec.load_signing_key(missing)
    with pytest.raises(KeyFileError, match="expected an Ed25519 signing key"):
        sec.load_signing_key(fed.clients["alice"].tls_key)  # an EC TLS key, not a signing key
    garbage = tmp_path / "garbage.key"
    garbage.write_text("hello")
    with pytest.raises(KeyFileError, match=r"garbage\.key: not a PEM private key"):
        sec.load_signing_key(garbage)


# --------------------------------------------------------------------------------------------------
# Credential helpers and a real TLS handshake


def test_credential_helper_errors(fed: FederationFiles, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"server\.pem.*insitu keygen"):
        sec.server_credentials(tmp_path / "server.pem", fed.server_key)
    with pytest.raises(FileNotFoundError, match=r"nope\.pem.*insitu keygen"):
        sec.server_credentials(fed.server_cert, fed.server_key, client_ca=tmp_path / "nope.pem")
    with pytest.raises(FileNotFoundError, match=r"ca\.pem.*insitu keygen"):
        sec.channel_credentials(tmp_path / "ca.pem")
    with pytest.raises(KeyFileError, match="does not match"):
        sec.server_credentials(fed.server_cert, fed.ca_key)
    alice = fed.clients["alice"]
    with pytest.raises(ValueError, match="together"):
        sec.channel_credentials(fed.ca_cert, client_cert=alice.tls_cert)
    with pytest.raises(KeyFileError, match="not a PEM certificate"):
        sec.channel_credentials(alice.signing_key)
    assert isinstance(
        sec.server_credentials(fed.server_cert, fed.server_key), grpc.ServerCredentials
    )


_METHOD = "/insitu.test.Echo/Echo"


def _identity(b: bytes) -> bytes:
    return b


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Reply with the request and the client certificate's common name seen by the server."""
    auth = context.auth_context()
    cn = b",".join(auth.get("x509_common_name", []))
    san = b",".join(auth.get("x509_subject_alternative_name", []))
    return request + b"|" + cn + b"|" + san


def _call(target: str, creds: grpc.ChannelCredentials) -> bytes:
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.secure_channel(target, creds, options=options) as channel:
        stub = channel.unary_unary(
            _METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        return stub(b"ping", timeout=10)


def test_mutual_tls_handshake(fed: FederationFiles, tmp_path: Path) -> None:
    handler = grpc.method_handlers_generic_handler(
        "insitu.test.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                _echo, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    try:
        server.add_generic_rpc_handlers((handler,))
        creds = sec.server_credentials(fed.server_cert, fed.server_key, client_ca=fed.ca_cert)
        port = server.add_secure_port("127.0.0.1:0", creds)
        assert port > 0
        server.start()

        alice = fed.clients["alice"]
        good = sec.channel_credentials(alice.ca_cert, alice.tls_cert, alice.tls_key)
        assert _call(f"127.0.0.1:{port}", good) == b"ping|alice|urn:insitu:client:alice"
        assert _call(f"localhost:{port}", good) == b"ping|alice|urn:insitu:client:alice"

        # No client certificate: the server requires one, so the handshake fails.
        with pytest.raises(grpc.RpcError) as info:
            _call(f"127.0.0.1:{port}", sec.channel_credentials(alice.ca_cert))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        # A client certificate from another federation's CA is rejected too, and that client
        # does not trust this server's certificate either.
        other = sec.generate_federation(tmp_path / "other", ["alice"])
        o = other.clients["alice"]
        with pytest.raises(grpc.RpcError) as info:
            _call(f"127.0.0.1:{port}", sec.channel_credentials(o.ca_cert, o.tls_cert, o.tls_key))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=None)


# --------------------------------------------------------------------------------------------------
# Bind policy


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1:8080", True),
        ("127.8.9.10:1", True),
        ("[::1]:8080", True),
        ("localhost:8080", True),
        ("LocalHost:8080", True),
        ("localhost", True),
        ("::1", True),
        ("[::ffff:127.0.0.1]:50051", True),
        ("unix:/tmp/insitu.sock", True),
        ("0.0.0.0:8080", False),
        ("[::]:8080", False),
        (":8080", False),
        ("10.0.0.5:50051", False),
        ("192.168.1.20:50051", False),
        ("[2001:db8::1]:50051", False),
        ("fl.example.org:443", False),
        ("localhost.example.org:443", False),
    ],
)
def test_is_loopback(address: str, expected: bool) -> None:
    assert sec.is_loopback(address) is expected


@pytest.mark.parametrize(
    "address, tls, authenticated, override, refused",
    [
        ("127.0.0.1:8080", False, False, False, False),  # loopback: only this machine can connect
        ("[::1]:8080", False, False, False, False),
        ("localhost:8080", False, True, False, False),
        ("0.0.0.0:8080", True, True, False, False),  # TLS and an allow-list: safe on a network
        ("0.0.0.0:8080", False, False, False, True),  # what `--insecure --address 0.0.0.0:...` asked for
        ("0.0.0.0:8080", False, True, False, True),  # plaintext
        ("[::]:8080", True, False, False, True),  # TLS but anyone may join
        ("10.0.0.5:8080", False, True, False, True),
        ("0.0.0.0:8080", False, False, True, False),  # the loud override
        ("[::]:8080", True, False, True, False),
    ],
)
def test_check_bind_allowed(address: str, tls: bool, authenticated: bool, override: bool, refused: bool) -> None:
    def check() -> None:
        sec.check_bind_allowed(address, tls=tls, authenticated=authenticated, allow_insecure_network=override)

    if not refused:
        check()
        return
    with pytest.raises(InsecureBindError) as info:
        check()
    message = " ".join(str(info.value).split())
    assert address in message and "--certs DIR" in message
    assert "--dangerously-allow-insecure-network" in message
    missing = message.split(f"{address} without ", 1)[1].split(":")[0]  # what the refusal says is missing
    assert ("TLS" in missing) == (not tls) and ("client authentication" in missing) == (not authenticated)
