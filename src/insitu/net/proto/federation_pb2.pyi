from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class HelloRequest(_message.Message):
    __slots__ = ("client_id", "protocol_versions")
    PROTOCOL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_versions: _containers.RepeatedScalarFieldContainer[int]
    client_id: str
    def __init__(self, protocol_versions: _Iterable[int] | None = ..., client_id: str | None = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("auth_required", "nonce", "protocol_version", "server_name", "server_versions")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    server_versions: _containers.RepeatedScalarFieldContainer[int]
    nonce: bytes
    server_name: str
    auth_required: bool
    def __init__(self, protocol_version: int | None = ..., server_versions: _Iterable[int] | None = ..., nonce: bytes | None = ..., server_name: str | None = ..., auth_required: bool | None = ...) -> None: ...

class AuthRequest(_message.Message):
    __slots__ = ("client_id", "nonce", "signature")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    nonce: bytes
    signature: bytes
    def __init__(self, client_id: str | None = ..., nonce: bytes | None = ..., signature: bytes | None = ...) -> None: ...

class AuthReply(_message.Message):
    __slots__ = ("heartbeat_interval_s", "model", "session_token")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    heartbeat_interval_s: float
    model: str
    def __init__(self, session_token: str | None = ..., heartbeat_interval_s: float | None = ..., model: str | None = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_token",)
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    def __init__(self, session_token: str | None = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("session_token", "wait_s")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    wait_s: float
    def __init__(self, session_token: str | None = ..., wait_s: float | None = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("config_json", "extras", "kind", "payload_bytes", "round", "task_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    kind: str
    round: int
    config_json: str
    payload_bytes: int
    extras: _containers.RepeatedCompositeFieldContainer[Extra]
    def __init__(self, task_id: str | None = ..., kind: str | None = ..., round: int | None = ..., config_json: str | None = ..., payload_bytes: int | None = ..., extras: _Iterable[Extra | _Mapping] | None = ...) -> None: ...

class Extra(_message.Message):
    __slots__ = ("name", "payload_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    payload_bytes: int
    def __init__(self, name: str | None = ..., payload_bytes: int | None = ...) -> None: ...

class Idle(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ("reason", "resumable")
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESUMABLE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    resumable: bool
    def __init__(self, reason: str | None = ..., resumable: bool | None = ...) -> None: ...

class TaskMessage(_message.Message):
    __slots__ = ("chunk", "header", "idle", "shutdown")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    chunk: bytes
    idle: Idle
    shutdown: Shutdown
    def __init__(self, header: TaskHeader | _Mapping | None = ..., chunk: bytes | None = ..., idle: Idle | _Mapping | None = ..., shutdown: Shutdown | _Mapping | None = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("error", "extras", "loss", "metrics_json", "num_examples", "payload_bytes", "session_token", "task_id")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    task_id: str
    num_examples: int
    loss: float
    metrics_json: str
    error: str
    payload_bytes: int
    extras: _containers.RepeatedCompositeFieldContainer[Extra]
    def __init__(self, session_token: str | None = ..., task_id: str | None = ..., num_examples: int | None = ..., loss: float | None = ..., metrics_json: str | None = ..., error: str | None = ..., payload_bytes: int | None = ..., extras: _Iterable[Extra | _Mapping] | None = ...) -> None: ...

class ResultMessage(_message.Message):
    __slots__ = ("chunk", "header")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    chunk: bytes
    def __init__(self, header: ResultHeader | _Mapping | None = ..., chunk: bytes | None = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: bool | None = ..., message: str | None = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("session_token",)
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    def __init__(self, session_token: str | None = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
