"""Recording the checkpoints LCSC merges: cheap for the training loop, safe on disk.

Recorder(model, directory, every) snapshots the model's floating-point state every `every`
steps into one safetensors file per snapshot, listed in a manifest. The training thread only
copies the state to host memory; one background thread writes, fsyncs and lists the files.

On-disk format (what Trajectory.open reads):

    <dir>/manifest.json
    <dir>/step-00000100.safetensors          8-digit zero-padded step (more digits when needed)
    <dir>/ema/manifest.json                  only with ema=...; same format, same steps
    <dir>/ema/step-00000100.safetensors
    <dir>/.recorder-tmp/                     files being written (see crash safety); no others

    manifest.json: {"format": "lcsc_fast.trajectory", "version": 1, "every": 100,
                    "snapshots": [{"step": 100, "file": "step-00000100.safetensors",
                                   "nbytes": 123456}, ...]}

`file` is relative to the manifest's directory, `nbytes` is the file's size (so a reader can
tell a truncated file), snapshots are in ascending step order. A snapshot holds the state_dict
entries that are floating point (integer ones such as num_batches_tracked are skipped) under
their state_dict names, with metadata {"step": "<step>", "format": "lcsc_fast.snapshot"}; with
include=..., only the entries it selects (a LoRA run's adapters, say, without the frozen base).

Crash safety. Every file is written first in <dir>/.recorder-tmp/, fsynced, renamed to its
final name with os.replace, and the directory is fsynced; a snapshot is listed only after that,
by rewriting the manifest the same way. So a process killed at any moment leaves a valid
manifest that lists only complete, durable snapshots; what else it may leave is a temporary
file in .recorder-tmp/ (safetensors' save_file writes through a ".tmpXXXXXX" of its own beside
its target, so there too) or a complete snapshot that is not listed yet. A Recorder started on
the directory removes the former and lists the latter (after checking that it is a complete
safetensors file of this model), or moves it to <dir>/discarded/ when it is not. Files the user
recorded are moved, never deleted, and outside .recorder-tmp/ the only files removed are the
temporary names an older lcsc_fast wrote beside the snapshots (manifest.json.tmp,
step-*.safetensors.tmp); its ".tmpXXXXXX" are left alone, since a user's file may have such a
name. It does so only once it has accepted the directory as its own: one it refuses (another
program's manifest, another `every`, ...) is left exactly as it was, its temporary files
included.
"""

from __future__ import annotations

import json
import operator
import os
import re
import sys
import threading
import weakref
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._io import chmod_default, fsync_dir

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so no guard against two Recorders
    fcntl = None

