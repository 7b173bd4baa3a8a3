"""LoRA fine-tuning of a trained digits model, recording only the adapters (LCSC Sec. 5.4).

The trained model's nn.Linear (and nn.Conv2d) layers get low-rank adapters (Hu et al. 2021):
y = W0 x + s B A x with s = alpha / r, B zero at the start so fine-tuning starts from the
trained model, and only A and B trained. Names follow PEFT's layout (<path>.base_layer.weight,
<path>.lora_A.weight, <path>.lora_B.weight), so the Recorder's snapshots (include="trainable":
the adapters, never W0) open with the base weights as a LoRA trajectory:

    traj = lcsc_fast.Trajectory.open("runs/lora/trajectory", base="runs/ct/model.safetensors")
    lcsc_fast.merge_into(plain_model, traj, w)   # W0 + s sum_i w_i B_i A_i

The run folder's trajectory/ holds an adapter_config.json (r, lora_alpha) that gives s.
The loss is the base run's own: iCT's for a ct run (at the curriculum's last level count: the
model is past the curriculum), EDM's for a dm run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import torch
from torch import nn

from . import common

EXAMPLES = """examples:
  python -m lcsc_fast.trainers.ct --out runs/ct
  python -m lcsc_fast.trainers.lora --base runs/ct --out runs/ct-lora --rank 8 --steps 1000
  python -m lcsc_fast.trainers.lora --base runs/dm --out runs/dm-lora --lr 5e-4
"""


@dataclasses.dataclass
class LoRAConfig(common.TrainConfig):
    out: str = "runs/lora"
    base: str = "runs/ct"  # the run folder of the trained model to fine-tune
    steps: int = 1000
    every: int = 10
    lr: float = 5e-4
    warmup_steps: int = 0
    rank: int = 8
    alpha: float = 8.0  # s = alpha / rank
    ema_rate: float = 0.99


class LoRALinear(nn.Module):
    """base_layer(x) + scale * lora_B(lora_A(x)), base_layer frozen."""

    def __init__(self, base_layer: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base_layer, self.scale = base_layer.requires_grad_(False), scale
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * self.lora_B(self.lora_A(x))


class LoRAConv2d(nn.Module):
    """A Conv2d's adapter: lora_A a conv of the layer's kernel into rank channels, lora_B a
    1x1 conv out of them, so B A reshapes to the layer's [out, in, kh, kw] weight."""

    def __init__(self, base_layer: nn.Conv2d, rank: int, scale: float):
        super().__init__()
        if base_layer.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        self.base_layer, self.scale = base_layer.requires_grad_(False), scale
        self.lora_A = nn.Conv2d(base_layer.in_channels, rank, base_layer.kernel_size,
                                base_layer.stride, base_layer.padding, base_layer.dilation,
                                bias=False)
        self.lora_B = nn.Conv2d(rank, base_layer.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * self.lora_B(self.lora_A(x))


def add_lora(model: nn.Module, rank: int, alpha: float) -> list[str]:
    """Freezes model and wraps each nn.Linear / nn.Conv2d in an adapter, in place; returns the
    wrapped layers' paths."""
    model.requires_grad_(False)
    scale = alpha / rank
    wrapped = []
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, scale))
            elif isinstance(child, nn.Conv2d):
                setattr(module, child_name, LoRAConv2d(child, rank, scale))
            else:
                continue
            wrapped.append(f"{path}.{child_name}" if path else child_name)
    return wrapped


def _loss_for(base_run: dict, config: LoRAConfig):
    trainer = base_run["trainer"]
    if trainer == "dm":
        from .dm import edm_loss

        recorded = base_run["config"]
        return lambda model, x, step: edm_loss(model, x, recorded["p_mean"], recorded["p_std"])
    if trainer in ("ct", "cd", "ect"):
        from .ct import CTConfig, CTLoss

        class FinestLevels(CTLoss):
            # The model is past the curriculum: iCT's loss at its last level count throughout.
            def num_levels(self, step: int) -> int:
                return self.config.s1 + 1

        # Whatever trained the consistency model, fine-tuning it without a teacher is
        # consistency training.
        return FinestLevels(CTConfig(dropout=config.dropout))
    raise ValueError(f"{config.base}: trainer {trainer!r} has no LoRA fine-tuning loss")


def train(config: LoRAConfig) -> common.Run:
    """Fine-tunes the base run's final weights with adapters; records the adapters only."""
    common.check_new_run_folder(config.out)  # before adapter_config.json is written there
    base_run = common.read_config(config.base)
    spec = base_run["model"]
    # The architecture is the base run's, whatever this config's own model fields say.
    sizes = {k: spec[k] for k in ("arch", "width", "depth", "channels") if k in spec}
    config = dataclasses.replace(config, **sizes)
    torch.manual_seed(config.seed)
    model = common.load_model(config.base, "model", dropout=config.dropout).train()
    layers = add_lora(model, config.rank, config.alpha)
    os.makedirs(os.path.join(config.out, common.TRAJECTORY_DIR), exist_ok=True)
    # The scaling, where lcsc_fast.Trajectory.open(..., base=...) looks for it (PEFT's keys).
    with open(os.path.join(config.out, common.TRAJECTORY_DIR, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": config.rank, "lora_alpha": config.alpha}, f)
    extra = {"lora": {"base": os.path.abspath(config.base), "layers": layers,
                      "base_model": os.path.abspath(os.path.join(config.base,
                                                                 common.MODEL_FILE))}}
    return common.train(config, "lora", model, _loss_for(base_run, config), extra,
                        include="trainable")


def open_trajectory(run_dir):
    """The LoRA run's trajectory, opened with its base weights: merges write plain models."""
    import lcsc_fast

    base = common.read_config(run_dir)["lora"]["base_model"]
    return lcsc_fast.Trajectory.open(os.path.join(run_dir, common.TRAJECTORY_DIR), base=base)


def main(argv=None) -> common.Run:
    p = common.parser_for(LoRAConfig, "LoRA fine-tuning of a trained digits model (a ct, cd, "
                          "ect or dm run folder), recording the adapters every --every steps.",
                          EXAMPLES)
    args = p.parse_args(argv)
    run = train(common.config_for_new_run(LoRAConfig, p, args))
    print(f"trained in {run.seconds:.1f} s; run folder {run.directory}")
    return run


if __name__ == "__main__":
    main()
