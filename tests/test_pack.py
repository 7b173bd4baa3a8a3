"""lcsc_fast.pack, what it writes: refusals of values a packed store cannot hold, durability.

* A checkpoint holding NaN or Inf, or a delta that overflows the delta dtype (fp16 ends at
  65504), is a CheckpointError naming the checkpoint (index, step, file) and the tensor, and
  leaves nothing behind; the dtypes that can hold the delta pack it exactly.
* Every file of the store, and its folder, is fsynced before the folder is renamed into place;
  every file has the mode the umask gives (0644 under umask 022), not safetensors' 0600.
* A manifest that is malformed (a field of the wrong type or out of range, a version this
  lcsc_fast does not read) is a CheckpointError naming manifest.json and the field; block_elems
  beyond a tensor's size is the whole tensor, written and read alike.
* An out_dir the store cannot be renamed onto (a file, a symbolic link, a path under a file)
  is refused before anything is written, with "pack:" and the path; an empty directory is
  replaced by the store, which keeps its mode and group.
(The packed store's layout and merges are tested in test_trajectory.py.)
"""

from __future__ import annotations

import importlib
import json
import os
import re
import stat

import pytest
import torch
from safetensors.torch import save_file

from lcsc_fast import CheckpointError, Trajectory, pack


def write_checkpoints(folder, checkpoints: list[dict]) -> list[str]:
    """Each {name: tensor} dict as folder/c<i>.safetensors; returns the paths."""
    paths = []
    for i, tensors in enumerate(checkpoints):
        paths.append(os.path.join(folder, f"c{i}.safetensors"))
        save_file(tensors, paths[-1])
    return paths


def running_vars(*values: list[float]) -> list[dict]:
    """Checkpoints of a BatchNorm-like module: a weight, a running_var holding values[i], and
    an integer step counter."""
    return [{"w": torch.full((4,), float(i)), "bn.running_var": torch.tensor(v),
             "bn.num_batches_tracked": torch.tensor(i)} for i, v in enumerate(values)]


# ---------------------------------------------------------------- values a store cannot hold


def test_fp16_delta_overflow_is_refused(tmp_path):
    """A running_var that moved by 1e5 overflows an fp16 delta: refused, naming checkpoint 1
    and the tensor and suggesting bf16 or fp32; fp32 packs it exactly."""
    paths = write_checkpoints(tmp_path, running_vars([1.0, 2.0e5], [1.5, 1.0]))
    with pytest.raises(CheckpointError) as info:
        pack(paths, tmp_path / "fp16", dtype="fp16")
    message = str(info.value)
    assert "checkpoint 1 (step 1, " + paths[1] in message and "'bn.running_var'" in message
    assert "overflows float16" in message and '"bf16" or "fp32"' in message
    assert sorted(os.listdir(tmp_path)) == ["c0.safetensors", "c1.safetensors"]
    with Trajectory.open(pack(paths, tmp_path / "fp32", dtype="fp32")) as packed:
        assert packed[1]["bn.running_var"].tolist() == [1.5, 1.0]


