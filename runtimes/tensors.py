"""Tensor data: Open Inference Protocol datatypes to numpy and back, in JSON lists and in raw bytes.

Raw bytes are the layout shared by gRPC ``raw_input_contents`` / ``raw_output_contents`` and Triton's HTTP
binary-data extension: little-endian, row-major; each BYTES element is prefixed with its length as a 4-byte
little-endian unsigned integer.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from runtimes.errors import InvalidInput

# Casts whose lost values the runtime reports itself: a value too large for its float datatype becomes an infinity,
# which _check_infinities turns into the client's 400, and a NaN or a fraction cast to an integer output is the
# data plane's 500 naming it (dataplane.lost_value). numpy's own "overflow" / "invalid value encountered in cast"
# warnings (once per process, naming no request) would only put noise on the runtime's stderr. A filter rather
# than np.errstate around the casts: that would cost every request, this costs nothing, and it hides those two
# warnings raised from this module only.
warnings.filterwarnings(
    "ignore", message="(overflow|invalid value) encountered in cast", category=RuntimeWarning, module=__name__
)

#: The typed field of InferTensorContents for each datatype; FP16 has none (raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

DATATYPES: tuple[str, ...] = tuple(_DTYPES)
#: The range of a shape dimension: int64 in the protocol and in protobuf (gRPC, stage calls, span export).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

#: The little-endian dtype of each fixed-size datatype: the raw wire layout (made once, not per tensor).
_WIRE: dict[str, np.dtype[Any]] = {name: dtype.newbyteorder("<") for name, dtype in _DTYPES.items() if name != "BYTES"}

_LENGTH = struct.Struct("<I")


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of an OIP datatype (object for BYTES); InvalidInput for an unknown datatype."""
    try:
        return _DTYPES[datatype]
    except KeyError:
        raise InvalidInput(f"unknown datatype {datatype!r}; known datatypes: {', '.join(DATATYPES)}") from None


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The OIP datatype of a numpy dtype (strings and bytes are BYTES)."""
    if dtype.kind in "OSU":
        return "BYTES"
    for datatype, candidate in _DTYPES.items():
        if candidate == dtype:
            return datatype
    raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")


def element_count(shape: Sequence[int]) -> int:
    """Number of elements of a tensor of ``shape`` (1 for a scalar)."""
    return math.prod(shape)


def format_shape(shape: Iterable[int]) -> str:
    """A shape as the clients wrote it, e.g. ``[-1, 4]``."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _to_bytes(element: object) -> bytes:
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):
        return element.encode("utf-8")
    if isinstance(element, bytearray | memoryview | np.bytes_):
        return bytes(element)
    # Models may return numbers or other objects in a BYTES output: send their text.
    return str(element).encode("utf-8")


def as_bytes_array(values: Iterable[object]) -> np.ndarray:
    """A 1-D object array whose elements are ``bytes``, from str/bytes elements."""
    items = [_to_bytes(v) for v in values]
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array


def text_array(name: str, array: np.ndarray) -> np.ndarray:
    """A BYTES input's elements as ``str`` (UTF-8), same shape, for frameworks that compare text (sklearn
    categories, ONNX string tensors); InvalidInput naming ``name`` if an element is not UTF-8."""
    flat = array.reshape(-1)
    texts = np.empty(flat.size, dtype=np.object_)
    for index, element in enumerate(flat):
        if isinstance(element, bytes):
            try:
                texts[index] = element.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(
                    f"input {name!r}: BYTES element {index} is not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from None
        else:
            texts[index] = element if isinstance(element, str) else str(element)
    return texts.reshape(array.shape)


def _flatten(data: object) -> list[object]:
    # Only for BYTES: numpy would turn nested lists of strings into a fixed-width unicode array.
    if not isinstance(data, list | tuple):
        return [data]
    flat: list[object] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list | tuple):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


class JsonConstant(float):
    """A NaN, Infinity or -Infinity that the JSON text spelled as that token (the JSON decoder's parse_constant).

    A JSON number past FP64's range (1e400) also reads as infinity, but as a plain float: the type tells the two
    apart, so that only the tokens are taken as infinities (as Triton reads them) and the number is refused.
    """

    __slots__ = ()


