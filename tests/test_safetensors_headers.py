"""lcsc_fast.safetensors_io: headers read and checked without touching tensor data.

Unit tests of parse_header / read_header on valid files (entries agree with the safetensors
library byte for byte) and on each kind of damage (a CheckpointError naming the file and the
tensor), then a property test: valid files written by safetensors.torch.save, corrupted at
random (byte flips, truncations, insertions into the JSON text, random JSON values for dtype /
shape / data_offsets, random header length fields, ...). read_header must either return a
Header whose entries are all consistent with the file (known dtypes, sizes matching shapes,
ranges inside the data section and not overlapping) or raise CheckpointError, never anything
else; and a file the safetensors library reads (dtypes lcsc_fast knows, no duplicate keys) must
be read the same way.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import safetensors
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from lcsc_fast.safetensors_io import (MAX_HEADER_NBYTES, SAFETENSORS_DTYPES, CheckpointError,
                                      Header, TensorEntry, parse_header, read_header)

NAME = "ckpt.safetensors"


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_of(dtype: torch.dtype, shape) -> torch.Tensor:
    """Deterministic contents (the value pattern is what the byte comparisons check)."""
    numel = math.prod(shape)
    if dtype == torch.bool:
        return (torch.arange(numel) % 3 == 0).reshape(shape)
    return (torch.arange(numel) % 100 - 37).to(dtype).reshape(shape)


def sample() -> dict:
    return {"w": tensor_of(torch.float32, (2, 3)), "b": tensor_of(torch.float16, (4,)),
            "n": tensor_of(torch.int64, ()), "e": tensor_of(torch.float32, (0, 2)),
            "m": tensor_of(torch.bool, (3,)), "z": tensor_of(torch.bfloat16, (5,))}


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def header_bytes(obj) -> bytes:
    """A header's bytes from bytes, a JSON text, or an object to serialise."""
    if isinstance(obj, bytes):
        return obj
    return (obj if isinstance(obj, str) else json.dumps(obj)).encode()


def file_of(header, body: bytes = b"") -> bytes:
    raw = header_bytes(header)
    return len(raw).to_bytes(8, "little") + raw + body


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def assert_matches_safetensors(header: Header, data: bytes) -> None:
    """header's entries are exactly the tensors the safetensors library reads from data."""
    reference = dict(safetensors.deserialize(bytes(data)))
    assert set(header.entries) == set(reference)
    for name, info in reference.items():
        e = header.entries[name]
        assert isinstance(e, TensorEntry) and e.name == name
        assert e.dtype == SAFETENSORS_DTYPES[info["dtype"]]
        assert e.shape == tuple(info["shape"])
        assert data[e.begin:e.begin + e.nbytes] == bytes(info["data"]), name


# ================================================================ valid files

def test_valid_file(tmp_path):
    tensors = sample()
    data = save(tensors, metadata={"step": "100", "format": "pt"})
    path = write(tmp_path / NAME, data)
    header = read_header(path)
    assert header.path == path and header.file_nbytes == len(data)
    assert header.metadata == {"step": "100", "format": "pt"}
    assert_matches_safetensors(header, data)
    n = int.from_bytes(data[:8], "little")
    for name, t in tensors.items():
        e = header.entries[name]
        assert e.dtype == t.dtype and e.shape == tuple(t.shape)
        assert e.nbytes == t.numel() * t.element_size()
        assert e.begin >= 8 + n  # absolute offsets, inside the data section
    assert read_header(tmp_path / NAME) == header  # a PathLike works too


def test_parse_header_offsets_are_absolute():
    raw = header_bytes({"a": entry("F32", (2,), (0, 8)), "b": entry("I8", (3,), (8, 11))})
    header = parse_header(raw, 8 + len(raw) + 11, "x")
    assert header.entries["a"] == TensorEntry("a", torch.float32, (2,), 8 + len(raw), 8)
    assert header.entries["b"] == TensorEntry("b", torch.int8, (3,), 8 + len(raw) + 8, 3)
    assert header.metadata == {} and header.path == "x"


@pytest.mark.parametrize("name", list(SAFETENSORS_DTYPES))
def test_every_known_dtype(name):
    dtype = SAFETENSORS_DTYPES[name]
    size = 3 * itemsize(dtype)
    raw = header_bytes({"t": entry(name, (3, 1), (0, size))})
    e = parse_header(raw, 8 + len(raw) + size).entries["t"]
    assert e.dtype == dtype and e.shape == (3, 1) and e.nbytes == size


