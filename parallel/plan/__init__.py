"""Memory, communication and step-time planner for training with FSDP2 over dp, tensor
parallelism over tp, pipeline parallelism over pp and context parallelism over cp.

    python -m parallel.plan --model 3.1-405b --nodes 16 --gpus-per-node 8 [--json]
    python -m parallel.plan --model 3.1-405b --nodes 1024 --tp 8 --pp 16 --pp-microbatches 32 \\
        --seq-len 8192 --micro-batch 1 --activation-checkpointing full --gpu-memory 79.1

It builds the real model with `build_parallel_model` on the meta device, on a fake
process group of the ranks of one pipeline stage (the world size over pp; nothing is
allocated, nothing is sent), and reads rank 0's shard shapes off the DTensors; rank 0
holds the largest shards when a size does not divide evenly. From them, per rank and per
optimizer step:

  params        the fp32 shards (with bf16 mixed precision they are the master weights;
                FSDP2 keeps no second copy)
  grads         fp32 shards of the same size
  optimizer     AdamW m and v, fp32
  gathered      peak of the unsharded (compute-dtype) parameters FSDP holds at once
  unsharded grads, reduce-scatter
                FSDP2's gradient of the block computing (compute dtype, unsharded) and
                the fp32 reduce-scatter input of the block being reduced
  activations   see `memory.activation_bytes`
  cp K/V        with cp > 1: the all-gathered keys and values kept for backward
  attention     the fused kernel's backward workspace and the document block mask
  = allocated   what torch.cuda.max_memory_allocated() should show
  + slack, CUDA context, NCCL buffers (outside the allocator's count; see the constants)
  = total       what must fit in the GPU's memory (`--gpu-memory`)
  comm          every collective of a training step, per mesh dimension: count, payload
                bytes (all-gather: gathered output; reduce-scatter: input; all-reduce:
                the tensor; send: the tensor) and bytes each rank sends on a ring
                ((n-1)/n of the payload, twice that for an all-reduce)
  estimate      the step time from FLOPs, link bandwidths and the pipeline bubble; see
                `estimate.step_estimate` and the hardware constants in `config`

4-D (`--pp P`, `--cp C`; docs/4d-parallelism.md): the mesh is ("pp", "dp_replicate",
"dp_shard", "cp", "tp"), tp innermost; FSDP shards each stage's parameters over
dp_shard x cp (context-parallel ranks see different tokens, so for FSDP they are data
parallel). A pp rank holds the parameters of its stage(s), the activations of the
micro-batches its schedule has in flight, and with cp each rank holds seq/C tokens of
a sequence plus the whole sequence's keys and values. Ranks of different stages differ,
so the plan reports the pp rank with the largest total. The engines planned are those
train.py runs with --pp and --cp: torch.distributed.pipelining's schedules
(parallel/pipeline.py) and an all-gather context parallelism as in Llama 3
(parallel/context.py).

`CommCounter` records the same quantities from a real run, so tests can hold the
planner to what actually happens. The defaults are train.py's (tests/test_plan.py holds
them equal), with bf16 because that is train.py's default on CUDA.

The modules, from the bottom: `config` (the step and the hardware asked about),
`counter` (a collective's record, and CommCounter), `layout` (pp ranks, their stages and
FSDP groups, the mesh's dimensions), `comm` (a step's collectives), `memory`, `estimate`
(step time), `fake_world`, `planner` (`plan`, `choose_tp`) and `cli` (`python -m
parallel.plan`). The names below are re-exported for the import paths that predate the
package; the project's own code imports them from the module that defines them.
"""

from llama.config import PRESETS

from ..pipeline import PipelineConfig, stage_layer_counts
from .cli import MEMORY_ROWS, main, parse_args
from .comm import cp_collectives, fsdp_collectives, pp_collectives, step_collectives, tp_collectives
from .config import (COMPUTE_EFFICIENCY, DEFAULTS, NETWORK_BYTES_PER_S, NVLINK_BYTES_PER_S, PEAK_TFLOPS, Hardware,
                     StepConfig)
from .counter import Collective, CommCounter, group_labels, summarize
from .estimate import block_params, rank_flops, step_estimate
from .fake_world import init_fake_world
from .layout import (Layout, PipelineRank, check_layout, forwards_in_flight, group_shards, group_span, mesh_dims,
                     pipeline_bubble, pipeline_ranks, stage_groups, whole_model)
from .memory import (ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, CUDA_NCCL_BYTES_PER_GROUP, FLEX_BLOCK, GIB, MIB,
                     activation_bytes, attention_workspace_bytes, block_activation_bytes, communicators,
                     fsdp_gradient_buffers, gathered_param_bytes, largest_micro_batch, loss_bytes, memory_bytes)
from .planner import CHOOSE_TP_MAX_DP, choose_tp, default_dp_replicate, plan, plan_strategy