def decode_json_data(name: str, datatype: str, data: object) -> np.ndarray:
    """Decode a JSON tensor's ``data`` (flat or nested list) into a flat numpy array of ``datatype``; a value that
    does not fit ``datatype`` is refused, naming its position in the flattened data."""
    dtype = numpy_dtype(datatype)
    if datatype == "BYTES":
        elements = _flatten(data)
        for element in elements:
            if not isinstance(element, str):
                raise InvalidInput(f"input {name!r}: BYTES data must be strings, got {type(element).__name__}")
        try:
            return as_bytes_array(elements)
        except UnicodeEncodeError as exc:
            # JSON escapes can spell lone surrogates ("\\udc80"), which are not text and have no UTF-8 form.
            raise InvalidInput(f"input {name!r}: BYTES data is not valid Unicode text: {exc.reason}") from None
    # numpy would convert anything it can: "1.5" and 1.5 to INT32 1, "abc" to BOOL true, null to NaN. So the data is
    # read as JSON gave it first, and its kind is checked against the datatype before the (range-checked) cast.
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input {name!r}: data is not a flat or nested list of {datatype} values ({exc})") from None
    expected, allowed = _JSON_KINDS[dtype.kind]
    if values.size and dtype.kind in "iu" and values.dtype.kind in "fO":
        values = _exact_integers(name, datatype, data, values)
    if values.size and values.dtype.kind not in allowed:
        found = _KIND_NAMES.get(values.dtype.kind, "mixed or null values")
        raise InvalidInput(f"input {name!r}: {datatype} data must be {expected}, got {found}")
    if dtype.kind in "iu":
        return fit_integers(name, datatype, values.reshape(-1))
    flat = values.astype(dtype, copy=False).reshape(-1)
    # One pass over the (usually finite) result; what made a value infinite is looked for only when one is.
    if dtype.kind == "f" and flat.size and not np.isfinite(flat).all():
        _check_infinities(name, datatype, data, values.reshape(-1), flat)
    return flat


def fit_integers(name: str, datatype: str, values: np.ndarray) -> np.ndarray:
    """Integer ``values`` (any integer dtype, flat) as ``datatype``; InvalidInput naming the first that does not fit."""
    dtype = numpy_dtype(datatype)
    if not values.size or values.dtype == dtype:
        return values
    info = np.iinfo(dtype)
    if values.min() < info.min or values.max() > info.max:
        position = int(np.flatnonzero((values < info.min) | (values > info.max))[0])
        raise _not_an_integer_of(name, datatype, values[position].item(), position)
    return values.astype(dtype)


def _not_an_integer_of(name: str, datatype: str, value: object, position: int) -> InvalidInput:
    info = np.iinfo(numpy_dtype(datatype))
    return InvalidInput(
        f"input {name!r}: value {value!r} at position {position} does not fit {datatype} ({info.min} to {info.max})"
    )


def _check_infinities(name: str, datatype: str, data: object, source: np.ndarray, cast: np.ndarray) -> None:
    # NaN is a value like any other (a missing feature, to XGBoost or LightGBM); an infinity is one only where the
    # client wrote one. A finite number that became infinite did not fit the datatype (FP32 1e39, FP16 70000).
    elements: list[object] | None = None
    for position in np.flatnonzero(np.isinf(cast)).tolist():
        value = source[position].item()
        if isinstance(value, int) or math.isfinite(value):
            largest = float(np.finfo(numpy_dtype(datatype)).max)
            raise InvalidInput(
                f"input {name!r}: value {value!r} at position {position} is outside the {datatype} range "
                f"(largest magnitude {largest:.8g})"
            )
        if elements is None:
            elements = _flatten(data)
        if not isinstance(elements[position], JsonConstant):
            raise InvalidInput(
                f"input {name!r}: the number at position {position} is outside the FP64 range, so outside the "
                f"{datatype} range too (write Infinity or -Infinity for an infinity)"
            )


def _exact_integers(name: str, datatype: str, data: object, values: np.ndarray) -> np.ndarray:
    # Integers past INT64 next to small ones make numpy choose float64 (or object for past UINT64), which is not a
    # reason to refuse them: convert the JSON values exactly, once they are known to be whole numbers.
    if values.dtype.kind == "f" and not np.array_equal(values, np.trunc(values)):
        return values  # really fractional (or NaN): refused by the caller with the usual message
    try:
        return np.asarray(data, dtype=numpy_dtype(datatype))
    except (ValueError, TypeError, OverflowError):
        pass
    info = np.iinfo(numpy_dtype(datatype))
    for position, element in enumerate(_flatten(data)):
        if isinstance(element, int | float) and not info.min <= element <= info.max:
            raise _not_an_integer_of(name, datatype, element, position) from None
    raise InvalidInput(f"input {name!r}: {datatype} data must be integers that fit {datatype}") from None


