"""LoRA trajectories: the saved adapters of a LoRA run, merged onto the frozen base weights.

LCSC merges LoRA runs too (Sec. 4.1 and 5.4 of the paper). Checkpoint i of such a run is
theta_i = W0 + s B_i A_i for every adapted weight, and W0 for every other tensor, so a merge is

    sum_i c_i theta_i = (sum_i c_i) W0 + s sum_i c_i B_i A_i,                          (1)

which is W0 + s sum_i c_i B_i A_i for coefficients summing to 1, as LCSC's do. Each adapted
weight is one call of lcsc_fast.lora.lora_weighted_sum (a fused low-rank product over the
concatenated rank; no dense B_i A_i is built), reading the factors in place from the mapped
adapter files; every other tensor is W0, copied by the engine. Coefficients that do not sum to 1
get (1) exactly: the engine first writes (sum c) W0, then the low-rank sum is added to it (one
more pass over each adapted weight, and for a 16-bit target one more rounding). Whether the sum
is 1 is decided in float32, the precision of the engine's coefficients.

Adapters:
- a Recorder directory whose snapshots hold only LoRA factors (Recorder(..., include=
  "trainable") on a model whose trainable parameters are its adapters),
- PEFT adapter folders (adapter_model.safetensors + adapter_config.json), or such files.
Factor names: <path>.lora_A.weight (PEFT's saved adapters, nn.Linear factors),
<path>.lora_A.<adapter>.weight (a live PEFT model's state_dict), <path>.lora_A (a parameter,
loralib style), and the same with lora_B; a leading "base_model.model." is dropped from <path>.
lora_A is [r, *rest] and lora_B [m, r] or [m, r, 1, ...] (a conv layer's); the adapted weight
is <path>.weight of the plain model, [m, *rest], and B A is reshaped to it.

The scaling s comes from adapter_config.json as PEFT applies it (lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora; rank_pattern and alpha_pattern per module), beside each
adapter file or in the Recorder directory; where there is none, from scale= (a number, or a
dict module path -> number). PEFT options under which the merged weight is not W0 + s B A, or
which train more than the factors (DoRA, fan_in_fan_out, lora_bias, modules_to_save, ...), are
refused.

The base W0: a state dict or an nn.Module, copied when the trajectory is opened (so that merging
into that same model starts from W0 every time), or safetensors files, mapped. Names are the
plain model's (<path>.weight); PEFT's are accepted too ("base_model.model." and ".base_layer"
dropped; a live PEFT model's own lora_A/lora_B tensors are not part of W0 and are skipped).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import engine
from .lora import LoraPlan
from .safetensors_io import (CheckpointError, MappedFile, TensorEntry, naming_changed_files,
                             read_header)
from .trajectory import (PACKED_FORMAT, RECORDER_FORMAT, _checkpoint_files, _normalized,
                         _read_json, _recorded_snapshots)

__all__ = ["LoraTrajectory"]

PEFT_PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_MERGEABLE = tuple(engine._DTYPE_CODES)

# PEFT options (adapter_config.json) that make the merged weight something other than
# W0 + s B A, or that train more than the factors; refused when set.
_UNSUPPORTED = {
    "use_dora": "DoRA rescales every merged weight by a learned magnitude",
    "fan_in_fan_out": "the delta is transposed for fan-in-fan-out (GPT-2 Conv1D) weights",
    "lora_bias": "lora_B carries a bias",
    "modules_to_save": "whole modules are trained beside the adapters",
    "trainable_token_indices": "embedding rows are trained beside the adapters",
    "layer_replication": "layers are replicated",
    "target_parameters": "the adapters target nn.Parameters, not layers",
    "alora_invocation_tokens": "an activated LoRA applies only after its invocation tokens",
}
_VARIANTS = ("use_qalora", "use_bdlora", "arrow_config", "kasa_config", "velora_config",
             "monteclora_config")
# Initialisations that change the base weights the adapter is trained against.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# ---------------------------------------------------------------- names

def _parse_factor(name: str):
    """(module path, "A" or "B", adapter name or None) when name is a LoRA factor, else None."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        if parts[k] in ("lora_A", "lora_B"):
            tail = parts[k + 1:]
            if tail in ([], ["weight"]):
                adapter = None
            elif len(tail) == 2 and tail[1] == "weight":
                adapter = tail[0]
            else:
                return None  # lora_B.bias and the like
            return ".".join(parts[:k]).removeprefix(PEFT_PREFIX), parts[k][-1], adapter
    return None


def _plain_name(name: str) -> str:
    """A base tensor's name in the plain model: PEFT's prefix and .base_layer dropped."""
    return ".".join(p for p in name.removeprefix(PEFT_PREFIX).split(".") if p != "base_layer")


def _not_a_factor(path: str, name: str) -> CheckpointError:
    if "lora_" in name:
        return CheckpointError(
            f"{path}: tensor {name!r} is a LoRA tensor lcsc_fast does not merge; only lora_A "
            "and lora_B weights are (no DoRA magnitudes, LoRA biases or embedding LoRA)")
    return CheckpointError(
        f"{path}: tensor {name!r} is not a LoRA factor (lora_A / lora_B); a LoRA trajectory's "
        "checkpoints hold adapters only: record them with Recorder(..., include='trainable'), "
        "and give the frozen weights as base=")


