from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HelloRequest(_message.Message):
    __slots__ = ("protocol_versions", "client_id")
    PROTOCOL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_versions: _containers.RepeatedScalarFieldContainer[int]
    client_id: str
    def __init__(self, protocol_versions: _Optional[_Iterable[int]] = ..., client_id: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("protocol_version", "server_versions", "nonce", "server_name", "auth_required")
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
    def __init__(self, protocol_version: _Optional[int] = ..., server_versions: _Optional[_Iterable[int]] = ..., nonce: _Optional[bytes] = ..., server_name: _Optional[str] = ..., auth_required: bool = ...) -> None: ...

class AuthRequest(_message.Message):
    __slots__ = ("client_id", "nonce", "signature")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    nonce: bytes
    signature: bytes
    def __init__(self, client_id: _Optional[str] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AuthReply(_message.Message):
    __slots__ = ("session_token", "heartbeat_interval_s", "model")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    heartbeat_interval_s: float
    model: str
    def __init__(self, session_token: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., model: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_token",)
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    def __init__(self, session_token: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("session_token", "wait_s")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    wait_s: float
    def __init__(self, session_token: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("task_id", "protocol", "step", "round", "model_version", "config_json", "payload_bytes", "extras", "message_bytes", "num_examples", "loss", "metrics_json", "error", "session_token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    protocol: str
    step: str
    round: int
    model_version: int
    config_json: str
    payload_bytes: int
    extras: _containers.RepeatedCompositeFieldContainer[Extra]
    message_bytes: int
    num_examples: int
    loss: float
    metrics_json: str
    error: str
    session_token: str
    def __init__(self, task_id: _Optional[str] = ..., protocol: _Optional[str] = ..., step: _Optional[str] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., config_json: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., extras: _Optional[_Iterable[_Union[Extra, _Mapping]]] = ..., message_bytes: _Optional[int] = ..., num_examples: _Optional[int] = ..., loss: _Optional[float] = ..., metrics_json: _Optional[str] = ..., error: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class Extra(_message.Message):
    __slots__ = ("name", "payload_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    payload_bytes: int
    def __init__(self, name: _Optional[str] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class Idle(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ("reason", "resumable")
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESUMABLE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    resumable: bool
    def __init__(self, reason: _Optional[str] = ..., resumable: bool = ...) -> None: ...

class TaskMessage(_message.Message):
    __slots__ = ("header", "chunk", "idle", "shutdown")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    header: Envelope
    chunk: bytes
    idle: Idle
    shutdown: Shutdown
    def __init__(self, header: _Optional[_Union[Envelope, _Mapping]] = ..., chunk: _Optional[bytes] = ..., idle: _Optional[_Union[Idle, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ...) -> None: ...

class ResultMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: Envelope
    chunk: bytes
    def __init__(self, header: _Optional[_Union[Envelope, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: bool = ..., message: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("session_token",)
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    def __init__(self, session_token: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
