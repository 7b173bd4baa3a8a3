"""Safetensors headers read and checked without touching tensor data, and read-only mappings.

A safetensors file is an 8-byte little-endian header length n, n bytes of UTF-8 JSON mapping each
tensor name to its dtype, shape and [begin, end) byte range in the data section that follows,
then the data. Writing goes through the safetensors library; reading for merges needs the byte
ranges themselves (the engine reads tensors in place, from the mapped file), so the header is
parsed and checked here, strictly: a bad file is refused when the trajectory is opened, with an
error naming the file and the tensor, never later as a crash.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import warnings
from array import array
from dataclasses import dataclass, field, replace

import torch

__all__ = ["CheckpointError", "TensorEntry", "Header", "read_header", "parse_header",
           "MappedFile", "naming_changed_files", "SAFETENSORS_DTYPES"]

# safetensors dtype name -> torch dtype; the engine merges F32/F16/BF16, the rest is copied.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_NBYTES = 100 * 2**20  # the safetensors library's own limit


class CheckpointError(ValueError):
    """A checkpoint file or set of files that cannot be used; the message names what and where."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    path: str
    file_nbytes: int
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    # read_header: (st_dev, st_ino, st_size, st_mtime_ns) of the file read, for MappedFile
    file_id: tuple[int, int, int, int] | None = field(default=None, compare=False)


def _file_id(st: os.stat_result) -> tuple[int, int, int, int]:
    """Which file this is and which version of it: a file rewritten in place keeps its device
    and inode but gets a new modification time (and perhaps size); a replaced one is another."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_header(path: str | os.PathLike) -> Header:
    """Read and check the header of a safetensors file; tensor data is not read."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            file_nbytes = stat.st_size
            if file_nbytes < 8:
                raise CheckpointError(f"{path}: {file_nbytes} bytes is too short for a "
                                      "safetensors file (truncated?)")
            n = int.from_bytes(f.read(8), "little")
            if n > file_nbytes - 8:
                raise CheckpointError(f"{path}: the header length ({n} bytes) runs past the end "
                                      f"of the file ({file_nbytes} bytes); the file is truncated "
                                      "or not a safetensors file")
            if n > MAX_HEADER_NBYTES:
                raise CheckpointError(f"{path}: a {n}-byte header is larger than safetensors "
                                      f"allows ({MAX_HEADER_NBYTES} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror})") from e
    return replace(parse_header(raw, file_nbytes, path), file_id=_file_id(stat))


