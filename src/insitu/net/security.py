"""Keys, certificates and client authentication for insitu's gRPC deployment.

Two independent layers protect a deployment:

* **TLS** (EC P-256 keys, which gRPC's BoringSSL supports) authenticates the server to clients and,
  with mutual TLS, clients to the server at the transport level.
* **Client allow-list**: every client holds an Ed25519 signing key; the server keeps the public keys
  in ``allowed_clients.json`` and admits a client only after it signs a fresh server challenge
  (:func:`new_challenge` / :func:`sign_challenge` / :func:`verify_challenge`).

:func:`generate_federation` writes everything a small federation needs::

    OUT_DIR/
      ca.pem                  self-signed CA certificate (public; give to everyone)
      keep-offline/ca.key     CA private key (0600). Only `insitu keygen --add-client` needs it; the
                              server never reads it. Move it off the server to offline storage:
                              whoever holds it can mint client certificates.
      server.pem, server.key  server TLS certificate (SAN = hosts) and key (0600)
      allowed_clients.json    {"version": 1, "clients": {"<id>": "<base64 Ed25519 public key>"}}
      clients/<id>/           self-contained folder to hand to client <id>:
        client.key            Ed25519 signing key, PKCS8 PEM (0600)
        ca.pem                copy of the CA certificate, to verify the server
        tls.pem, tls.key      client TLS certificate (CN = id, SAN URI urn:insitu:client:<id>)
                              and key (0600), only with mutual TLS

A server without TLS or without client authentication may bind only loopback addresses, unless
told ``--dangerously-allow-insecure-network`` (:func:`check_bind_allowed`). A running server
re-reads its allow-list file when it changes (:class:`ReloadingAllowList`), so a client added with
:func:`add_client` is admitted, and one removed from the file refused, without a restart.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import ipaddress
import json
import logging
import re
import secrets
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from insitu.files import write_atomic

_log = logging.getLogger("insitu.server")

__all__ = [
    "ALLOW_LIST",
    "ALLOW_LIST_VERSION",
    "CA_CERT",
    "CA_KEY",
    "CA_KEY_DIR",
    "CHALLENGE_DOMAIN",
    "CLIENTS_DIR",
    "CLIENT_SIGNING_KEY",
    "CLIENT_TLS_CERT",
    "CLIENT_TLS_KEY",
    "NONCE_BYTES",
    "SERVER_CERT",
    "SERVER_KEY",
    "AllowListError",
    "AuthenticationError",
    "ClientFiles",
    "FederationFiles",
    "InsecureBindError",
    "KeyFileError",
    "ReloadingAllowList",
    "SecurityError",
    "add_client",
    "ca_key_path",
    "challenge_message",
    "channel_credentials",
    "check_bind_allowed",
    "client_uri",
    "generate_federation",
    "is_loopback",
    "load_allow_list",
    "load_signing_key",
    "new_challenge",
    "save_allow_list",
    "server_credentials",
    "sign_challenge",
    "validate_client_id",
    "verify_challenge",
]

# File names of the layout written by generate_federation (relative to its out_dir / client folder).
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_KEY_DIR = "keep-offline"  # the CA key's own folder: easy to move off the server
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
ALLOW_LIST = "allowed_clients.json"
CLIENTS_DIR = "clients"
CLIENT_SIGNING_KEY = "client.key"
CLIENT_TLS_CERT = "tls.pem"
CLIENT_TLS_KEY = "tls.key"

ALLOW_LIST_VERSION = 1
NONCE_BYTES = 32
CHALLENGE_DOMAIN = b"insitu-auth-v1\0"
ED25519_PUBLIC_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
MAX_SERVER_NAME_BYTES = 1024

_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_CLOCK_SKEW = _dt.timedelta(minutes=5)
_KEYGEN_HINT = "generate keys and certificates with `insitu keygen`"


# --------------------------------------------------------------------------------------------------
# Errors


class SecurityError(Exception):
    """Base class of this module's errors, so callers can catch them all at once."""


class AuthenticationError(SecurityError):
    """A client failed authentication; the message is safe to send back to the client."""


class InsecureBindError(SecurityError):
    """Binding a non-loopback address without TLS or authentication was refused."""


