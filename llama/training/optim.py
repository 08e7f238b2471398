"""AdamW and its learning-rate schedule: which parameters decay, one fused kernel per step
where the device has one, warm-up then cosine, linear or constant."""

import math

import torch


def lr_at(step: int, opts) -> float:
    """Linear warm-up, then cosine or linear decay to min_lr_ratio * lr at the last step."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    floor = opts.lr * opts.min_lr_ratio
    progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    if opts.decay == "constant":
        return opts.lr
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if opts.decay == "cosine" else 1 - progress
    return floor + (opts.lr - floor) * shape


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def param_groups(model, opts) -> list:
    """The parameters that train, in two groups: weight decay for the matrices, none for the
    norms and the embedding (unless --decay-norms-and-embeddings). Frozen parameters
    (requires_grad False) get no group, so the optimizer holds no state for them."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = name.endswith("norm.weight") or name.startswith("tok_embeddings")
        (no_decay if exempt and not opts.decay_norms_and_embeddings else decay).append(param)
    return [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, opts, device) -> torch.optim.Optimizer:
    """AdamW with one kernel per step (fused) on CUDA, whose step counters live on the
    device, and on CPU, where it is about 5x faster than foreach (bench/bench_step.py's
    model: 6 against 35 ms a step). Elsewhere foreach, whose step counters live in host
    memory: it reads them with .item(), a host read, never a device sync."""
    fused = torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, opts), lr=opts.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused, foreach=not fused
    )