def test_bf16_delta_overflow_is_refused(tmp_path):
    """3.4e38 is a float32 but rounds to inf in bf16 (largest 3.39e38): refused, suggesting
    fp32 only."""
    paths = write_checkpoints(tmp_path, running_vars([0.0], [3.4e38]))
    with pytest.raises(CheckpointError, match=r"overflows bfloat16 .*; pack with dtype \"fp32\"$"):
        pack(paths, tmp_path / "bf16", dtype="bf16")
    with Trajectory.open(pack(paths, tmp_path / "fp32", dtype="fp32")) as packed:
        assert packed[1]["bn.running_var"].item() == torch.tensor(3.4e38).item()


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_float32_delta_overflow_is_refused(tmp_path, dtype):
    """3e38 - (-3e38) overflows float32 itself: no delta dtype holds it."""
    paths = write_checkpoints(tmp_path, running_vars([-3e38], [3e38]))
    with pytest.raises(CheckpointError, match="overflows float32; .* merge from the checkpoint"):
        pack(paths, tmp_path / "store", dtype=dtype)
    assert len(os.listdir(tmp_path)) == 2


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [0, 2], ids=["in=base", "in=other"])
def test_checkpoint_holding_nan_or_inf_is_refused(tmp_path, dtype, value, where):
    """inf - inf is NaN, and inf in the base turns every delta into inf or NaN: a checkpoint
    holding NaN or Inf, the base or another, is refused at every delta dtype, by name."""
    values = [[1.0, 2.0, 3.0], [1.5, 2.5, 3.5], [2.0, 3.0, 4.0]]
    values[where][1] = value
    paths = write_checkpoints(tmp_path, running_vars(*values))
    label = f"checkpoint {where} (step {where}, {paths[where]})"
    with pytest.raises(CheckpointError, match=re.escape(
            f"pack: {label} holds NaN or Inf in tensor 'bn.running_var'")):
        pack(paths, tmp_path / "store", dtype=dtype)
    assert len(os.listdir(tmp_path)) == 3


def test_single_checkpoint_holding_inf_is_refused(tmp_path):
    paths = write_checkpoints(tmp_path, running_vars([1.0, float("inf")]))
    with pytest.raises(CheckpointError, match="checkpoint 0 .* holds NaN or Inf"):
        pack(paths, tmp_path / "store")


# ---------------------------------------------------------------- durability


def test_every_file_is_fsynced_before_the_store_is_renamed_into_place(tmp_path, monkeypatch):
    """base.safetensors and integers.safetensors (written by safetensors' save_file, which does
    not fsync) as well as deltas.bin, manifest.json and the folder: a crash after the rename
    must not leave a store whose files are empty. Files are told apart by inode, which the
    rename keeps."""
    paths = write_checkpoints(tmp_path, running_vars([1.0, 2.0], [1.5, 2.5], [2.0, 3.0]))
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = pack(paths, tmp_path / "store")
    renamed = events.index(("replace", out))
    synced = {ino for what, ino in events[:renamed] if what == "fsync"}
    for name in ("base.safetensors", "integers.safetensors", "deltas.bin", "manifest.json", ""):
        assert os.stat(os.path.join(out, name)).st_ino in synced, name or "the folder"


@pytest.mark.skipif(os.name == "nt", reason="Windows has no file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask=022", "umask=027"])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask):
    paths = write_checkpoints(tmp_path, running_vars([1.0, 2.0], [1.5, 2.5]))
    old = os.umask(umask)
    try:
        out = pack(paths, tmp_path / "store")
    finally:
        os.umask(old)
    for name in ("base.safetensors", "integers.safetensors", "deltas.bin", "manifest.json"):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o666 & ~umask, name


# ---------------------------------------------------------------- the manifest


def small_run(folder) -> list[str]:
    """Three checkpoints whose float tensor w (10 elements) equals the checkpoint's index."""
    return write_checkpoints(folder, [{"w": torch.full((10,), float(i)), "n": torch.tensor(i)}
                                      for i in range(3)])


DELETE = object()


def edit(manifest: dict, field: str, value) -> None:
    """Set manifest[field] to value; "files/<name>" and "tensors/<k>/<key>" reach inside."""
    *inner, key = field.split("/")
    for part in inner:
        manifest = manifest[int(part)] if isinstance(manifest, list) else manifest[part]
    if value is DELETE:
        del manifest[key]
    else:
        manifest[key] = value