class AllowListError(SecurityError, ValueError):
    """An allow-list file or mapping is malformed; the message names the file and the entry."""


class KeyFileError(SecurityError, ValueError):
    """A key or certificate file exists but does not hold what was expected."""


# --------------------------------------------------------------------------------------------------
# File layout


@dataclass(frozen=True)
class ClientFiles:
    """Paths of one client's self-contained folder (hand the whole folder to that client)."""

    dir: Path
    signing_key: Path
    ca_cert: Path
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def in_dir(cls, client_dir: Path | str) -> ClientFiles:
        """Locate the standard files in a client folder; TLS paths are None when absent there."""
        d = Path(client_dir)
        tls_cert, tls_key = d / CLIENT_TLS_CERT, d / CLIENT_TLS_KEY
        has_tls = tls_cert.exists() and tls_key.exists()
        return cls(
            dir=d,
            signing_key=d / CLIENT_SIGNING_KEY,
            ca_cert=d / CA_CERT,
            tls_cert=tls_cert if has_tls else None,
            tls_key=tls_key if has_tls else None,
        )


@dataclass(frozen=True)
class FederationFiles:
    """Paths written by :func:`generate_federation` (server side plus one folder per client)."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    allow_list: Path
    clients: dict[str, ClientFiles] = field(default_factory=dict)

    @classmethod
    def in_dir(cls, out_dir: Path | str) -> FederationFiles:
        """Locate a federation's standard files; clients are those listed in its allow-list."""
        root = Path(out_dir)
        allow = root / ALLOW_LIST
        clients: dict[str, ClientFiles] = {}
        if allow.exists():
            for cid in load_allow_list(allow):
                clients[cid] = ClientFiles.in_dir(root / CLIENTS_DIR / cid)
        return cls(
            root=root,
            ca_cert=root / CA_CERT,
            ca_key=ca_key_path(root),
            server_cert=root / SERVER_CERT,
            server_key=root / SERVER_KEY,
            allow_list=allow,
            clients=clients,
        )


# --------------------------------------------------------------------------------------------------
# Validation helpers


def validate_client_id(client_id: str) -> str:
    """Return ``client_id`` if it is 1-64 chars of ``[A-Za-z0-9_.-]``, else raise ValueError."""
    if not isinstance(client_id, str) or not _CLIENT_ID_RE.fullmatch(client_id):
        raise ValueError(
            f"invalid client id {client_id!r}: use 1-64 characters from A-Z a-z 0-9 _ . -"
        )
    if client_id in (".", ".."):
        raise ValueError(f"invalid client id {client_id!r}: '.' and '..' are reserved")
    return client_id


def _validate_client_ids(client_ids: Sequence[str]) -> list[str]:
    """Validate ids and refuse duplicates (they would share a folder and an allow-list entry)."""
    if isinstance(client_ids, str):
        raise TypeError("client_ids must be a sequence of ids, not a single string")
    ids = [validate_client_id(c) for c in client_ids]
    seen: set[str] = set()
    for cid in ids:
        if cid in seen:
            raise ValueError(f"duplicate client id {cid!r}")
        seen.add(cid)
    return ids


def _parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Turn host names and IP literals into SAN entries (DNS or IP), deduplicated, order kept."""
    if isinstance(hosts, str):
        raise TypeError("hosts must be a sequence of host names, not a single string")
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        if not isinstance(host, str) or not host.strip():
            raise ValueError(f"invalid host {host!r}: expected a DNS name or an IP address")
        h = host.strip()
        literal = h[1:-1] if h.startswith("[") and h.endswith("]") else h
        try:
            ip = ipaddress.ip_address(literal)
        except ValueError:
            ip = None
        if ip is not None:
            key = f"ip:{ip}"
            entry: x509.GeneralName = x509.IPAddress(ip)
        else:
            dns = h.lower().rstrip(".")
            labels = dns.split(".")
            if labels and labels[0] == "*":  # wildcard allowed in the leftmost label only
                labels = labels[1:]
            if (
                not labels
                or len(dns) > 253
                or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels)
            ):
                raise ValueError(f"invalid host {host!r}: expected a DNS name or an IP address")
            key = f"dns:{dns}"
            entry = x509.DNSName(dns)
        if key not in seen:
            seen.add(key)
            names.append(entry)
    if not names:
        raise ValueError("hosts must name at least one DNS name or IP address for the server")
    return names


# --------------------------------------------------------------------------------------------------
# File writing


def _refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    """Raise FileExistsError naming the first existing path, unless overwriting is allowed."""
    if overwrite:
        return
    for p in paths:
        if p.exists() or p.is_symlink():
            raise FileExistsError(
                f"{p} already exists; refusing to overwrite keys or certificates "
                "(pass overwrite=True / --overwrite to replace them)"
            )


def _mkdir_private(path: Path) -> None:
    """Create a directory (and parents) readable by the owner only when it is new."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)