# ---------------------------------------------------------------- scaling

def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _PeftScaling:
    """s for each module as PEFT computes it from one adapter_config.json."""

    def __init__(self, config, path: str):
        self.path = path
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        peft_type = config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise CheckpointError(f"{path}: peft_type {peft_type!r} is not LORA; lcsc_fast merges "
                                  "LoRA adapters only")
        for key, why in _UNSUPPORTED.items():
            if config.get(key):
                raise CheckpointError(f"{path}: {key}={config[key]!r} is not supported ({why}); "
                                      "lcsc_fast merges plain LoRA, W0 + s B A")
        for key in _VARIANTS:
            if config.get(key):
                raise CheckpointError(f"{path}: {key}={config[key]!r} selects a LoRA variant "
                                      "whose merge is not W0 + s B A; lcsc_fast merges plain LoRA")
        if config.get("bias", "none") != "none":
            raise CheckpointError(f"{path}: bias={config['bias']!r} trains biases beside the "
                                  "adapters; lcsc_fast merges adapters trained with bias='none'")
        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise CheckpointError(
                f"{path}: init_lora_weights={init!r} trains the adapter against a changed base "
                "weight, so W0 + s B A is not its model; save it converted to plain LoRA first "
                "(PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...))")
        self.r, self.alpha = config.get("r"), config.get("lora_alpha")
        if not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1):
            raise CheckpointError(f"{path}: r={self.r!r} is not a positive integer")
        if not _number(self.alpha):
            raise CheckpointError(f"{path}: lora_alpha={self.alpha!r} is not a finite number")
        self.rslora = config.get("use_rslora", False)
        if not isinstance(self.rslora, bool):
            raise CheckpointError(f"{path}: use_rslora={self.rslora!r} is not true or false")
        self.rank_pattern = config.get("rank_pattern") or {}
        self.alpha_pattern = config.get("alpha_pattern") or {}
        for key, pattern in (("rank_pattern", self.rank_pattern),
                             ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict) or not all(_number(v) for v in pattern.values()):
                raise CheckpointError(f"{path}: {key} must map module patterns to numbers")

    def _lookup(self, patterns: dict, module: str, default):
        # PEFT's rule: the first pattern that matches the end of the module's name, at a dot.
        for key, value in patterns.items():
            try:
                if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
                    return value
            except re.error as e:
                raise CheckpointError(f"{self.path}: pattern {key!r} is not a regular "
                                      f"expression ({e})") from None
        return default

    def __call__(self, module: str, rank: int, file: str) -> float:
        r = self._lookup(self.rank_pattern, module, self.r)
        alpha = self._lookup(self.alpha_pattern, module, self.alpha)
        if r != rank:
            raise CheckpointError(f"{file}: module {module!r} has rank {rank}, but {self.path} "
                                  f"gives it r={r}; the adapter and its config do not belong "
                                  "together")
        return alpha / math.sqrt(r) if self.rslora else alpha / r


class _GivenScaling:
    """s from Trajectory.open(..., scale=): one number, or module path -> number."""

    def __init__(self, scale):
        if isinstance(scale, Mapping):
            bad = [k for k, v in scale.items() if not isinstance(k, str) or not _number(v)]
            if bad:
                raise ValueError(f"scale[{bad[0]!r}]: expected a module path mapped to a finite "
                                 "number")
        elif not _number(scale):
            raise TypeError(f"scale: expected a finite number or a dict module path -> number, "
                            f"got {scale!r}")
        self.scale = scale

    def __call__(self, module: str, rank: int, file: str) -> float:
        if isinstance(self.scale, Mapping):
            return float(self.scale[module])  # the keys are checked against the modules
        return float(self.scale)


# ---------------------------------------------------------------- opening

@dataclass
class _Module:
    """One adapted weight: its factors in every checkpoint and their scaling."""

    path: str  # the module's path in the plain model
    weight: str  # the adapted tensor: path + ".weight"
    rank: int
    a_shape: tuple
    b_shape: tuple
    dtype: torch.dtype  # every factor's
    scales: list  # [N] s of each checkpoint


