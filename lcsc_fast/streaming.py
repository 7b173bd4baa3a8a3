"""Merging from mapped files into another device's memory, through staging buffers.

Chunks of segments (about CHUNK_NBYTES of source bytes each) are gathered from the mapped files
into pinned host memory by the native engine (in parallel, a truncated file raising instead of
faulting), copied to the device on a side stream, and merged there on the current stream. Two
chunks are in flight: while chunk k is merged, chunk k + 1 is gathered and copied.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _C
from .trajectory import _chunks, _code_nbytes

__all__ = ["merge_staged"]

CHUNK_NBYTES = 64 * 2**20
_ALIGN = 16  # staged regions start 16-byte aligned, so the CUDA kernel uses vector loads


def merge_staged(traj, targets, device, columns, base_column, extra,
                 chunk_nbytes: int = CHUNK_NBYTES, rows: np.ndarray | None = None) -> None:
    """Merge traj's segments `rows` (indices; default all) into targets on device (cuda; cpu
    works too and is what the tests without a GPU exercise) through staging buffers."""
    seg = traj._segments
    if rows is None:
        rows = np.arange(len(seg.numel))
    if not isinstance(targets[0], (list, tuple)):  # one output: a list of tensors, a column list
        targets, columns = [targets], [columns]
    on_cuda = device.type == "cuda"
    element_size = _code_nbytes(seg.dtype[rows])
    region = seg.numel[rows, None] * element_size  # [R, M] bytes of each source run
    padded = (region + _ALIGN - 1) // _ALIGN * _ALIGN
    src_addr = traj._addresses()[seg.file[rows]] + seg.offset[rows].astype(np.uint64)
    chunks = _chunks(padded.sum(axis=1), chunk_nbytes)
    if not chunks:
        return
    # One plan for the whole merge, built on the mapped files' addresses, checks every output
    # against every other output and every input, as the in-place path does; plans per chunk
    # would miss overlaps across chunks, and raise only after earlier chunks were written. Each
    # chunk then points its rows at the staged copies of the same bytes and runs them (on a
    # copy of src_addr: the plan may share its array, and the gathers still read it).
    plan = traj._plan(rows, src_addr.copy(), targets, device, base_column, extra)
    capacity = max(int(padded[lo:hi].sum()) for lo, hi in chunks)
    pinned = [torch.empty(capacity, dtype=torch.uint8, pin_memory=on_cuda) for _ in range(2)]
    staged = ([torch.empty(capacity, dtype=torch.uint8, device=device) for _ in range(2)]
              if on_cuda else pinned)
    compute = torch.cuda.current_stream(device) if on_cuda else None
    copier = torch.cuda.Stream(device) if on_cuda else None
    if on_cuda:
        # staged[] was allocated on the compute stream, whose queued work may still use those
        # blocks under their previous owner (the last merge's staging, for one): the copies
        # into them start after it.
        copier.wait_stream(compute)
    copied, merged = [None, None], [None, None]
    threads = torch.get_num_threads()
    try:
        for k, (lo, hi) in enumerate(chunks):
            slot = k % 2
            if copied[slot] is not None:
                copied[slot].synchronize()  # pinned[slot]'s previous copy has left it
            sizes = padded[lo:hi].reshape(-1)
            offsets = (np.cumsum(sizes) - sizes).astype(np.uint64)  # [R * M], row-major
            _C.copy_regions(pinned[slot].data_ptr() + offsets, src_addr[lo:hi].reshape(-1),
                            np.ascontiguousarray(region[lo:hi].reshape(-1)), threads)
            if on_cuda:
                total = int(sizes.sum())
                with torch.cuda.stream(copier):
                    if merged[slot] is not None:
                        copier.wait_event(merged[slot])  # staged[slot] is no longer read
                    staged[slot][:total].copy_(pinned[slot][:total], non_blocking=True)
                    copied[slot] = torch.cuda.Event()
                    copied[slot].record(copier)
                compute.wait_event(copied[slot])
            src = (staged[slot].data_ptr() + offsets).reshape(hi - lo, -1)  # [hi - lo, M]
            traj._restage(plan, lo, hi, src, base_column)
            plan.run(columns, lo, hi)
            if on_cuda:
                merged[slot] = torch.cuda.Event()
                merged[slot].record(compute)
    finally:
        for event in copied:
            if event is not None:
                event.synchronize()  # pinned memory must outlive the copies reading it
