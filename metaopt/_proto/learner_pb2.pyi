from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_FLOAT32_LE: _ClassVar[Encoding]
    ENCODING_BFLOAT16_LE: _ClassVar[Encoding]

class RejectReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECT_REASON_UNSPECIFIED: _ClassVar[RejectReason]
    REJECT_REASON_WRONG_JOB: _ClassVar[RejectReason]
    REJECT_REASON_WRONG_SHAPE: _ClassVar[RejectReason]
    REJECT_REASON_BAD_CHECKSUM: _ClassVar[RejectReason]
    REJECT_REASON_NON_FINITE: _ClassVar[RejectReason]
    REJECT_REASON_NORM_TOO_LARGE: _ClassVar[RejectReason]
    REJECT_REASON_STALE: _ClassVar[RejectReason]
    REJECT_REASON_FUTURE_VERSION: _ClassVar[RejectReason]
    REJECT_REASON_NOT_CONNECTED: _ClassVar[RejectReason]
    REJECT_REASON_UNKNOWN_ENCODING: _ClassVar[RejectReason]
    REJECT_REASON_JOB_FINISHED: _ClassVar[RejectReason]
    REJECT_REASON_INVALID_FIELD: _ClassVar[RejectReason]
    REJECT_REASON_REPLAYED: _ClassVar[RejectReason]
    REJECT_REASON_BAD_CHUNK: _ClassVar[RejectReason]
ENCODING_UNSPECIFIED: Encoding
ENCODING_FLOAT32_LE: Encoding
ENCODING_BFLOAT16_LE: Encoding
REJECT_REASON_UNSPECIFIED: RejectReason
REJECT_REASON_WRONG_JOB: RejectReason
REJECT_REASON_WRONG_SHAPE: RejectReason
REJECT_REASON_BAD_CHECKSUM: RejectReason
REJECT_REASON_NON_FINITE: RejectReason
REJECT_REASON_NORM_TOO_LARGE: RejectReason
REJECT_REASON_STALE: RejectReason
REJECT_REASON_FUTURE_VERSION: RejectReason
REJECT_REASON_NOT_CONNECTED: RejectReason
REJECT_REASON_UNKNOWN_ENCODING: RejectReason
REJECT_REASON_JOB_FINISHED: RejectReason
REJECT_REASON_INVALID_FIELD: RejectReason
REJECT_REASON_REPLAYED: RejectReason
REJECT_REASON_BAD_CHUNK: RejectReason

class TaskSpec(_message.Message):
    __slots__ = ("name", "kwargs_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    kwargs_json: str
    def __init__(self, name: _Optional[str] = ..., kwargs_json: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("job_id", "worker_id", "run_id", "theta_structure_digest")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    THETA_STRUCTURE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    run_id: str
    theta_structure_digest: str
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., run_id: _Optional[str] = ..., theta_structure_digest: _Optional[str] = ...) -> None: ...

class GradientEstimate(_message.Message):
    __slots__ = ("job_id", "worker_id", "run_id", "sequence", "theta_version", "task", "num_particles", "inner_steps", "mean_loss", "encoding", "values", "length", "crc32", "chunks")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    THETA_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTICLES_FIELD_NUMBER: _ClassVar[int]
    INNER_STEPS_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    run_id: str
    sequence: int
    theta_version: int
    task: TaskSpec
    num_particles: int
    inner_steps: int
    mean_loss: float
    encoding: Encoding
    values: bytes
    length: int
    crc32: int
    chunks: int
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., run_id: _Optional[str] = ..., sequence: _Optional[int] = ..., theta_version: _Optional[int] = ..., task: _Optional[_Union[TaskSpec, _Mapping]] = ..., num_particles: _Optional[int] = ..., inner_steps: _Optional[int] = ..., mean_loss: _Optional[float] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., values: _Optional[bytes] = ..., length: _Optional[int] = ..., crc32: _Optional[int] = ..., chunks: _Optional[int] = ...) -> None: ...

class EstimateChunk(_message.Message):
    __slots__ = ("sequence", "index", "values", "padding")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    index: int
    values: bytes
    padding: bytes
    def __init__(self, sequence: _Optional[int] = ..., index: _Optional[int] = ..., values: _Optional[bytes] = ..., padding: _Optional[bytes] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "estimate", "chunk")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    estimate: GradientEstimate
    chunk: EstimateChunk
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., estimate: _Optional[_Union[GradientEstimate, _Mapping]] = ..., chunk: _Optional[_Union[EstimateChunk, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("theta_version", "max_in_flight", "seed")
    THETA_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    theta_version: int
    max_in_flight: int
    seed: int
    def __init__(self, theta_version: _Optional[int] = ..., max_in_flight: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("sequence", "accepted", "reason", "detail", "theta_version")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    THETA_VERSION_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    accepted: bool
    reason: RejectReason
    detail: str
    theta_version: int
    def __init__(self, sequence: _Optional[int] = ..., accepted: _Optional[bool] = ..., reason: _Optional[_Union[RejectReason, str]] = ..., detail: _Optional[str] = ..., theta_version: _Optional[int] = ...) -> None: ...

class ThetaUpdated(_message.Message):
    __slots__ = ("theta_version",)
    THETA_VERSION_FIELD_NUMBER: _ClassVar[int]
    theta_version: int
    def __init__(self, theta_version: _Optional[int] = ...) -> None: ...

class Stop(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class LearnerMessage(_message.Message):
    __slots__ = ("welcome", "ack", "theta_updated", "stop")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    THETA_UPDATED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    ack: Ack
    theta_updated: ThetaUpdated
    stop: Stop
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., theta_updated: _Optional[_Union[ThetaUpdated, _Mapping]] = ..., stop: _Optional[_Union[Stop, _Mapping]] = ...) -> None: ...

class GetThetaRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ArraySpec(_message.Message):
    __slots__ = ("path", "shape")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    path: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, path: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ThetaStructure(_message.Message):
    __slots__ = ("arrays",)
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    arrays: _containers.RepeatedCompositeFieldContainer[ArraySpec]
    def __init__(self, arrays: _Optional[_Iterable[_Union[ArraySpec, _Mapping]]] = ...) -> None: ...

class Theta(_message.Message):
    __slots__ = ("version", "structure", "structure_digest", "values", "length", "crc32")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    version: int
    structure: ThetaStructure
    structure_digest: str
    values: bytes
    length: int
    crc32: int
    def __init__(self, version: _Optional[int] = ..., structure: _Optional[_Union[ThetaStructure, _Mapping]] = ..., structure_digest: _Optional[str] = ..., values: _Optional[bytes] = ..., length: _Optional[int] = ..., crc32: _Optional[int] = ...) -> None: ...