@dataclass
class _CandidateTables(engine._Plan):
    """The engine plan of a LoRA merge's dense sums, every output's in one: entry j writes
    labels[j], a tensor of output owners[j], from the sources `inputs` names. Its overlap
    errors name the output each tensor belongs to."""

    inputs: list = field(default_factory=list)  # [N] "W0" or "base"
    labels: list = field(default_factory=list)  # [T] "target['x']" or "outs[k]['x']"
    owners: list = field(default_factory=list)  # [T] the output k each entry belongs to

    def add_output(self, k: int, label: str, name: str, out: torch.Tensor, w0: dict,
                   base: dict | None) -> None:
        """Output k's tensor `name`, out (labelled label[name]), merged from W0 and base."""
        self.labels.append(f"{label}[{name!r}]")
        self.owners.append(k)
        self.add(name, [out], [w0[name] if d == "W0" else base[name] for d in self.inputs], None)

    def _output_name(self, k: int, t: int) -> str:
        return self.labels[t]

    def _input_name(self, t: int, i: int) -> str:
        return f"{self.inputs[i]}[{self.names[t]!r}]"

    def _describe_overlap(self, out_k, out_t, other_k, in_t, in_i) -> str:
        if other_k < 0 and self.owners[in_t] != self.owners[out_t]:
            return (f"{self.labels[out_t]} overlaps {self._input_name(in_t, in_i)} in memory, "
                    f"which outs[{self.owners[in_t]}] is merged from; the outputs are written "
                    "one after another, so no output may share memory with the base")
        return super()._describe_overlap(out_k, out_t, other_k, in_t, in_i)