MALFORMED = {  # id: (field, value, what the message says)
    "version 99": ("version", 99, "version 99 is not one this lcsc_fast reads (version 1)"),
    "no version": ("version", DELETE, "version None is not one this lcsc_fast reads"),
    "version true": ("version", True, "version True is not one"),
    "steps string": ("steps", "012", "steps is '012', not a non-empty list of integers"),
    "steps floats": ("steps", [0.5, 1.7, 2.2], "steps is [0.5, 1.7, 2.2], not"),
    "steps empty": ("steps", [], "steps is [], not a non-empty list"),
    "base_index float": ("base_index", 0.9, "base_index is 0.9, not a checkpoint index in [0, 3)"),
    "base_index out of range": ("base_index", 3, "base_index is 3, not a checkpoint index"),
    "block_elems string": ("block_elems", "7", "block_elems is '7', not a positive integer"),
    "block_elems zero": ("block_elems", 0, "block_elems is 0, not a positive integer"),
    "block_elems float": ("block_elems", 7.0, "block_elems is 7.0, not a positive integer"),
    "delta_dtype I8": ("delta_dtype", "I8", "delta_dtype is 'I8', not one of F32, F16, BF16"),
    "tensors object": ("tensors", {"name": "w"}, "tensors is {'name': 'w'}, not a list"),
    "tensor dtype I64": ("tensors/0/dtype", "I64", "tensors[0] is {'name': 'w', 'shape': [10], "),
    "negative shape": ("tensors/0/shape", [-10], "tensors[0] is"),
    "files list": ("files", [], "files is [], not an object"),
    "files entry null": ("files/deltas.bin", None, "files['deltas.bin'] is None, not"),
    "nbytes string": ("files/deltas.bin/nbytes", "80", "files['deltas.bin'] is {'nbytes': '80'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_manifest_is_a_checkpoint_error_naming_the_field(tmp_path, case):
    field, value, fragment = MALFORMED[case]
    out = pack(small_run(tmp_path), tmp_path / "store")
    path = os.path.join(out, "manifest.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    edit(manifest, field, value)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: {fragment}")):
        Trajectory.open(out)


def test_a_tensor_listed_twice_is_refused(tmp_path):
    out = pack(small_run(tmp_path), tmp_path / "store")
    path = os.path.join(out, "manifest.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["tensors"].append(manifest["tensors"][0])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: tensor 'w' is listed twice")):
        Trajectory.open(out)


@pytest.mark.parametrize("block_elems", [3, 10, 11, 2**62, 10**30])
def test_block_elems_beyond_a_tensor_is_the_whole_tensor(tmp_path, block_elems):
    """Any positive block_elems packs, and the store reads back the checkpoints exactly (fp32
    deltas of small integers); 10**30 no longer overflows the reader's int64 arithmetic."""
    out = pack(small_run(tmp_path), tmp_path / "store", dtype="fp32", block_elems=block_elems)
    with Trajectory.open(out, verify=True) as packed:
        for i in range(3):
            assert packed[i]["w"].tolist() == [float(i)] * 10
        assert packed.merge([0.25, 0.25, 0.5])["w"].tolist() == [1.25] * 10


@pytest.mark.parametrize("block_elems", ["7", 7.0, True, 0])
def test_pack_refuses_a_block_elems_that_is_not_a_positive_integer(tmp_path, block_elems):
    with pytest.raises(ValueError, match="block_elems must be a positive integer"):
        pack(small_run(tmp_path), tmp_path / "store", block_elems=block_elems)
    assert not os.path.exists(tmp_path / "store")


# ---------------------------------------------------------------- the output directory


