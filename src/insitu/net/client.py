"""The client side of a deployment: connect a ``Client`` to a federation server and serve it.

``connect`` handshakes (protocol version, then an Ed25519 signature over the server's challenge),
keeps a heartbeat going, pulls task envelopes, hands each to the handler of the round protocol it
names (:func:`~insitu.protocols.registry.client_handlers`: ``client.fit``/``client.evaluate`` for the
plain exchange, secure aggregation's steps) and pushes the reply envelopes back in chunks. Network trouble and server restarts lead to reconnection with exponential backoff;
a refusal (bad key, incompatible version) is final and raised with the server's reason.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from insitu.client.api import Client
from insitu.config import setting
from insitu.data import PARTITION_NAMES
from insitu.data.files import DATA_FORMATS, IMAGE_MODES
from insitu.models import MODEL_NAMES
from insitu.net import payload, security
from insitu.net.proto import federation_pb2 as pb
from insitu.net.proto import federation_pb2_grpc as pb_grpc
from insitu.net.servicer import CHUNK_SIZE, MAX_MESSAGE_BYTES, MAX_WAIT_S, PROTOCOL_VERSIONS, SESSION_METADATA
from insitu.protocols.base import ClientHandler, ClientPolicy
from insitu.protocols.envelope import Envelope
from insitu.protocols.registry import client_handlers

log = logging.getLogger("insitu.client")

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.INTERNAL}


class ConnectionRefused(RuntimeError):
    """The server refused this client for good (bad key, unknown id, incompatible protocol)."""


@dataclass
class ClientTLS:
    """Where a client finds the CA that signed the server, and optionally its own TLS pair (mTLS)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None


@dataclass
class Backoff:
    """Exponential backoff with jitter between reconnection attempts."""

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        while True:
            yield delay * random.uniform(0.5, 1.0)
            delay = min(self.max_s, delay * self.factor)


