"""Fuzzing every transport: a mutated valid request gets finite tensors or an error of the table.

Hypothesis draws a valid request (a model or an ensemble, 1 to 16 images of 1 to 64 pixels a
side in any image dtype, maybe a mix, a temperature, an output, a dtype, a top_k), mutates it
(fields dropped or given values of other types, odd dtype names, odd and reshaped shapes, cut,
padded or flipped tensor bytes, flipped, cut or extended bytes of the whole encoded body,
unknown models, mix, top_k, output and temperature values out of range, odd HTTP timeouts)
and sends it to the shared server four ways: over HTTP as msgpack or framed (the images'
bytes after a msgpack header, drawn per example), as protobuf over gRPC, and in the Open
Inference Protocol (the same values as v2 inputs and parameters: REST with
binary tensors, gRPC ModelInferRequest with raw contents). Every answer must be a 2xx whose
tensors are finite, or an error of the error table (HTTP 4xx with its JSON body, v2's
`{"error": message}`; a gRPC code other than INTERNAL and UNKNOWN with the `kdserve-error`
name); an unmutated request must be answered; the server logs no error and no traceback; and
a valid request still succeeds after each example. Inputs once reported to fail are always
tried.

CI runs a fixed set of examples (derandomized, no example database): about 10 s per
transport on two cores. For a longer local run with fresh random examples, set the number
of examples per transport: `KDSERVE_FUZZ_EXAMPLES=20000 pytest tests/server/test_fuzz.py`
(about 15 ms an example).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import struct
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import msgpack
import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, given, note, settings
from hypothesis import strategies as st

from teacher_server.server.serve import ServerThread
from teacher_server.shared import oip, wire
from teacher_server.shared._proto import grpc_predict_v2_pb2 as v2
from teacher_server.shared._proto import teacher_pb2 as pb
from teacher_server.shared.contract import IMAGE_DTYPES, MIX_MODES, OUTPUT_DTYPES, OUTPUTS
from teacher_server.shared.errors import ERROR_TABLE
from tests.helpers import (
    AUTH,
    GRPC_AUTH,
    INFER_METHOD,
    grpc_status,
    post,
    protobuf_request,
    tensor_map,
)

CI_EXAMPLES = 600
"""Examples per transport in CI; KDSERVE_FUZZ_EXAMPLES overrides it for a local run."""
LOCAL_EXAMPLES = os.environ.get("KDSERVE_FUZZ_EXAMPLES")
EXAMPLES = int(LOCAL_EXAMPLES) if LOCAL_EXAMPLES else CI_EXAMPLES
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=LOCAL_EXAMPLES is None,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CALL_TIMEOUT_S = 10.0
MODELS = ("small", "wide", "pair_logits", "pair_probs")
NUM_CLASSES = 10
ROWS = {row.name: row for row in ERROR_TABLE.values()}
SERVER_FAULTS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
TRANSPORTS = ["http", "grpc", "v2_rest", "v2_grpc"]
"""Our protocol's two transports and the Open Inference Protocol's (REST binary, gRPC)."""
pytestmark = [pytest.mark.slow, pytest.mark.timeout(max(300, EXAMPLES // 10))]

# ---- valid requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    """Seeded images, drawn as a recipe so that a failing example prints short."""

    count: int
    height: int
    width: int
    dtype: str
    seed: int

    def tensor_map(self) -> dict[str, Any]:
        shape = (self.count, 3, self.height, self.width)
        generator = torch.Generator().manual_seed(self.seed)
        if self.dtype == "uint8":
            tensor = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        else:
            tensor = torch.rand(shape, generator=generator).to(IMAGE_DTYPES[self.dtype])
        return tensor_map(tensor)


@st.composite
def valid_fields(draw: st.DrawFn) -> dict[str, Any]:
    """A request the server must answer with 200: every optional field present or not."""
    images = Images(
        count=draw(st.integers(1, 16)),
        height=draw(st.integers(1, 64)),
        width=draw(st.integers(1, 64)),
        dtype=draw(st.sampled_from(sorted(IMAGE_DTYPES))),
        seed=draw(st.integers(0, 2**16)),
    )
    fields: dict[str, Any] = {"model": draw(st.sampled_from(MODELS)), "images": images}
    optional = {
        "temperature": st.floats(0.05, 20.0),
        "output": st.sampled_from(OUTPUTS),
        "output_dtype": st.sampled_from(OUTPUT_DTYPES),
        "top_k": st.integers(1, NUM_CLASSES),
        "request_id": st.text(max_size=20),
        "mix": valid_mix(images),
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            fields[name] = draw(values)
    return fields


@st.composite
def valid_mix(draw: st.DrawFn, images: Images) -> dict[str, Any]:
    perm = draw(st.permutations(range(images.count)))
    if draw(st.sampled_from(MIX_MODES)) == "mixup":
        return {"mode": "mixup", "perm": perm, "lam": draw(st.floats(0.0, 1.0))}
    y0 = draw(st.integers(0, images.height))
    x0 = draw(st.integers(0, images.width))
    box = [y0, x0, draw(st.integers(y0, images.height)), draw(st.integers(x0, images.width))]
    return {"mode": "cutmix", "perm": perm, "box": box}


# ---- mutations ----------------------------------------------------------------------------

HUGE_INTS = (2**31 - 1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63))
ODD_FLOATS = (math.nan, math.inf, -math.inf, 1e-300, 5e-324, -0.0, 1e300, 1.7976931348623157e308)
OTHER_TYPES = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1, *HUGE_INTS, *ODD_FLOATS]),
    st.sampled_from(["", "x", b"", b"\x00\xff", [], [1], [[]], {}, {"a": 1}, {1: "a"}]),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.lists(
        st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=3), st.none()), max_size=5
    ),
    st.dictionaries(
        st.sampled_from(["dtype", "shape", "data", "mode", "perm", "x"]),
        st.one_of(st.integers(-5, 5), st.text(max_size=3), st.binary(max_size=3)),
        max_size=3,
    ),
)
"""Any field's value replaced by one of another type (or an odd one of the same type)."""
DIMS = st.one_of(
    st.sampled_from([-1, 0, 1, 3, 64, 4096, 4097, *HUGE_INTS[:3]]), st.integers(-3, 70)
)
UNKNOWN_MODELS = st.sampled_from(["nope", "SMALL", "small ", "small\x00", "é", "m" * 300])
ODD_VALUES: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    ("model",): st.sampled_from(["", *MODELS]),
    ("images", "dtype"): st.sampled_from(
        [
            *("int64", "float64", "int32", "int8", "bool", "complex64", "float8_e4m3fn"),
            *("UINT8", "uint8 ", "", "float", "torch.uint8", *sorted(IMAGE_DTYPES)),
        ]
    ),
    ("images", "shape"): st.lists(DIMS, max_size=9),
    ("images", "data"): st.binary(max_size=64),
    ("temperature",): st.one_of(
        st.sampled_from(
            [1e-300, 5e-324, 1e-40, 1e-8, 1e-4, 1e300, *ODD_FLOATS, 0.0, -1.0, 2**64 - 1]
        ),
        st.floats(),
    ),
    ("output",): st.sampled_from(["softmax", "LOGITS", "", "logits ", "top_k", "\x00", *OUTPUTS]),
    ("output_dtype",): st.sampled_from(
        ["int8", "float64", "bfloat16", "FLOAT32", "", "int32", "uint8", *OUTPUT_DTYPES]
    ),
    ("top_k",): st.sampled_from([0, -1, 1, NUM_CLASSES, NUM_CLASSES + 1, *HUGE_INTS]),
    ("request_id",): st.sampled_from(["", "r" * 256, "r" * 257, "é" * 200, "\x00"]),
    ("mix",): st.sampled_from([{}, {"mode": "mixup"}, {"mode": "cutmix", "perm": [0]}]),
    ("mix", "mode"): st.sampled_from(["", "mixup", "cutmix", "MIXUP", "cut", "none"]),
    ("mix", "perm"): st.lists(
        st.one_of(st.integers(-2, 17), st.sampled_from(HUGE_INTS)), max_size=18
    ),
    ("mix", "lam"): st.sampled_from([-1e-300, -0.0, 1.0000001, 2.0, 0, 1, *ODD_FLOATS]),
    ("mix", "box"): st.lists(
        st.one_of(st.integers(-2, 70), st.sampled_from(HUGE_INTS)), max_size=6
    ),
}
"""Values of the right type for each field, many of them out of its range."""
PATHS = sorted({*ODD_VALUES, ("images",), ("unknown",), ("images", "x"), ("mix", "x")})
RESHAPES = {
    "sides swapped": lambda n, h, w: [n, 3, w, h],
    "channels last": lambda n, h, w: [n, h, w, 3],
    "rows stacked": lambda n, h, w: [1, 3, n * h, w],
    "pixels in a column": lambda n, h, w: [n, 3, h * w, 1],
    "one pixel each": lambda n, h, w: [n * h * w, 3, 1, 1] if n * h * w <= 64 else [n, 3, h, w],
    "five dims": lambda n, h, w: [n, 3, h, w, 1],
}
"""Shapes of the same number of elements as (n, 3, h, w): the data length still matches."""
Mutation = tuple[str, tuple[str, ...], Any]
"""(kind, path to a field, value): drop, set, reshape, or cut / pad / flip the images' bytes."""