def _adapter_sources(source):
    """([N] adapter files, [N] config path or None, steps) of what Trajectory.open was given."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        manifest_path = os.path.join(path, "manifest.json")
        if os.path.isdir(path) and os.path.exists(manifest_path):
            manifest = _read_json(manifest_path)
            fmt = manifest.get("format") if isinstance(manifest, dict) else None
            if fmt == PACKED_FORMAT:
                raise CheckpointError(f"{path} is a packed store; LoRA adapters are opened from "
                                      "a Recorder directory or adapter files")
            if fmt != RECORDER_FORMAT:
                raise CheckpointError(f"{manifest_path}: unknown format {fmt!r}; expected "
                                      f"{RECORDER_FORMAT!r}")
            files, steps = _recorded_snapshots(path, manifest)
            # The config beside the snapshots, or, for a Recorder's <dir>/ema, in <dir>.
            candidates = [os.path.join(path, CONFIG_FILE)]
            if os.path.basename(os.path.normpath(path)) == "ema":
                candidates.append(os.path.join(os.path.dirname(os.path.normpath(path)),
                                               CONFIG_FILE))
            config = next((c for c in candidates if os.path.exists(c)), None)
            return files, [config] * len(files), steps
        source = [path]
    if not isinstance(source, Sequence) or isinstance(source, (str, bytes)) or not source:
        raise TypeError("Trajectory.open: expected a Recorder directory or a non-empty list of "
                        "adapter folders or files")
    files, configs = [], []
    for p in source:
        p = os.fspath(p)
        if os.path.isdir(p):
            file = os.path.join(p, ADAPTER_FILE)
            if not os.path.exists(file):
                raise CheckpointError(f"{p}: no {ADAPTER_FILE} (a PEFT adapter folder holds "
                                      f"{ADAPTER_FILE} and {CONFIG_FILE})")
        elif os.path.exists(p):
            file = p
        else:
            raise CheckpointError(f"{p}: no such file or folder")
        config = os.path.join(os.path.dirname(file), CONFIG_FILE)
        files.append(file)
        configs.append(config if os.path.exists(config) else None)
    return files, configs, list(range(len(files)))


def _read_factors(header) -> dict:
    """{module path: {"A": entry, "B": entry}} of one adapter file, checked."""
    path = header.path
    modules, first = {}, None  # first: (adapter name, tensor name) of the first factor
    for name, entry in header.entries.items():
        parsed = _parse_factor(name)
        if parsed is None:
            raise _not_a_factor(path, name)
        module, factor, adapter = parsed
        first = first or (adapter, name)
        if adapter != first[0]:
            raise CheckpointError(f"{path}: tensors {first[1]!r} and {name!r} are factors of two "
                                  "adapters; a checkpoint holds one adapter")
        slot = modules.setdefault(module, {})
        if factor in slot:
            raise CheckpointError(f"{path}: tensors {slot[factor].name!r} and {name!r} are both "
                                  f"lora_{factor} of module {module!r}")
        slot[factor] = entry
    if not modules:
        raise CheckpointError(f"{path}: no LoRA factors (lora_A / lora_B) in this file")
    for module, slot in modules.items():
        for factor, other in (("A", "B"), ("B", "A")):
            if other not in slot:
                raise CheckpointError(f"{path}: module {module!r} has lora_{factor} "
                                      f"({slot[factor].name!r}) but no lora_{other}")
        a, b = slot["A"], slot["B"]
        for e in (a, b):
            if e.dtype not in _MERGEABLE:
                raise CheckpointError(f"{path}: tensor {e.name!r} is {e.dtype}; LoRA factors "
                                      "must be float32, float16 or bfloat16")
        if a.dtype != b.dtype:
            raise CheckpointError(f"{path}: tensor {a.name!r} is {a.dtype} but {b.name!r} is "
                                  f"{b.dtype}; a module's factors must share one dtype")
        if len(a.shape) < 2 or a.shape[0] < 1:
            raise CheckpointError(f"{path}: tensor {a.name!r} has shape {list(a.shape)}; lora_A "
                                  "must be [r, ...] with r >= 1 and at least two dimensions")
        if len(b.shape) < 2 or any(d != 1 for d in b.shape[2:]):
            raise CheckpointError(f"{path}: tensor {b.name!r} has shape {list(b.shape)}; lora_B "
                                  "must be [out, r] or [out, r, 1, 1]")
        if b.shape[1] != a.shape[0]:
            raise CheckpointError(f"{path}: module {module!r}: lora_B {b.name!r} has rank "
                                  f"{b.shape[1]} (shape {list(b.shape)}) but lora_A {a.name!r} "
                                  f"has rank {a.shape[0]} (shape {list(a.shape)})")
    return modules


def _few(names) -> str:
    return engine._few(sorted(names))


class LoraTrajectory(Sequence):
    """The checkpoints of a LoRA run over frozen base weights (see the module docstring).

    len(traj) checkpoints; traj[i] is checkpoint i materialised (W0 + s B_i A_i for adapted
    weights, W0 for the rest) as a dict of new tensors. lcsc_fast.merge_into(target, traj, c)
    writes (sum c) W0 + s sum_i c_i B_i A_i into the plain target model's own tensors.
    """

    kind = "lora"

    def __init__(self, *, files, sources, modules, steps, shapes, dtypes):
        self._files = files  # [F] MappedFile
        self._sources = sources  # key -> tensor (a copied base) or (file index, TensorEntry)
        self._modules = modules  # adapted weight name -> _Module
        self.steps = steps
        self.shapes = shapes  # name -> shape, every tensor of the base
        self.dtypes = dtypes  # name -> dtype
        self._float_names = [n for n in sorted(shapes) if dtypes[n].is_floating_point]
        self._views = {}  # key -> CPU tensor viewing the mapped file
        self._resident = None  # after .to(): (device, key -> tensor)
        self._closed = False
        # Kept between merges, so that a search's merges validate each layer once:
        self._factor_lists = {}  # device -> {adapted name: (As, Bs)}, see _factors
        self._lora_plans = {}  # (output index, adapted name) -> (LoraPlan, its As list)

    @classmethod
    def open(cls, source, *, base, scale=None) -> LoraTrajectory:
        """Open LoRA adapters (a Recorder directory, PEFT adapter folders or adapter files) with
        the base weights W0 (a state dict, an nn.Module, or safetensors files). Headers and
        configs are read and everything is checked; no tensor data of a file is read."""
        if base is None:
            raise TypeError("Trajectory.open(adapters, base=...): a LoRA trajectory needs the "
                            "frozen base weights W0")
        given = None if scale is None else _GivenScaling(scale)
        adapter_files, config_paths, steps = _adapter_sources(source)
        files, headers, index = [], [], {}

        def add_file(path: str) -> int:
            if path not in index:
                header = read_header(path)
                index[path] = len(headers)
                headers.append(header)
            return index[path]

        sources, shapes, dtypes, where = _base_sources(base, add_file, headers)
        per_checkpoint = []
        for path in adapter_files:
            f = add_file(path)
            per_checkpoint.append((f, _read_factors(headers[f])))
        if given is not None:
            both = [c for c in config_paths if c is not None]
            if both:
                raise ValueError(f"scale= was given, but {both[0]} gives the scaling too; pass "
                                 "one of them")
            if isinstance(scale, Mapping):
                paths = set(per_checkpoint[0][1])
                missing, extra = paths - scale.keys(), scale.keys() - paths
                if missing or extra:
                    parts = ([f"missing {_few(missing)}"] if missing else []) + (
                        [f"unknown {_few(extra)}"] if extra else [])
                    raise ValueError(f"scale: its module paths do not match the adapters' "
                                     f"({'; '.join(parts)})")
            scalings = [given] * len(adapter_files)
        else:
            cache, scalings = {}, []
            for path, config in zip(adapter_files, config_paths):
                if config is None:
                    raise CheckpointError(
                        f"{path}: no {CONFIG_FILE} beside it gives the LoRA scaling "
                        "(lora_alpha / r); put the adapter's config there, or pass scale=")
                if config not in cache:
                    cache[config] = _PeftScaling(_read_json(config), config)
                scalings.append(cache[config])
        modules = _check_modules(per_checkpoint, headers, scalings, sources, shapes, dtypes,
                                 where)
        for module in modules.values():
            for i, (f, factors) in enumerate(per_checkpoint):
                sources[(module.weight, i, "A")] = (f, factors[module.path]["A"])
                sources[(module.weight, i, "B")] = (f, factors[module.path]["B"])
        for h in headers:
            try:
                files.append(MappedFile(h.path, h.file_nbytes, h.file_id))
            except BaseException:
                for f in files:
                    f.close()
                raise
        return cls(files=files, sources=sources, modules=modules, steps=steps, shapes=shapes,
                   dtypes=dtypes)

    # ------------------------------------------------------------------ inspection

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    @property
    def adapted(self) -> dict[str, int]:
        """The adapted weights' names and their LoRA ranks."""
        return {name: m.rank for name, m in sorted(self._modules.items())}

    @property
    def scales(self) -> dict[str, list[float]]:
        """The adapted weights' names and each checkpoint's scaling s."""
        return {name: list(m.scales) for name, m in sorted(self._modules.items())}

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i):
        """Checkpoint i, W0 + s B_i A_i, as a dict of new tensors in the base's dtypes."""
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"checkpoint index {i} is out of range for {n} checkpoints")
        return self.merge([1.0 if j == i % n else 0.0 for j in range(n)])

    def __repr__(self) -> str:
        return (f"LoraTrajectory({len(self)} checkpoints, steps {self.steps[0]}.."
                f"{self.steps[-1]}, {len(self._modules)} adapted of {len(self.shapes)} tensors)")

    def close(self) -> None:
        """Close the files and drop resident copies; using the trajectory then raises."""
        self._closed = True
        self._resident = None
        self._forget_plans()
        self._views.clear()
        for f in self._files:
            f.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the trajectory is closed; open it again with Trajectory.open")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ merging

    def merge(self, coeffs, base=None, device="cpu", dtype: torch.dtype | None = None) -> dict:
        """The merged checkpoint as a new dict name -> tensor on device; floating-point tensors
        get dtype (default: the base's). Same coefficients and base as merge_into."""
        self._check_open()
        device = torch.device(device)
        out = {}
        for name in self.names:
            d = self.dtypes[name]
            if d.is_floating_point and dtype is not None:
                d = dtype
            out[name] = torch.empty(self.shapes[name], dtype=d, device=device)
        (row,) = engine._coeff_rows(coeffs, None, len(self))
        # New tensors each call: no plan would serve again, and keeping them would keep out.
        self._run([engine._target_tensors(out)], [row], base, ints_required=True,
                  keep_plans=False)
        return out

    def _lcsc_merge_into(self, target, coeffs, base=None):
        """lcsc_fast.merge_into(target, traj, coeffs, base) lands here."""
        (row,) = engine._coeff_rows(coeffs, None, len(self))
        self._run([engine._target_tensors(target)], [row], base, ints_required=True)
        return target

    def merge_batched(self, coeffs, outs, base=None) -> None:
        """K merges: outs[k] (a dict or module holding every floating-point tensor of the
        trajectory) gets the merge with coeffs[k]; integer tensors are not touched."""
        if isinstance(outs, (Mapping, torch.nn.Module)) or not isinstance(outs, Sequence):
            raise TypeError("outs: expected a sequence of dicts or modules")
        rows = engine._coeff_rows(coeffs, len(outs), len(self))
        self._run([engine._target_tensors(o) for o in outs], rows, base, ints_required=False)

    def _run(self, outs: list[dict], rows: list[list[float]], base, ints_required: bool,
             keep_plans: bool = True) -> None:
        """Validate every output, coefficient and source, then merge row k into outs[k].
        keep_plans: keep each adapted weight's LoraPlan for the next merge into the same
        tensors (see _lora_plan)."""
        self._check_open()
        what = "the target" if ints_required else "outs[{k}]"
        checked = [self._check_target(t, what.format(k=k), ints_required)
                   for k, t in enumerate(outs)]
        device = None
        for k, (_, _, d) in enumerate(checked):
            if device is not None and d is not None and d != device:
                raise ValueError(f"outs[{k}] is on {d} but outs[0] is on {device}")
            device = device or d
        device = device or torch.device("cpu")
        if self._resident is not None and _normalized(device) != self._resident[0]:
            raise ValueError(f"the trajectory is resident on {self._resident[0]} but the target "
                             f"is on {device}; merge on that device or call .to({str(device)!r})")
        base_state = self._check_base(base, device)
        plans = [self._coefficients(row, base) for row in rows]
        if self._resident is None:
            for f in self._files:
                f.check_unchanged()

        w0 = {name: self._tensor(name, device) for name in self._float_names}
        factors = self._factors(device)
        # Copies, read now: t.copy_() from a view of the mapping would not be fault-guarded.
        ints = {name: self._tensor(name, device, view=False) for name in self.shapes
                if name not in w0 and ints_required}
        # Every tensor but the adapted ones (all of them unless fused) is sum_j a_j D_j, D_j
        # being W0 or a caller's base. One engine plan holds these sums for every output, output
        # k's as entries spans[k], run one output at a time (each has its own a_j). The fused
        # adapted weights, which their LoraPlans write alone, follow for the plan's overlap
        # check only: it then covers every output of every candidate before any is written.
        dense_kinds = ["base", "W0"] if base_state is not None else ["W0"]  # as _coefficients
        tables = _CandidateTables(device, len(dense_kinds), 1, inputs=dense_kinds)
        label = "target" if ints_required else "outs[{k}]"
        spans, fused_k, check_only = [], [], []
        for k, ((floats, _, _), (dense, _)) in enumerate(zip(checked, plans)):
            fused = len(dense) == 1 and dense[0][0] == "W0" and np.float32(dense[0][1]) == 1.0
            fused_k.append(fused)
            lo = len(tables.names)
            for name, t in floats.items():
                if fused and name in self._modules:
                    check_only.append((k, name, t))
                else:
                    tables.add_output(k, label.format(k=k), name, t, w0, base_state)
            spans.append((lo, len(tables.names)))
        for k, name, t in check_only:  # a fused LoraPlan reads W0, the only dense source
            tables.add_output(k, label.format(k=k), name, t, w0, base_state)
        if tables.names:
            tables.finish()  # raises for any overlap
        lora_plans = [[(self._lora_plan(k, name, t, factors[name], w0[name] if fused else t,
                                        keep_plans), name)
                       for name, t in floats.items() if name in self._modules]
                      for k, ((floats, _, _), fused) in enumerate(zip(checked, fused_k))]

        for k, ((floats, int_targets, _), (dense, lora)) in enumerate(zip(checked, plans)):
            lo, hi = spans[k]
            with naming_changed_files(self._files):
                if hi > lo:
                    tables.run([[a for _, a in dense]], lo, hi, guard_faults=True)
                for plan, name in lora_plans[k]:
                    plan(lora[name])
            engine._bump_versions(list(floats.values()))
            with torch.no_grad():
                for name, t in int_targets.items():
                    t.copy_(ints[name])

    def _factors(self, device: torch.device) -> dict:
        """{adapted name: (As, Bs)}, every checkpoint's factors on device as As[i] [r, n] and
        Bs[i] [m, r] whatever the layer (B A reshaped is a conv weight's delta). Kept per device
        when they are views of the mapping or resident tensors; built per merge when each merge
        copies them to another device anyway."""
        device = _normalized(device)
        lists = self._factor_lists.get(device)
        if lists is not None:
            return lists
        lists = {name: ([self._tensor((name, i, "A"), device).reshape(m.rank, -1)
                         for i in range(len(self))],
                        [self._tensor((name, i, "B"), device).reshape(-1, m.rank)
                         for i in range(len(self))])
                 for name, m in self._modules.items()}
        if self._resident is not None or device.type == "cpu":
            self._factor_lists[device] = lists
        return lists

    def _lora_plan(self, k: int, name: str, out: torch.Tensor, factors, base,
                   keep: bool) -> LoraPlan:
        """The LoraPlan writing adapted weight `name` of output k: the one of the previous merge
        when it was built for these very tensors, else a new one (validated once, here; kept
        for the next merge with keep)."""
        As, Bs = factors
        cached = self._lora_plans.get((k, name))
        if cached is not None:
            plan, plan_As = cached
            if (plan.out is out and plan.base is base and plan_As is As
                    and out.data_ptr() == plan.out_ptr and base.data_ptr() == plan.base_ptr):
                return plan
        # guard_faults: the factors may be views of the mapped adapter files
        plan = LoraPlan(out, As, Bs, base=base, guard_faults=True)
        if keep:
            self._lora_plans[(k, name)] = (plan, As)
        return plan

    def _forget_plans(self) -> None:
        self._lora_plans.clear()
        self._factor_lists.clear()

    def _coefficients(self, w: list[float], base):
        """For one merge: the dense terms [(source, coefficient)] and, per adapted weight, the
        coefficients of its low-rank terms with the scaling folded in (the float32 w_i =
        fl32(s c_i) that lora_weighted_sum forms itself from scale * c_i)."""
        total = math.fsum(w)
        lora = list(w)
        if base is None:  # (1): (sum c) W0 + s sum_i c_i B_i A_i
            dense = [("W0", total)]
        elif isinstance(base, int):
            # theta_b + sum_i c_i (theta_i - theta_b) = W0 + s sum_i c_i B_i A_i
            #                                           + (1 - sum c) s B_b A_b
            dense = [("W0", 1.0)]
            lora[base % len(self)] += 1.0 - total
        else:  # theta_B + sum_i c_i (theta_i - theta_B), theta_B a caller's state dict
            dense = [("base", 1.0 - total), ("W0", total)]
        engine._check_float32_finite([a for _, a in dense], "coefficients of W0 and the base")
        folded = {}
        for name, module in self._modules.items():
            folded[name] = [c * s for c, s in zip(lora, module.scales)]
            engine._check_float32_finite(folded[name], f"scale * coeffs of {name!r}")
        return dense, folded

    def _check_target(self, tensors: dict, what: str, ints_required: bool):
        """({float name: tensor} to write, {integer name: tensor} to copy, device); raises
        before anything is written."""
        floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
        if ints_required:
            held = {k: v for k, v in tensors.items() if k in self.shapes or v.is_floating_point()}
            _check_names(set(self.shapes), held, what)
        else:
            _check_names(set(self._float_names), floats, what)
        out, device, seen = {}, None, {}
        for name in self._float_names:
            t = tensors[name]
            engine._check_tensor(t, f"{what}[{name!r}]")
            if tuple(t.shape) != self.shapes[name]:
                raise ValueError(f"{what}[{name!r}]: shape {tuple(t.shape)} differs from the "
                                 f"trajectory's {self.shapes[name]}")
            device = engine._one_device(device, t, f"{what}[{name!r}]")
            key = (t.data_ptr(), t.numel(), t.dtype)
            if t.numel() and key in seen:
                if name in self._modules or seen[key] in self._modules:
                    raise ValueError(f"{what}[{name!r}] and {what}[{seen[key]!r}] share storage, "
                                     "and one of them is LoRA-adapted; they cannot both be merged")
                continue  # a tied weight: merged once, under its first name
            seen[key] = name
            out[name] = t
        ints = {}
        if ints_required:
            for name in self.shapes:
                # The base's integer tensors are copied: a floating-point target for one is
                # refused here, not left unwritten.
                if name in self._float_names or name not in tensors:
                    continue
                t = tensors[name]
                if t.dtype != self.dtypes[name] or tuple(t.shape) != self.shapes[name]:
                    raise ValueError(f"{what}[{name!r}]: {t.dtype} {tuple(t.shape)} does not "
                                     f"match the base's {self.dtypes[name]} {self.shapes[name]}")
                ints[name] = t
        return out, ints, device

    def _check_base(self, base, device):
        """merge_into's base= for a LoRA trajectory: None, a checkpoint index, or a state dict
        (returned, checked)."""
        if base is None:
            return None
        if isinstance(base, bool) or not isinstance(base, (int, Mapping)):
            raise TypeError("base: expected a checkpoint index or a state dict")
        if isinstance(base, int):
            if not -len(self) <= base < len(self):
                raise ValueError(f"base: index {base} is out of range for {len(self)} "
                                 "checkpoints")
            return None
        _check_names(set(self.shapes), base, "base")
        for name in self._float_names:
            t = base[name]
            engine._check_tensor(t, f"base[{name!r}]")
            if tuple(t.shape) != self.shapes[name] or t.device != device:
                raise ValueError(f"base[{name!r}]: {tuple(t.shape)} on {t.device} does not match "
                                 f"the target's {self.shapes[name]} on {device}")
        return base

    # ------------------------------------------------------------------ sources

    def _tensor(self, key, device: torch.device, view: bool = True) -> torch.Tensor:
        """Source `key` (a base name, or (weight, checkpoint, "A"/"B")) on device. From a mapped
        file: a view of the mapping with view on the CPU (the engine reads it under its fault
        guard), else a copy read under the fault guard; plain torch reading the mapping (a
        copy_, a .to()) would die of SIGBUS if the file shrank."""
        if self._resident is not None:
            return self._resident[1][key]
        src = self._sources[key]
        if isinstance(src, torch.Tensor):
            return src if src.device == device else src.to(device)
        if view and device.type == "cpu":
            return self._mapped(key, *src)
        return self._files[src[0]].tensor(src[1]).to(device)

    def _mapped(self, key, f: int, entry: TensorEntry) -> torch.Tensor:
        """A tensor of a mapped file: a view of the mapping where its bytes are aligned for its
        dtype (so nothing is copied), else a copy."""
        view = self._views.get(key)
        if view is not None:
            return view
        file = self._files[f]
        if entry.begin % entry.dtype.itemsize or not entry.nbytes:
            return file.tensor(entry)
        # MappedFile._bytes is the whole mapping as a read-only uint8 tensor; nothing writes it.
        view = file._bytes[entry.begin:entry.begin + entry.nbytes].view(entry.dtype)
        view = view.reshape(entry.shape)
        self._views[key] = view
        return view

    def to(self, device) -> LoraTrajectory:
        """Keep W0 and every factor resident on device ("cuda", "cuda:1") or in pinned host
        memory ("pinned"), so that repeated merges (a search) never read the files. Returns
        self."""
        self._check_open()
        pinned = str(device) == "pinned"
        target = _normalized(torch.device("cpu" if pinned else device))
        resident = {}
        for key, src in self._sources.items():
            t = src if isinstance(src, torch.Tensor) else self._files[src[0]].tensor(src[1])
            resident[key] = t.pin_memory() if pinned else t.to(target)
        self._resident = (target, resident)
        self._forget_plans()
        return self


