"""Pipeline parallelism on torch.distributed.pipelining: the model cut into stages by
layer ranges, one or more stages per pp rank, run by PyTorch's 1F1B or interleaved 1F1B
schedule.

A stage is a `TransformerStage`: the first holds the embedding, the last the final norm
and the LM head, each a contiguous range of blocks. It keeps the whole model's parameter
names (`layers.7.attention.wq.weight` on whichever stage holds block 7), so a checkpoint
written on pp 2 loads on pp 1 and back. Inside a stage everything else is unchanged: TP
across the tp mesh, context parallelism across cp, and FSDP over dp x cp, one FSDP root
per stage.

The loss: the last stage's logits stay vocab-sharded over tp, and each micro-batch's
loss is its summed token losses over the step's global token count, as without a
pipeline, so the schedule must not scale gradients again (scale_grads=False).

Stages hand each other the residual stream (batch, seq, dim), split along the sequence
over tp under sequence parallelism and over cp under context parallelism: each (dp, cp,
tp) position of one stage sends to the same position of the next, one activation
forward and one gradient back per micro-batch.
"""

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from llama.config import ModelArgs
from llama.model import Transformer

from .compat import pipeline_eval
from .layers import tp_size
from .losses import vocab_parallel_cross_entropy
from .mesh import local_device, pp_mesh

SCHEDULES = ("1f1b", "interleaved")
# A stage stays gathered from its first micro-batch's forward to its last backward (the
# schedule also keeps its gradients unsharded until then): resharding after each forward
# would gather the stage again for every micro-batch. So the resharding strategies run as
# their keep-gathered twins, as torchtitan does under pp and the planner assumes.
PIPELINE_STRATEGY = {"full": "grad_op", "hybrid": "hybrid_zero2"}


@dataclass(frozen=True)
class PipelineConfig:
    """How a pipeline runs, as torch.distributed.pipelining's Schedule1F1B and
    ScheduleInterleaved1F1B run it. microbatches: per optimizer step (None: pp, the fewest
    1F1B accepts); virtual_stages: stages per rank (interleaved); fewer_end_layers: the
    first and last stages hold one layer fewer (Llama 3)."""

    microbatches: Optional[int] = None
    schedule: str = "1f1b"
    virtual_stages: int = 1
    fewer_end_layers: bool = True

    @classmethod
    def from_options(cls, opts: argparse.Namespace) -> "PipelineConfig":
        """From the flags `add_pipeline_arguments` defines."""
        return cls(opts.pp_microbatches, opts.pp_schedule, opts.virtual_stages, opts.pp_fewer_end_layers)


def add_pipeline_arguments(group) -> None:
    """The pipeline's flags, one definition for train.py and the planner."""
    group.add_argument("--pp-microbatches", type=int, default=None,
                       help="pipeline micro-batches per run of the schedule (default: --pp, the fewest 1F1B takes)")
    group.add_argument("--pp-schedule", default="1f1b", choices=SCHEDULES,
                       help="torch.distributed.pipelining schedule: 1F1B, or interleaved 1F1B with --virtual-stages "
                            "(default: %(default)s)")
    group.add_argument("--virtual-stages", type=int, default=1,
                       help="stages per pp rank for --pp-schedule interleaved (default: %(default)s)")
    group.add_argument("--pp-fewer-end-layers", action=argparse.BooleanOptionalAction, default=True,
                       help="first and last stages hold one block fewer, for the embedding and the LM head, as in "
                            "Llama 3 (default: on)")


def stage_layer_counts(n_layers: int, stages: int, fewer_end_layers: bool = True) -> list:
    """Blocks per pipeline stage, as even as they go. With fewer_end_layers the first and
    the last stage hold one block fewer, as Llama 3 did for the embedding and the LM head
    (and the first stage's extra micro-batches in flight): 405B's 126 on 16 stages are
    7, 8 x 14, 7."""
    fewer = fewer_end_layers and stages > 1
    base, extra = divmod(n_layers + (2 if fewer else 0), stages)
    counts = [base + (1 if 0 < i <= extra else 0) for i in range(stages)]
    if fewer:
        counts[0] -= 1
        counts[-1] -= 1
    if min(counts) < 1:
        raise ValueError(
            f"--pp x virtual stages = {stages} stages is more than {n_layers} layers can fill"
            + (" with one layer fewer on the first and last (try --no-pp-fewer-end-layers)" if fewer else "")
        )
    return counts


def stage_layers(n_layers: int, stages: int, fewer_end_layers: bool = True) -> list:
    """The block ids of each stage, in pipeline order."""
    bounds = [0]
    for count in stage_layer_counts(n_layers, stages, fewer_end_layers):
        bounds.append(bounds[-1] + count)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def rank_stages(pp_rank: int, pp: int, virtual_stages: int = 1) -> list:
    """The stages a pp rank runs: rank, rank + pp, ... (the loop layout that interleaved
    1F1B expects: each micro-batch visits every rank v times)."""
    return [pp_rank + k * pp for k in range(virtual_stages)]