def test_every_known_dtype_matches_safetensors(tmp_path):
    tensors = {name: tensor_of(dtype, (2, 2)) for name, dtype in SAFETENSORS_DTYPES.items()}
    data = save(tensors)
    assert_matches_safetensors(read_header(write(tmp_path / NAME, data)), data)


def test_empty_tensors_and_touching_ranges():
    """Zero-size tensors overlap nothing (even at one offset, even at the end of the file);
    ranges that only touch ([0, 8) and [8, 16)) do not overlap."""
    raw = header_bytes({"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (2,), (8, 16)),
                        "e1": entry("F32", (0,), (8, 8)), "e2": entry("BF16", (0, 5), (8, 8)),
                        "e3": entry("U8", (0,), (16, 16)), "s": entry("I64", (), (16, 24))})
    header = parse_header(raw, 8 + len(raw) + 24)
    assert {k: e.nbytes for k, e in header.entries.items()} == {
        "a": 8, "b": 8, "e1": 0, "e2": 0, "e3": 0, "s": 8}


def test_header_filling_the_whole_file(tmp_path):
    raw = header_bytes({"a": entry("U8", (0,), (0, 0))})
    header = read_header(write(tmp_path / NAME, file_of(raw)))
    assert header.file_nbytes == 8 + len(raw) and header.entries["a"].nbytes == 0


def test_header_only_file(tmp_path):
    header = read_header(write(tmp_path / NAME, file_of("{}")))
    assert header.entries == {} and header.metadata == {}


# ================================================================ damaged headers

