from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Mix(_message.Message):
    __slots__ = ("mode", "lam", "perm", "box")
    MODE_FIELD_NUMBER: _ClassVar[int]
    LAM_FIELD_NUMBER: _ClassVar[int]
    PERM_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    mode: str
    lam: float
    perm: _containers.RepeatedScalarFieldContainer[int]
    box: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, mode: _Optional[str] = ..., lam: _Optional[float] = ..., perm: _Optional[_Iterable[int]] = ..., box: _Optional[_Iterable[int]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("model", "images", "mix", "temperature", "output", "output_dtype", "top_k", "request_id", "client_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MIX_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: Tensor
    mix: Mix
    temperature: float
    output: str
    output_dtype: str
    top_k: int
    request_id: str
    client_id: str
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., mix: _Optional[_Union[Mix, _Mapping]] = ..., temperature: _Optional[float] = ..., output: _Optional[str] = ..., output_dtype: _Optional[str] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., client_id: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "total_ms", "batch_sizes")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    total_ms: float
    batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("logits", "top_k_values", "top_k_indices", "model", "request_id", "timings", "members")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_VALUES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_INDICES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    top_k_values: Tensor
    top_k_indices: Tensor
    model: str
    request_id: str
    timings: Timings
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., top_k_values: _Optional[_Union[Tensor, _Mapping]] = ..., top_k_indices: _Optional[_Union[Tensor, _Mapping]] = ..., model: _Optional[str] = ..., request_id: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "num_classes", "input_size", "mean", "std", "dtype", "members", "combine", "member_weights", "kind", "max_images")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_classes: int
    input_size: _containers.RepeatedScalarFieldContainer[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    dtype: str
    members: _containers.RepeatedScalarFieldContainer[str]
    combine: str
    member_weights: _containers.RepeatedScalarFieldContainer[float]
    kind: str
    max_images: int
    def __init__(self, name: _Optional[str] = ..., num_classes: _Optional[int] = ..., input_size: _Optional[_Iterable[int]] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., dtype: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ..., combine: _Optional[str] = ..., member_weights: _Optional[_Iterable[float]] = ..., kind: _Optional[str] = ..., max_images: _Optional[int] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_request_bytes", "max_batch_size", "max_queue_images", "max_request_images", "max_request_pixels")
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_PIXELS_FIELD_NUMBER: _ClassVar[int]
    max_request_bytes: int
    max_batch_size: int
    max_queue_images: int
    max_request_images: int
    max_request_pixels: int
    def __init__(self, max_request_bytes: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_queue_images: _Optional[int] = ..., max_request_images: _Optional[int] = ..., max_request_pixels: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "limits")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    limits: ServerLimits
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ...) -> None: ...