@st.composite
def mutations(draw: st.DrawFn) -> Mutation:
    kinds = ["drop", "other_type", "odd_value", "unknown_model", "reshape", "cut", "pad", "flip"]
    kind = draw(st.sampled_from(kinds))
    if kind == "unknown_model":
        return ("set", ("model",), draw(UNKNOWN_MODELS))
    if kind == "reshape":
        return ("reshape", ("images", "shape"), draw(st.sampled_from(sorted(RESHAPES))))
    if kind == "drop":
        return ("drop", draw(st.sampled_from(PATHS)), None)
    if kind == "other_type":
        return ("set", draw(st.sampled_from(PATHS)), draw(OTHER_TYPES))
    if kind == "odd_value":
        path = draw(st.sampled_from(sorted(ODD_VALUES)))
        return ("set", path, draw(ODD_VALUES[path]))
    if kind == "flip":
        return ("flip", ("images", "data"), draw(byte_flips()))
    return (kind, ("images", "data"), draw(st.integers(1, 64)))


def byte_flips() -> st.SearchStrategy[list[tuple[float, int]]]:
    """Where (a fraction of the length) to xor which byte."""
    where = st.floats(0.0, 1.0, exclude_max=True)
    return st.lists(st.tuples(where, st.integers(1, 255)), min_size=1, max_size=4)