BAD_HEADERS = {  # id -> (header JSON text or object, data section bytes, message fragments)
    "invalid-utf8": (b'{"a\xff": {}}', 0, ["UTF-8"]),
    "invalid-json": ('{"a": {"dtype": "F32",', 0, ["not valid JSON"]),
    "empty-text": ("", 0, ["not valid JSON"]),
    "list": ("[]", 0, ["not a JSON object"]),
    "string": ('"F32"', 0, ["not a JSON object"]),
    "null": ("null", 0, ["not a JSON object"]),
    "duplicate-tensor": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                         '"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8,
                         ["'a'", "twice"]),
    "duplicate-field": ('{"a": {"dtype": "F32", "dtype": "F16", "shape": [2], '
                        '"data_offsets": [0, 8]}}', 8, ["'dtype'", "twice"]),
    "metadata-list": ({"__metadata__": ["x"]}, 0, ["__metadata__"]),
    "metadata-int-value": ({"__metadata__": {"step": 100}}, 0, ["__metadata__['step'] is 100"]),
    # Falsy values are not "no metadata" either: only an absent or null __metadata__ is.
    "metadata-empty-list": ({"__metadata__": []}, 0, ["__metadata__ is []"]),
    "metadata-empty-string": ({"__metadata__": ""}, 0, ['__metadata__ is ""']),
    "metadata-zero": ({"__metadata__": 0}, 0, ["__metadata__ is 0"]),
    "metadata-false": ({"__metadata__": False}, 0, ["__metadata__ is false"]),
    "metadata-null-value": ({"__metadata__": {"step": None}}, 0, ["__metadata__['step'] is null"]),
    "entry-list": ({"a": [0, 8]}, 8, ["'a'"]),
    "entry-string": ({"a": "F32"}, 8, ["'a'"]),
    "dtype-missing": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, 8, ["'a'", "dtype"]),
    "dtype-unknown": ({"a": entry("F8_E4M3", (2,), (0, 2))}, 2, ["'a'", "F8_E4M3"]),
    "dtype-lowercase": ({"a": entry("f32")}, 8, ["'a'", "'f32'"]),
    "dtype-list": ({"a": entry(["F32"])}, 8, ["'a'", "dtype"]),
    "shape-missing": ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, 8, ["'a'", "shape"]),
    "shape-int": ({"a": {**entry(), "shape": 2}}, 8, ["'a'", "shape"]),
    "shape-negative": ({"a": entry(shape=(-2,))}, 8, ["'a'", "shape"]),
    "shape-float": ({"a": entry(shape=(2.0,))}, 8, ["'a'", "shape"]),
    "shape-bool": ({"a": entry(shape=(True, True))}, 8, ["'a'", "shape"]),
    "shape-null": ({"a": entry(shape=(None,))}, 8, ["'a'", "shape"]),
    "offsets-missing": ({"a": {"dtype": "F32", "shape": [2]}}, 8, ["'a'", "data_offsets"]),
    "offsets-one": ({"a": entry(offsets=(8,))}, 8, ["'a'", "data_offsets"]),
    "offsets-three": ({"a": entry(offsets=(0, 4, 8))}, 8, ["'a'", "data_offsets"]),
    "offsets-float": ({"a": entry(offsets=(0.0, 8.0))}, 8, ["'a'", "data_offsets"]),
    "offsets-bool": ({"a": entry("U8", (1,), (False, True))}, 8, ["'a'", "data_offsets"]),
    "offsets-negative": ({"a": entry(offsets=(-8, 0))}, 8, ["'a'", "data_offsets"]),
    "offsets-reversed": ({"a": entry(offsets=(8, 0))}, 8, ["'a'", "data_offsets"]),
    "span-too-short": ({"a": entry(shape=(3,))}, 12, ["'a'", "span 8", "needs 12"]),
    "span-too-long": ({"a": entry(shape=(1,))}, 8, ["'a'", "span 8", "needs 4"]),
    "huge-shape": ({"a": entry(shape=(2**40, 2**40))}, 8, ["'a'", "span"]),
    "past-the-end": ({"a": entry(offsets=(4, 12))}, 8, ["'a'", "past the end", "truncated"]),
    "empty-past-the-end": ({"a": entry(shape=(0,), offsets=(9, 9))}, 8, ["'a'", "past the end"]),
    "overlap-partial": ({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, 12,
                        ["'a'", "'b'", "overlap"]),
    "overlap-inside": ({"a": entry("F32", (4,), (0, 16)), "b": entry("U8", (2,), (4, 6))}, 16,
                       ["'a'", "'b'", "overlap"]),
    "overlap-identical": ({"a": entry(), "b": entry()}, 8, ["'a'", "'b'", "overlap"]),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_damaged_header(tmp_path, case):
    """parse_header and read_header raise CheckpointError naming the file and what is wrong."""
    header, data_nbytes, fragments = BAD_HEADERS[case]
    raw = header_bytes(header)
    with pytest.raises(CheckpointError) as info:
        parse_header(raw, 8 + len(raw) + data_nbytes, NAME)
    for fragment in [NAME, *fragments]:
        assert fragment in str(info.value), (fragment, str(info.value))
    path = write(tmp_path / NAME, file_of(raw, bytes(data_nbytes)))
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    for fragment in [path, *fragments]:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_deeply_nested_header():
    raw = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(CheckpointError, match=NAME):
        parse_header(raw, 8 + len(raw), NAME)


def test_header_with_a_huge_integer_literal():
    raw = b'{"a": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}'
    with pytest.raises(CheckpointError, match=NAME):
        parse_header(raw, 8 + len(raw) + 4, NAME)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("data, fragment", [
    (b"", "too short"),
    (b"\x02\x00\x00\x00\x00\x00\x00", "too short"),
    ((100).to_bytes(8, "little") + b"{}", "runs past the end"),
    ((2**64 - 1).to_bytes(8, "little") + b"{}", "runs past the end"),
    ((3).to_bytes(8, "little") + b"{}", "runs past the end"),
], ids=["empty", "7-bytes", "length-beyond-file", "length-max", "length-one-past"])
def test_read_header_file_level_errors(tmp_path, data, fragment):
    path = write(tmp_path / NAME, data)
    with pytest.raises(CheckpointError, match=fragment) as info:
        read_header(path)
    assert path in str(info.value)


def test_read_header_header_larger_than_safetensors_allows(tmp_path):
    """A header length above the safetensors limit is refused without reading it (the file is
    sparse: nothing is written)."""
    path = tmp_path / NAME
    with open(path, "wb") as f:
        f.write((MAX_HEADER_NBYTES + 1).to_bytes(8, "little"))
        f.truncate(MAX_HEADER_NBYTES + 64)
    with pytest.raises(CheckpointError, match="larger than safetensors allows"):
        read_header(path)


def test_read_header_unreadable_paths(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read") as info:
        read_header(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(info.value)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_header(tmp_path)  # a directory


# ================================================================ property: random corruption

DTYPE_CHOICES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                 torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
NAMES = st.text(alphabet="abcxyz._0129", min_size=1, max_size=6)
SHAPES = st.lists(st.integers(0, 4), max_size=3).map(tuple)
STATES = st.dictionaries(NAMES, st.tuples(st.sampled_from(DTYPE_CHOICES), SHAPES),
                         min_size=1, max_size=4)
METADATA = st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)

JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**66, 2**66) | st.integers(-3, 64)
                | st.floats() | st.text(max_size=5)
                | st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3",
                                   "U16", "f32", "", "__metadata__"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=2),
                           max_leaves=6)