__all__ = ["Recorder"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lcsc_fast.trajectory"
MANIFEST_VERSION = 1
SNAPSHOT_FORMAT = "lcsc_fast.snapshot"
EMA_DIR = "ema"
DISCARDED_DIR = "discarded"
LOCK_NAME = ".recorder.lock"
TMP_DIR = ".recorder-tmp"  # the Recorder's temporary files, and nothing else
LEGACY_TMP_SUFFIX = ".tmp"  # an older Recorder's temporary files: <final name>.tmp

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SNAPSHOT_NAME = re.compile(r"step-(\d{8,})\.safetensors")


def snapshot_file_name(step: int) -> str:
    """The file name of step's snapshot: step-00000100.safetensors (8 digits or more)."""
    return f"step-{step:08d}.safetensors"


def _snapshot_step(name: str) -> int | None:
    """The step of a snapshot file name, or None for any other name (only exact round trips:
    step-000000100.safetensors is not ours)."""
    m = _SNAPSHOT_NAME.fullmatch(name)
    if m is None or snapshot_file_name(int(m[1])) != name:
        return None
    return int(m[1])


# ---------------------------------------------------------------- file operations
# Module-level, and called through the module's globals, so tests can inject failures and
# simulated kills between any two of them.

def _save_file(tensors: dict, path: str, metadata: dict) -> None:
    """Write tensors to path as a safetensors file, mode 0666 less the umask, and fsync it."""
    save_file(tensors, path, metadata=metadata)
    chmod_default(path)
    fd = os.open(path, os.O_RDONLY)  # fsync flushes the file's data whatever the open mode
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(data: bytes, path: str) -> None:
    """Write data to path and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace(src: str, dst: str) -> None:
    os.replace(src, dst)


# A module attribute of its own: the crash-simulation tests intercept each file operation here.
_fsync_dir = fsync_dir


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_atomically(path: str, write) -> None:
    """write(tmp) to a file of path's name in .recorder-tmp/ beside it, then rename it to path
    and fsync the directory: path is either its old content or the complete new one at any
    moment. safetensors' save_file writes through a ".tmpXXXXXX" beside its target, so this
    keeps that one in .recorder-tmp/ as well, where a restart can tell it is ours."""
    tmp_dir = os.path.join(os.path.dirname(path), TMP_DIR)
    os.makedirs(tmp_dir, exist_ok=True)
    tmp = os.path.join(tmp_dir, os.path.basename(path))
    try:
        write(tmp)
    except Exception:
        _remove_quietly(tmp)  # an ordinary failure (disk full) should not leave a big file
        raise
    _replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _move_aside(path: str, discarded: str) -> str:
    """Move path into directory `discarded` without overwriting anything there (a name that is
    taken gets ~1, ~2, ... before its extension); returns the new path."""
    os.makedirs(discarded, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    dst = os.path.join(discarded, stem + ext)
    n = 0
    while os.path.lexists(dst):
        n += 1
        dst = os.path.join(discarded, f"{stem}~{n}{ext}")
    os.rename(path, dst)
    return dst


def manifest_text(every: int, snapshots: list[dict]) -> str:
    """manifest.json's content: valid JSON with one snapshot per line, for people reading it."""
    head = json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "every": every})
    entries = ",\n ".join(json.dumps({"step": s["step"], "file": s["file"], "nbytes": s["nbytes"]})
                          for s in snapshots)
    return head[:-1] + ', "snapshots": [' + (f"\n {entries}\n" if entries else "") + "]}\n"