BODY_EDITS = st.one_of(
    st.tuples(st.just("flip"), byte_flips()),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0, exclude_max=True)),
    st.tuples(st.just("tail"), st.binary(min_size=1, max_size=8)),
)
"""Edits of the whole encoded body, after the field mutations."""
TIMEOUTS_MS = st.sampled_from(["abc", "", "-1", "0", "nan", "inf", "1e-300", "1e309", "0.001"])
URL_MODELS = st.one_of(UNKNOWN_MODELS, st.sampled_from(MODELS))


@dataclass(frozen=True)
class Case:
    fields: dict[str, Any]
    mutations: list[Mutation]
    body_edit: tuple[str, Any] | None
    url_model: str | None = None
    """HTTP only: the URL's model when it is not the body's."""
    timeout_ms: str | None = None
    """HTTP only: the x-request-timeout-ms header; a tiny one may well answer 504."""
    framed: bool = False
    """HTTP only: a framed body (the images' data after the header) instead of msgpack."""

    @property
    def unmutated(self) -> bool:
        """The valid request as drawn: it must be answered."""
        edits = (self.body_edit, self.url_model, self.timeout_ms)
        return not self.mutations and all(edit is None for edit in edits)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    return Case(
        fields=draw(valid_fields()),
        mutations=draw(st.lists(mutations(), max_size=3)),
        body_edit=draw(st.one_of(st.none(), BODY_EDITS)),
        url_model=draw(st.one_of(st.none(), URL_MODELS)),
        framed=draw(st.booleans()),
        timeout_ms=draw(st.one_of(st.none(), TIMEOUTS_MS)),
    )


