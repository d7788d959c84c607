"""The gRPC service a federation server exposes to its clients.

It authenticates clients (Ed25519 signature over a one-time challenge, checked against the
allow-list) before they can pull anything, streams parameters out in chunks and decodes pushed
updates chunk by chunk into preallocated arrays. Every refusal names its reason; a bad update is
reported to the round loop as that client's failure and never stops the server.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from insitu import serde
from insitu.client.api import EvalResult, FitResult, ProtocolReply
from insitu.engines.grpc_pool import SHUTDOWN, GrpcClientPool, PendingTask, PoolClosedError
from insitu.net import payload, security
from insitu.net.proto import federation_pb2 as pb
from insitu.net.proto import federation_pb2_grpc as pb_grpc
from insitu.privacy.secagg.participant import MESSAGE, message_bytes

log = logging.getLogger("insitu.server")

PROTOCOL_VERSIONS = (1,)
CHUNK_SIZE = 128 << 10  # small: uploads waiting for their turn each buffer about one chunk
MAX_WAIT_S = 30.0
CHALLENGE_TTL_S = 60.0


class AttemptLimiter:
    """At most ``limit`` handshake attempts per peer host in a sliding ``window_s``."""

    def __init__(self, limit: int = 30, window_s: float = 60.0) -> None:
        self.limit, self.window_s = limit, window_s
        self._seen: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def allow(self, peer: str) -> bool:
        host = peer.rsplit(":", 1)[0]
        now = time.monotonic()
        with self._lock:
            times = self._seen[host]
            while times and now - times[0] > self.window_s:
                times.popleft()
            if len(times) >= self.limit:
                return False
            times.append(now)
            return True


class FederationServicer(pb_grpc.FederationServicer):
    """Hello -> Authenticate -> (PullTask / PushResult / Heartbeat)* -> Leave."""

    def __init__(self, pool: GrpcClientPool, *, allow_list: dict[str, Ed25519PublicKey] | None,
                 server_name: str = "insitu", max_update_bytes: int = 4 << 30,
                 heartbeat_interval_s: float = 3.0, limiter: AttemptLimiter | None = None,
                 download_slots: int = 4) -> None:
        self.pool = pool
        self.allow_list = allow_list
        self.server_name = server_name
        self.max_update_bytes = max_update_bytes
        self.heartbeat_interval_s = heartbeat_interval_s
        self.limiter = limiter or AttemptLimiter()
        # Parameter downloads in flight at once: each holds a few chunk buffers in gRPC, so
        # bounding them bounds the server's send-side memory whatever the number of clients.
        self.download_slots = threading.BoundedSemaphore(download_slots)
        self._challenges: dict[bytes, tuple[str, float]] = {}
        self._lock = threading.Lock()

    # -- handshake ---------------------------------------------------------------------------
    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:
        peer = context.peer()
        if not self.limiter.allow(peer):
            log.warning("refused %s: too many connection attempts", peer)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many connection attempts; retry later")
        common = sorted(set(request.protocol_versions) & set(PROTOCOL_VERSIONS))
        if not common:
            log.warning("refused client %r from %s: protocol versions %s, server speaks %s",
                        request.client_id, peer, list(request.protocol_versions), list(PROTOCOL_VERSIONS))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"protocol version mismatch: client speaks {list(request.protocol_versions)}, "
                          f"this server speaks {list(PROTOCOL_VERSIONS)}; install a matching insitu")
        nonce = security.new_challenge()
        with self._lock:
            now = time.monotonic()
            self._challenges = {n: v for n, v in self._challenges.items() if now - v[1] < CHALLENGE_TTL_S}
            self._challenges[nonce] = (request.client_id, now)
        return pb.HelloReply(protocol_version=common[-1], server_versions=list(PROTOCOL_VERSIONS), nonce=nonce,
                             server_name=self.server_name, auth_required=self.allow_list is not None)

    def Authenticate(self, request: pb.AuthRequest, context: grpc.ServicerContext) -> pb.AuthReply:
        peer = context.peer()
        if not self.limiter.allow(peer):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many connection attempts; retry later")
        with self._lock:
            issued = self._challenges.pop(request.nonce, None)
        if issued is None or issued[0] != request.client_id:
            self._refuse(context, request.client_id, peer, "unknown or expired challenge; say Hello again")
        names = (context.auth_context() or {}).get("x509_common_name")
        if names and request.client_id.encode() not in names:
            self._refuse(context, request.client_id, peer, "the TLS client certificate belongs to another client")
        if self.allow_list is not None:
            try:
                security.verify_challenge(self.allow_list, request.client_id, request.nonce, self.server_name,
                                          request.signature)
            except security.AuthenticationError as error:
                self._refuse(context, request.client_id, peer, str(error))
        try:
            session = self.pool.register(request.client_id, peer)
        except PoolClosedError as error:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        return pb.AuthReply(session_token=session.token, heartbeat_interval_s=self.heartbeat_interval_s)

    def _refuse(self, context: grpc.ServicerContext, client_id: str, peer: str, reason: str) -> None:
        log.warning("rejected client %r from %s: %s", client_id, peer, reason)
        self.pool.notify("rejected", client_id, reason)
        message = reason if reason.startswith("authentication failed") else f"authentication failed: {reason}"
        context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    def _session(self, token: str, context: grpc.ServicerContext) -> Any:
        session = self.pool.session(token)
        if session is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or expired session; authenticate again")
        return session

    # -- steady state ------------------------------------------------------------------------
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        self._session(request.session_token, context)
        return pb.HeartbeatReply()

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        self.pool.leave(request.session_token)
        return pb.LeaveReply()

    def PullTask(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.TaskMessage]:
        session = self._session(request.session_token, context)
        wait_s = min(max(request.wait_s, 0.0), MAX_WAIT_S)
        task = self.pool.next_task(session, wait_s)
        if task is SHUTDOWN:
            yield pb.TaskMessage(shutdown=pb.Shutdown(reason="the federation is finished"))
            return
        if task is None:
            yield pb.TaskMessage(idle=pb.Idle())
            return
        assert isinstance(task, PendingTask)
        scalars, extras = payload.split_config(task.config)
        size, extra_headers = payload.describe(task.parameters, extras)
        with self.download_slots:
            yield pb.TaskMessage(header=pb.TaskHeader(task_id=task.task_id, kind=task.kind, round=task.server_round,
                                                      config_json=json.dumps(scalars), payload_bytes=size,
                                                      extras=extra_headers))
            for chunk in payload.iter_payload(task.parameters, extras, CHUNK_SIZE):
                if not context.is_active():
                    return
                yield pb.TaskMessage(chunk=bytes(chunk))

    def PushResult(self, request_iterator: Iterator[pb.ResultMessage], context: grpc.ServicerContext) -> pb.PushReply:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("body") != "header":
            return pb.PushReply(accepted=False, message="a result must start with a ResultHeader")
        header = first.header
        session = self._session(header.session_token, context)
        task = self.pool.pending_task(header.task_id)
        if task is None or task.client_id != session.client_id:
            log.info("discarded result from client %s for task %s: not awaited (late or unknown)",
                     session.client_id, header.task_id)
            return pb.PushReply(accepted=False, message="this task is no longer awaited (late or unknown)")
        if header.error:
            self.pool.deliver(task, RuntimeError(f"client reported an error: {header.error}"))
            return pb.PushReply(accepted=True, message="error recorded")
        try:
            metrics = _parse_metrics(header.metrics_json)
            if task.kind == "evaluate":
                outcome: Any = EvalResult(float(header.loss), int(header.num_examples), metrics)
                self.pool.deliver(task, outcome)
                return pb.PushReply(accepted=True, message="ok")
            with self.pool.decode_slot:  # one update (or masked vector) decoded at a time, released once folded
                outcome = self._decode_upload(task, header, metrics, request_iterator)
                self.pool.deliver(task, outcome, wait_consumed=600.0)
                del outcome
        except (serde.SerdeError, ValueError) as error:
            self.pool.deliver(task, ValueError(f"bad update: {error}"))
            return pb.PushReply(accepted=False, message=f"update rejected: {error}")
        except grpc.RpcError as error:  # stream broke mid-upload (client died, message too large)
            self.pool.deliver(task, ConnectionError(f"upload failed: {error.code().name}: {error.details()}"))
            return pb.PushReply(accepted=False, message="upload failed")
        return pb.PushReply(accepted=True, message="ok")

    def _decode_upload(self, task: PendingTask, header: pb.ResultHeader, metrics: dict[str, float],
                       request_iterator: Iterator[pb.ResultMessage]) -> FitResult | ProtocolReply:
        """A fit result, or a secure-aggregation reply (no parameters, one extra holding the message bytes),
        decoded chunk by chunk into preallocated arrays."""
        secagg = task.kind == "secagg"
        if secagg and (header.payload_bytes or [e.name for e in header.extras] != [MESSAGE]):
            raise serde.SerdeError(f"a secure-aggregation reply carries exactly one extra named {MESSAGE!r} and no "
                                   "parameters")
        if header.payload_bytes > self.max_update_bytes:
            raise serde.SerdeError(f"update of {header.payload_bytes} bytes exceeds the server's limit "
                                   f"of {self.max_update_bytes}")
        decoder = payload.PayloadDecoder(header.payload_bytes, header.extras, max_bytes=self.max_update_bytes,
                                         expected=task.expected)
        for message in request_iterator:
            if message.WhichOneof("body") != "chunk":
                raise serde.SerdeError("expected payload chunks after the header")
            decoder.feed(message.chunk)
        parameters, extras = decoder.finish()
        del decoder
        if secagg:
            return ProtocolReply(message_bytes(extras.pop(MESSAGE)), int(header.num_examples), metrics)
        if parameters is None:
            raise serde.SerdeError("a fit result must carry parameters (payload_bytes was 0)")
        return FitResult(parameters, int(header.num_examples), metrics, extras)


def _parse_metrics(text: str) -> dict[str, float]:
    """Metrics arrive as a JSON object of finite numbers; anything else is refused."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"metrics are not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError("metrics must be a JSON object")
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"metric {key!r} is {value!r}, expected a finite number")
        out[str(key)] = float(value)
    return out