def _check_names(names: set, state: Mapping, what: str) -> None:
    """state has exactly `names`; the message says which differ, and what a PEFT model is."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{what}: expected a dict of tensors, got {type(state).__name__}")
    missing, extra = sorted(names - state.keys()), sorted(state.keys() - names)
    if missing or extra:
        parts = ([f"missing {engine._few(missing)}"] if missing else []) + (
            [f"unexpected {engine._few(extra)}"] if extra else [])
        hint = ""
        if any(_parse_factor(n) is not None or "base_layer" in n.split(".") for n in extra):
            hint = ("; merge into the plain model (a PEFT-wrapped one holds its own adapters: "
                    "use peft_model.get_base_model() after unloading them, or a fresh model)")
        raise ValueError(f"{what}'s tensors do not match the LoRA trajectory's base: "
                         f"{'; '.join(parts)}{hint}")


def _base_sources(base, add_file, headers):
    """The base W0: ({name: tensor or (file index, entry)}, shapes, dtypes, description)."""
    sources, shapes, dtypes, origin = {}, {}, {}, {}
    if isinstance(base, (torch.nn.Module, Mapping)):
        state = base.state_dict() if isinstance(base, torch.nn.Module) else base
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"base[{name!r}]: expected a torch.Tensor, got "
                                f"{type(t).__name__}")
            if _parse_factor(name) is not None:
                continue  # a live PEFT model's own adapters are not part of W0
            plain = _plain_name(name)
            if plain in origin:
                raise ValueError(f"base: {origin[plain]!r} and {name!r} are both the plain "
                                 f"model's {plain!r}")
            if t.is_floating_point() and t.dtype not in _MERGEABLE:
                raise TypeError(f"base[{name!r}]: dtype {t.dtype} is not supported; use float32, "
                                "float16 or bfloat16")
            origin[plain] = name
            # A copy: the caller's model may be the merge target, and every merge starts from W0.
            sources[plain] = t.detach().clone(memory_format=torch.contiguous_format)
            shapes[plain], dtypes[plain] = tuple(t.shape), t.dtype
        return sources, shapes, dtypes, "the base state dict"
    if isinstance(base, (str, os.PathLike)):
        base = [base]
    if not isinstance(base, Sequence) or isinstance(base, (str, bytes)) or not base:
        raise TypeError("base: expected a state dict, an nn.Module, or safetensors file(s)")
    paths = [f for p in base for f in _checkpoint_files(os.fspath(p))]
    for path in paths:
        f = add_file(path)
        for name, entry in headers[f].entries.items():
            if _parse_factor(name) is not None:
                continue
            plain = _plain_name(name)
            if plain in origin:
                raise CheckpointError(f"{path}: tensor {name!r} is the plain model's {plain!r}, "
                                      f"as {origin[plain]!r} is")
            if entry.dtype.is_floating_point and entry.dtype not in _MERGEABLE:
                raise CheckpointError(f"{path}: tensor {name!r} is {entry.dtype}; merges need "
                                      "float32, float16 or bfloat16")
            origin[plain] = f"{path}: {name}"
            sources[plain] = (f, entry)
            shapes[plain], dtypes[plain] = entry.shape, entry.dtype
    return sources, shapes, dtypes, ", ".join(paths)


def _check_modules(per_checkpoint, headers, scalings, sources, shapes, dtypes, where):
    """{adapted weight name: _Module}: the same modules, shapes and dtypes in every checkpoint,
    each adapting a base weight of the right shape."""
    f0, first = per_checkpoint[0]
    path0 = headers[f0].path
    for f, factors in per_checkpoint[1:]:
        path = headers[f].path
        missing, extra = first.keys() - factors.keys(), factors.keys() - first.keys()
        if missing or extra:
            parts = ([f"missing {_few(missing)}"] if missing else []) + (
                [f"unexpected {_few(extra)}"] if extra else [])
            raise CheckpointError(f"{path}: its LoRA modules differ from {path0}'s: "
                                  f"{'; '.join(parts)}")
        for module, slot in factors.items():
            rank, rank0 = slot["A"].shape[0], first[module]["A"].shape[0]
            if rank != rank0:
                raise CheckpointError(f"{path}: module {module!r} has rank {rank} "
                                      f"({slot['A'].name!r} {list(slot['A'].shape)}) but rank "
                                      f"{rank0} in {path0}; a trajectory's checkpoints share "
                                      "each module's rank")
            for factor in ("A", "B"):
                e, e0 = slot[factor], first[module][factor]
                if e.shape == e0.shape and e.dtype == e0.dtype:
                    continue
                if e.shape != e0.shape:
                    raise CheckpointError(f"{path}: tensor {e.name!r} has shape {list(e.shape)} "
                                          f"but {list(e0.shape)} in {path0}")
                raise CheckpointError(f"{path}: tensor {e.name!r} is {e.dtype} but {e0.dtype} in "
                                      f"{path0}; a module's factors share one dtype")
    modules = {}
    for module in sorted(first):
        a, b = first[module]["A"], first[module]["B"]
        weight = f"{module}.weight" if module else "weight"
        if weight not in sources:
            raise CheckpointError(f"{path0}: module {module!r} adapts {weight!r}, which the base "
                                  f"({where}) does not have")
        shape = tuple(shapes[weight])
        rest = tuple(a.shape[1:])
        fits = (len(shape) >= 2 and shape[0] == b.shape[0]
                and (shape[1:] == rest or (len(rest) == 1 and rest[0] == math.prod(shape[1:]))))
        if not dtypes[weight].is_floating_point or not fits:
            raise CheckpointError(
                f"{path0}: module {module!r}: lora_B {list(b.shape)} @ lora_A {list(a.shape)} "
                f"does not fit the base weight {weight!r}, {dtypes[weight]} {list(shape)} "
                f"({where}); expected [out, ...] = [{b.shape[0]}, {', '.join(map(str, rest))}] "
                "(grouped convolutions and transposed weights are not supported)")
        scales = [scaling(module, a.shape[0], headers[f].path)
                  for (f, _), scaling in zip(per_checkpoint, scalings)]
        modules[weight] = _Module(module, weight, a.shape[0], tuple(a.shape), tuple(b.shape),
                                  a.dtype, scales)
    return modules