def _read_snapshot_header(path: str) -> tuple[dict, dict]:
    """({name: shape}, metadata) of a complete safetensors file. Raises ValueError saying what is
    wrong when the file is truncated, padded or not safetensors at all (safetensors checks that
    the header covers the file exactly)."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # SafetensorError, OSError: all mean "not a usable snapshot"
        raise ValueError(f"{type(e).__name__}: {e}") from None
    return shapes, metadata


def _describe_mismatch(a: dict, b: dict, a_name: str, b_name: str) -> str:
    """How two {name: shape} dicts differ, naming a few tensors of each kind."""
    parts = []
    only_a = [n for n in a if n not in b]
    if only_a:
        parts.append(f"only in {a_name}: {_few(only_a)}")
    only_b = [n for n in b if n not in a]
    if only_b:
        parts.append(f"only in {b_name}: {_few(only_b)}")
    shapes = [f"{n!r} is {list(a[n])} in {a_name} but {list(b[n])} in {b_name}"
              for n in a if n in b and tuple(a[n]) != tuple(b[n])]
    if shapes:
        parts.append("; ".join(shapes[:5]) + (f" (and {len(shapes) - 5} more)"
                                               if len(shapes) > 5 else ""))
    return "; ".join(parts)


def _few(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# ---------------------------------------------------------------- one manifest and its files

class _Stream:
    """One manifest and its snapshot files: the model's (<dir>) or the EMA module's (<dir>/ema).

    The training thread owns `buffers` (host copies reused between snapshots) and changes
    `snapshots` only while the writer is idle; the writer thread appends to `snapshots`.
    """

    def __init__(self, label: str, module: torch.nn.Module, directory: str, every: int,
                 names: list[str] | None = None):
        self.label = label  # "model" or "ema", for messages
        self.module = module
        self.directory = directory
        self.every = every
        self.selected = names is not None  # include=...: only these entries are recorded
        self.shapes = _float_shapes(module, label, names)  # {name: shape}, state_dict order
        self.snapshots: list[dict] = []  # manifest entries, ascending steps
        self.buffers: dict[str, tuple[torch.Tensor, bool]] = {}  # name -> (buffer, pinned)

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.directory, MANIFEST_NAME)

    @property
    def discarded(self) -> str:
        return os.path.join(self.directory, DISCARDED_DIR)

    # -- training thread

    def copy_state(self, dtype: torch.dtype | None, cuda_devices: set) -> dict[str, torch.Tensor]:
        """Host copies of the module's floating-point state, converted to dtype (None keeps
        each tensor's). CUDA tensors are copied without blocking into pinned buffers; their
        devices are added to cuda_devices so the caller can record an event on each."""
        out = {}
        state = self.module.state_dict()
        for name, t in state.items():
            if not t.is_floating_point() or (self.selected and name not in self.shapes):
                continue
            if self.shapes.get(name) != tuple(t.shape):
                out = None  # named below
                break
            want = t.dtype if dtype is None else dtype
            pinned = t.is_cuda
            buf, buf_pinned = self.buffers.get(name, (None, False))
            if buf is None or buf.dtype != want or buf_pinned != pinned:
                # Allocated once and reused: a fresh allocation per snapshot would page-fault
                # the whole model in again (and pinning is slow).
                buf = torch.empty(t.shape, dtype=want, pin_memory=pinned)
                self.buffers[name] = (buf, pinned)
            if pinned:
                buf.copy_(t, non_blocking=True)
                cuda_devices.add(t.device)
            else:
                buf.copy_(t)  # synchronous: training mutates t right after step() returns
            out[name] = buf
        if out is None or len(out) != len(self.shapes):
            now = {n: tuple(t.shape) for n, t in state.items() if t.is_floating_point()
                   and (not self.selected or n in self.shapes)}
            raise ValueError(
                f"the {self.label}'s floating-point state changed since the Recorder was "
                f"created ({_describe_mismatch(now, self.shapes, 'it now', 'it then')})"
                "; one trajectory must hold one architecture, so record the changed model into "
                "a new directory")
        return out

    # -- writer thread (or the training thread while the writer is idle)

    def write_snapshot(self, step: int, tensors: dict, metadata: dict) -> None:
        name = snapshot_file_name(step)
        path = os.path.join(self.directory, name)
        _write_atomically(path, lambda tmp: _save_file(tensors, tmp, metadata))
        self.snapshots.append({"step": step, "file": name, "nbytes": os.path.getsize(path)})

    def write_manifest(self) -> None:
        data = manifest_text(self.every, self.snapshots).encode()
        _write_atomically(self.manifest_path, lambda tmp: _write_bytes(data, tmp))

    # -- start-up

    def remove_stale_tmp(self, manifest_only: bool = False) -> None:
        """Remove the temporary files a killed Recorder left: every file in .recorder-tmp/, and
        the names an older lcsc_fast wrote beside the snapshots (manifest.json.tmp,
        step-*.safetensors.tmp). Other names are left alone, an older lcsc_fast's .tmpXXXXXX
        included: a user's file may have such a name. manifest_only: the directory has no
        manifest yet, and a Recorder writes its manifest before any snapshot, so of the older
        names only manifest.json.tmp can be a Recorder's there."""
        tmp_dir = os.path.join(self.directory, TMP_DIR)
        for name in os.listdir(tmp_dir) if os.path.isdir(tmp_dir) else ():
            path = os.path.join(tmp_dir, name)
            if os.path.isfile(path):
                os.remove(path)
        for name in os.listdir(self.directory):
            if name == MANIFEST_NAME + LEGACY_TMP_SUFFIX:
                ours = True
            else:
                ours = (not manifest_only and name.endswith(LEGACY_TMP_SUFFIX)
                        and _snapshot_step(name[:-len(LEGACY_TMP_SUFFIX)]) is not None)
            path = os.path.join(self.directory, name)
            if ours and os.path.isfile(path):
                os.remove(path)

    def read_manifest(self) -> bool:
        """Load the existing manifest into `snapshots`; False when there is none. Raises
        ValueError naming the problem when it is malformed, has another `every`, or lists a
        file that is missing or has another size."""
        path = self.manifest_path
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return False
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); it was not written by "
                             "lcsc_fast.Recorder (whose manifests are always complete). Move it "
                             "away or record into a new directory") from None
        fix = "record into a new directory"
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"{path}: format is {found!r}, expected {MANIFEST_FORMAT!r}; this "
                             f"is not an lcsc_fast trajectory, so {fix}")
        if doc.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: version {doc.get('version')!r} is not one this "
                             f"lcsc_fast writes (version {MANIFEST_VERSION}); upgrade lcsc_fast "
                             f"or {fix}")
        if doc.get("every") != self.every:
            raise ValueError(f"{path}: the snapshots there were recorded with "
                             f"every={doc.get('every')!r}, but this Recorder has "
                             f"every={self.every}; pass every={doc.get('every')!r} to append "
                             f"to them, or {fix}")
        snapshots = doc.get("snapshots")
        if not isinstance(snapshots, list):
            raise ValueError(f"{path}: 'snapshots' is not a list; {fix}")
        last = -1
        for i, s in enumerate(snapshots):
            ok = (isinstance(s, dict) and all(isinstance(s.get(k), int)
                                              and not isinstance(s.get(k), bool)
                                              for k in ("step", "nbytes"))
                  and isinstance(s.get("file"), str))
            if not ok:
                raise ValueError(f"{path}: snapshots[{i}] is {s!r}, not an entry "
                                 "{'step': int, 'file': str, 'nbytes': int}; " + fix)
            if os.path.isabs(s["file"]) or ".." in re.split(r"[/\\]", s["file"]):
                raise ValueError(f"{path}: snapshots[{i}] names {s['file']!r}, which is outside "
                                 f"{self.directory}; {fix}")
            if s["step"] <= last:
                raise ValueError(f"{path}: snapshots[{i}] has step {s['step']} after step "
                                 f"{last}; steps must ascend, so {fix}")
            last = s["step"]
            file = os.path.join(self.directory, s["file"])
            try:
                size = os.path.getsize(file)
            except OSError:
                size = None
            if size != s["nbytes"]:
                problem = "is missing" if size is None else f"has {size} bytes"
                raise ValueError(f"{path} lists {s['file']} with {s['nbytes']} bytes, but the "
                                 f"file {problem}; the directory was changed outside "
                                 f"lcsc_fast.Recorder. Restore the file, or {fix}")
        self.snapshots = [{"step": s["step"], "file": s["file"], "nbytes": s["nbytes"]}
                          for s in snapshots]
        return True

    def check_against_last(self) -> None:
        """The last listed snapshot has exactly the module's tensor names and shapes."""
        if not self.snapshots:
            return
        path = os.path.join(self.directory, self.snapshots[-1]["file"])
        try:
            shapes, _ = _read_snapshot_header(path)
        except ValueError as e:
            raise ValueError(f"{path} is listed in the manifest but cannot be read ({e}); "
                             "restore it, or record into a new directory") from None
        if shapes != self.shapes:
            diff = _describe_mismatch(self.shapes, shapes, f"the {self.label}",
                                      self.snapshots[-1]["file"])
            other = " (or ones recorded with another include=)" if self.selected else ""
            raise ValueError(f"{self.directory} holds snapshots of a different {self.label}"
                             f"{other} ({diff}); record this {self.label} into a new directory")

    def unlisted(self) -> tuple[dict[int, str], list[str]]:
        """({step: path} of unlisted snapshot files that are complete snapshots of this module
        after the last listed step, [paths of every other unlisted snapshot file])."""
        listed = {s["file"] for s in self.snapshots}
        last = self.snapshots[-1]["step"] if self.snapshots else -1
        good, bad = {}, []
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:  # <dir>/ema before the first Recorder with ema= made it
            return good, bad
        for name in names:
            step = _snapshot_step(name)
            if step is None or name in listed:
                continue
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                continue
            try:
                shapes, metadata = _read_snapshot_header(path)
                valid = (step > last and shapes == self.shapes
                         and metadata.get("format") == SNAPSHOT_FORMAT
                         and metadata.get("step") == str(step))
            except ValueError:  # truncated or not safetensors
                valid = False
            if valid:
                good[step] = path
            else:
                bad.append(path)
        return good, bad