TOKENS = st.sampled_from(['{', '}', '[', ']', ',', ':', '"', '0', '-1', '1e3', '7', 'null',
                          'true', '"F32"', '\\', '\\u0000', '\\ud800', '\x00', 'é', ' ', '{}',
                          '"a": 1', '"__metadata__": {}', ', "x": {"dtype": "U8", "shape": '
                          '[1], "data_offsets": [0, 1]}']) | st.text(max_size=4)


def split(data: bytes):
    """(header length field, header bytes, rest); the header bytes as far as the file has them."""
    n = int.from_bytes(data[:8].ljust(8, b"\0"), "little")
    return n, data[8:8 + n], data[8 + n:]


def _parsed(data: bytes):
    n, raw, body = split(data)
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None, body
    return (obj, body) if isinstance(obj, dict) else (None, body)


def _rejoin(obj, body, data):
    return file_of(json.dumps(obj), body) if obj is not None else data


def op_flip(frac, xor):
    def apply(data):
        if not data:
            return data
        i = min(int(frac * len(data)), len(data) - 1)
        return data[:i] + bytes([data[i] ^ xor]) + data[i + 1:]
    return apply


def op_truncate(frac):
    return lambda data: data[:int(frac * len(data))]


def op_insert(frac, token, fix_length):
    def apply(data):
        n, raw, body = split(data)
        i = int(frac * len(raw))
        new = raw[:i] + token.encode("utf-8", "surrogatepass") + raw[i:]
        length = len(new) if fix_length else n
        return length.to_bytes(8, "little") + new + body
    return apply


def op_set_field(which, field, value):
    def apply(data):
        obj, body = _parsed(data)
        names = sorted(k for k in obj or {} if k != "__metadata__" and isinstance(obj[k], dict))
        if not names:
            return data
        obj[names[which % len(names)]][field] = value
        return _rejoin(obj, body, data)
    return apply


def op_nudge_offset(which, end, delta):
    def apply(data):
        obj, body = _parsed(data)
        names = sorted(k for k in obj or {} if k != "__metadata__" and isinstance(obj[k], dict))
        if not names:
            return data
        offsets = obj[names[which % len(names)]].get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) for o in offsets):
            offsets[end] += delta
        return _rejoin(obj, body, data)
    return apply


def op_copy_offsets(src, dst):
    """Give one tensor another's byte range (overlaps, or size mismatches)."""
    def apply(data):
        obj, body = _parsed(data)
        names = sorted(k for k in obj or {} if k != "__metadata__" and isinstance(obj[k], dict))
        if len(names) < 2:
            return data
        a, b = names[src % len(names)], names[dst % len(names)]
        obj[b]["data_offsets"] = obj[a].get("data_offsets")
        return _rejoin(obj, body, data)
    return apply


def op_delete(which, field):
    def apply(data):
        obj, body = _parsed(data)
        if not obj:
            return data
        name = sorted(obj)[which % len(obj)]
        if field is None or not isinstance(obj[name], dict):
            del obj[name]
        else:
            obj[name].pop(field, None)
        return _rejoin(obj, body, data)
    return apply


def op_length(value, relative):
    def apply(data):
        n = int.from_bytes(data[:8].ljust(8, b"\0"), "little")
        length = max(0, n + value) % 2**64 if relative else value
        return length.to_bytes(8, "little") + data[8:]
    return apply


def op_append(extra):
    return lambda data: data + extra