SMALL_IMAGE = {"model": "small", "images": Images(1, 8, 8, "uint8", 0)}
KNOWN_CASES = [
    Case(SMALL_IMAGE, [("set", ("temperature",), 1e-300)], None),
    Case(SMALL_IMAGE, [("set", ("temperature",), 5e-324)], None),
    Case({**SMALL_IMAGE, "output_dtype": "float16"}, [("set", ("temperature",), 1e-40)], None),
    Case(SMALL_IMAGE, [("set", ("images", "dtype"), ["uint8"])], None),
    Case(SMALL_IMAGE, [("set", ("images", "dtype"), {"uint8": 1})], None),
    Case(SMALL_IMAGE, [("set", ("images", "shape"), [64, 3, 1, 1])], None),
]
"""Inputs reported to answer 200 with inf / NaN, 500, or to compute long: always tried."""


def request_fields(case: Case) -> dict[str, Any]:
    """The case's request: its images made, then each mutation applied in turn."""
    fields = copy.deepcopy(case.fields)
    fields["images"] = fields["images"].tensor_map()
    for kind, path, value in case.mutations:
        parent = fields
        for key in path[:-1]:
            if not isinstance(parent.get(key), dict):
                parent[key] = {}
            parent = parent[key]
        leaf = path[-1]
        if kind == "drop":
            parent.pop(leaf, None)
        elif kind == "set":
            parent[leaf] = copy.deepcopy(value)
        elif kind == "reshape":
            shape = parent.get(leaf)
            if isinstance(shape, list) and len(shape) == 4 and all(type(d) is int for d in shape):
                parent[leaf] = RESHAPES[value](shape[0], shape[2], shape[3])
        elif isinstance(parent.get(leaf), bytes):
            parent[leaf] = edited_bytes(parent[leaf], kind, value)
    return fields


def edited_bytes(data: bytes, kind: str, value: Any) -> bytes:
    """cut / pad: that many bytes off or on; flip: xor bytes; truncate: keep a fraction; tail."""
    if kind == "cut":
        return data[: max(0, len(data) - int(value))]
    if kind == "pad":
        return data + b"\x01" * int(value)
    if kind == "tail":
        return data + bytes(value)
    if kind == "truncate":
        return data[: int(value * len(data))]
    edited = bytearray(data)
    for where, mask in value if data else ():
        edited[int(where * len(data))] ^= mask
    return bytes(edited)


# ---- protobuf of any field values ---------------------------------------------------------


def _numbers(descriptor: Any) -> dict[Any, int]:
    return {field.name: field.number for field in descriptor.fields}


REQUEST_NUMBERS = _numbers(pb.InferRequest.DESCRIPTOR)
NESTED_NUMBERS = {"images": _numbers(pb.Tensor.DESCRIPTOR), "mix": _numbers(pb.Mix.DESCRIPTOR)}
UNKNOWN_NUMBER = 15


def protobuf_body(fields: dict[Any, Any], numbers: dict[Any, int] = REQUEST_NUMBERS) -> bytes:
    """An InferRequest's bytes whatever the values' types, each written by its own type.

    The protobuf analogue of a msgpack map with wrong types: an int is a varint, a float a
    double, a str or bytes length-delimited, a map a nested message, a list of ints packed.
    A wire type that does not match the field's is kept as an unknown field by the parser.
    """
    body = b""
    for name, value in fields.items():
        nested = NESTED_NUMBERS.get(name, {}) if numbers is REQUEST_NUMBERS else {}
        body += _field(numbers.get(name, UNKNOWN_NUMBER), value, nested)
    return body