def _float_shapes(module, label: str, names: list[str] | None = None) -> dict[str, tuple]:
    """{name: shape} of the floating-point state entries to record: all of them, or `names`."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{label}: expected a torch.nn.Module, got {type(module).__name__}")
    state = module.state_dict()
    if names is not None:
        lacking = [n for n in names if n not in state or not state[n].is_floating_point()]
        if lacking:
            raise ValueError(f"{label}: include= selected {_few(lacking)} on the model, but the "
                             f"{label}'s state_dict has no such floating-point entries; the model "
                             f"and the {label} must have the same architecture")
        wanted = set(names)
        return {n: tuple(t.shape) for n, t in state.items() if n in wanted}
    shapes = {n: tuple(t.shape) for n, t in state.items() if t.is_floating_point()}
    if not shapes:
        raise ValueError(f"{label}: its state_dict has no floating-point tensors, so there is "
                         "nothing to record")
    return shapes


def _selected_names(model, include) -> list[str] | None:
    """The state_dict names include= selects on the model (None: every floating-point entry)."""
    if include is None:
        return None
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    floats = [n for n, t in model.state_dict().items() if t.is_floating_point()]
    if isinstance(include, str) and include == "trainable":
        trainable = {n for n, p in model.named_parameters(remove_duplicate=False)
                     if p.requires_grad}
        names = [n for n in floats if n in trainable]
    elif callable(include):
        names = [n for n in floats if include(n)]
    else:
        raise TypeError(f"include: expected None, 'trainable' or a callable name -> bool, got "
                        f"{include!r}")
    if not names:
        raise ValueError(f"include={include!r} selects none of the model's floating-point "
                         "state_dict entries, so there is nothing to record")
    return names


# ---------------------------------------------------------------- background writer

@dataclass
class _Job:
    step: int
    parts: list  # [(stream, {name: host tensor})], model first
    events: list = field(default_factory=list)  # CUDA events the host copies complete at

    def write(self) -> None:
        """Both snapshot files first, then both manifests: whatever a kill interrupts, the
        files a manifest lists exist, and a restart can list the rest (see the module doc)."""
        for ev in self.events:
            ev.synchronize()
        metadata = {"step": str(self.step), "format": SNAPSHOT_FORMAT}
        for stream, tensors in self.parts:
            stream.write_snapshot(self.step, tensors, metadata)
        for stream, _ in self.parts:
            stream.write_manifest()


class _Writer:
    """One background thread writing at most one job at a time. It references no Recorder,
    so an abandoned Recorder can be garbage-collected (and its finalizer flush this)."""

    def __init__(self, name: str):
        self._cond = threading.Condition()
        self._job: _Job | None = None
        self._stopping = False
        self.error: tuple[int, BaseException] | None = None  # (step, exception); writer stops
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._stopping:
                    self._cond.wait()
                job = self._job
            if job is None:
                return
            try:
                job.write()
            except BaseException as e:  # reported from the training thread; nothing after it
                with self._cond:
                    self.error = (job.step, e)
                    self._job = None
                    self._cond.notify_all()
                return
            with self._cond:
                self._job = None
                self._cond.notify_all()

    def wait_idle(self) -> None:
        """Return once no job is pending (written, or failed: check `error`)."""
        with self._cond:
            while self._job is not None:
                self._cond.wait()

    def submit(self, job: _Job) -> None:
        """Hand over a job; the caller has waited for idle and checked `error`."""
        with self._cond:
            assert self._job is None and self.error is None
            self._job = job
            self._cond.notify_all()

    def stop(self) -> None:
        """Write the pending job, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()