FRAC = st.floats(0, 1, exclude_max=True)
OPS = st.one_of(
    st.builds(op_flip, FRAC, st.integers(1, 255)),
    st.builds(op_truncate, FRAC),
    st.builds(op_insert, FRAC, TOKENS, st.booleans()),
    st.builds(op_set_field, st.integers(0, 3), st.sampled_from(["dtype", "shape",
                                                                "data_offsets"]), JSON_VALUES),
    st.builds(op_nudge_offset, st.integers(0, 3), st.integers(0, 1), st.integers(-9, 9)),
    st.builds(op_copy_offsets, st.integers(0, 3), st.integers(0, 3)),
    st.builds(op_delete, st.integers(0, 4), st.sampled_from([None, "dtype", "shape",
                                                             "data_offsets"])),
    st.builds(op_length, st.integers(0, 2**64 - 1), st.just(False)),
    st.builds(op_length, st.integers(-16, 16), st.just(True)),
    st.builds(op_append, st.binary(min_size=1, max_size=16)),
)


def build(state: dict, metadata) -> bytes:
    return save({name: tensor_of(dtype, shape) for name, (dtype, shape) in state.items()},
                metadata=metadata)


def assert_consistent(header: Header, data: bytes) -> None:
    """Everything a merge relies on: known dtypes, sizes matching shapes, ranges inside the
    file's data section, no two non-empty ranges overlapping."""
    n = int.from_bytes(data[:8], "little")
    data_start = 8 + n
    assert header.file_nbytes == len(data)
    assert isinstance(header.metadata, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())
    spans = []
    for name, e in header.entries.items():
        assert isinstance(name, str) and e.name == name and name != "__metadata__"
        assert e.dtype in SAFETENSORS_DTYPES.values()
        assert isinstance(e.shape, tuple) and all(
            type(d) is int and d >= 0 for d in e.shape)
        assert e.nbytes == math.prod(e.shape) * itemsize(e.dtype)
        assert data_start <= e.begin and e.begin + e.nbytes <= len(data)
        if e.nbytes:
            spans.append((e.begin, e.begin + e.nbytes))
    spans.sort()
    for (_, end0), (begin1, _) in zip(spans, spans[1:]):
        assert begin1 >= end0


def safetensors_reads(data: bytes):
    try:
        return dict(safetensors.deserialize(bytes(data)))
    except Exception:  # noqa: BLE001 - any refusal by the reference library
        return None


def _has_duplicate_keys(raw: bytes) -> bool:
    found = []

    def hook(pairs):
        keys = [k for k, _ in pairs]
        found.append(len(keys) != len(set(keys)))
        return dict(pairs)

    try:
        json.loads(raw, object_pairs_hook=hook)
    except (ValueError, RecursionError):
        return False
    return any(found)


def _lcsc_readable(raw: bytes) -> bool:
    """Headers lcsc_fast may refuse by design although safetensors reads them: duplicate keys,
    dtypes it does not know, and "__metadata__": null."""
    if _has_duplicate_keys(raw):
        return False
    obj = json.loads(raw)
    if "__metadata__" in obj and obj["__metadata__"] is None:
        return False
    return all(v["dtype"] in SAFETENSORS_DTYPES for k, v in obj.items() if k != "__metadata__")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("headers") / NAME


PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(state=STATES, metadata=METADATA, ops=st.lists(OPS, min_size=1, max_size=3))
def test_corrupted_headers_are_consistent_or_refused(scratch, state, metadata, ops):
    """read_header on a randomly corrupted file: a consistent Header or CheckpointError, nothing
    else; when the safetensors library reads the file too (and nothing lcsc_fast refuses by
    design is in it), both see the same tensors at the same bytes."""
    data = build(state, metadata)
    for op in ops:
        data = op(data)
    path = write(scratch, data)
    try:
        header = read_header(path)
    except CheckpointError as e:
        assert path in str(e)
        header = None
    event("read_header: accepted" if header is not None else "read_header: CheckpointError")
    if header is not None:
        assert_consistent(header, data)
    if safetensors_reads(data) is not None and _lcsc_readable(split(data)[1]):
        event("safetensors reads it too")
        assert header is not None, "safetensors reads this file but read_header refuses it"
        assert_matches_safetensors(header, data)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(state=STATES, metadata=METADATA)
def test_valid_files_read_like_safetensors(scratch, state, metadata):
    data = build(state, metadata)
    header = read_header(write(scratch, data))
    assert_consistent(header, data)
    assert_matches_safetensors(header, data)
    assert header.metadata == (metadata or {})