def _pem_private_key(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    """Serialize a private key as unencrypted PKCS8 PEM (what gRPC and load_signing_key read)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    """Serialize a certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------------------------------
# Certificates


def _now() -> _dt.datetime:
    """Current UTC time (a function so validity windows share one definition)."""
    return _dt.datetime.now(_dt.timezone.utc)


def _check_days(days: int) -> None:
    """Refuse validity periods that would produce already-expired or nonsensical certificates."""
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive integer, got {days!r}")


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a self-signed EC P-256 CA allowed to sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "insitu federation CA")])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    days: int,
    usage: x509.ObjectIdentifier,
    san: list[x509.GeneralName] | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create an EC P-256 key and a CA-signed certificate for server or client TLS auth."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    # A leaf must not outlive its CA: clamp so verifiers do not reject the chain for that reason.
    not_after = min(now + _dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def client_uri(client_id: str) -> str:
    """URI SAN of a client's TLS certificate (``urn:insitu:client:<id>``), to map peers to ids."""
    return f"urn:insitu:client:{validate_client_id(client_id)}"


def _client_paths(root: Path, client_id: str, mutual_tls: bool) -> ClientFiles:
    """Paths of a client's folder inside a federation directory."""
    d = root / CLIENTS_DIR / client_id
    return ClientFiles(
        dir=d,
        signing_key=d / CLIENT_SIGNING_KEY,
        ca_cert=d / CA_CERT,
        tls_cert=d / CLIENT_TLS_CERT if mutual_tls else None,
        tls_key=d / CLIENT_TLS_KEY if mutual_tls else None,
    )


def _client_file_list(files: ClientFiles) -> list[Path]:
    """All files a client folder will contain, for the overwrite check."""
    out = [files.signing_key, files.ca_cert]
    if files.tls_cert is not None and files.tls_key is not None:
        out += [files.tls_cert, files.tls_key]
    return out


def _write_client(
    files: ClientFiles,
    client_id: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    days: int,
) -> Ed25519PublicKey:
    """Write one client's folder and return its Ed25519 public key for the allow-list."""
    _mkdir_private(files.dir)
    signing = Ed25519PrivateKey.generate()
    write_atomic(files.signing_key, _pem_private_key(signing), 0o600)
    write_atomic(files.ca_cert, _pem_cert(ca_cert), 0o644)
    if files.tls_cert is not None and files.tls_key is not None:
        key, cert = _make_leaf(
            ca_key,
            ca_cert,
            client_id,
            days=days,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            # RFC 5280 verifiers want a SAN; a URI names the client like a SPIFFE id would.
            san=[x509.UniformResourceIdentifier(client_uri(client_id))],
        )
        write_atomic(files.tls_key, _pem_private_key(key), 0o600)
        write_atomic(files.tls_cert, _pem_cert(cert), 0o644)
    return signing.public_key()


def generate_federation(
    out_dir: Path,
    client_ids: Sequence[str],
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    mutual_tls: bool = True,
    overwrite: bool = False,
) -> FederationFiles:
    """Write a CA, server TLS files, one folder per client and the allow-list into ``out_dir``.

    ``hosts`` are the names/IPs clients will dial; they all go into the server certificate's
    SubjectAlternativeName. Nothing is written when any target file exists and ``overwrite`` is
    false, so a refusal never leaves a half-replaced federation behind.
    """
    ids = _validate_client_ids(client_ids)
    san = _parse_hosts(hosts)
    _check_days(days)
    root = Path(out_dir)
    files = FederationFiles(
        root=root,
        ca_cert=root / CA_CERT,
        ca_key=root / CA_KEY_DIR / CA_KEY,
        server_cert=root / SERVER_CERT,
        server_key=root / SERVER_KEY,
        allow_list=root / ALLOW_LIST,
        clients={cid: _client_paths(root, cid, mutual_tls) for cid in ids},
    )
    targets = [files.ca_cert, files.ca_key, root / CA_KEY, files.server_cert, files.server_key, files.allow_list]
    for cf in files.clients.values():
        targets += _client_file_list(cf)
    _refuse_existing(targets, overwrite)

    _mkdir_private(root)
    _mkdir_private(files.ca_key.parent)
    ca_key, ca_cert = _make_ca(days)
    if overwrite:  # a CA key of an older layout must not survive beside the new one
        (root / CA_KEY).unlink(missing_ok=True)
    write_atomic(files.ca_key, _pem_private_key(ca_key), 0o600)
    write_atomic(files.ca_cert, _pem_cert(ca_cert), 0o644)

    server_key, server_cert = _make_leaf(
        ca_key, ca_cert, "insitu server", days=days, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san
    )
    write_atomic(files.server_key, _pem_private_key(server_key), 0o600)
    write_atomic(files.server_cert, _pem_cert(server_cert), 0o644)

    allowed: dict[str, Ed25519PublicKey] = {}
    for cid, cf in files.clients.items():
        allowed[cid] = _write_client(cf, cid, ca_key, ca_cert, days)
    save_allow_list(files.allow_list, allowed)
    return files


def ca_key_path(root: Path | str) -> Path:
    """Where a federation folder keeps its CA key: ``keep-offline/ca.key``, or ``ca.key`` at the top
    in federations made before that folder existed."""
    r = Path(root)
    legacy = r / CA_KEY
    return legacy if legacy.exists() and not (r / CA_KEY_DIR / CA_KEY).exists() else r / CA_KEY_DIR / CA_KEY


def _load_ca(root: Path, ca_key: Path | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Load and cross-check a federation's CA key and certificate."""
    cert = _load_cert(root / CA_CERT)
    key_path = ca_key or ca_key_path(root)
    try:
        key = _load_private_key(key_path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"CA key {key_path} not found: adding a client needs the federation's CA key. If you "
            "moved it offline, bring it back for this command or point to it with --ca-key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{key_path}: expected an EC CA private key")
    if key.public_key() != cert.public_key():
        raise KeyFileError(f"{key_path}: does not match the CA certificate {root / CA_CERT}")
    return key, cert


def add_client(
    out_dir: Path,
    client_id: str,
    *,
    days: int = 365,
    mutual_tls: bool = True,
    overwrite: bool = False,
    ca_key: Path | None = None,
) -> ClientFiles:
    """Add one client to an existing federation (signed by its CA key) and to its allow-list.

    The CA key is ``ca_key``, or the federation's ``keep-offline/ca.key`` (:func:`ca_key_path`). The
    allow-list is replaced atomically, so a running server reads either the old or the new one.
    With ``overwrite`` an existing client of that id gets new keys (revoking the old signing key).
    """
    validate_client_id(client_id)
    _check_days(days)
    root = Path(out_dir)
    allow_path = root / ALLOW_LIST
    allowed = load_allow_list(allow_path)
    if client_id in allowed and not overwrite:
        raise FileExistsError(
            f"client {client_id!r} is already in {allow_path}; "
            "pass overwrite=True / --overwrite to replace its keys"
        )
    ca_private, ca_cert = _load_ca(root, ca_key)
    files = _client_paths(root, client_id, mutual_tls)
    _refuse_existing(_client_file_list(files), overwrite)
    if overwrite and not mutual_tls:
        # Do not leave a stale TLS pair beside fresh keys.
        for stale in (files.dir / CLIENT_TLS_CERT, files.dir / CLIENT_TLS_KEY):
            stale.unlink(missing_ok=True)
    allowed[client_id] = _write_client(files, client_id, ca_private, ca_cert, days)
    save_allow_list(allow_path, allowed)
    return files


# --------------------------------------------------------------------------------------------------
# Allow-list


def _raw_public(key: Ed25519PublicKey) -> bytes:
    """Raw 32-byte encoding of an Ed25519 public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_allow_list(path: Path) -> dict[str, Ed25519PublicKey]:
    """Read ``allowed_clients.json`` as ``{client_id: public key}``; errors name file and entry."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"allow-list {p} not found; {_KEYGEN_HINT}") from None
    except UnicodeDecodeError as e:
        raise AllowListError(f"{p}: not UTF-8 text ({e})") from None
    try:
        doc: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise AllowListError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise AllowListError(f"{p}: expected a JSON object with 'version' and 'clients'")
    version = doc.get("version")
    if version != ALLOW_LIST_VERSION or isinstance(version, bool):
        raise AllowListError(
            f"{p}: unsupported allow-list version {version!r} (expected {ALLOW_LIST_VERSION})"
        )
    clients = doc.get("clients")
    if not isinstance(clients, dict):
        raise AllowListError(f"{p}: 'clients' must be an object mapping client id to public key")
    out: dict[str, Ed25519PublicKey] = {}
    for cid, value in clients.items():
        try:
            validate_client_id(cid)
        except ValueError as e:
            raise AllowListError(f"{p}: bad entry {cid!r}: {e}") from None
        if not isinstance(value, str):
            raise AllowListError(
                f"{p}: bad entry {cid!r}: public key must be a base64 string, "
                f"got {type(value).__name__}"
            )
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise AllowListError(
                f"{p}: bad entry {cid!r}: public key is not valid base64"
            ) from None
        if len(raw) != ED25519_PUBLIC_KEY_BYTES:
            raise AllowListError(
                f"{p}: bad entry {cid!r}: Ed25519 public key must be "
                f"{ED25519_PUBLIC_KEY_BYTES} bytes, got {len(raw)}"
            )
        out[cid] = Ed25519PublicKey.from_public_bytes(raw)
    return out


class ReloadingAllowList(Mapping[str, Ed25519PublicKey]):
    """An allow-list file that is re-read whenever it changed on disk, checked at every lookup.

    A server holding one admits a client added with ``insitu keygen --add-client`` (and stops
    admitting one removed from the file) without a restart. The file is replaced atomically by
    :func:`save_allow_list`, so a lookup sees the old or the new list, never half of one; a file
    that became unreadable or malformed is reported once and the last good list stays in force.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._keys = load_allow_list(self.path)
        self._problem: str | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _current(self) -> dict[str, Ed25519PublicKey]:
        with self._lock:
            stamp = self._stat()
            if stamp is not None and stamp != self._stamp:
                try:
                    keys = load_allow_list(self.path)
                except (OSError, SecurityError) as error:
                    if str(error) != self._problem:
                        self._problem = str(error)
                        _log.warning("allow-list %s changed but cannot be read (%s); keeping the previous "
                                     "one", self.path, error)
                else:
                    added, removed = sorted(set(keys) - set(self._keys)), sorted(set(self._keys) - set(keys))
                    _log.info("allow-list %s re-read: %d clients (added %s, removed %s)", self.path, len(keys),
                              added or "none", removed or "none")
                    self._keys, self._stamp, self._problem = keys, stamp, None
            return self._keys

    def __getitem__(self, client_id: str) -> Ed25519PublicKey:
        return self._current()[client_id]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._current()))

    def __len__(self) -> int:
        return len(self._current())


def save_allow_list(path: Path, mapping: Mapping[str, Ed25519PublicKey]) -> None:
    """Write ``{client_id: public key}`` as a version-1 allow-list, atomically, ids sorted."""
    clients: dict[str, str] = {}
    for cid in sorted(mapping):
        validate_client_id(cid)
        key = mapping[cid]
        if not isinstance(key, Ed25519PublicKey):
            raise TypeError(
                f"allow-list entry {cid!r}: expected an Ed25519PublicKey, got {type(key).__name__}"
            )
        clients[cid] = base64.b64encode(_raw_public(key)).decode("ascii")
    doc = {"version": ALLOW_LIST_VERSION, "clients": clients}
    write_atomic(Path(path), (json.dumps(doc, indent=2) + "\n").encode("utf-8"), 0o644)


# --------------------------------------------------------------------------------------------------
# Challenge-response


def new_challenge() -> bytes:
    """Return a fresh 32-byte random nonce for one authentication attempt (never reuse it)."""
    return secrets.token_bytes(NONCE_BYTES)


def challenge_message(nonce: bytes, client_id: str, server_name: str) -> bytes:
    """Build the domain-separated bytes a client signs, binding nonce, client id and server name.

    The fixed-length nonce and NUL-free id/name make the encoding unambiguous, so a signature
    made for one (id, server) pair cannot be replayed for another or for another protocol.
    """
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes (use new_challenge())")
    validate_client_id(client_id)
    if not isinstance(server_name, str) or not server_name or "\0" in server_name:
        raise ValueError("server_name must be a non-empty string without NUL characters")
    name = server_name.encode("utf-8")
    if len(name) > MAX_SERVER_NAME_BYTES:
        raise ValueError(f"server_name is longer than {MAX_SERVER_NAME_BYTES} bytes")
    return CHALLENGE_DOMAIN + bytes(nonce) + b"\0" + client_id.encode("ascii") + b"\0" + name


def sign_challenge(
    private_key: Ed25519PrivateKey, nonce: bytes, client_id: str, server_name: str
) -> bytes:
    """Sign the challenge message with the client's Ed25519 key (64-byte signature)."""
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError(f"expected an Ed25519PrivateKey, got {type(private_key).__name__}")
    return private_key.sign(challenge_message(nonce, client_id, server_name))


def verify_challenge(
    allow_list: Mapping[str, Ed25519PublicKey],
    client_id: str,
    nonce: bytes,
    server_name: str,
    signature: bytes,
) -> None:
    """Admit ``client_id`` only if it is allow-listed and signed this nonce for this server.

    Raises :class:`AuthenticationError`; its message never lists the allowed ids.
    """
    if not isinstance(client_id, str) or not _CLIENT_ID_RE.fullmatch(client_id):
        raise AuthenticationError("authentication failed: invalid client id")
    key = allow_list.get(client_id)
    if key is None:
        raise AuthenticationError(f"authentication failed: client {client_id!r} is not allowed")
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != ED25519_SIGNATURE_BYTES:
        raise AuthenticationError(
            f"authentication failed for client {client_id!r}: malformed signature"
        )
    message = challenge_message(nonce, client_id, server_name)
    try:
        key.verify(bytes(signature), message)
    except InvalidSignature:
        raise AuthenticationError(
            f"authentication failed for client {client_id!r}: bad signature"
        ) from None


# --------------------------------------------------------------------------------------------------
# Loading keys and certificates


def _read(path: Path | str, what: str) -> bytes:
    """Read a key/cert file; a missing file names the path and how to create it."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {p} not found; {_KEYGEN_HINT}") from None
    except IsADirectoryError:
        raise KeyFileError(f"{what} {p} is a directory, expected a PEM file") from None


def _load_private_key(path: Path | str, data: bytes | None = None) -> Any:
    """Parse an unencrypted PEM private key, with an error naming the file."""
    p = Path(path)
    raw = _read(p, "key file") if data is None else data
    try:
        return serialization.load_pem_private_key(raw, password=None)
    except TypeError:
        raise KeyFileError(
            f"{p}: private key is encrypted; insitu needs an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{p}: not a PEM private key") from None


def _load_cert(path: Path | str, data: bytes | None = None) -> x509.Certificate:
    """Parse a PEM certificate, with an error naming the file."""
    p = Path(path)
    raw = _read(p, "certificate") if data is None else data
    try:
        return x509.load_pem_x509_certificate(raw)
    except ValueError:
        raise KeyFileError(f"{p}: not a PEM certificate") from None


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load a client's Ed25519 signing key (PKCS8 PEM, unencrypted) with errors naming the file."""
    key = _load_private_key(path)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{path}: expected an Ed25519 signing key (clients/<id>/client.key), "
            f"found {type(key).__name__.lstrip('_')}"
        )
    return key


def _check_pair(cert_path: Path, cert_pem: bytes, key_path: Path, key_pem: bytes) -> None:
    """Fail early and clearly when a cert/key pair is unreadable or mismatched (gRPC is cryptic)."""
    cert = _load_cert(cert_path, cert_pem)
    key = _load_private_key(key_path, key_pem)
    if key.public_key() != cert.public_key():
        raise KeyFileError(f"{key_path}: private key does not match certificate {cert_path}")


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials for a gRPC server; with ``client_ca``, clients must show a cert it signed."""
    cert_pem = _read(cert, "server certificate")
    key_pem = _read(key, "server key")
    _check_pair(Path(cert), cert_pem, Path(key), key_pem)
    if client_ca is None:
        return grpc.ssl_server_credentials([(key_pem, cert_pem)])
    ca_pem = _read(client_ca, "client CA certificate")
    _load_cert(client_ca, ca_pem)
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )


def channel_credentials(
    ca: Path, client_cert: Path | None = None, client_key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials for a gRPC client trusting ``ca``; pass cert and key for mutual TLS."""
    if (client_cert is None) != (client_key is None):
        raise ValueError(
            "client_cert and client_key must be given together (mutual TLS) or not at all"
        )
    ca_pem = _read(ca, "CA certificate")
    _load_cert(ca, ca_pem)
    if client_cert is None or client_key is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_pem)
    cert_pem = _read(client_cert, "client certificate")
    key_pem = _read(client_key, "client key")
    _check_pair(Path(client_cert), cert_pem, Path(client_key), key_pem)
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