@dataclass
class ClientSettings:
    """Everything ``insitu client`` takes, declared once: its flags and its settings file's ``[client]`` keys
    are generated from these fields (``insitu.config``), as the server's are from ``ServerSettings``.

    The command turns them into a local ``TorchClient`` over this machine's data and the arguments of
    :func:`connect` (``address``, ``client_id``, the TLS files and signing key, ``give_up_after_s``,
    ``poll_wait_s``, ``dp_min_noise`` as ``min_noise_multiplier``).
    """

    address: str = setting("127.0.0.1:8080", section="network", help="Server host:port.")
    client_id: str | None = setting(None, section="network", help="This client's id (as in the server's allow-list); "
                             "required, as a flag or in the settings file.")
    certs: Path | None = setting(None, section="security", help="This client's folder from `insitu keygen` "
                                 "(client.key, ca.pem, tls.pem, tls.key).")
    key: Path | None = setting(None, section="security", help="Ed25519 signing key (default CERTS/client.key).")
    insecure: bool = setting(False, section="security", help="Plaintext connection (the server must run with "
                             "--insecure).")
    dataset: str = setting("digits", section="data", help="Named dataset to take a partition of.")
    data_dir: str | None = setting(None, section="data", help="Folder with the IDX files.")
    partition_id: int | None = setting(None, section="data", help="Which partition of the dataset this client "
                                       "holds (default: the client id, when it is a number below "
                                       "--num-partitions).")
    num_partitions: int = setting(3, section="data", help="Into how many partitions the dataset is split.")
    partition: str = setting("iid", section="data", choices=PARTITION_NAMES, help="How the dataset is split "
                             "(same on every client).")
    alpha: float = setting(0.5, section="data", help="Dirichlet concentration (dirichlet, quantity).")
    partition_seed: int = setting(0, section="data", help="Seed of the partition (same on every client).")
    train_limit: int = setting(0, section="data", help="Use only the first N examples of the dataset before "
                               "partitioning (0 = all).")
    data: Path | None = setting(None, section="data", help="Train on this machine's own data instead of a named "
                                "dataset: a folder of images (one subfolder per class), a .csv, .parquet or .npz "
                                "file, or a Hugging Face save_to_disk folder (docs/data.md).")
    data_format: str = setting("", section="data", choices=("", *DATA_FORMATS), help="Format of --data (default: "
                               "from the suffix or the folder's layout).")
    test_data: Path | None = setting(None, section="data", help="--data: a local test file or folder (else train/ "
                                     "and test/ subfolders or a 'split' column; without one the client only trains).")
    feature_columns: str = setting("", section="data", help="--data tables: the feature columns, comma-separated "
                                   "(default: every numeric column but the label).")
    exclude_columns: str = setting("", section="data", help="--data tables: columns left out of the features.")
    classes: str = setting("", section="data", help="--data: the federation's class names in label order, "
                           "comma-separated (default: sorted names found here; the server's list must match).")
    image_size: str = setting("", section="data", help="--data images: resize to SIZE or HEIGHTxWIDTH.")
    image_mode: str = setting("", section="data", choices=IMAGE_MODES, help="--data images: grayscale or rgb "
                              "(default: grayscale when every image is).")
    normalize: str = setting("auto", section="data", help="--data: auto (this client's own mean/std), none, or "
                             "MEAN[,MEAN..]/STD[,STD..] (give the server's values for identical preprocessing).")
    x_key: str = setting("x", section="data", help="--data .npz: the inputs' array.")
    y_key: str = setting("y", section="data", help="--data .npz: the labels' array.")
    csv: Path | None = setting(None, section="data", help="Train on this CSV file instead of a named dataset (the "
                               "older form of --data FILE.csv).")
    label_column: str = setting("label", section="data", help="CSV column holding the class label.")
    num_classes: int | None = setting(None, section="data", help="Classes in the CSV labels (default: largest "
                                      "label + 1; set it on every party).")
    model: str | None = setting(None, section="training", choices=MODEL_NAMES, help="Architecture; default: the "
                                "one the server trains (it tells the client). A different one is refused.")
    dp_min_noise: float = setting(0.0, section="privacy", help="Take part only in distributed-DP secure rounds "
                                  "whose noise, from the participants this client can verify, is at least this "
                                  "multiple of the clip norm (0 = off); plain tasks are refused.")
    state_dir: Path | None = setting(None, section="run", help="Where this client keeps state between rounds "
                                     "(SCAFFOLD's control variate); default .insitu-client/CLIENT_ID.")
    give_up_after_s: float = setting(600.0, section="limits", aliases=("--give-up-after",), help="Stop if the "
                                     "server is unreachable this long (seconds).")
    poll_wait_s: float = setting(10.0, section="limits", aliases=("--poll-wait",), help="Seconds one task "
                                 f"request waits at the server for a task before asking again (0 < s <= "
                                 f"{MAX_WAIT_S:g}).")

    def validate(self) -> None:
        """Refuse settings no client can run with (the partition id is checked against the client id later)."""
        if not self.client_id:
            raise ValueError("give this client's id: --client-id ID, or client_id in the settings file's [client] "
                             "table (as in the server's allow-list)")
        if self.data is not None and self.csv is not None:
            raise ValueError("give --data or --csv, not both (--data FILE.csv reads a CSV too)")
        if self.num_partitions < 1:
            raise ValueError(f"--num-partitions must be >= 1, got {self.num_partitions}")
        if not 0 < self.poll_wait_s <= MAX_WAIT_S:
            raise ValueError(f"--poll-wait must be in (0, {MAX_WAIT_S:g}] seconds (the server waits at most "
                             f"{MAX_WAIT_S:g}), got {self.poll_wait_s}")
        if self.give_up_after_s < 0:
            raise ValueError(f"--give-up-after must be >= 0 seconds, got {self.give_up_after_s}")

    def credentials(self) -> tuple[ClientTLS | None, Path | None]:
        """(TLS files, signing key) from --certs (the key: --key, else the folder's), or (None, --key) with
        --insecure; neither is a ValueError naming the fix."""
        if self.insecure:
            return None, self.key
        if self.certs is None:
            raise ValueError("give this client's --certs folder (from `insitu keygen`), or --insecure")
        files = security.ClientFiles.in_dir(self.certs)
        return ClientTLS(files.ca_cert, files.tls_cert, files.tls_key), self.key or files.signing_key