def _field(number: int, value: Any, nested: dict[Any, int]) -> bytes:
    if value is None:
        return b""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value % 2**64)
    if isinstance(value, float):
        return _varint(number << 3 | 1) + struct.pack("<d", value)
    if isinstance(value, list) and not all(isinstance(item, int) for item in value):
        return b"".join(_field(number, item, nested) for item in value)
    if isinstance(value, dict):
        payload = protobuf_body(value, nested)
    elif isinstance(value, list):
        payload = b"".join(_varint(item % 2**64) for item in value)
    else:
        payload = value.encode() if isinstance(value, str) else bytes(value)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# ---- the same request in the Open Inference Protocol, whatever its values' types ---------

V2_TYPES = {"uint8": "UINT8", "float16": "FP16", "bfloat16": "BF16", "float32": "FP32"}
V2_OUTPUT_TYPES = {"float32": "FP32", "float16": "FP16"}


def v2_parts(fields: dict[str, Any]) -> tuple[Any, Any, dict[str, Any], list[dict[str, Any]]]:
    """(model, id, parameters, inputs) of a v2 request carrying `fields`: each value where the
    protocol puts it (images and mix perm / box as inputs, the rest as request parameters),
    mutated values kept as they are; an input's `data` is bytes (binary) or any value."""
    parameters: dict[str, Any] = {}
    for name in ("temperature", "output", "top_k", "unknown"):
        if name in fields:
            parameters[name] = fields[name]
    if "output_dtype" in fields:
        value = fields["output_dtype"]
        parameters["output_dtype"] = (
            V2_OUTPUT_TYPES.get(value, value) if isinstance(value, str) else value
        )
    inputs: list[dict[str, Any]] = []
    images = fields.get("images")
    if isinstance(images, dict):
        dtype = images.get("dtype")
        inputs.append(
            {
                "name": "images",
                "datatype": V2_TYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype,
                "shape": images.get("shape"),
                "data": images.get("data"),
            }
        )
    elif images is not None:
        inputs.append({"name": "images", "datatype": "UINT8", "shape": [1], "data": images})
    mix = fields.get("mix")
    if isinstance(mix, dict):
        if "mode" in mix:
            parameters["mix"] = mix["mode"]
        if "lam" in mix:
            parameters["mix_lam"] = mix["lam"]
        for key, name in (("perm", "mix_perm"), ("box", "mix_box")):
            value = mix.get(key)
            if isinstance(value, list) and all(type(v) is int for v in value):
                data = b"".join(struct.pack("<Q", v % 2**64) for v in value)
                inputs.append(
                    {"name": name, "datatype": "INT64", "shape": [len(value)], "data": data}
                )
            elif key in mix:
                inputs.append({"name": name, "datatype": "INT64", "shape": [1], "data": value})
    elif mix is not None:
        parameters["mix"] = mix
    return fields.get("model"), fields.get("request_id"), parameters, inputs