def _shutdown(writer: _Writer, lock_fd: int | None) -> None:
    writer.stop()
    if lock_fd is not None:
        os.close(lock_fd)  # releases the flock


def _shutdown_abandoned(writer: _Writer, lock_fd: int | None, directory: str) -> None:
    """A Recorder garbage-collected (or alive at exit) without close(): flush it anyway."""
    _shutdown(writer, lock_fd)
    if writer.error is not None:
        step, e = writer.error
        print(f"lcsc_fast.Recorder: writing the snapshot of step {step} to {directory} failed "
              f"({type(e).__name__}: {e}), and the Recorder was never closed to report it",
              file=sys.stderr)


def _lock_directory(directory: str) -> int | None:
    """An exclusive flock on <dir>/.recorder.lock, held until close: two Recorders writing one
    directory would interleave their manifests, and a starting one would remove the other's
    temporary files. The kernel drops the lock when the process dies, so a killed run never
    blocks its restart."""
    if fcntl is None:
        return None
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"{directory} is in use by another lcsc_fast.Recorder (in this or "
                           "another process); close that one first, or record into a different "
                           "directory") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


# ---------------------------------------------------------------- Recorder

class Recorder:
    """Saves snapshots of a model (and of its EMA) every `every` training steps into
    `directory`, in the format Trajectory.open reads (see the module docstring).

        with lcsc_fast.Recorder(model, "runs/a/trajectory", every=100, ema=ema) as rec:
            for step in range(start, total):
                train_step()
                rec.step(step)

    step(step) returns at once unless step % every == 0. Then it copies the floating-point
    state_dict entries of `model` (and of `ema`, an nn.Module, stored under <dir>/ema/) to host
    memory, converted to `dtype` (float32, float16 or bfloat16; None keeps each tensor's
    dtype, so a float64 buffer stays float64, which merges do not accept: pass a dtype for such
    a model), and hands the copy to one background thread that writes it. On CUDA the copy goes
    into pinned host buffers without blocking, ordered on the current stream, and the writer
    waits for it; on the CPU it is a plain copy. At most one snapshot is pending: when the
    writer is still busy with the previous one, step() waits for it. Host memory is one
    snapshot's worth of buffers, reused.

    An exception in the writer is raised (as a RuntimeError whose __cause__ is the original)
    from the next step() or close(); the Recorder then stops recording.

    On a directory that already holds snapshots, the Recorder appends to them, provided its
    `every` and the module's tensor names and shapes are the ones recorded there (ValueError
    naming the differences otherwise). Steps must increase: step(s) for s at or below the last
    recorded step raises ValueError, unless `truncate_after_resume` is true, in which case the
    snapshots at steps >= s are dropped from the manifests and their files moved to
    <dir>/discarded/ (and <dir>/ema/discarded/). Use that when training resumes from a
    checkpoint older than the last snapshot.

    include records only some floating-point entries: "trainable" (the parameters that require
    grad when the Recorder is created: a LoRA run's adapters, without the frozen base weights in
    every snapshot) or a callable name -> bool. The names are chosen once, on `model`, and the
    same names are recorded from `ema`.

    close() (or leaving the with block) writes the pending snapshot and stops the thread.
    """

    def __init__(self, model: torch.nn.Module, directory, every: int,
                 ema: torch.nn.Module | None = None, dtype: torch.dtype | None = None, *,
                 truncate_after_resume: bool = False, include=None):
        if isinstance(every, bool) or not isinstance(every, int):
            raise TypeError(f"every: expected an int, got {type(every).__name__}")
        if every < 1:
            raise ValueError(f"every: {every} is not a positive number of steps")
        if dtype is not None and dtype not in _DTYPES:
            raise TypeError(f"dtype: {dtype} is not supported; use None (keep each tensor's "
                            "dtype), torch.float32, torch.float16 or torch.bfloat16")
        directory = os.path.abspath(os.fspath(directory))
        names = _selected_names(model, include)
        streams = [_Stream("model", model, directory, every, names)]
        if ema is not None:
            streams.append(_Stream("ema", ema, os.path.join(directory, EMA_DIR), every, names))
        self._directory = directory
        self._every = every
        self._dtype = dtype
        self._truncate = bool(truncate_after_resume)
        self._streams = streams
        self._closed = False
        self._error_reported = False

        os.makedirs(directory, exist_ok=True)
        # Refused before the lock file is created: a directory we refuse may be another
        # program's, so it is left exactly as it was. _open_directory checks again, locked.
        _check_directory(streams, directory)
        self._lock_fd = _lock_directory(directory)
        try:
            self._last_step = _open_directory(streams, directory)
        except BaseException:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise
        self._writer = _Writer(f"lcsc_fast.Recorder writer ({directory})")
        self._finalizer = weakref.finalize(self, _shutdown_abandoned, self._writer,
                                           self._lock_fd, directory)

    # -- properties

    @property
    def directory(self) -> str:
        """The trajectory directory (absolute)."""
        return self._directory

    @property
    def every(self) -> int:
        return self._every

    @property
    def last_step(self) -> int | None:
        """The last step snapshotted (perhaps still being written), including those found in
        the directory at start; None when there is none. Resume with step last_step + 1."""
        return self._last_step

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"last_step={self._last_step}"
        return (f"Recorder({self._directory!r}, every={self._every}, "
                f"ema={len(self._streams) > 1}, {state})")

    # -- recording

    def step(self, step: int) -> None:
        """Call once per training step, after the optimizer step: snapshots when
        step % every == 0, else returns at once."""
        if self._closed or self._writer.error is not None:
            self._raise_unusable()
        try:
            step = operator.index(step)
        except TypeError:
            raise TypeError(f"step: expected an int, got {type(step).__name__}") from None
        last = self._last_step
        if step % self._every == 0 or (last is not None and step <= last):
            self._record(step)

    def _record(self, step: int) -> None:
        if step < 0:  # before truncating anything
            raise ValueError(f"step({step}): steps are counted from 0")
        last = self._last_step
        if last is not None and step <= last:
            if not self._truncate:
                raise ValueError(
                    f"step({step}): {self._directory} already holds snapshots up to step {last}, "
                    "and steps must increase. Resume training after step "
                    f"{last}, pass truncate_after_resume=True to move the snapshots from step "
                    f"{step} on to {os.path.join(self._directory, DISCARDED_DIR)}, or record "
                    "into a new directory")
            self._truncate_from(step)
        if step % self._every:
            return
        self._writer.wait_idle()  # at most one snapshot pending: its buffers are ours again
        if self._writer.error is not None:
            self._raise_unusable()
        devices: set = set()
        parts = [(s, s.copy_state(self._dtype, devices)) for s in self._streams]
        events = []
        for device in devices:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(device))
            events.append(ev)
        self._writer.submit(_Job(step, parts, events))
        self._last_step = step

    def _truncate_from(self, step: int) -> None:
        """Drop the snapshots at steps >= step: manifests first, so a kill between the two
        leaves listed files in place (and the moved files at worst unlisted, which a restart
        lists again), then move their files to discarded/."""
        self._writer.wait_idle()
        if self._writer.error is not None:
            self._raise_unusable()
        dropped = []
        for s in self._streams:
            gone = [e for e in s.snapshots if e["step"] >= step]
            s.snapshots = [e for e in s.snapshots if e["step"] < step]
            s.write_manifest()
            dropped.append((s, gone))
        for s, gone in dropped:
            for e in gone:
                _move_aside(os.path.join(s.directory, e["file"]), s.discarded)
            if gone:
                _fsync_dir(s.directory)
                _fsync_dir(s.discarded)
        kept = self._streams[0].snapshots
        self._last_step = kept[-1]["step"] if kept else None

    def flush(self) -> None:
        """Wait until every snapshot taken so far is written and listed."""
        if self._closed or self._writer.error is not None:
            self._raise_unusable()
        self._writer.wait_idle()
        if self._writer.error is not None:
            self._raise_unusable()

    def close(self) -> None:
        """Write the pending snapshot, stop the writer thread and release the directory.
        Raises the writer's error if step() has not raised it yet. Idempotent."""
        if self._finalizer.detach() is not None:
            _shutdown(self._writer, self._lock_fd)
        self._closed = True
        if self._writer.error is not None and not self._error_reported:
            self._raise_unusable()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _raise_unusable(self):
        if self._writer.error is not None:
            step, e = self._writer.error
            self._error_reported = True
            raise RuntimeError(
                f"lcsc_fast.Recorder: writing the snapshot of step {step} to {self._directory} "
                f"failed ({type(e).__name__}: {e}), so no snapshot from step {step} on was "
                "recorded. Fix the cause (disk space, permissions), then start a new Recorder on "
                "the directory: it resumes after the last complete snapshot") from e
        raise RuntimeError(f"lcsc_fast.Recorder on {self._directory} is closed")