def check_pipeline(args: ModelArgs, pp: int, config: PipelineConfig) -> int:
    """The micro-batches per step, after checking the pipeline's flags; each problem is
    one line naming the flag."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown --pp-schedule {config.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if pp == 1:
        if config.microbatches not in (None, 1) or config.schedule != "1f1b" or config.virtual_stages != 1:
            raise ValueError("--pp-microbatches, --pp-schedule and --virtual-stages need --pp > 1 "
                             "(without a pipeline, accumulate with --grad-accum)")
        return 1
    if args.tie_word_embeddings:
        raise ValueError(f"--pp {pp}: this model ties its embedding and LM head, which the first and "
                         "last stages would have to share; train it with --pp 1")
    v = config.virtual_stages
    m = pp if config.microbatches is None else config.microbatches
    if (config.schedule == "interleaved") != (v > 1):
        raise ValueError(f"--pp-schedule {config.schedule} with --virtual-stages {v}: interleaved needs "
                         "--virtual-stages 2 or more, 1f1b exactly 1")
    if m < pp:  # 1F1B refuses fewer; interleaved then idles beyond (p-1)/(v m + p - 1)
        raise ValueError(f"--pp-microbatches {m} must be at least --pp {pp}, so that every stage has work "
                         "while the pipeline fills")
    rounds = max(1, m // pp)
    if v > 1 and m % rounds:
        raise ValueError(f"--pp-microbatches {m} must be a multiple of {rounds} (micro-batches // pp): "
                         "interleaved 1F1B runs them in equal rounds")
    stage_layer_counts(args.n_layers, pp * v, config.fewer_end_layers)
    return m


class TransformerStage(Transformer):
    """One pipeline stage of the Transformer: blocks `layer_ids` (a ModuleDict keyed by the
    block id, so parameter names stay the whole model's), the embedding on the first
    stage, the final norm and LM head on the last. Built on the meta device like the
    Transformer, then materialised by `parallel.fsdp.build_parallel_model`.

    forward(x, document_ids=None): x is the tokens on the first stage and the residual
    stream elsewhere; returns the residual stream, or on the last stage this tp rank's
    slice of the vocabulary's logits as a plain tensor (the loss knows the tp mesh)."""

    def __init__(
        self, args: ModelArgs, layer_ids: range, first: bool, last: bool, tp_mesh=None,
        sequence_parallel: bool = False, cp_mesh=None,
    ):
        if args.tie_word_embeddings and not (first and last):
            raise ValueError("a pipeline stage cannot hold tied embeddings: the first and last stage would share them")
        super().__init__(args, tp_mesh, sequence_parallel, cp_mesh)  # on meta: nothing is allocated
        self.layers = nn.ModuleDict({str(i): self.layers[i] for i in layer_ids})
        self.first, self.last = first, last
        if not first:
            self.tok_embeddings = None
        if not last:
            self.norm = self.output = None

    def forward(self, x: torch.Tensor, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.first:
            self.check_tokens(x)
            seqlen = x.shape[1]
            h = self.tok_embeddings(x)
        else:
            # under sequence parallelism the stream holds this tp rank's part of the sequence
            seqlen = x.shape[1] * (tp_size(self.tp_mesh) if self.sequence_parallel else 1)
            h = x
        freqs_cis, mask = self.block_inputs(seqlen, x.device, document_ids=document_ids)
        for layer in self.layers.values():
            h = layer(h, freqs_cis, mask=mask)
        if not self.last:
            return h
        logits = self.output(self.norm(h))
        return logits.to_local() if isinstance(logits, DTensor) else logits

    def _apply(self, fn, *args, **kwargs):
        return nn.Module._apply(self, fn, *args, **kwargs)  # nothing tied to restore


class PipelineLoss:
    """The schedule's loss_fn: a micro-batch's summed loss over `global_tokens`, what the
    step's mean divides by over every dp rank and micro-batch (set before each step).
    `summed(logits, targets)` is the run's objective (llama/training/objective.py; the
    trainee sets it), next-token cross-entropy by default."""

    def __init__(self, tp_mesh: Optional[DeviceMesh]):
        self.tp_mesh = tp_mesh if tp_size(tp_mesh) > 1 else None
        self.global_tokens = 1
        self.summed = functools.partial(vocab_parallel_cross_entropy, reduction="sum")

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.tp_mesh is not None:
            logits = DTensor.from_local(logits, self.tp_mesh, [Shard(logits.ndim - 1)], run_check=False)
        return self.summed(logits, targets) / max(self.global_tokens, 1)


class RankStages(nn.Module):
    """This rank's stages as one module with the whole model's parameter names (the blocks
    of all its stages in one `layers` ModuleDict): what the optimizer, gradient clipping and
    checkpoints (torch.distributed.checkpoint's get_state_dict) take as the model. It holds
    the stages' modules, it does not copy them; the schedule runs the stages themselves."""

    def __init__(self, parts: list):
        super().__init__()
        self.args = parts[0].args
        self.layers = nn.ModuleDict()
        for part in parts:
            self.layers.update(part.layers)
            for name in ("tok_embeddings", "norm", "output"):
                if getattr(part, name) is not None:
                    self.add_module(name, getattr(part, name))

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline rank's stages run through Pipeline.step, not as one module")


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them. `model` is what the optimizer,
    clipping and checkpoints see; `parts` are the stages, in pipeline order."""

    parts: list
    schedule: object
    loss: PipelineLoss
    microbatches: int
    stages: list  # the schedule's PipelineStage of each part

    @property
    def first(self) -> bool:
        """Holds stage 0: feeds the tokens."""
        return self.parts[0].first

    @property
    def last(self) -> bool:
        """Holds the last stage: computes the loss."""
        return self.parts[-1].last

    @functools.cached_property
    def model(self) -> RankStages:
        return RankStages(self.parts)

    def step(self, inputs, targets, document_ids=None, global_tokens: int = 1) -> torch.Tensor:
        """Forward and backward of one batch (this dp rank's rows, cut into micro-batches by
        the schedule). Returns this rank's share of the step's loss as a device tensor: the
        sum of its micro-batches' losses on the last stage, 0 elsewhere."""
        self.loss.global_tokens = global_tokens
        return self._run(self.schedule.step, inputs, targets, document_ids)

    @torch.no_grad()
    def eval_loss_sum(self, inputs, targets, document_ids=None) -> torch.Tensor:
        """Summed token losses of a batch, forward only (0 on ranks without the last stage)."""
        self.loss.global_tokens = 1
        return self._run(functools.partial(pipeline_eval, self.schedule, self.stages), inputs, targets, document_ids)

    def _run(self, run, inputs, targets, document_ids):
        rows = inputs.shape[0]
        if rows % self.microbatches:
            raise ValueError(
                f"the pipeline cuts each batch into --pp-microbatches {self.microbatches}, but this rank's batch "
                f"has {rows} rows; give each dp rank a multiple of {self.microbatches} rows"
            )
        kwargs = {} if document_ids is None else {"document_ids": document_ids}
        args = (inputs,) if self.first else ()
        losses = [] if self.last else None
        run(*args, target=targets if self.last else None, losses=losses, return_outputs=False, **kwargs)
        device = local_device(inputs.device.type)
        if not self.last:
            return torch.zeros((), device=device)
        return torch.stack([loss.detach().float() for loss in losses]).sum()


def build_pipeline(
    source: Union[ModelArgs, str, Path], mesh: DeviceMesh, config: PipelineConfig = PipelineConfig(), **model_options
) -> Pipeline:
    """This rank's pipeline stages on `mesh` (which has a "pp" dimension), each built as
    `parallel.fsdp.build_parallel_model` builds the whole model (TP, CP, FSDP over dp x cp,
    compile, activation checkpointing, init or load), and the schedule that runs them.
    `model_options` are build_parallel_model's keyword arguments; a resharding `strategy`
    runs as its keep-gathered twin (PIPELINE_STRATEGY)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    from .fsdp import build_parallel_model
    from .mesh import tp_mesh

    stages_mesh = pp_mesh(mesh)
    if stages_mesh is None:
        raise ValueError(f"build_pipeline needs a mesh with a 'pp' dimension, got {mesh.mesh_dim_names}")
    pp, pp_rank = stages_mesh.size(), stages_mesh.get_local_rank()
    if isinstance(source, ModelArgs):
        args = source
    else:
        from llama.weights.format import read_model_args

        args = read_model_args(source)
    microbatches = check_pipeline(args, pp, config)
    strategy = model_options.pop("strategy", "full")
    model_options["strategy"] = PIPELINE_STRATEGY.get(strategy, strategy)
    n_stages = pp * config.virtual_stages
    layers = stage_layers(args.n_layers, n_stages, config.fewer_end_layers)
    device = local_device(mesh.device_type)
    parts, stages = [], []
    for index in rank_stages(pp_rank, pp, config.virtual_stages):
        first, last = index == 0, index == n_stages - 1

        def make(args_, tp_mesh_, sequence_parallel, cp_mesh_, ids=layers[index], first=first, last=last):
            return TransformerStage(args_, ids, first, last, tp_mesh_, sequence_parallel, cp_mesh_)

        part = build_parallel_model(source, mesh, make_model=make, **model_options)
        parts.append(part)
        stages.append(PipelineStage(part, index, n_stages, device, group=stages_mesh.get_group()))
    loss = PipelineLoss(tp_mesh(mesh))
    if config.schedule == "interleaved":
        schedule = ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss, scale_grads=False)
    else:
        schedule = Schedule1F1B(stages[0], microbatches, loss_fn=loss, scale_grads=False)
    return Pipeline(parts, schedule, loss, microbatches, stages)
