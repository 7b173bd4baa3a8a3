"""The lcsc-fast command line: the demo; inspect, merge, pack and search trajectories.

    lcsc-fast demo                            LCSC against EMA on digits, end to end
    lcsc-fast inspect PATH...                 what a trajectory holds
    lcsc-fast search PATH... --objective M:F --out DIR
                                              LCSC coefficients -> DIR/coefficients.json + plots
    lcsc-fast merge PATH... --coeffs FILE --out merged.safetensors
    lcsc-fast pack PATH... OUT                a packed store, laid out for fast merges

PATH is whatever lcsc_fast.Trajectory.open accepts: a Recorder directory, a packed store, or
one or more checkpoint files (.safetensors, or a sharded model's index); with --lora-base, LoRA
adapters (PEFT adapter folders or files, or a Recorder directory of adapters) over those base
weights, checkpoint i being W0 + s B_i A_i (inspect, search, merge). Errors in the inputs
(a missing file, a coefficient file for another trajectory, a bad module:function) print one
line naming the problem and exit with status 2; an exception raised by the user's own objective
or target code is shown with its traceback and exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import itertools
import json
import math
import os
import sys
import textwrap
import traceback
from collections import Counter
from collections.abc import Mapping

from safetensors import SafetensorError

from ._io import write_atomically

__all__ = ["main"]

PROG = "lcsc-fast"
EXIT_OK, EXIT_USER_CODE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
STATE_NAME, HISTORY_NAME = "search.state", "history.jsonl"
COEFFS_NAME, COEFFS_PLOT, SEARCH_PLOT = "coefficients.json", "coefficients.png", "search.png"
_DTYPE_CHOICES = ("fp32", "fp16", "bf16")

_MAIN_EPILOG = f"""\
examples (PATH: a Recorder directory, a packed store, or checkpoint files):
  {PROG} demo                                   # LCSC against EMA on digits, end to end
  {PROG} inspect run/
  {PROG} inspect ckpt/step-*.safetensors --json
  {PROG} search run/ --objective my_eval:score --out search/ --budget 2000
  {PROG} merge run/ --coeffs search/coefficients.json --out merged.safetensors
  {PROG} pack run/ run-packed/ --dtype bf16

'{PROG} COMMAND --help' shows each command's options and more examples.
"""

_DEMO_EPILOG = f"""\
examples:
  {PROG} demo                                   # consistency training, ~10 minutes on 2 cores
  {PROG} demo --quick --out /tmp/demo           # the same pipeline in under 2 minutes
  {PROG} demo --trainer dm                      # a diffusion model, FID at NFE 15 and 9
  {PROG} demo --trainer ect --seed 1            # ECT from a diffusion model it trains first
  {PROG} demo --lora                            # + LoRA fine-tuning, LCSC over the adapters
"""

_INSPECT_EPILOG = f"""\
examples:
  {PROG} inspect run/                           # a Recorder directory (steps from its manifest)
  {PROG} inspect ckpt/step-*.safetensors        # checkpoint files, in the order given
  {PROG} inspect run-packed/ --json             # a packed store, as JSON
  {PROG} inspect lora/ckpt-*/ --lora-base base.safetensors   # PEFT adapters over their base
"""

_SEARCH_EPILOG = f"""\
The objective is a function that scores the merged model, lower being better. With this
file my_eval.py in the current directory (the default target is a dict name -> float32 tensor
shaped like the checkpoints, merged in place before every call):

  import torch
  def score(model):
      return float(sum((t ** 2).sum() for t in model.values() if t.is_floating_point()))

examples:
  {PROG} search run/ --objective my_eval:score --out search/ --budget 2000
  {PROG} search ckpt/*.safetensors --objective my_eval.py:score --out search-files/ --budget 200
  {PROG} search run/ --objective my_eval:fid --target my_eval:build_model --out search-fid/
  {PROG} search run/ --objective my_eval:score --out search-cmaes/ --algorithm cmaes --seed 1
  {PROG} search run/ --objective my_eval:score --out search/ --resume   # after a kill
  {PROG} search lora/ckpt-*/ --lora-base base.safetensors --objective my_eval:score --out search-lora/ --budget 64
  {PROG} search run/ --objective my_eval:score --out search/ --resume --budget 4000  # extend

Writes DIR/coefficients.json (merge it with '{PROG} merge'), DIR/coefficients.png (the
coefficient pattern over checkpoint steps), DIR/search.png (best score against evaluations,
the baselines as horizontal lines), DIR/history.jsonl (one line per evaluation) and
DIR/search.state (to resume).
"""

_MERGE_EPILOG = f"""\
FILE is the coefficients.json that '{PROG} search' writes, or a JSON list of one number per
checkpoint, such as [-0.1, 0.3, 0.8].