#: numpy kind of a datatype -> (what its JSON data must be, numpy kinds of JSON data accepted for it).
_JSON_KINDS = {"b": ("true/false", "b"), "i": ("integers", "iu"), "u": ("integers", "iu"), "f": ("numbers", "iuf")}
_KIND_NAMES = {"b": "true/false", "i": "integers", "u": "integers", "f": "non-integer numbers", "U": "strings"}


def encode_json_data(array: np.ndarray) -> list[Any]:
    """A tensor's data as a flat JSON list (BYTES as text)."""
    flat = array.reshape(-1)
    if flat.dtype == np.object_:
        return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in flat]
    return list(flat.tolist())


def decode_raw(name: str, datatype: str, raw: bytes | memoryview, count: int | None = None) -> np.ndarray:
    """Decode one tensor's raw bytes into a flat numpy array of ``datatype``; BYTES data holding more than
    ``count`` elements is refused before it is split further."""
    dtype = numpy_dtype(datatype)
    if datatype == "BYTES":
        return as_bytes_array(_split_bytes(name, bytes(raw), count))
    wire = _WIRE[datatype]
    if len(raw) % wire.itemsize:
        raise InvalidInput(
            f"input {name!r}: {len(raw)} bytes of raw data is not a whole number of {datatype} elements "
            f"({wire.itemsize} bytes each)"
        )
    if datatype == "BOOL":
        # Any non-zero byte is true; reinterpreting bytes such as 0x02 as numpy bools would give values that are
        # neither True nor False. The comparison makes the copy a model may write into.
        return np.not_equal(np.frombuffer(raw, dtype=np.uint8), 0)
    # A copy: the model may modify its inputs in place, and the wire buffer is read-only.
    return np.frombuffer(raw, dtype=wire).astype(dtype, copy=True)


def _split_bytes(name: str, raw: bytes, count: int | None) -> list[bytes]:
    elements: list[bytes] = []
    offset, end = 0, len(raw)
    while offset < end:
        if count is not None and len(elements) >= count:
            # Every 4 bytes can be one (empty) element: splitting all of them is the expensive part.
            raise InvalidInput(
                f"input {name!r}: the raw BYTES data holds more than the {count} elements its shape needs"
            )
        if end - offset < _LENGTH.size:
            raise InvalidInput(f"input {name!r}: raw BYTES data is truncated (a length prefix is cut short)")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if end - offset < length:
            raise InvalidInput(f"input {name!r}: raw BYTES data is truncated (an element of {length} bytes)")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def encode_raw(array: np.ndarray, datatype: str) -> bytes:
    """A tensor's raw little-endian bytes (BYTES elements length-prefixed)."""
    if datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(b)) + b for b in (_to_bytes(v) for v in array.reshape(-1)))
    wire = _WIRE.get(datatype)
    if wire is None:
        wire = numpy_dtype(datatype).newbyteorder("<")
    return np.ascontiguousarray(array, dtype=wire).tobytes()


def cast(array: object, datatype: str) -> np.ndarray:
    """``array`` converted to the numpy dtype of ``datatype`` (raises ValueError/TypeError if impossible)."""
    dtype = numpy_dtype(datatype)
    if datatype == "BYTES":
        values = np.asarray(array, dtype=np.object_)
        return as_bytes_array(values.reshape(-1)).reshape(values.shape)
    if type(array) is np.ndarray and array.dtype == dtype:
        # What astype(copy=False) would return, without its argument parsing (every output of every request).
        return array
    return np.asarray(array).astype(dtype, copy=False)


def zeros(datatype: str, shape: Sequence[int]) -> np.ndarray:
    """A tensor of zeros (empty byte strings for BYTES), used for the warm-up call."""
    if datatype == "BYTES":
        return as_bytes_array([b""] * element_count(shape)).reshape(tuple(shape))
    return np.zeros(tuple(shape), dtype=numpy_dtype(datatype))


class JsonData:
    """An input's ``data`` from a JSON request body (flat or nested list)."""

    __slots__ = ("data",)

    def __init__(self, data: object) -> None:
        self.data = data

    def decode(self, name: str, datatype: str, count: int | None = None) -> np.ndarray:
        """The data as a flat array of ``datatype`` (already parsed: ``count`` bounds nothing here)."""
        return decode_json_data(name, datatype, self.data)


class RawData:
    """An input's raw bytes (gRPC ``raw_input_contents`` or an HTTP binary-data segment)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes | memoryview) -> None:
        self.raw = raw

    def decode(self, name: str, datatype: str, count: int | None = None) -> np.ndarray:
        """The bytes as a flat array of ``datatype`` (BYTES split no further than ``count`` elements)."""
        return decode_raw(name, datatype, self.raw, count)
