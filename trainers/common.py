"""What every trainer shares: the run folder, the optimiser loop with a standard EMA model, and
lcsc_fast.Recorder saving the trajectory, exactly as a user's training code would use it.

A run folder holds:
    config.json          the trainer's config, including the model's architecture
    trajectory/          the Recorder's snapshots (trajectory/ema/: the EMA model's)
    model.safetensors    the final weights;  ema.safetensors: the final EMA weights
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import lcsc_fast
from lcsc_fast.recorder import MANIFEST_NAME

from .digits import Batches, load_digits
from .networks import Denoiser, build_model, num_parameters

CONFIG_FILE, TRAJECTORY_DIR = "config.json", "trajectory"
MODEL_FILE, EMA_FILE = "model.safetensors", "ema.safetensors"


@dataclasses.dataclass
class TrainConfig:
    """Options every trainer has; trainers subclass it with their own."""

    out: str = "runs/run"  # the run folder
    steps: int = 2000  # optimiser steps
    batch_size: int = 256
    lr: float = 1e-3  # Adam
    warmup_steps: int = 100  # linear learning-rate warm-up
    every: int = 50  # a snapshot every this many steps
    ema_rate: float = 0.999  # the standard EMA kept beside the run, per step
    seed: int = 0
    arch: str = "mlp"  # "mlp" or "unet"
    width: int = 256  # mlp
    depth: int = 3  # mlp
    channels: int = 32  # unet
    dropout: float = 0.0
    threads: int | None = None  # torch CPU threads (None: torch's default)
    progress: bool = True


def model_spec(config: TrainConfig, kind: str) -> dict:
    """The arguments of networks.build_model for this config."""
    sizes = ({"width": config.width, "depth": config.depth} if config.arch == "mlp"
             else {"channels": config.channels})
    return {"arch": config.arch, "kind": kind, "dropout": config.dropout, **sizes}


def new_model(spec: dict) -> Denoiser:
    return build_model(**spec)


def load_model(run_dir, which: str = "ema", dropout: float | None = 0.0) -> Denoiser:
    """The run's final ("model") or EMA ("ema") weights in a fresh model, in eval mode.
    dropout: override the recorded rate (None keeps it); inference wants 0."""
    spec = dict(read_config(run_dir)["model"])
    if dropout is not None:
        spec["dropout"] = dropout
    model = new_model(spec)
    name = {"model": MODEL_FILE, "ema": EMA_FILE}[which]
    model.load_state_dict(load_file(os.path.join(run_dir, name)))
    return model.eval().requires_grad_(False)


def read_config(run_dir) -> dict:
    with open(os.path.join(run_dir, CONFIG_FILE)) as f:
        return json.load(f)


@dataclasses.dataclass
class Run:
    directory: str
    model: Denoiser  # final weights, eval mode
    ema: Denoiser
    seconds: float

    @property
    def trajectory_dir(self) -> str:
        return os.path.join(self.directory, TRAJECTORY_DIR)


def _write_config(config: TrainConfig, trainer: str, spec: dict, extra: dict) -> None:
    text = json.dumps({"trainer": trainer, "model": spec, "config": dataclasses.asdict(config),
                       **extra}, indent=2)
    path = os.path.join(config.out, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(path + ".tmp", path)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * model, parameters and floating-point buffers."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.is_floating_point():
            e.lerp_(m, 1 - rate)
        else:
            e.copy_(m)


def train(config: TrainConfig, trainer: str, model: Denoiser,
          loss_fn: Callable[[Denoiser, torch.Tensor, int], torch.Tensor],
          extra_config: dict | None = None, include=None) -> Run:
    """Adam on loss_fn(model, batch, step) for config.steps steps over the digits' training
    split, a standard EMA model beside it, and a Recorder snapshot of both every config.every
    steps (steps are counted from 1, after each update). Writes the run folder; returns it.
    include: what the Recorder records (its include=; None: every floating-point tensor).
    config.threads applies while training; torch's thread count is restored afterwards.
    A folder that holds a run already is refused (FileExistsError) and left as it is."""
    check_new_run_folder(config.out)
    with _torch_threads(config.threads):
        return _train(config, trainer, model, loss_fn, extra_config, include)


def check_new_run_folder(out: str) -> None:
    """FileExistsError if out holds a run: training there would replace its config and final
    weights and set its trajectory aside, or stop half-way on a model of another shape."""
    recorded = os.path.join(TRAJECTORY_DIR, MANIFEST_NAME)
    found = [name for name in (CONFIG_FILE, recorded, MODEL_FILE, EMA_FILE)
             if os.path.exists(os.path.join(out, name))]
    if found:
        raise FileExistsError(f"{out} holds a run already ({', '.join(found)}); choose another "
                              "--out (nothing there is overwritten)")


def config_for_new_run(config_cls, p: argparse.ArgumentParser, args: argparse.Namespace):
    """The config of a command line's arguments; an --out that holds a run is a usage error."""
    config = config_from_args(config_cls, args)
    try:
        check_new_run_folder(config.out)
    except FileExistsError as e:
        p.error(str(e))
    return config


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(config: TrainConfig, trainer: str, model: Denoiser, loss_fn, extra_config,
           include) -> Run:
    torch.manual_seed(config.seed)
    os.makedirs(config.out, exist_ok=True)
    spec = model_spec(config, model.kind)
    _write_config(config, trainer, spec, extra_config or {})
    images, _ = load_digits("train")
    batches = Batches(images, config.batch_size, config.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    warmup = max(config.warmup_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup))
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(1, config.steps + 1), desc=f"{trainer} ({num_parameters(model):,} params)",
               disable=not config.progress, leave=False)
    with lcsc_fast.Recorder(model, os.path.join(config.out, TRAJECTORY_DIR), every=config.every,
                            ema=ema, truncate_after_resume=True, include=include) as recorder:
        for step in bar:
            loss = loss_fn(model, next(batches), step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            update_ema(ema, model, config.ema_rate)
            recorder.step(step)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4g}")
    seconds = time.perf_counter() - start
    model.eval().requires_grad_(False)
    save_file(model.state_dict(), os.path.join(config.out, MODEL_FILE))
    save_file(ema.state_dict(), os.path.join(config.out, EMA_FILE))
    return Run(config.out, model, ema.eval(), seconds)


def parser_for(config_cls, description: str, examples: str) -> argparse.ArgumentParser:
    """A command-line parser with one --option per field of the config dataclass."""
    p = argparse.ArgumentParser(description=description, epilog=examples,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if field.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(field.type).split(" ")[0],
                                                                 None)
            if kind is None:  # "int | None" and the like
                kind = int if "int" in str(field.type) else (
                    float if "float" in str(field.type) else str)
            p.add_argument(flag, type=kind, default=default)
    return p


def config_from_args(config_cls, args: argparse.Namespace):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})