def _check_directory(streams: list[_Stream], directory: str
                     ) -> tuple[list[bool], list[tuple[dict[int, str], list[str]]], set[int]]:
    """Read and check the manifests and the unlisted snapshot files, changing nothing on disk,
    so that a directory this raises ValueError for is left as it was. Returns, per stream,
    whether its manifest existed and its unlisted() files, and the steps every stream has."""
    existed = [s.read_manifest() for s in streams]
    ema_manifest = os.path.join(directory, EMA_DIR, MANIFEST_NAME)
    if len(streams) == 1 and os.path.exists(ema_manifest):
        raise ValueError(f"{directory} holds an EMA trajectory as well ({ema_manifest}), but "
                         "this Recorder has no ema module; pass ema=<the EMA module> to keep "
                         "recording both, or record into a new directory")
    main = streams[0]
    if len(streams) == 2 and main.snapshots and not existed[1]:
        raise ValueError(f"{directory} holds snapshots up to step {main.snapshots[-1]['step']} "
                         "without EMA snapshots, so EMA snapshots recorded now would not have "
                         "the model's steps; record without ema=..., or into a new directory")
    for s in streams:
        s.check_against_last()

    found = [s.unlisted() for s in streams]
    available = [{e["step"] for e in s.snapshots} | set(good)
                 for s, (good, _) in zip(streams, found)]
    common = set.intersection(*available)
    for s in streams:
        lacking = sorted({e["step"] for e in s.snapshots} - common)
        if lacking:
            raise ValueError(f"{s.manifest_path} lists steps {lacking[:5]} that the other "
                             "manifest neither lists nor has complete files for; the directory "
                             "was changed outside lcsc_fast.Recorder. Record into a new "
                             "directory")
    return existed, found, common