ClientFactory = Callable[[str], Client]
"""Builds the local client once the server has said which architecture it trains (its model name,
"" from a server that does not say); it may raise ``ConnectionRefused`` if that cannot work here."""


class _Suspended(Exception):
    """The server stopped before the end of the run and can be resumed: wait and reconnect."""


def connect(
    client: Client | ClientFactory,
    address: str,
    *,
    client_id: str,
    signing_key: Ed25519PrivateKey | Path | str | None = None,
    tls: ClientTLS | None = None,
    backoff: Backoff | None = None,
    give_up_after_s: float | None = 600.0,
    poll_wait_s: float = 10.0,
    on_task: Callable[[bool], None] | None = None,
    min_noise_multiplier: float | None = None,
) -> int:
    """Serve ``client`` to the server at ``address`` until it says the federation is over.

    ``min_noise_multiplier``: take part only in distributed-DP secure rounds with at least this much
    noise (see :class:`~insitu.protocols.base.ClientPolicy`); plain fit and evaluate tasks are then refused.

    ``on_task(ok)`` is called after each task, with False when it failed here (and the failure was
    reported to the server).

    ``client`` may be a factory called with the server's model name at the first handshake, so the
    local model matches the server's. Returns the number of tasks completed. Raises
    :class:`ConnectionRefused` if the server refuses this client (bad key, TLS certificate not
    accepted, another model), and ``TimeoutError`` if it stays unreachable for ``give_up_after_s``
    seconds. A server stopped before the end of its run (Ctrl-C) says so; the client then keeps
    reconnecting, within the same ``give_up_after_s``, until the server resumes.
    """
    if isinstance(signing_key, (str, Path)):
        signing_key = security.load_signing_key(Path(signing_key))
    backoff = backoff or Backoff()
    done = 0
    delays = backoff.delays()
    local: Client | None = client if isinstance(client, Client) else None
    factory: ClientFactory | None = None if isinstance(client, Client) else client
    server_model: str | None = None
    policy = ClientPolicy(min_noise_multiplier)
    handlers: dict[str, ClientHandler] | None = None  # by protocol name; they keep protocol state between steps
    unreachable_since: float | None = None
    tls_refusals = 0
    while True:
        channel = _channel(address, tls)
        try:
            stub = pb_grpc.FederationStub(channel)
            token, interval, model = _handshake(stub, client_id, signing_key)
            if server_model is None:
                server_model = model
                if local is None:
                    assert factory is not None
                    local = factory(model)
                handlers = client_handlers(local, policy)
            elif model != server_model:
                _leave(stub, token)
                raise ConnectionRefused(f"the server at {address} now trains {model!r}, but this client joined a "
                                        f"federation of {server_model!r}: restart the client")
            assert handlers is not None
            log.info("connected to %s as %s", address, client_id)
            delays, unreachable_since, tls_refusals = backoff.delays(), None, 0
            beat = _Heartbeat(stub, token, interval)
            try:
                while True:
                    outcome = _serve_one(stub, token, handlers, poll_wait_s)
                    if outcome == "shutdown":
                        log.info("server finished the federation after %d tasks", done)
                        _leave(stub, token)
                        return done
                    if outcome == "suspended":
                        _leave(stub, token)
                        raise _Suspended
                    if outcome in ("done", "failed"):
                        done += 1
                        if on_task is not None:
                            on_task(outcome == "done")
            finally:
                beat.stop()
        except _Suspended:
            unreachable_since = time.monotonic()
            wait = "" if give_up_after_s is None else f" for up to {give_up_after_s:.0f} s (--give-up-after)"
            log.warning("the server at %s stopped before the end of the run: waiting%s for it to resume "
                        "(insitu server ... --resume)", address, wait)
            delays = backoff.delays()
            time.sleep(next(delays))
        except grpc.RpcError as error:
            code = error.code()
            details = error.details() or ""
            if "WRONG_VERSION_NUMBER" in details:
                raise ConnectionRefused(_not_tls(address)) from None
            if "CERTIFICATE_VERIFY_FAILED" in details or "handshake failed" in details.lower():
                raise ConnectionRefused(f"TLS handshake with {address} failed: the server's certificate is not signed "
                                        f"by this client's CA (ca.pem of another federation?), or does not name "
                                        f"this address (keygen --host): check --certs and --address. {details}"
                                        ) from None
            if code not in RETRYABLE:
                raise ConnectionRefused(f"server at {address} refused {client_id}: {error.details()}") from None
            if code == grpc.StatusCode.UNAVAILABLE and "Connection refused" not in details:
                problem = diagnose_tls(address, tls) if tls is not None else _speaks_tls(address)
                tls_refusals = tls_refusals + 1 if problem else 0
                if problem and tls_refusals >= 2:  # twice in a row: not a server that was just stopping
                    raise ConnectionRefused(problem) from None
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if give_up_after_s is not None and now - unreachable_since > give_up_after_s:
                raise TimeoutError(f"server at {address} unreachable for {give_up_after_s:.0f} s ({error.details()})") from None
            delay = next(delays)
            log.warning("connection to %s lost (%s: %s); retrying in %.1f s", address, code.name, error.details(), delay)
            time.sleep(delay)
        finally:
            channel.close()


