"""The gRPC service a federation server exposes to its clients.

It authenticates clients (Ed25519 signature over a one-time challenge, checked against the
allow-list) before they can pull anything, streams task envelopes out in chunks and decodes pushed
reply envelopes chunk by chunk into preallocated arrays. It moves envelopes and knows no round
protocol: what a reply may carry comes with its task. Every refusal names its reason; a bad update is
reported to the round loop as that client's failure and never stops the server.

Hostile peers are bounded (threat model: docs/deployment.md#limits-against-hostile-clients): a
PullTask or PushResult call without a live session token in its metadata is refused before any
message is read; calls with one request must deliver it within the stall limit, at most 64
waiting per peer host; an upload may declare no more than what its task's round protocol said a
reply may carry (an :class:`~insitu.protocols.envelope.Expect`), each section at most the model's
size and shaped like the model (parameters and named arrays alike, checked from each section's serde
header, which may be no longer than the model's plus a small slack, before that header is parsed); it waits for a decode slot without holding memory (one upload is
received at a time, up to ``upload_slots`` while the others' peers are silent), and a watchdog cancels it when
its peer stays silent for ``upload_stall_s`` or it exceeds ``upload_timeout_s``; a client has at
most one upload in flight; claimed example counts are capped at ``max_examples_per_client``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from insitu import serde
from insitu.engines.grpc_pool import SHUTDOWN, GrpcClientPool, PendingTask, PoolClosedError
from insitu.net import payload, security
from insitu.net.proto import federation_pb2 as pb
from insitu.net.proto import federation_pb2_grpc as pb_grpc
from insitu.protocols.envelope import Envelope

log = logging.getLogger("insitu.server")

# 2: the session token travels in the call metadata of PullTask and PushResult.
# 3: tasks and results are one Envelope type (protocol, step, round, model version, typed body).
PROTOCOL_VERSIONS = (3,)
SESSION_METADATA = "insitu-session"  # metadata key of the session token (sent before any message)
GATED_METHODS = frozenset({"/insitu.v1.Federation/PullTask", "/insitu.v1.Federation/PushResult"})
# Calls whose single request gRPC would wait for, in a handler thread, with no deadline.
UNARY_REQUEST_METHODS = frozenset(f"/insitu.v1.Federation/{name}"
                                  for name in ("Hello", "Authenticate", "Heartbeat", "Leave", "PullTask"))
REQUESTS_WAITING_PER_HOST = 64  # calls one peer host may have waiting for their request at once
CHUNK_SIZE = 128 << 10  # small: uploads waiting for their turn each buffer about one chunk
MAX_MESSAGE_BYTES = CHUNK_SIZE + (64 << 10)  # gRPC's message size limit on both ends
MAX_WAIT_S = 30.0
PULLS_PER_SESSION = 2  # a client pulls one task at a time; 2 lets a retry overlap a dying call
CHALLENGE_TTL_S = 60.0

# Upload limits (ServerSettings and `insitu server` flags of the same names override them).
UPLOAD_SLOTS = 4  # most uploads decoded at once: server memory is O(slots x model)
SLOT_GRACE_S = 0.05  # another upload may start once every upload holding a slot has been silent this long
UPLOAD_STALL_S = 10.0  # the server waited this long for the next message of an upload: cancel it
UPLOAD_TIMEOUT_S = 300.0  # an upload that holds a decode slot longer than this is cancelled
# An upload holding a slot slower than SLOT_YIELD_RATE on average no longer keeps the next upload
# waiting (a "slow drip" is never silent; opening a slot costs only memory). One slower than
# MIN_UPLOAD_RATE is cancelled once the stall limit plus its declared size at that rate have passed
# (or at UPLOAD_TIMEOUT_S, whichever comes first): 512 kbit/s, below any link a federation runs on.
SLOT_YIELD_RATE = 1 << 20  # bytes per second
MIN_UPLOAD_RATE = 64 << 10  # bytes per second
MAX_EXAMPLES_PER_CLIENT = 100_000  # a result claiming more examples counts as this many
MAX_EXAMPLES_RATIO = 10.0  # ... and at most this many times the median count of the previous round (0: off)
SECTION_SLACK_BYTES = 4 << 10  # a section's serde header may differ a little from ours (names are the same)


def session_token(metadata: Any) -> str:
    """The session token in a call's invocation metadata, or ""."""
    for key, value in metadata or ():
        if key == SESSION_METADATA and isinstance(value, str):
            return value
    return ""