def _reject_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise CheckpointError(f"the key {dup!r} appears twice")
    return dict(pairs)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(raw: bytes, file_nbytes: int, path: str = "<header>") -> Header:
    """Check a header's bytes against the file's size; raises CheckpointError naming the tensor."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: the header is not valid UTF-8 ({e.reason} at byte "
                              f"{e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the header is not valid JSON ({e.msg} at character "
                              f"{e.pos})") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: the header is not valid: {e}") from None
    except (ValueError, RecursionError) as e:  # integers too long to parse, nesting too deep
        raise CheckpointError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is None:  # absent or null: none
        metadata = {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is {json.dumps(metadata)[:80]}; it must be "
                              "an object mapping strings to strings (or absent)")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise CheckpointError(f"{path}: __metadata__[{key!r}] is {json.dumps(value)[:80]}; "
                                  "__metadata__ must map strings to strings")

    data_start = 8 + len(raw)
    entries = {}
    for name, info in obj.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: expected an object with dtype, shape, data_offsets")
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"),
                                                                       str) else None
        if dtype is None:
            raise CheckpointError(f"{where}: unknown dtype {info.get('dtype')!r}; known: "
                                  f"{', '.join(SAFETENSORS_DTYPES)}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative "
                                  "integers")
        offsets = info.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end] with "
                                  "0 <= begin <= end")
        itemsize = dtype.itemsize
        expected = math.prod(shape) * itemsize
        begin, end = offsets
        if end - begin != expected:
            raise CheckpointError(f"{where}: data_offsets span {end - begin} bytes but a "
                                  f"{info['dtype']} tensor of shape {shape} needs {expected}")
        if data_start + end > file_nbytes:
            raise CheckpointError(f"{where}: its data ends at byte {data_start + end}, past the "
                                  f"end of the file ({file_nbytes} bytes); the file is truncated")
        entries[name] = TensorEntry(name, dtype, tuple(shape), data_start + begin, expected)

    spans = sorted((e.begin, e.begin + e.nbytes, e.name) for e in entries.values() if e.nbytes)
    for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise CheckpointError(f"{path}: tensors {name0!r} and {name1!r} overlap in the file")
    return Header(path, file_nbytes, entries, metadata)


class MappedFile:
    """A read-only memory map of a whole file. The engine reads tensors through address + offset;
    nothing is copied, and nothing is read until a merge touches it."""

    def __init__(self, path: str, expected_nbytes: int,
                 file_id: tuple[int, int, int, int] | None = None):
        """expected_nbytes: the file's size when its header was read; file_id: its
        Header.file_id, to refuse a file replaced or rewritten since."""
        self.path = path
        self.nbytes = expected_nbytes
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._file_id = _file_id(os.fstat(self._fd))
            self.check_unchanged()
            if file_id is not None and file_id != self._file_id:
                raise CheckpointError(f"{path}: the file was replaced or written to after its "
                                      "header was read; open the trajectory again")
            if expected_nbytes == 0:  # mmap refuses empty files; there is nothing to read
                self._map, self._bytes = None, torch.empty(0, dtype=torch.uint8)
            else:
                self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
                with warnings.catch_warnings():
                    # A read-only buffer: torch warns that the tensor is not writable. It never
                    # is written: the engine only reads sources.
                    warnings.simplefilter("ignore", UserWarning)
                    self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        except BaseException:
            os.close(self._fd)
            raise
        self.address = self._bytes.data_ptr()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def change(self) -> str | None:
        """How the file changed since it was opened ("shrank from 200 to 100 bytes", ...), or
        None: same size and modification time. One fstat of the open file, which is the file
        mapped: a file replaced by a rename is not seen, nor need it be (the mapping holds the
        old one)."""
        if self.closed:
            return None
        now = _file_id(os.fstat(self._fd))
        if now[2] < self.nbytes:
            return f"shrank from {self.nbytes} to {now[2]} bytes"
        if now != self._file_id:
            size = "" if now[2] == self._file_id[2] else f", {self._file_id[2]} -> {now[2]} bytes"
            return f"was written to in place (new modification time{size})"
        return None

    def check_unchanged(self) -> None:
        """Refuse a file changed since it was opened: one that shrank would fault, one rewritten
        in place would be read as garbage at the old header's offsets. ValueError once closed."""
        if self.closed:
            raise ValueError(f"{self.path}: the file was closed with its trajectory; open the "
                             "trajectory again")
        change = self.change()
        if change is not None:
            raise CheckpointError(f"{self.path}: the file {change} since the trajectory was "
                                  "opened; open the trajectory again")

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        """A copy of one tensor's data."""
        raw = self.read(entry.begin, entry.nbytes)
        return raw.view(entry.dtype).reshape(entry.shape) if entry.nbytes else torch.empty(
            entry.shape, dtype=entry.dtype)

    def read(self, begin: int, nbytes: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Bytes [begin, begin + nbytes) copied into out (a uint8 CPU tensor, new by default).

        The copy runs in the native engine under its fault guard: a file that shrank since it
        was opened raises instead of killing the process with SIGBUS.
        """
        from . import _C

        self.check_unchanged()
        if not 0 <= begin <= begin + nbytes <= self.nbytes:
            raise CheckpointError(f"{self.path}: bytes [{begin}, {begin + nbytes}) are outside "
                                  f"the file ({self.nbytes} bytes)")
        if out is None:
            out = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            with naming_changed_files([self]):
                _C.copy_regions(array("Q", [out.data_ptr()]), array("Q", [self.address + begin]),
                                array("q", [nbytes]), 1)
        return out

    def advise(self, begin: int, nbytes: int, advice: int) -> None:
        """madvise on the pages covering [begin, begin + nbytes) (a hint: errors are ignored)."""
        if nbytes <= 0 or self._map is None:
            return
        start = begin - begin % mmap.PAGESIZE
        end = min(begin + nbytes, self.nbytes)
        if advice == mmap.MADV_DONTNEED:  # only whole pages inside the range: neighbours stay
            start = begin + (-begin) % mmap.PAGESIZE
            end -= end % mmap.PAGESIZE if end < self.nbytes else 0
            if end <= start:
                return
        try:
            self._map.madvise(advice, start, end - start)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Close the file and drop the mapping; tensors still viewing it keep it until they go.
        mmap.close() would unmap under them: torch.frombuffer holds a reference to the mmap,
        not a buffer export that would make close() refuse, so the mapping is left to go with
        its last reference."""
        if self._fd < 0:
            return
        self._bytes = torch.empty(0, dtype=torch.uint8)
        self._map = None
        os.close(self._fd)
        self._fd = -1


@contextlib.contextmanager
def naming_changed_files(files):
    """Re-raise the native fault guard's RuntimeError (a SIGBUS reading a mapped file, which
    names no file) naming those of files (MappedFiles) that changed since they were opened."""
    try:
        yield
    except RuntimeError as e:
        changed = [f"{f.path} {change}" for f in files if (change := f.change()) is not None]
        if "SIGBUS" not in str(e) or not changed:
            raise
        raise RuntimeError(f"{e} ({'; '.join(changed)}; open the trajectory again)") from None