def diagnose_tls(address: str, tls: ClientTLS, timeout_s: float = 5.0) -> str | None:
    """Why a TLS server at ``address`` refuses this client, or None if it does not (or is unreachable).

    gRPC reports a server's refusal of the client certificate only as "Socket closed", like any
    dropped connection. A direct TLS handshake with the same files tells them apart: a server that
    accepts the client speaks HTTP/2 first; one that refuses its certificate closes the connection.
    """
    where = security.host_and_port(address)
    if where is None:
        return None
    host, port = where
    context = ssl.create_default_context(cafile=str(tls.ca))
    if tls.cert is not None and tls.key is not None:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=host) as conn:
            conn.settimeout(timeout_s)
            first = conn.recv(1)
    except ssl.SSLCertVerificationError as error:
        return (f"TLS handshake with {address} failed: this client does not trust the server's certificate "
                f"({error.verify_message}): its ca.pem is from another federation, or the server certificate "
                f"does not name {host} (insitu keygen --host). Check --certs and --address.")
    except ssl.SSLError as error:
        reason = error.reason or str(error)
        if "CERTIFICATE" in reason.upper() or "UNKNOWN_CA" in reason.upper() or "ALERT" in reason.upper():
            return _refused_certificate(address, tls, reason)
        if "WRONG_VERSION_NUMBER" in reason.upper():
            return _not_tls(address)
        return None
    except OSError:
        return None  # unreachable, reset or timed out: a network problem, retried by the caller
    return None if first else _refused_certificate(address, tls, "connection closed after the TLS handshake")


def _not_tls(address: str) -> str:
    """What to tell a TLS client whose server answers in plaintext."""
    return (f"the server at {address} does not speak TLS: it runs with --insecure (give this client --insecure "
            "too, on loopback or a trusted network only), or this is not an insitu server")


def _speaks_tls(address: str, timeout_s: float = 5.0) -> str | None:
    """Why a plaintext client is cut off: the server at ``address`` speaks TLS (None if it does not)."""
    where = security.host_and_port(address)
    if where is None:
        return None
    host, port = where
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only asking "is this TLS?"
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            pass
    except (OSError, ValueError):
        return None  # not a TLS handshake (or unreachable): a network problem, retried by the caller
    return (f"the server at {address} requires TLS, and this client connects in plaintext (--insecure): give "
            f"the client its folder from `insitu keygen` with --certs instead of --insecure")


def _refused_certificate(address: str, tls: ClientTLS, detail: str) -> str:
    if tls.cert is None:
        return (f"the server at {address} refused the TLS connection ({detail}): it requires a client certificate "
                f"(mutual TLS) and this client has none; use the client folder made by `insitu keygen` "
                f"(with tls.pem and tls.key) as --certs")
    return (f"the server at {address} refused this client's TLS certificate {tls.cert} ({detail}): it was "
            f"signed by another federation's CA, or has expired. Use the client folder the server's "
            f"`insitu keygen` made (or `insitu keygen --out DIR --add-client ID`) as --certs")


