"""LoRA adapters on a Transformer: which projections get one, how they start, and which
parameters train.

`add_adapters(model, LoRAConfig(rank=16))` gives each target projection (Meta's names:
wq, wk, wv, wo, w1, w2, w3) a low-rank update, y = x W^T + (alpha / r) x A^T B^T
(parallel.layers.LoRA: A replicated and B split in a column-parallel layer, A split and
B replicated in a row-parallel one, so no collective is added), and freezes everything
else. A starts as PEFT's (Kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in))) and B at zero, so
the model at step 0 is the base model exactly. Adapter parameters are named
`<layer>.lora_a` and `<layer>.lora_b` (e.g. `layers.0.attention.wq.lora_a`)."""

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from parallel.layers import ColumnParallelLinear, LoRA, RowParallelLinear, fill_uniform_, local_tensor

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: Optional[float] = None  # None: 2 x rank (a scale of 2, torchtune's Llama 3 recipes' choice)
    dropout: float = 0.0
    targets: tuple = TARGETS
    rslora: bool = False  # scale alpha / sqrt(rank) (Kalajdzievski 2023) instead of alpha / rank

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"--lora-rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"--lora-targets {','.join(self.targets) or '(empty)'}: the model has no projection "
                f"{', '.join(unknown) or '(none given)'}; choose from {','.join(TARGETS)}"
            )

    @property
    def lora_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def from_options(cls, opts) -> Optional["LoRAConfig"]:
        """train.py's --lora-* flags; None without --lora-rank."""
        if not opts.lora_rank:
            return None
        targets = tuple(t.strip() for t in opts.lora_targets.split(",") if t.strip())
        return cls(opts.lora_rank, opts.lora_alpha, opts.lora_dropout, targets, opts.lora_rslora)


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def adapted_layers(model: nn.Module) -> dict:
    """Name -> layer of every projection that carries an adapter."""
    return {name: m for name, m in model.named_modules() if getattr(m, "lora", None) is not None}


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The base model inside: every adapted layer computes x W^T alone (DPO's reference
    under LoRA). The adapters' parameters stay where they are; nothing is copied."""
    layers = adapted_layers(model)
    saved = {name: layer.lora for name, layer in layers.items()}
    for layer in layers.values():
        layer.lora = None
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.lora = saved[name]


def add_adapters(model: nn.Module, config: LoRAConfig) -> int:
    """Give every target projection of `model` (a Transformer, or a pipeline stage's part
    of one) an adapter, on the device the model is being built on (meta, for
    build_parallel_model), and freeze every other parameter. Returns how many layers got one."""
    lora = LoRA(config.rank, config.scale, config.dropout)
    count = 0
    for name, layer in model.named_modules():
        if name.rsplit(".", 1)[-1] in config.targets and isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            layer.add_lora(lora)
            count += 1
    if count == 0:
        raise ValueError(f"--lora-targets {','.join(config.targets)}: no such projection in the model")
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
    return count


@torch.no_grad()
def init_adapters_(model: nn.Module, seed: int = 0) -> None:
    """A as PEFT draws it, U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform with a = sqrt(5)),
    with the same values on any mesh; B zero, so that the adapted model equals the base."""
    for name, layer in adapted_layers(model).items():
        fill_uniform_(layer.lora_a, 1 / math.sqrt(layer.lora_a.shape[1]), seed, f"{name}.lora_a")
        local_tensor(layer.lora_b).zero_()


def store_frozen_as(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the frozen base in `dtype` (bf16 under bf16 compute): it has no master weights
    to keep, as nothing updates it. Before the parameters are allocated (on meta) this
    costs nothing. Shared parameters (a tied output) stay shared."""
    converted = {}
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is None or param.requires_grad or param.dtype == dtype:
                continue
            if id(param) not in converted:
                converted[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
            module._parameters[key] = converted[id(param)]