# --------------------------------------------------------------------------------------------------
# Bind policy


def _bind_host(address: str) -> str:
    """Extract the host part of a gRPC bind address (``host:port``, ``[v6]:port`` or bare host)."""
    a = address.strip()
    if a.startswith("["):
        end = a.find("]")
        return a[1:end] if end != -1 else a[1:]
    if a.count(":") == 1:
        return a.rsplit(":", 1)[0]
    return a  # bare host, or an unbracketed IPv6 literal (ambiguous with a port: taken whole)


def host_and_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``host:port`` or ``[v6]:port`` address, or None if it names no port."""
    try:
        return _bind_host(address), int(address.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def is_loopback(address: str) -> bool:
    """Whether a gRPC bind address is reachable only from this machine (loopback or Unix socket).

    Host names other than ``localhost`` are not resolved and count as non-loopback; wildcard
    addresses (``0.0.0.0``, ``[::]``, empty host) listen on every interface and are not loopback.
    """
    a = address.strip()
    if a.startswith(("unix:", "unix-abstract:")):
        return True
    host = _bind_host(a).strip().lower()
    if host in ("localhost", "localhost."):
        return True
    if "%" in host:  # zone id, e.g. fe80::1%eth0
        host = host.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_bind_allowed(
    address: str, *, tls: bool, authenticated: bool, allow_insecure_network: bool = False
) -> None:
    """Refuse to serve a network-reachable address without TLS or without client authentication.

    Loopback addresses are always allowed (only this machine can connect). Anything else needs
    both TLS and an allow-list, unless ``allow_insecure_network`` (the CLI's loudly named
    ``--dangerously-allow-insecure-network``) says the risk is accepted. Call it before binding.
    """
    if (tls and authenticated) or allow_insecure_network or is_loopback(address):
        return
    missing = " and ".join(
        part for part, ok in (("TLS", tls), ("client authentication", authenticated)) if not ok
    )
    raise InsecureBindError(
        f"refusing to listen on {address} without {missing}: anyone on the network could read the "
        "models and updates" + ("" if tls else " in plaintext") + " and join the federation"
        + ("" if authenticated else " without a key")
        + ". Use --certs DIR (create DIR with `insitu keygen`; it holds the TLS files and the "
        "allow-list), or bind a loopback address such as 127.0.0.1:PORT (--insecure is for loopback "
        "tests only). To accept the risk on a network you fully trust, add "
        "--dangerously-allow-insecure-network."
    )