def _channel(address: str, tls: ClientTLS | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=GRPC_OPTIONS)
    creds = security.channel_credentials(tls.ca, tls.cert, tls.key)
    return grpc.secure_channel(address, creds, options=GRPC_OPTIONS)


def _handshake(stub: pb_grpc.FederationStub, client_id: str,
               key: Ed25519PrivateKey | None) -> tuple[str, float, str]:
    hello = stub.Hello(pb.HelloRequest(protocol_versions=list(PROTOCOL_VERSIONS), client_id=client_id), timeout=30)
    signature = b""
    if hello.auth_required:
        if key is None:
            raise ConnectionRefused("the server requires authentication: pass the client's signing key (--key)")
        signature = security.sign_challenge(key, hello.nonce, client_id, hello.server_name)
    reply = stub.Authenticate(pb.AuthRequest(client_id=client_id, nonce=hello.nonce, signature=signature), timeout=30)
    return reply.session_token, reply.heartbeat_interval_s or 3.0, reply.model


def _serve_one(stub: pb_grpc.FederationStub, token: str, handlers: dict[str, ClientHandler], wait_s: float) -> str:
    """Pull one task and answer it: "done", "failed" (reported), "idle", "shutdown" or "suspended" (resumable)."""
    stream = stub.PullTask(pb.PullRequest(session_token=token, wait_s=wait_s), timeout=wait_s + 60,
                           metadata=((SESSION_METADATA, token),))
    first = next(stream, None)
    if first is None or first.WhichOneof("body") == "idle":
        return "idle"
    if first.WhichOneof("body") == "shutdown":
        return "suspended" if first.shutdown.resumable else "shutdown"
    header = first.header
    decoder = payload.BodyDecoder(header, max_bytes=max(payload.declared_bytes(header), 1))
    for message in stream:
        decoder.feed(message.chunk)
    parameters, arrays, protocol_bytes = decoder.finish()
    task = Envelope(header.protocol, header.step, header.round, header.model_version,
                    json.loads(header.config_json or "{}"), parameters, arrays, protocol_bytes)
    del parameters
    what = f"{header.protocol} {header.step}".strip()
    log.info("round %d: %s task received", header.round, what)
    try:
        handler = handlers.get(header.protocol)
        if handler is None:
            raise ValueError(f"unknown round protocol {header.protocol!r} (this client speaks "
                             f"{', '.join(sorted(handlers))}): upgrade insitu on this client to the server's version")
        reply = handler.handle(task)
    except Exception as error:  # report the failure to the server; keep serving
        log.exception("round %d: %s failed", header.round, what)
        _push(stub, pb.Envelope(session_token=token, task_id=header.task_id, protocol=header.protocol,
                                step=header.step, round=header.round, error=f"{type(error).__name__}: {error}"))
        return "failed"
    del task
    _push(stub, payload.header(reply, header.task_id, token), payload.iter_body(reply, CHUNK_SIZE))
    return "done"


def _push(stub: pb_grpc.FederationStub, head: pb.Envelope, chunks: Iterable[bytes | memoryview] = ()) -> None:
    def messages() -> Iterator[pb.ResultMessage]:
        yield pb.ResultMessage(header=head)
        for chunk in chunks:
            yield pb.ResultMessage(chunk=bytes(chunk))

    reply = stub.PushResult(messages(), timeout=3600, metadata=((SESSION_METADATA, head.session_token),))
    if not reply.accepted:
        log.warning("server did not accept the result: %s", reply.message)


def _leave(stub: pb_grpc.FederationStub, token: str) -> None:
    try:
        stub.Leave(pb.LeaveRequest(session_token=token), timeout=5)
    except grpc.RpcError:
        pass


class _Heartbeat:
    """Tells the server every ``interval`` seconds that this client is alive (also while training)."""

    def __init__(self, stub: pb_grpc.FederationStub, token: str, interval: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(stub, token, interval), daemon=True)
        self._thread.start()

    def _run(self, stub: pb_grpc.FederationStub, token: str, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                stub.Heartbeat(pb.HeartbeatRequest(session_token=token), timeout=max(interval, 5.0))
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return

    def stop(self) -> None:
        self._stop.set()