def _json_able(value: Any) -> Any:
    if isinstance(value, bytes):
        return list(value)
    if isinstance(value, dict):
        return {str(k): _json_able(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_able(v) for v in value]
    return value


def v2_rest_body(fields: dict[str, Any]) -> tuple[bytes, int]:
    """Triton's binary-tensor form: bytes data travel after the JSON header."""
    _, request_id, parameters, inputs = v2_parts(fields)
    header: dict[str, Any] = {"inputs": []}
    blobs = []
    for tensor in inputs:
        item = {k: _json_able(v) for k, v in tensor.items() if k != "data" and v is not None}
        if isinstance(tensor["data"], bytes):
            item["parameters"] = {"binary_data_size": len(tensor["data"])}
            blobs.append(tensor["data"])
        elif tensor["data"] is not None:
            item["data"] = _json_able(tensor["data"])
        header["inputs"].append(item)
    header["parameters"] = {"binary_data_output": True, **_json_able(parameters)}
    if request_id is not None:
        header["id"] = _json_able(request_id)
    head = json.dumps(header).encode()
    return head + b"".join(blobs), len(head)


def _parameter(message: Any, value: Any) -> None:
    if isinstance(value, bool):
        message.bool_param = value
    elif isinstance(value, int) and -(2**63) <= value < 2**63:
        message.int64_param = value
    elif isinstance(value, int) and 0 <= value < 2**64:
        message.uint64_param = value
    elif isinstance(value, float):
        message.double_param = value
    elif isinstance(value, str):
        message.string_param = value
    else:
        message.string_param = repr(value)


def v2_grpc_body(fields: dict[str, Any]) -> bytes:
    """A ModelInferRequest with raw contents; values of a type the message cannot hold are
    written as their repr (a string) or left out."""
    model, request_id, parameters, inputs = v2_parts(fields)
    message = v2.ModelInferRequest(
        model_name=model if isinstance(model, str) else repr(model),
        id=request_id if isinstance(request_id, str) else "",
    )
    for key, value in parameters.items():
        _parameter(message.parameters[key], value)
    for tensor in inputs:
        shape = tensor["shape"]
        ints = isinstance(shape, list) and all(type(d) is int and abs(d) < 2**63 for d in shape)
        datatype = tensor["datatype"]
        message.inputs.add(
            name=tensor["name"],
            datatype=datatype if isinstance(datatype, str) else repr(datatype),
            shape=shape if ints else [],
        )
        data = tensor["data"]
        message.raw_input_contents.append(data if isinstance(data, bytes) else b"")
    return message.SerializeToString()


def send_v2_rest(transports: Transports, case: Case, fields: dict[str, Any]) -> str | None:
    body, header_length = v2_rest_body(fields)
    if case.body_edit is not None:
        body = edited_bytes(body, *case.body_edit)
    model = fields.get("model")
    if case.url_model is not None:
        model = case.url_model
    elif not isinstance(model, str) or not model:
        model = "small"
    path = f"/v2/models/{urllib.parse.quote(model, safe='')}/infer"
    headers = {oip.HEADER_LENGTH: str(min(header_length, len(body)))}
    response = transports.http.post(path, content=body, headers=headers)
    return assert_v2_rest_answer(response)


# ---- answers ------------------------------------------------------------------------------


def assert_finite(result: Any) -> None:
    for name in ("logits", "top_k_values"):
        tensor = getattr(result, name)
        assert tensor is None or bool(torch.isfinite(tensor).all()), f"{name} not finite: {tensor}"
    indices = result.top_k_indices
    assert indices is None or bool(((indices >= 0) & (indices < NUM_CLASSES)).all()), indices


def assert_http_answer(response: httpx.Response, *, timed: bool) -> str | None:
    """2xx with finite tensors (None), or the error table's 4xx and JSON error body (its name).

    A request that set its own timeout (`timed`) may also be the table's 504.
    """
    if response.is_success:
        framed = response.headers["content-type"] == wire.FRAMED_CONTENT_TYPE
        decode = wire.result_from_framed if framed else wire.result_from_msgpack
        assert_finite(decode(response.content))
        return None
    answer = f"HTTP {response.status_code}: {response.text[:500]}"
    expired = timed and response.status_code == ROWS["deadline_exceeded"].http
    assert 400 <= response.status_code < 500 or expired, answer
    error = response.json()["error"]
    assert error["name"] in ROWS, answer
    row = ROWS[error["name"]]
    assert (row.http, row.grpc) == (response.status_code, error["code"]), answer
    assert error["message"], answer
    return f"{error['name']}: {error['message']}"


def assert_grpc_answer(
    infer: Any, body: bytes, check: Callable[[bytes], None] | None = None
) -> str | None:
    """OK with finite tensors (None), or a code of the error table with its name (the name).

    `check` asserts on an OK answer's bytes (default: our InferResponse's tensors finite).
    """
    try:
        answer = infer(body, metadata=GRPC_AUTH, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        code = error.code()
        details = f"gRPC {code.name}: {error.details()}"
        assert code not in SERVER_FAULTS, details
        trailing: Any = error.trailing_metadata()  # (key, value) pairs, whatever the stubs say
        name = dict(trailing or ()).get(wire.ERROR_NAME_KEY)
        assert name in ROWS and ROWS[name].grpc == code.name, f"{details} (name {name!r})"
        return f"{name}: {error.details()}"
    if check is None:
        assert_finite(wire.result_from_protobuf(answer))
    else:
        check(answer)
    return None


def assert_v2_finite(outputs: list[tuple[str, str, list[int], bytes]]) -> None:
    dtypes = {"FP32": torch.float32, "FP16": torch.float16, "INT32": torch.int32}
    for name, datatype, shape, data in outputs:
        tensor = torch.frombuffer(bytearray(data), dtype=dtypes[datatype]).view(shape)
        if name == "top_k_indices":
            assert bool(((tensor >= 0) & (tensor < NUM_CLASSES)).all()), tensor
        else:
            assert bool(torch.isfinite(tensor).all()), f"{name} not finite: {tensor}"


def assert_v2_rest_answer(response: httpx.Response) -> str | None:
    """2xx with finite tensors (None), or a 4xx with the protocol's `{"error": message}`."""
    if response.is_success:
        size = int(response.headers.get(oip.HEADER_LENGTH, len(response.content)))
        header = json.loads(response.content[:size])
        outputs, offset = [], size
        for out in header["outputs"]:
            if "data" in out:  # a JSON answer (binary_data_output was mutated)
                assert all(math.isfinite(v) for v in out["data"]), out
                continue
            length = out["parameters"]["binary_data_size"]
            data = response.content[offset : offset + length]
            outputs.append((out["name"], out["datatype"], out["shape"], data))
            offset += length
        assert_v2_finite(outputs)
        return None
    answer = f"HTTP {response.status_code}: {response.text[:500]}"
    assert 400 <= response.status_code < 500, answer
    error = response.json()["error"]
    assert isinstance(error, str) and error, answer
    return f"v2 {response.status_code}: {error}"


def assert_v2_grpc_finite(answer: bytes) -> None:
    """An OK ModelInferResponse's raw outputs are finite."""
    message = v2.ModelInferResponse.FromString(answer)
    assert_v2_finite(
        [
            (out.name, out.datatype, list(out.shape), raw)
            for out, raw in zip(message.outputs, message.raw_output_contents, strict=True)
        ]
    )


class ServerLog(logging.Handler):
    """The log records emitted while it is attached (the server runs in this process)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @contextlib.contextmanager
    def attached(self) -> Iterator[ServerLog]:
        loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
        for logger in loggers:
            logger.addHandler(self)
        try:
            yield self
        finally:
            for logger in loggers:
                logger.removeHandler(self)

    def assert_quiet(self, requests: int) -> None:
        """No error, no traceback, at most one warning line per request."""
        lines = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.records]
        assert not [r for r in self.records if r.levelno >= logging.ERROR or r.exc_info], lines
        assert len(self.records) <= requests, lines


@dataclass
class Transports:
    http: httpx.Client
    infer: Any
    v2_infer: Any


@pytest.fixture(scope="module")
def transports(server: ServerThread) -> Iterator[Transports]:
    """One HTTP client and one gRPC channel for every example (a fresh one per call is slower)."""
    with (
        httpx.Client(
            base_url=server.endpoints.http_url, headers=AUTH, timeout=CALL_TIMEOUT_S
        ) as http,
        grpc.insecure_channel(f"127.0.0.1:{server.endpoints.grpc_port}") as channel,
    ):
        v2_method = f"/{oip.GRPC_SERVICE}/ModelInfer"
        yield Transports(
            http,
            channel.unary_unary(INFER_METHOD, None, None),
            channel.unary_unary(v2_method, None, None),
        )


LIVENESS = Case(SMALL_IMAGE, [], None)


def framed_body(fields: dict[str, Any]) -> bytes:
    """The fields as a framed body: the images' data (whatever its type: bytes follow the
    header, anything else stays in it) after a header of the other fields."""
    header = copy.copy(fields)
    images = header.get("images")
    tail = b""
    if isinstance(images, dict) and isinstance(images.get("data"), bytes):
        header["images"] = {key: value for key, value in images.items() if key != "data"}
        tail = images["data"]
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<I", len(packed)) + packed + tail


def send(transports: Transports, transport: str, case: Case) -> str | None:
    """The case's request over one transport: None if it was answered, else the refusal."""
    fields = request_fields(case)
    if currently_in_test_context():
        note(f"{transport} request: {preview_fields(fields)}")
    if transport == "v2_rest":
        return send_v2_rest(transports, case, fields)
    if transport == "v2_grpc":
        body = v2_grpc_body(fields)
        if case.body_edit is not None:
            body = edited_bytes(body, *case.body_edit)
        return assert_grpc_answer(transports.v2_infer, body, check=assert_v2_grpc_finite)
    if transport == "grpc":
        body = protobuf_body(fields)
        if not case.mutations:
            assert pb.InferRequest.FromString(body) == pb.InferRequest.FromString(
                protobuf_request(fields)
            ), "this file's protobuf encoder differs from the helpers'"
        if case.body_edit is not None:
            body = edited_bytes(body, *case.body_edit)
        return assert_grpc_answer(transports.infer, body)
    body = framed_body(fields) if case.framed else msgpack.packb(fields, use_bin_type=True)
    if case.body_edit is not None:
        body = edited_bytes(body, *case.body_edit)
    model = fields.get("model")
    if case.url_model is not None:
        model = case.url_model
    elif not isinstance(model, str) or not model:
        model = "small"
    path = f"/v1/models/{urllib.parse.quote(model, safe='')}/infer"
    headers = {
        "content-type": wire.FRAMED_CONTENT_TYPE if case.framed else wire.MSGPACK_CONTENT_TYPE
    }
    if case.timeout_ms is not None:
        headers[wire.TIMEOUT_HEADER] = case.timeout_ms
    response = transports.http.post(path, content=body, headers=headers)
    return assert_http_answer(response, timed=case.timeout_ms is not None)


@pytest.mark.parametrize("transport", TRANSPORTS)
@FUZZ
@given(case=cases())
def test_mutated_requests_get_finite_tensors_or_a_table_error(
    transports: Transports, transport: str, case: Case
) -> None:
    refusal = answered_and_still_serving(transports, transport, case)
    assert refusal is None or not case.unmutated, f"a valid request was refused: {refusal}"
    event("answered" if refusal is None else refusal.split(":")[0])


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", KNOWN_CASES, ids=lambda case: repr(case.mutations[0][1:]))
def test_inputs_that_once_failed(transports: Transports, transport: str, case: Case) -> None:
    answered_and_still_serving(transports, transport, case)


def answered_and_still_serving(transports: Transports, transport: str, case: Case) -> str | None:
    """The case's answer is finite or a table error, quietly, and a valid request follows."""
    with ServerLog().attached() as server_log:
        refusal = send(transports, transport, case)
        after = send(transports, transport, LIVENESS)
        assert after is None, f"a valid request was refused after this one: {after}"
    server_log.assert_quiet(requests=1)
    return refusal


def preview_fields(fields: Any) -> Any:
    """The fields as a failure report shows them: long bytes as their length and first bytes."""
    if isinstance(fields, dict):
        return {key: preview_fields(value) for key, value in fields.items()}
    if isinstance(fields, bytes) and len(fields) > 16:
        return f"<{len(fields)} bytes {fields[:8]!r}...>"
    return fields


def test_the_server_still_serves_after_fuzzing(server: ServerThread) -> None:
    """On fresh connections, with the helpers' own encoders."""
    fields = request_fields(LIVENESS)
    assert post(server, fields).status_code == 200
    assert grpc_status(server, fields) == grpc.StatusCode.OK