def tree(folder) -> dict:
    """Every path under folder (links not followed) with its bytes, link target or None."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                out[path] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    out[path] = f.read()
            else:
                out[path] = None
    return out


BAD_OUT = {  # id: what comes after "pack: <out_dir> " in the message ({t}: tmp_path)
    "a file": "exists and is not a directory",
    "an input file": "exists and is not a directory",
    "a link to an empty directory": "is a symbolic link (to {t}/empty), which the store would "
                                    "replace; pack into {t}/empty itself",
    "a dangling link": "is a symbolic link (to {t}/nowhere), which the store would replace; "
                       "choose a new directory",
}


def bad_out(folder, case: str):
    """An out_dir of kind `case` (see BAD_OUT) in folder."""
    if case == "a file":
        (folder / "afile").write_text("precious")
        return folder / "afile"
    if case == "an input file":
        return folder / "c0.safetensors"
    if case == "a link to an empty directory":
        os.mkdir(folder / "empty")
        os.symlink(folder / "empty", folder / "link")
        return folder / "link"
    os.symlink(folder / "nowhere", folder / "dangling")
    return folder / "dangling"


@pytest.mark.parametrize("case", list(BAD_OUT))
def test_an_out_dir_the_store_cannot_replace_is_refused_up_front(tmp_path, monkeypatch, case):
    """Refused before anything is written (the store's writer is never called), and everything
    on disk is left as it was."""
    paths = write_checkpoints(tmp_path, running_vars([1.0], [2.0]))
    out = bad_out(tmp_path, case)
    before = tree(tmp_path)

    def never(*args):
        raise AssertionError("the store was written before out_dir was checked")

    monkeypatch.setattr(importlib.import_module("lcsc_fast.pack"), "_write_store", never)
    with pytest.raises(FileExistsError, match=re.escape(
            f"pack: {out} " + BAD_OUT[case].format(t=tmp_path))):
        pack(paths, out)
    assert tree(tmp_path) == before


def test_an_out_dir_under_a_file_is_refused_with_context(tmp_path):
    paths = write_checkpoints(tmp_path, running_vars([1.0], [2.0]))
    with pytest.raises(OSError, match=re.escape(
            f"pack: cannot make the folder {paths[0]}/sub for {paths[0]}/sub/store")):
        pack(paths, os.path.join(paths[0], "sub", "store"))


@pytest.mark.skipif(os.name == "nt", reason="Windows has no file modes")
@pytest.mark.parametrize("mode", [0o700, 0o750, 0o2775], ids=oct)
def test_an_empty_out_dir_keeps_its_mode(tmp_path, mode):
    paths = write_checkpoints(tmp_path, running_vars([1.0], [2.0]))
    out = tmp_path / "shared"
    os.mkdir(out)
    os.chmod(out, mode)
    pack(paths, out)
    assert stat.S_IMODE(os.stat(out).st_mode) == mode
    assert sorted(os.listdir(out)) == ["base.safetensors", "deltas.bin", "integers.safetensors",
                                       "manifest.json"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="giving a folder another group needs root")
def test_an_empty_setgid_out_dir_keeps_its_group_for_the_store_and_its_files(tmp_path):
    """A shared folder (setgid, another group): the store and the files in it get its group,
    as files written there directly would."""
    paths = write_checkpoints(tmp_path, running_vars([1.0], [2.0]))
    out = tmp_path / "shared"
    os.mkdir(out)
    group = os.getegid() + 4321
    os.chown(out, -1, group)
    os.chmod(out, 0o2770)
    pack(paths, out)
    assert os.stat(out).st_gid == group and stat.S_IMODE(os.stat(out).st_mode) == 0o2770
    for name in os.listdir(out):
        assert os.stat(out / name).st_gid == group, name


def test_store_rewritten_after_its_headers_were_read_is_refused(tmp_path, monkeypatch):
    """A packed store's .safetensors files written to between reading their headers and
    mapping them are refused, as a single checkpoint file is: the headers describe the old
    bytes."""
    store = pack(Trajectory.open(write_checkpoints(tmp_path, running_vars([1.0], [2.0]))),
                 str(tmp_path / "store"))
    store_module = importlib.import_module("lcsc_fast.pack")
    for victim in ("base.safetensors", "integers.safetensors"):
        path = os.path.join(store, victim)
        mtime_ns = os.stat(path).st_mtime_ns - 3600 * 10**9  # a rewrite surely changes it
        os.utime(path, ns=(mtime_ns, mtime_ns))
        read = store_module.read_header

        def read_then_rewrite(p, read=read, path=path):
            header = read(p)
            if os.path.samefile(p, path):
                with open(path, "r+b") as f:
                    data = f.read()
                    f.seek(0)
                    f.write(data)
            return header

        monkeypatch.setattr(store_module, "read_header", read_then_rewrite)
        with pytest.raises(CheckpointError, match="written to after its header was read") as info:
            Trajectory.open(store)
        assert victim in str(info.value)
        monkeypatch.undo()
        Trajectory.open(store).close()  # opened again, it reads the files as they are now