def _open_directory(streams: list[_Stream], directory: str) -> int | None:
    """Bring the directory, locked by this Recorder, to a consistent state before recording;
    returns the last step.

    Reads and checks the manifests (again: another Recorder may have changed them before we
    took the lock), and only then, in a directory accepted as ours, removes stale temporary files,
    lists the complete unlisted snapshots a killed run left (a step only when every stream
    has it, so the model's and the EMA's manifests keep the same steps), moves the other
    unlisted snapshot files to discarded/, and writes the manifests that are missing or
    changed.
    """
    main = streams[0]
    existed, found, common = _check_directory(streams, directory)
    for s, existed_before in zip(streams, existed):
        os.makedirs(s.directory, exist_ok=True)
        s.remove_stale_tmp(manifest_only=not existed_before)
    for s, existed_before, (good, bad) in zip(streams, existed, found):
        adopt = sorted(step for step in good if step in common)
        bad = bad + [path for step, path in good.items() if step not in common]
        for path in bad:
            _move_aside(path, s.discarded)
        if bad:
            _fsync_dir(s.directory)
            _fsync_dir(s.discarded)
        for step in adopt:
            name = snapshot_file_name(step)
            s.snapshots.append({"step": step, "file": name,
                                "nbytes": os.path.getsize(os.path.join(s.directory, name))})
        if adopt or not existed_before:
            s.write_manifest()
    return main.snapshots[-1]["step"] if main.snapshots else None