class SessionGate(grpc.ServerInterceptor):
    """Bounds what a peer gets from the server before it has authenticated.

    PullTask and PushResult calls without a live session token in their metadata are refused
    before gRPC hands them to a handler thread that would wait for their first message, so streams
    opened without credentials (a stolen TLS certificate without its signing key, or anyone on a
    --no-mtls server) cost one short refusal each and hold no thread. Calls with one request
    (Hello, Authenticate, Heartbeat, Leave, PullTask) must deliver it within the watchdog's stall
    limit, and one peer host may have at most ``per_host`` calls waiting for their request at once.
    """

    def __init__(self, pool: GrpcClientPool, watchdog: UploadWatchdog,
                 per_host: int = REQUESTS_WAITING_PER_HOST) -> None:
        self.pool = pool
        self.watchdog = watchdog
        self.per_host = per_host
        self._refusal = grpc.stream_unary_rpc_method_handler(self._refuse)
        self._refused = 0
        self._last_log = 0.0
        self._waiting: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        method = handler_call_details.method
        if method in GATED_METHODS:
            token = session_token(handler_call_details.invocation_metadata)
            if not token or self.pool.session(token) is None:
                self._note(f"{method.rsplit('/', 1)[-1]} call(s) without a valid session token")
                return self._refusal
        handler = continuation(handler_call_details)
        if method not in UNARY_REQUEST_METHODS or handler is None:
            return handler
        # Read the one request ourselves (as a stream), so its wait has a deadline.
        first = self._first_request
        if handler.unary_unary is not None:
            behavior = handler.unary_unary
            return grpc.stream_unary_rpc_method_handler(
                lambda requests, context: behavior(first(requests, context), context),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            streaming = handler.unary_stream
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, context: streaming(first(requests, context), context),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        return handler

    def _first_request(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The call's request, read within the stall limit; the call is aborted if it does not come."""
        peer = context.peer()
        host = peer.rsplit(":", 1)[0]
        with self._lock:
            busy = self._waiting[host] >= self.per_host
            if not busy:
                self._waiting[host] += 1
        if busy:
            self._note(f"over {self.per_host} calls waiting for their request from one host (latest {host})")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls in progress; retry later")
        watched = self.watchdog.watch(f"a call from {peer}", context, quiet=True)
        try:
            request = self.watchdog.read(watched, requests)
        except ConnectionError:
            request = None
        finally:
            self.watchdog.forget(watched)
            with self._lock:
                self._waiting[host] -= 1
                if not self._waiting[host]:
                    del self._waiting[host]
        if request is None:
            self._note(f"call(s) without a request ({watched.reason or 'stream ended'}; latest {peer})")
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"no request within {self.watchdog.stall_s:g} s" if watched.reason else
                          "expected one request message")
        return request

    def _note(self, what: str) -> None:
        with self._lock:  # logged at most every 5 s: a flood of refusals must not flood the log
            self._refused += 1
            now = time.monotonic()
            if now - self._last_log < 5.0:
                return
            count, self._refused, self._last_log = self._refused, 0, now
        log.warning("refused %d unauthenticated call(s) in the last 5 s; latest: %s", count, what)

    @staticmethod
    def _refuse(request_iterator: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      f"no valid session: authenticate, then send the session token in the {SESSION_METADATA!r} "
                      f"call metadata (insitu protocol {PROTOCOL_VERSIONS[-1]})")


class _Upload:
    """One upload in progress, as the watchdog sees it."""

    def __init__(self, label: str, context: grpc.ServicerContext, quiet: bool) -> None:
        self.label = label  # "the upload of client 3", "a handshake from ipv4:..."
        self.quiet = quiet  # not logged one by one (unauthenticated peers: counted by the gate)
        self.context = context
        self.waiting_since: float | None = None  # the server has been waiting for the peer since
        self.deadline: float | None = None  # it must be received by then (set once it holds a slot)
        self.limit_s = 0.0
        self.reason: str | None = None  # why the watchdog cancelled it
        self.received = 0  # payload bytes received
        self.receiving_since: float | None = None  # it holds a slot and its bytes are still arriving

    def yields_slot(self, now: float, grace_s: float) -> bool:
        """Whether this slot holder lets another upload start: its peer has been silent for ``grace_s``,
        or it is receiving slower than ``SLOT_YIELD_RATE`` on average (a drip that is never silent)."""
        if self.waiting_since is not None and now - self.waiting_since >= grace_s:
            return True
        started = self.receiving_since
        return started is not None and now - started >= grace_s and self.received < SLOT_YIELD_RATE * (now - started)


class UploadSlots:
    """Decode slots that adapt to the peers: one upload is received at a time, as long as it
    progresses; another may start only while every upload holding a slot has been silent for
    ``grace_s`` or receives slower than ``SLOT_YIELD_RATE`` (a stalled or slow peer), up to ``limit``
    at once. Honest fast uploads are thus
    decoded one after another (memory: one update), and stalling peers cannot block the others.
    An upload whose receipt is done (waiting for the loop to fold it) is not silent: it keeps the
    next one waiting, so memory stays at one decoded update per slot."""

    def __init__(self, limit: int, grace_s: float) -> None:
        self.limit, self.grace_s = limit, grace_s
        self._holders: set[_Upload] = set()
        self._cond = threading.Condition()

    def acquire(self, upload: _Upload, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if len(self._holders) < self.limit and all(h.yields_slot(now, self.grace_s) for h in self._holders):
                    self._holders.add(upload)
                    return True
                if now >= deadline:
                    return False
                self._cond.wait(min(deadline - now, self.grace_s / 2))  # silence grows without a notify

    def release(self, upload: _Upload) -> None:
        with self._cond:
            self._holders.discard(upload)
            self._cond.notify_all()


class UploadWatchdog:
    """Cancels an upload whose peer stays silent for ``stall_s`` while the server waits for it, or
    that is still being received at its deadline. One thread, running only while uploads exist."""

    def __init__(self, stall_s: float, interval_s: float = 0.1) -> None:
        self.stall_s = stall_s
        self.interval_s = min(interval_s, stall_s / 4)
        self._uploads: set[_Upload] = set()
        self._lock = threading.Lock()
        self._running = False

    def watch(self, label: str, context: grpc.ServicerContext, quiet: bool = False) -> _Upload:
        upload = _Upload(label, context, quiet)
        with self._lock:
            self._uploads.add(upload)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="insitu-upload-watchdog", daemon=True).start()
        return upload

    def forget(self, upload: _Upload) -> None:
        with self._lock:
            self._uploads.discard(upload)

    def read(self, upload: _Upload, messages: Iterator[pb.ResultMessage]) -> pb.ResultMessage | None:
        """The next message (None at the end of the stream), waited for at most ``stall_s``.

        ConnectionError if the call was cancelled (by this watchdog or the peer) or broke."""
        upload.waiting_since = time.monotonic()
        try:
            message = next(messages, None)
            if message is None and upload.reason is not None:  # cancelled: the stream may just end
                raise ConnectionError(upload.reason)
            return message
        except grpc.RpcError as error:
            # gRPC keeps the error with the call's state: it must not keep the reading frames (and the
            # decoder buffers above them) alive, so it goes no further than here.
            error.__traceback__ = None
            raise ConnectionError(upload.reason or "the stream broke off") from None
        finally:
            upload.waiting_since = None

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._uploads:
                    self._running = False
                    return
                uploads = list(self._uploads)
            now = time.monotonic()
            for upload in uploads:
                since, deadline = upload.waiting_since, upload.deadline
                if upload.reason is not None:
                    continue
                if since is not None and now - since > self.stall_s:
                    upload.reason = (f"stalled: no data for {self.stall_s:g} s after {upload.received} bytes "
                                     "(the upload stall limit)")
                elif deadline is not None and now > deadline:
                    upload.reason = (f"too slow: not received within the upload time limit of {upload.limit_s:g} s "
                                     f"({upload.received} bytes arrived)")
                else:
                    continue
                if not upload.quiet:
                    log.warning("cancelled %s: %s", upload.label, upload.reason)
                upload.context.cancel()
            time.sleep(self.interval_s)


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

    def __init__(self, pool: GrpcClientPool, *, allow_list: Mapping[str, Ed25519PublicKey] | None,
                 server_name: str = "insitu", max_update_bytes: int = 4 << 30,
                 heartbeat_interval_s: float = 3.0, limiter: AttemptLimiter | None = None,
                 download_slots: int = 4, model: str = "", upload_slots: int = UPLOAD_SLOTS,
                 upload_stall_s: float = UPLOAD_STALL_S, upload_timeout_s: float = UPLOAD_TIMEOUT_S,
                 max_examples_per_client: int = MAX_EXAMPLES_PER_CLIENT,
                 max_examples_ratio: float = MAX_EXAMPLES_RATIO) -> None:
        if upload_slots < 1 or upload_stall_s <= 0 or upload_timeout_s <= 0 or max_examples_per_client < 1:
            raise ValueError("upload_slots and max_examples_per_client must be >= 1, the upload limits > 0 s")
        if not max_examples_ratio >= 0:
            raise ValueError(f"max_examples_ratio must be >= 0 (0: off), got {max_examples_ratio}")
        self.pool = pool
        self.model = model  # the architecture's name, told to clients so they build the same one
        self.allow_list = allow_list
        self.server_name = server_name
        self.max_update_bytes = max_update_bytes
        self.heartbeat_interval_s = heartbeat_interval_s
        self.limiter = limiter or AttemptLimiter()
        # Parameter downloads in flight at once: each holds a few chunk buffers in gRPC, so
        # bounding them bounds the server's send-side memory whatever the number of clients.
        self.download_slots = threading.BoundedSemaphore(download_slots)
        # Uploads decoded at once. Each holds a model-sized buffer from its first chunk until the loop
        # has folded it; an upload waiting for a slot holds one chunk.
        self.upload_slots = UploadSlots(upload_slots, min(SLOT_GRACE_S, upload_stall_s / 4))
        self.upload_timeout_s, self.upload_stall_s = upload_timeout_s, upload_stall_s
        self.max_examples_per_client = max_examples_per_client
        self.max_examples_ratio = max_examples_ratio
        self._claims: dict[int, list[int]] = {}  # counted examples of fit results, by round (this and the last)
        self.watchdog = UploadWatchdog(upload_stall_s)
        self.gate = SessionGate(pool, self.watchdog)  # install with grpc.server(interceptors=[servicer.gate])
        self._uploading: set[str] = set()  # clients with an upload in flight
        self._pulls: dict[str, int] = defaultdict(int)  # PullTask calls in flight, by session token
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
            older = all(v < min(PROTOCOL_VERSIONS) for v in request.protocol_versions)
            fix = ("the client is older than this server: upgrade insitu on the client (pip install -U insitu) to "
                   "the server's version" if older else
                   "the client is newer than this server: upgrade insitu on the server, or install the server's "
                   "version on the client")
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"protocol version mismatch: client speaks {list(request.protocol_versions)}, "
                          f"this server speaks {list(PROTOCOL_VERSIONS)}; {fix}")
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
        return pb.AuthReply(session_token=session.token, heartbeat_interval_s=self.heartbeat_interval_s,
                            model=self.model)

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
        session = self._session(session_token(context.invocation_metadata()), context)
        self._count_pull(session.token, session.client_id, context)
        wait_s = min(max(request.wait_s, 0.0), MAX_WAIT_S)
        task = self.pool.next_task(session, wait_s)
        if task is SHUTDOWN:
            resumable = self.pool.resumable
            reason = ("the server stopped before the end of the run; wait for it to resume" if resumable
                      else "the federation is finished")
            yield pb.TaskMessage(shutdown=pb.Shutdown(reason=reason, resumable=resumable))
            return
        if task is None:
            yield pb.TaskMessage(idle=pb.Idle())
            return
        assert isinstance(task, PendingTask)
        with self.download_slots:
            yield pb.TaskMessage(header=payload.header(task.envelope, task.task_id))
            for chunk in payload.iter_body(task.envelope, CHUNK_SIZE):
                if not context.is_active():
                    return
                yield pb.TaskMessage(chunk=bytes(chunk))

    def _count_pull(self, token: str, client_id: str, context: grpc.ServicerContext) -> None:
        """At most PULLS_PER_SESSION long polls of one session at once: each holds a handler thread."""
        with self._lock:
            busy = self._pulls[token] >= PULLS_PER_SESSION
            if not busy:
                self._pulls[token] += 1
        if busy:
            log.warning("refused a PullTask of client %s: %d of its pulls are waiting already", client_id,
                        PULLS_PER_SESSION)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {PULLS_PER_SESSION} pulls at a time")

        def done() -> None:
            with self._lock:
                self._pulls[token] -= 1
                if not self._pulls[token]:
                    del self._pulls[token]

        if not context.add_callback(done):  # the call has already ended
            done()

    def PushResult(self, request_iterator: Iterator[pb.ResultMessage], context: grpc.ServicerContext) -> pb.PushReply:
        token = session_token(context.invocation_metadata())
        session = self._session(token, context)
        client_id = session.client_id
        with self._lock:
            busy = client_id in self._uploading
            self._uploading.add(client_id)
        if busy:
            log.warning("refused an upload of client %s: another of its uploads is in progress", client_id)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "another upload of this client is in progress: one at a time")
        upload = self.watchdog.watch(f"the upload of client {client_id}", context)
        try:
            return self._push(client_id, token, upload, request_iterator, context)
        finally:
            self.watchdog.forget(upload)
            with self._lock:
                self._uploading.discard(client_id)

    def _push(self, client_id: str, token: str, upload: _Upload, messages: Iterator[pb.ResultMessage],
              context: grpc.ServicerContext) -> pb.PushReply:
        try:
            first = self.watchdog.read(upload, messages)
        except ConnectionError:  # cancelled by the watchdog, or the client went away
            log.warning("upload of client %s ended before its header: %s", client_id,
                        upload.reason or "the stream broke off")
            return pb.PushReply(accepted=False, message=f"upload failed: {upload.reason or 'the stream broke off'}")
        if first is None or first.WhichOneof("body") != "header":
            return pb.PushReply(accepted=False, message="a result must start with an Envelope header")
        header = first.header
        if header.session_token != token:
            return pb.PushReply(accepted=False, message="the header's session token is not the call's")
        task = self.pool.pending_task(header.task_id)
        if task is None or task.client_id != client_id:
            log.info("discarded result from client %s for task %s: not awaited (late or unknown)",
                     client_id, header.task_id)
            return pb.PushReply(accepted=False, message="this task is no longer awaited (late or unknown)")
        if header.error:
            self.pool.deliver(task, RuntimeError(f"client reported an error: {header.error}"))
            return pb.PushReply(accepted=True, message="error recorded")
        declared = payload.declared_bytes(header)
        try:
            metrics = _parse_metrics(header.metrics_json)
            num_examples = self._count(task, int(header.num_examples))
            self._check_declared(task, header)  # before any slot or buffer is taken
            reply = Envelope(task.envelope.protocol, task.envelope.step, task.envelope.round,
                             task.envelope.model_version, num_examples=num_examples, loss=float(header.loss),
                             metrics=metrics)
            if not declared:  # nothing to decode (an evaluation): no slot needed
                self.pool.deliver(task, reply)
            elif not self._receive(upload, task, header, reply, messages, context):
                return pb.PushReply(accepted=False, message="this task is no longer awaited (late or unknown)")
            self._record_count(task, num_examples)  # only a received result moves the next round's median
        except (serde.SerdeError, ValueError) as error:
            return self._fail(task, ValueError(f"bad update: {error}"), f"update rejected: {error}")
        except ConnectionError:  # the watchdog cancelled the call, or the stream broke off
            reason = upload.reason or _broken_off(upload.received, declared)
            return self._fail(task, ConnectionError(f"upload failed: {reason}"), f"upload failed: {reason}")
        except Exception as error:  # a bug here must fail this task now, not leave the round waiting
            log.exception("receiving the upload of client %s failed", client_id)
            reason = f"server error while receiving the upload: {type(error).__name__}: {error}"
            return self._fail(task, RuntimeError(reason), reason)
        return pb.PushReply(accepted=True, message="ok")

    def _fail(self, task: PendingTask, error: BaseException, message: str) -> pb.PushReply:
        log.warning("upload of client %s for round %d refused: %s", task.client_id, task.envelope.round, error)
        self.pool.deliver(task, error)
        return pb.PushReply(accepted=False, message=message)

    def _count(self, task: PendingTask, claimed: int) -> int:
        """The example count a result is weighted by: what the client claims, at most the server's cap
        and, for training results, ``max_examples_ratio`` x the median count of the previous round."""
        cap, why = self.max_examples_per_client, "max_examples_per_client"
        median = self._previous_median(task.envelope.round) if task.expect.training else None
        if median is not None and self.max_examples_ratio > 0 and self.max_examples_ratio * median < cap:
            cap = max(1, int(self.max_examples_ratio * median))
            why = f"max_examples_ratio {self.max_examples_ratio:g} x the previous round's median count {median:g}"
        counted = min(claimed, cap)
        if claimed > cap:
            log.warning("client %s claimed %d examples; counted as %d (%s)", task.client_id, claimed, cap, why)
        return counted

    def _record_count(self, task: PendingTask, counted: int) -> None:
        """Remember a received training result's counted examples (the median of a round caps the next)."""
        server_round = task.envelope.round
        if task.expect.training and counted > 0:
            with self._lock:
                self._claims.setdefault(server_round, []).append(counted)
                for old in [r for r in self._claims if r < server_round - 1]:
                    del self._claims[old]

    def _previous_median(self, server_round: int) -> float | None:
        with self._lock:
            earlier = [r for r in self._claims if r < server_round]
            return float(statistics.median(self._claims[max(earlier)])) if earlier else None

    def _check_declared(self, task: PendingTask, header: pb.Envelope) -> None:
        """Refuse a reply whose declared sections are more than its task's ``Expect`` and the model allow."""
        expect = task.expect
        total = payload.declared_bytes(header)
        if total > self.max_update_bytes:
            raise serde.SerdeError(f"update of {total} bytes exceeds the server's limit of {self.max_update_bytes}")
        if expect.parameters and not header.payload_bytes:
            raise serde.SerdeError("this reply must carry parameters (payload_bytes was 0)")
        if header.payload_bytes and not expect.parameters:
            raise serde.SerdeError(f"parameters ({header.payload_bytes} bytes) are not part of a reply to this task")
        if header.message_bytes > expect.message_bytes:
            raise serde.SerdeError(f"a protocol message of {header.message_bytes} bytes exceeds the "
                                   f"{expect.message_bytes} bytes a reply to this task may carry")
        model = serde.encoded_size_of(task.model)
        sections = [(None, header.payload_bytes), *((e.name, e.payload_bytes) for e in header.extras)]
        for name, size in sections:
            what = "parameters" if name is None else f"extra {name!r}"
            if name is not None and name not in expect.arrays:
                accepted = ", ".join(sorted(expect.arrays)) or "none"
                raise serde.SerdeError(f"{what} ({size} bytes) is not a result this task's client algorithm returns "
                                       f"(accepted extras: {accepted})")
            if size > model + SECTION_SLACK_BYTES:
                raise serde.SerdeError(f"{what} of {size} bytes exceeds the model's size ({model} bytes)")

    def _receive(self, upload: _Upload, task: PendingTask, header: pb.Envelope, reply: Envelope,
                 messages: Iterator[pb.ResultMessage], context: grpc.ServicerContext) -> bool:
        """Decode the upload chunk by chunk into preallocated arrays and hand it to the loop.

        The first chunk is awaited without a slot; the slot is then held until the loop has folded
        the result. False if the task stopped being awaited while the upload waited for a slot."""
        chunk = self._next_chunk(upload, messages)
        while not self.upload_slots.acquire(upload, timeout=0.25):
            if not context.is_active() or self.pool.pending_task(task.task_id) is None:
                return False
        try:
            declared = payload.declared_bytes(header)
            upload.limit_s = min(self.upload_timeout_s, self.upload_stall_s + declared / MIN_UPLOAD_RATE)
            upload.receiving_since = time.monotonic()
            upload.deadline = upload.receiving_since + upload.limit_s
            self._decode(upload, task, header, reply, chunk, messages)
            del chunk
            upload.deadline = upload.receiving_since = None  # received: waiting for the loop is not the peer's doing
            self.pool.deliver(task, reply, wait_consumed=600.0)
            del reply
        finally:
            self.upload_slots.release(upload)
        return True

    def _decode(self, upload: _Upload, task: PendingTask, header: pb.Envelope, reply: Envelope, chunk: bytes | None,
                messages: Iterator[pb.ResultMessage]) -> None:
        """Fill ``reply``'s body (parameters, named arrays, protocol bytes) from the upload's chunks."""
        decoder = payload.BodyDecoder(header, max_bytes=self.max_update_bytes, expected=task.model,
                                      arrays_expected=task.model)
        declared = payload.declared_bytes(header)
        while chunk is not None:
            decoder.feed(chunk)
            upload.received += len(chunk)
            chunk = self._next_chunk(upload, messages)
        if upload.reason is not None:  # the watchdog cancelled it (the stream may end quietly then)
            raise ConnectionError(upload.reason)
        if upload.received < declared:  # ended early: whether cancelled or closed, say so (not "truncated")
            raise ConnectionError(_broken_off(upload.received, declared))
        reply.parameters, reply.arrays, reply.message = decoder.finish()

    def _next_chunk(self, upload: _Upload, messages: Iterator[pb.ResultMessage]) -> bytes | None:
        message = self.watchdog.read(upload, messages)
        if message is None:
            return None
        if message.WhichOneof("body") != "chunk":
            raise serde.SerdeError("expected payload chunks after the header")
        return message.chunk


def _broken_off(received: int, declared: int) -> str:
    return (f"the stream broke off after {received} of {declared} bytes: the client sent a message over the server's "
            f"limit of {MAX_MESSAGE_BYTES} bytes, disconnected, cancelled, or closed its stream early")


def _parse_metrics(text: str) -> dict[str, float]:
    """Metrics arrive as a JSON object of finite numbers; anything else is refused."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"metrics are not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError("metrics must be a JSON object")  # noqa: TRY004 - a bad upload, refused like any other
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"metric {key!r} is {value!r}, expected a finite number")
        out[str(key)] = float(value)
    return out