examples:
  {PROG} merge run/ --coeffs search/coefficients.json --out merged.safetensors
  {PROG} merge run-packed/ --coeffs search/coefficients.json --dtype bf16 --out bf16.safetensors
  {PROG} merge a.safetensors b.safetensors --coeffs w.json --out merged-ab.safetensors --force
  {PROG} merge run/ --coeffs deltas.json --base 0 --out merged-base0.safetensors
  {PROG} merge lora/ckpt-*/ --lora-base base.safetensors --coeffs lora-w.json --out merged-lora.safetensors
"""

_PACK_EPILOG = f"""\
examples:
  {PROG} pack run/ run-packed/                        # bf16 deltas against checkpoint 0
  {PROG} pack ckpt/*.safetensors packed/ --dtype fp32 # fp32 deltas: closer, twice the size
  {PROG} pack run/ run-packed-last/ --base -1         # deltas against the last checkpoint
"""


class UsageError(ValueError):
    """A command-line input that cannot be used; the message says what and what to do."""


class UserCodeError(Exception):
    """The user's objective or target code raised; __cause__ is its exception."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


# ---------------------------------------------------------------- parser

def _parser() -> argparse.ArgumentParser:
    from . import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=fmt, epilog=_MAIN_EPILOG,
        description=_wrap("Fast Linear Combination of Saved Checkpoints (LCSC): inspect, "
                          "search, merge and pack trajectories of saved checkpoints."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    paths_help = ("a Recorder directory, a packed store, or one or more checkpoint files "
                  "(.safetensors, or a sharded model's index .json)")

    p = sub.add_parser("demo", formatter_class=fmt, epilog=_DEMO_EPILOG,
                       help="LCSC against EMA on scikit-learn's digits, end to end",
                       description=_wrap("Train a consistency (or diffusion) model on the 8x8 "
                                         "digits while recording checkpoints, search LCSC "
                                         "coefficients with FID on fixed noise, then score the "
                                         "last checkpoint, the training EMA, EMA*, LCSC and "
                                         "LCSC on the first quarter of training on held-out "
                                         "noise. Writes a report folder (summary.md, "
                                         "results.json, PNGs). Needs pip install "
                                         "'lcsc_fast[demo]'."))
    p.add_argument("--out", default="lcsc-demo", metavar="DIR",
                   help="report folder; the training run goes to DIR/run (default: "
                        "%(default)s)")
    p.add_argument("--trainer", choices=("ct", "cd", "ect", "dm"), default="ct",
                   help="ct: consistency training (iCT-style); cd: consistency distillation "
                        "and ect: consistency tuning, both from a diffusion model trained "
                        "first; dm: the diffusion model itself (default: %(default)s)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps, evaluations and samples: under 2 minutes")
    p.add_argument("--steps", type=_positive_int, metavar="N",
                   help="training steps (default: 4000; --quick: 600)")
    p.add_argument("--checkpoints", type=_positive_int, metavar="N",
                   help="snapshots recorded over the run; must divide --steps (default: 100; "
                        "--quick: 40)")
    p.add_argument("--budget", type=_positive_int, metavar="N",
                   help="evaluations per search (default: 1000; --quick: 64)")
    p.add_argument("--sample-steps", type=int, choices=(1, 2),
                   help="consistency models (ct, cd, ect): 1- or 2-step sampling (default: 1); "
                        "not with --trainer dm, which samples with EDM's Heun sampler at NFE 15 "
                        "and 9")
    p.add_argument("--lora", action="store_true",
                   help="then fine-tune the final model with LoRA (recording the adapters) and "
                        "compare LCSC over the adapters with LCSC over the full model "
                        "(the paper's Tab. 5 in miniature)")
    p.add_argument("--lora-steps", type=_positive_int, metavar="N",
                   help="with --lora: fine-tuning steps; --checkpoints must divide them "
                        "(default: 2000; --quick: 320)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars or timings")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("inspect", formatter_class=fmt, epilog=_INSPECT_EPILOG,
                       help="show what a trajectory holds",
                       description=_wrap("Show a trajectory's kind, checkpoints, steps, "
                                         "tensors, parameters, dtypes and size on disk. Reads "
                                         "headers only."))
    p.add_argument("paths", nargs="+", metavar="PATH", help=paths_help)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_lora_options(p)
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("search", formatter_class=fmt, epilog=_SEARCH_EPILOG,
                       help="search LCSC coefficients that minimise an objective",
                       description=_wrap("Search merge coefficients (summing to 1) that "
                                         "minimise an objective, and score the baselines "
                                         "(last, uniform, EMA) beside them."))
    p.add_argument("paths", nargs="+", metavar="PATH", help=paths_help)
    p.add_argument("--objective", required=True, metavar="MODULE:FUNCTION",
                   help="objective(model) -> float, lower is better; MODULE is importable from "
                        "the current directory, or a path to a .py file")
    p.add_argument("--target", metavar="MODULE:FUNCTION",
                   help="function() -> the model (torch.nn.Module or dict of tensors) each "
                        "candidate is merged into (default: a dict of float32 tensors shaped "
                        "like the checkpoints)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--every", type=_positive_int, default=None, metavar="K",
                   help="training steps between consecutive checkpoints, for checkpoint files "
                        "that do not record their steps (Recorder directories and packed stores "
                        "do); the EMA baselines depend on it. Default: their recorded steps, "
                        "else 1")
    p.add_argument("--budget", type=_positive_int, default=2000, metavar="N",
                   help="objective evaluations of the search; the baselines come on top "
                        "(default: %(default)s)")
    p.add_argument("--algorithm", choices=("lcsc", "cmaes"), default="lcsc",
                   help="lcsc: the paper's evolutionary search; cmaes: CMA-ES "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the search saved in DIR/{STATE_NAME} (same arguments; a "
                        "larger --budget extends a finished search)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr")
    _add_lora_options(p)
    p.set_defaults(run=_cmd_search)

    p = sub.add_parser("merge", formatter_class=fmt, epilog=_MERGE_EPILOG,
                       help="merge the checkpoints with given coefficients into one file",
                       description=_wrap("Merge sum_i w_i theta_i (or theta_base + sum_i "
                                         "w_i (theta_i - theta_base) with --base) into a "
                                         ".safetensors file. The file is written under a "
                                         "temporary name and renamed, so an existing output "
                                         "is never left half-written."))
    p.add_argument("paths", nargs="+", metavar="PATH", help=paths_help)
    p.add_argument("--coeffs", required=True, metavar="FILE",
                   help="coefficients JSON (from search), or a JSON list of numbers")
    p.add_argument("--out", required=True, metavar="FILE", help="the merged .safetensors file")
    p.add_argument("--base", type=int, metavar="INDEX",
                   help="merge as differences against checkpoint INDEX")
    p.add_argument("--dtype", choices=_DTYPE_CHOICES,
                   help="dtype of the merged floating-point tensors (default: the "
                        "checkpoints' own)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    _add_lora_options(p)
    p.set_defaults(run=_cmd_merge)

    p = sub.add_parser("pack", formatter_class=fmt, epilog=_PACK_EPILOG,
                       help="write a packed store (base + deltas) for fast merges",
                       description=_wrap("Write a packed store: one base checkpoint whole, "
                                         "and every other checkpoint as a delta against it, "
                                         "laid out so that a merge streams one file front to "
                                         "back."))
    p.add_argument("paths", nargs="+", metavar="PATH", help=paths_help)
    p.add_argument("out", metavar="OUT", help="the store's directory (new or empty)")
    p.add_argument("--dtype", choices=_DTYPE_CHOICES, default="bf16",
                   help="dtype of the deltas (default: %(default)s)")
    p.add_argument("--base", type=int, default=0, metavar="INDEX",
                   help="the checkpoint kept whole (default: %(default)s)")
    p.set_defaults(run=_cmd_pack)
    return parser


def _add_lora_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora-base", action="append", metavar="FILE",
                   help="the frozen base weights W0 (.safetensors; repeat the option for "
                        "shards): the PATHs are then LoRA adapters (PEFT adapter folders or "
                        "adapter_model.safetensors files, or a Recorder directory of adapters)")
    p.add_argument("--lora-scale", type=float, metavar="S",
                   help="the LoRA scaling for adapters without an adapter_config.json (default "
                        "with a config: its lora_alpha / r)")


def _wrap(text: str) -> str:
    # RawDescriptionHelpFormatter keeps the epilogs' examples as written; descriptions are
    # wrapped here instead.
    return textwrap.fill(text, width=90)


def _int_at_least(minimum: int, message: str):
    """An argparse type: an integer >= minimum, else message ({value} filled in)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(message.format(value=value))
        return value

    return parse


_positive_int = _int_at_least(1, "{value} is not positive")
_seed = _int_at_least(0, "{value} is negative; seeds are integers >= 0")


# ---------------------------------------------------------------- entry point

def main(argv=None) -> int:
    """Run the lcsc-fast command line with argv (default: sys.argv[1:]); returns the exit
    status: 0 done, 1 the user's objective or target code raised, 2 bad input, 130
    interrupted."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and argparse's own usage errors
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    where = f"{PROG} {args.command}"
    try:
        return args.run(args)
    except UserCodeError as e:
        cause = e.__cause__
        traceback.print_exception(type(cause), cause, cause.__traceback__)
        _error(where, f"{e.what} raised {type(cause).__name__} (traceback above)")
        return EXIT_USER_CODE
    except KeyboardInterrupt:
        hint = ""
        if args.command == "search":
            hint = (f"; the search state is saved after every generation: rerun with --resume "
                    f"to continue from {os.path.join(args.out, STATE_NAME)}")
        _error(where, f"interrupted{hint}")
        return EXIT_INTERRUPTED
    except (ValueError, TypeError) as e:  # CheckpointError and UsageError are ValueErrors
        _error(where, str(e))
        return EXIT_USAGE
    except OSError as e:  # a missing path, an output that exists, a directory in the way
        _error(where, _os_message(e))
        return EXIT_USAGE
    except SafetensorError as e:  # save_file's I/O errors (a full disk) are not OSErrors
        out = getattr(args, "out", None)
        what = "writing the output" if out is None else f"writing {out}"
        _error(where, f"{what} failed ({e}); outputs are renamed into place only when "
                      "complete, so nothing was changed: free some disk space (or fix the "
                      "permissions) and run the command again")
        return EXIT_USAGE


def _error(where: str, message: str) -> None:
    print(f"{where}: error: {' '.join(message.split())}", file=sys.stderr)


def _os_message(e: OSError) -> str:
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def _open(paths, args=None):
    from .trajectory import Trajectory

    source = paths[0] if len(paths) == 1 else list(paths)
    base, scale = getattr(args, "lora_base", None), getattr(args, "lora_scale", None)
    if scale is not None and base is None:
        raise UsageError("--lora-scale scales LoRA adapters; name their base weights with "
                         "--lora-base")
    if base is None:
        for path in paths:
            if os.path.isfile(os.path.join(path, "adapter_config.json")):
                raise UsageError(f"{path} holds a LoRA adapter; name the frozen base weights it "
                                 "adapts with --lora-base FILE")
        return Trajectory.open(source)
    return Trajectory.open(source, base=base[0] if len(base) == 1 else base, scale=scale)


# ---------------------------------------------------------------- inspect

def _cmd_demo(args) -> int:
    try:
        # Imported for their dependencies alone (clean-fid; the classifier's scikit-learn).
        importlib.import_module("cleanfid")
        importlib.import_module(".trainers.classifier", __package__)
        from . import demo
    except ImportError as e:
        raise UsageError(f"the demo needs scikit-learn and clean-fid ({e}); "
                         "pip install 'lcsc_fast[demo]'") from None
    overrides = {"out": args.out, "trainer": args.trainer, "seed": args.seed,
                 "lora": args.lora, "progress": args.progress}
    if args.sample_steps is not None:
        # Refused even at 1: the dm demo would ignore it.
        if args.trainer == "dm":
            raise UsageError(f"--sample-steps {args.sample_steps}: only consistency models (ct, "
                             "cd, ect) sample in 1 or 2 steps; --trainer dm samples with EDM's "
                             "Heun sampler at NFE " + " and ".join(map(str, demo.DM_NFES)))
        overrides["sample_steps"] = args.sample_steps
    for option, field in (("steps", "train_steps"), ("checkpoints", "checkpoints"),
                          ("budget", "budget"), ("lora_steps", "lora_steps")):
        if getattr(args, option) is not None:
            overrides[field] = getattr(args, option)
    config = demo.DemoConfig.quick(**overrides) if args.quick else demo.DemoConfig(**overrides)
    demo.run(config)
    return EXIT_OK


def _cmd_inspect(args) -> int:
    with _open(args.paths, args) as traj:
        info = _summary(traj, args.paths)
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    steps, gaps = info["steps"], info["step_gaps"]
    if len(steps) == 1:
        step_text = f"{steps[0]} (one checkpoint)"
    else:
        spacing = (f"every {next(iter(gaps))}" if len(gaps) == 1 else "gaps " + ", ".join(
            f"{g} (x{c})" for g, c in list(gaps.items())[:8]) + (", ..." if len(gaps) > 8
                                                                  else ""))
        step_text = f"{steps[0]}..{steps[-1]}, {spacing}"
    if info["source"] == "files":
        step_text += " (checkpoint files carry no training step: these are their positions)"
    kind = {"recorder": "checkpoints (a Recorder directory)",
            "files": "checkpoints (files, in the order given)"}.get(info["source"])
    if info["kind"] == "packed":
        kind = (f"packed store (checkpoint {info['packed_base']} whole, "
                f"{info['delta_dtype']} deltas)")
    if info["kind"] == "lora":
        ranks = sorted(set(info["lora_ranks"].values()))
        kind = (f"LoRA adapters over base weights W0: {_count(len(info['lora_ranks']), 'weight')}"
                f" adapted, rank {', '.join(map(str, ranks))}; checkpoint i is W0 + s B_i A_i")
    tensors, float_tensors = info["tensors"], info["floating_tensors"]
    dtypes = "; ".join(f"{d}: {_count(v['tensors'], 'tensor')}, "
                       f"{_count(v['elements'], 'element')}" for d, v in info["dtypes"].items())
    tensor_text = (f"{tensors} ({float_tensors} floating-point, merged; "
                   f"{tensors - float_tensors} other, copied from the last checkpoint)")
    disk, files = info["bytes_on_disk"], info["files"]
    disk_text = f"{_human_bytes(disk)} ({disk:,} bytes in {_count(files, 'file')})"
    rows = [("path", " ".join(info["paths"])), ("kind", kind),
            ("checkpoints", str(info["checkpoints"])), ("steps", step_text),
            ("tensors", tensor_text),
            ("parameters", f"{info['parameters']:,} (floating-point elements per checkpoint)"),
            ("dtypes", dtypes), ("on disk", disk_text)]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return EXIT_OK


def _summary(traj, paths) -> dict:
    """What `inspect` shows, as a JSON-ready dict."""
    source = traj.kind
    if traj.kind == "checkpoints":
        one_dir = len(paths) == 1 and os.path.isdir(paths[0])
        source = "recorder" if one_dir and os.path.exists(
            os.path.join(paths[0], "manifest.json")) else "files"
    steps = [int(s) for s in traj.steps]
    gaps = Counter(b - a for a, b in itertools.pairwise(steps))
    by_dtype: dict[str, dict[str, int]] = {}
    for name in traj.names:
        d = _dtype_name(traj.dtypes[name])
        entry = by_dtype.setdefault(d, {"tensors": 0, "elements": 0})
        entry["tensors"] += 1
        entry["elements"] += math.prod(traj.shapes[name])
    info = {
        "paths": [os.fspath(p) for p in paths], "kind": traj.kind, "source": source,
        "checkpoints": len(traj), "steps": steps,
        "step_gaps": {str(g): c for g, c in sorted(gaps.items())},
        "tensors": len(traj.names),
        "floating_tensors": sum(1 for n in traj.names if traj.dtypes[n].is_floating_point),
        "parameters": sum(math.prod(traj.shapes[n]) for n in traj.names
                          if traj.dtypes[n].is_floating_point),
        "dtypes": dict(sorted(by_dtype.items())),
        "files": len(traj._files), "bytes_on_disk": sum(f.nbytes for f in traj._files),
    }
    if traj.kind == "lora":
        info["lora_ranks"] = dict(sorted(traj.adapted.items()))
    if traj.kind == "packed":
        with open(os.path.join(paths[0], "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        info["packed_base"] = traj._packed_base
        info["delta_dtype"] = _dtype_name(_safetensors_dtype(manifest["delta_dtype"]))
    return info


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _safetensors_dtype(name: str):
    from .safetensors_io import SAFETENSORS_DTYPES

    return SAFETENSORS_DTYPES[name]


def _human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- merge

def _cmd_merge(args) -> int:
    import torch
    from safetensors.torch import save_file

    out = os.fspath(args.out)
    if os.path.isdir(out):
        raise UsageError(f"--out {out} is a directory; name the .safetensors file to write")
    if os.path.exists(out) and not args.force:
        raise UsageError(f"--out {out} exists; pass --force to replace it, or choose another "
                         "name")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out {out}: the directory {out_dir} does not exist; create it first")
    for path in [*args.paths, *(args.lora_base or ())]:
        if _same_file(out, path) or (os.path.isdir(path) and _inside(out, path)):
            raise UsageError(f"--out {out} is {'in ' if os.path.isdir(path) else ''}{path}, "
                             "which the merge reads; write it elsewhere")
    with _open(args.paths, args) as traj:
        if os.path.exists(out) and any(_same_file(out, f.path) for f in traj._files):
            raise UsageError(f"--out {out} is one of the trajectory's own files; choose "
                             "another name")
        coeffs = _read_coefficients(args.coeffs, traj)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                 None: None}[args.dtype]
        merged = traj.merge(coeffs, base=args.base, dtype=dtype)
        _check_finite(merged, traj, coeffs, args.base)
        metadata = {"format": "pt", "lcsc_fast": json.dumps(
            {"coefficients": coeffs, "steps": list(traj.steps), "base": args.base})}
        _atomic(out, lambda tmp: save_file(merged, tmp, metadata=metadata))
    print(f"merged {len(coeffs)} checkpoints (coefficients sum to {math.fsum(coeffs):.6g}) "
          f"into {out}")
    return EXIT_OK


def _check_finite(merged: dict, traj, coeffs, base: int | None) -> None:
    """UsageError naming the first tensor of the merge that is not finite, and why: the
    checkpoints that hold NaN or Inf in it (a zero coefficient does not hide them: 0 * NaN is
    NaN), values beyond the output dtype's range (float16 ends at 65504), or beyond float32's,
    which the merge accumulates in."""
    import torch

    for name, tensor in merged.items():
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            continue
        culprits, exact = [], 0.0  # exact: the merge in float64, to tell the ranges apart
        for i, w in enumerate(coeffs):
            theta = traj[i][name].double()
            if not bool(torch.isfinite(theta).all()):
                culprits.append(i)
            exact = exact + w * theta
        if base is not None:
            exact = exact + (1.0 - math.fsum(coeffs)) * traj[base % len(traj)][name].double()
        peak = float(exact.abs().max())
        if culprits:
            where = f"checkpoint(s) {_short(culprits)} hold NaN or Inf there"
        elif tensor.dtype != torch.float32 and peak <= torch.finfo(torch.float32).max:
            other = "fp32 or bf16" if tensor.dtype == torch.float16 else "fp32"
            where = (f"its values reach {peak:.6g}, beyond the range of {_dtype_name(tensor.dtype)}"
                     f" (largest {torch.finfo(tensor.dtype).max:.6g}); merge with --dtype {other}")
        else:
            where = "the coefficients overflow float32 there"
        raise UsageError(f"the merged {name!r} is not finite: {where}; nothing was written")


def _inside(path: str, directory: str) -> bool:
    real, folder = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, folder]) == folder


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _read_coefficients(path: str, traj) -> list[float]:
    """The coefficient vector in file path, checked against traj (length, steps)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--coeffs {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--coeffs {path}: cannot read it as JSON ({e})") from None
    steps = None
    if isinstance(data, Mapping):
        if "coefficients" not in data:
            raise UsageError(f"--coeffs {path}: a JSON object needs a \"coefficients\" list "
                             f"(found keys: {', '.join(sorted(data)) or 'none'})")
        steps = data.get("steps")
        data = data["coefficients"]
    if not isinstance(data, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in data):
        raise UsageError(f"--coeffs {path}: the coefficients must be a JSON list of numbers, "
                         "one per checkpoint")
    try:
        coeffs = [float(x) for x in data]
    except OverflowError:
        big = next(i for i, x in enumerate(data) if abs(x) > 1e308)
        raise UsageError(f"--coeffs {path}: coefficient {big} is too large for a float; every "
                         "coefficient must be finite") from None
    bad = [i for i, x in enumerate(coeffs) if not math.isfinite(x)]
    if bad:
        raise UsageError(f"--coeffs {path}: coefficient {bad[0]} is {coeffs[bad[0]]}; every "
                         "coefficient must be finite")
    if len(coeffs) != len(traj):
        raise UsageError(f"--coeffs {path}: {len(coeffs)} coefficients, but the trajectory has "
                         f"{len(traj)} checkpoints; use the coefficients searched for this "
                         "trajectory")
    # Checkpoint files record no steps (their steps read 0..N-1): a search given --every
    # recorded its own, which only have to be as many.
    unrecorded = list(traj.steps) == list(range(len(traj)))
    if steps is not None and steps != list(traj.steps) and not (
            unrecorded and isinstance(steps, list) and len(steps) == len(traj)):
        raise UsageError(f"--coeffs {path}: its steps {_short(steps)} differ from the "
                         f"trajectory's steps {_short(list(traj.steps))}; the coefficients were "
                         "searched for another trajectory (or delete \"steps\" from the file "
                         "to merge anyway)")
    return coeffs


def _short(values, k: int = 6) -> str:
    if not isinstance(values, list):
        return repr(values)
    if len(values) <= k:
        return repr(values)
    return "[" + ", ".join(map(repr, values[:k // 2])) + ", ..., " + ", ".join(
        map(repr, values[-(k // 2):])) + f"] ({len(values)} steps)"


def _atomic(path: str, write) -> None:
    """write(tmp) to a temporary file beside path, then rename it onto path: path is either
    its old self or complete, never half-written."""
    write_atomically(path, write)


# ---------------------------------------------------------------- pack

def _cmd_pack(args) -> int:
    from .pack import pack

    with _open(args.paths) as traj:
        before = sum(f.nbytes for f in traj._files)
        n, steps = len(traj), list(traj.steps)
        pack(traj, args.out, dtype=args.dtype, base=args.base)
    after = sum(os.path.getsize(os.path.join(args.out, name)) for name in os.listdir(args.out))
    print(f"packed {n} checkpoints (steps {steps[0]}..{steps[-1]}) into {args.out}: "
          f"{_human_bytes(after)} ({args.dtype} deltas against checkpoint "
          f"{args.base % n}; the checkpoints take {_human_bytes(before)})")
    return EXIT_OK


# ---------------------------------------------------------------- search

def _records_steps(paths) -> bool:
    """Whether the trajectory at paths records its checkpoints' steps: a Recorder directory
    or a packed store does, checkpoint files do not."""
    return len(paths) == 1 and os.path.isdir(paths[0])


def _cmd_search(args) -> int:
    from .search import search

    out = os.fspath(args.out)
    state_path = os.path.join(out, STATE_NAME)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a directory")
    if os.path.exists(state_path) and not args.resume:
        raise UsageError(f"{state_path} exists: a search was run in {out} before; pass --resume "
                         "to continue it (or extend it with a larger --budget), or remove the "
                         "file or choose another --out to start afresh")
    with _open(args.paths, args) as traj, _cwd_on_path():
        objective = _load_callable(args.objective, "--objective")
        if args.target is not None:
            target = _build_target(_load_callable(args.target, "--target"), args.target)
        else:
            target = _default_target(traj)
        if args.resume and not os.path.exists(state_path):
            print(f"{PROG} search: no {state_path} yet; starting from the beginning",
                  file=sys.stderr)
        steps = list(traj.steps)
        if args.every is not None:
            if _records_steps(args.paths):
                raise UsageError(f"--every: {args.paths[0]} records its checkpoints' steps "
                                 f"({_short(steps)}); --every is for checkpoint files, which "
                                 "do not")
            steps = [i * args.every for i in range(len(traj))]
        os.makedirs(out, exist_ok=True)
        result = search(traj, _guarded_objective(objective, args.objective), target,
                        budget=args.budget, algorithm=args.algorithm, seed=args.seed,
                        state_path=state_path, history_path=os.path.join(out, HISTORY_NAME),
                        progress=args.progress, steps=steps)

    from . import plots

    record = {
        "coefficients": result.coefficients, "steps": steps, "score": _json_number(result.score),
        "algorithm": args.algorithm, "seed": args.seed, "evaluations": result.evaluations,
        "baselines": {k: _json_number(v) for k, v in result.baselines.items()},
        "baseline_coefficients": result.baseline_coefficients,
    }
    coeffs_path = os.path.join(out, COEFFS_NAME)
    _atomic(coeffs_path, lambda tmp: _write_text(tmp, json.dumps(record, indent=1) + "\n"))
    ema_star = result.baseline_coefficients.get("ema*")
    best_ema = _ema_star_name(result)
    coeffs_png = plots.plot_coefficients(
        steps, result.coefficients, os.path.join(out, COEFFS_PLOT),
        baselines=None if ema_star is None else {
            f"ema* (= {best_ema})" if best_ema else "ema*": ema_star})
    search_png = plots.plot_search(result.history, result.baselines,
                                   os.path.join(out, SEARCH_PLOT))
    _print_table(result, args.algorithm)
    print(f"\nwrote {coeffs_path}, {coeffs_png}, {search_png}")
    lora = [f"--lora-base {b}" for b in args.lora_base or ()] + (
        [] if args.lora_scale is None else [f"--lora-scale {args.lora_scale}"])
    print(f"merge with: {PROG} merge {' '.join([*args.paths, *lora])} --coeffs {coeffs_path} "
          "--out merged.safetensors")
    return EXIT_OK


def _print_table(result, algorithm: str) -> None:
    """The search's score and every baseline's, best first within the baselines."""
    same = _ema_star_name(result)
    rows = [(f"{algorithm} search", result.score, f"{result.evaluations} evaluations")]
    order = sorted(result.baselines.items(),
                   key=lambda kv: (math.inf if math.isnan(kv[1]) else kv[1], kv[0]))
    for name, score in order:
        rows.append((name, score, f"= {same}" if name == "ema*" and same else ""))
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'score':>12}")
    for name, score, note in rows:
        print(f"{name:<{width}}  {score:>12.6g}  {note}".rstrip())


def _ema_star_name(result) -> str | None:
    """The EMA baseline that "ema*" (the best of the EMA grid) is, or None."""
    ema_star = result.baseline_coefficients.get("ema*")
    return next((k for k, w in result.baseline_coefficients.items()
                 if k != "ema*" and w == ema_star), None)


def _json_number(x: float):
    """x, or None for inf/nan, which JSON cannot hold."""
    return x if math.isfinite(x) else None


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def _cwd_on_path():
    """The current directory first on sys.path while the command runs, so `--objective
    my_eval:score` finds ./my_eval.py the way `python -c 'import my_eval'` would (a console
    script's sys.path starts with its own bin directory instead)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _load_callable(spec: str, option: str):
    """The function named by spec, "module:function" (a dotted module, importable from the
    current directory) or "path/to/file.py:function"."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{option} {spec!r}: expected MODULE:FUNCTION, such as my_eval:score "
                         "(my_eval.py in the current directory)")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise UsageError(f"{option} {spec!r}: no such file {module_name}")
        name = "_lcsc_fast_user_" + os.path.splitext(os.path.basename(module_name))[0]
        spec_obj = importlib.util.spec_from_file_location(name, module_name)
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[name] = module  # dataclasses and pickling look their module up here
        try:
            spec_obj.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise UserCodeError(f"{option} {spec}: importing {module_name}") from e
        except BaseException:
            sys.modules.pop(name, None)
            raise
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.split(".")[0] != e.name.split(".")[0]:
                # the module exists but imports a missing one: its traceback says where
                raise UserCodeError(f"{option} {spec}: importing {module_name}") from e
            raise UsageError(f"{option} {spec!r}: no module named {module_name!r} (looked in "
                             f"the current directory {os.getcwd()} and on sys.path); pass "
                             "MODULE:FUNCTION for a module there, or path/to/file.py:FUNCTION"
                             ) from None
        except Exception as e:  # the module's own code raised while importing
            raise UserCodeError(f"{option} {spec}: importing {module_name}") from e
    try:
        fn = getattr(module, attr)
    except AttributeError:
        names = sorted(n for n in vars(module) if not n.startswith("_")
                       and callable(getattr(module, n)))
        raise UsageError(f"{option} {spec!r}: module {module_name!r} has no {attr!r}; its "
                         f"functions: {', '.join(names[:10]) or 'none'}") from None
    if not callable(fn):
        raise UsageError(f"{option} {spec!r}: {attr!r} is a {type(fn).__name__}, not a "
                         "function")
    return fn


def _guarded_objective(objective, spec: str):
    """objective, its exceptions marked as the user's code and its result checked to be a
    number."""
    def scored(model) -> float:
        try:
            value = objective(model)
        except Exception as e:
            raise UserCodeError(f"--objective {spec}") from e
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"--objective {spec} returned {type(value).__name__} "
                             f"{_clip(repr(value))}, not a number; it must return the score "
                             "as a float (lower is better)") from None

    return scored


def _build_target(build, spec: str):
    import torch

    try:
        target = build()
    except Exception as e:
        raise UserCodeError(f"--target {spec}") from e
    if not isinstance(target, (torch.nn.Module, Mapping)):
        raise UsageError(f"--target {spec} returned {type(target).__name__}; it must return "
                         "the model to merge into: a torch.nn.Module or a dict of tensors")
    return target


def _default_target(traj) -> dict:
    """Tensors shaped like the trajectory's: float32 for the merged ones, the checkpoints' own
    dtype for integer ones (copied from the last checkpoint)."""
    import torch

    return {name: torch.zeros(traj.shapes[name], dtype=torch.float32
                              if traj.dtypes[name].is_floating_point else traj.dtypes[name])
            for name in traj.names}


def _clip(text: str, k: int = 60) -> str:
    return text if len(text) <= k else text[:k - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
