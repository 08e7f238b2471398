"""LoRA against full fine-tuning on 4 CPU processes (gloo), 2x2 mesh: step time, memory,
trainable parameters and checkpoint size.

    PYTHONPATH=. python bench/bench_lora.py [--steps 6] [--consecutive 2] [--rank 16] [--top 12] [--tiny]

The 2x2 CPU config of bench/bench_step.py (dim 512, 4 layers, 8 heads / 4 kv heads, vocab
8192, seq 512, micro-batch 4 per dp rank, fp32) with train.py's step on CPU: sequence
parallelism on, FSDP full, fused AdamW over `param_groups` (frozen parameters get no
state), the LoRA factors' tp shares summed once a step. Variants: full fine-tuning, and
LoRA of rank `--rank` on all seven projections (wq, wk, wv, wo, w1, w2, w3), and the same on
an NF4 base (QLoRA, `--base-dtype nf4`; not with --tiny, whose projections are smaller than
one NF4 block unit). All step in
every round, after one peak probe, as bench_step.py times them (so the machine's drift
hits both alike); figures are medians over the rounds with the range. Target: a LoRA
r 16 step takes at most 0.75x a full step.

Memory per rank is counted, not sampled: the storage bytes of the parameters' local
shards, their gradients (taken with the gradients complete, before the optimizer step)
and the optimizer state, each storage once. Activations and FSDP's transient unsharded
parameters are not in it. torch keeps no peak for its CPU allocator (there is no CPU
counterpart of torch.cuda.max_memory_allocated), so no allocator peak is reported; the
process RSS is not one either. Checkpoint bytes: one real save through
llama.training.checkpoint.Checkpointer (adapters, their AdamW state and RNG for LoRA;
the whole model's for full), every rank's files. FLOPs per step: torch's FlopCounterMode
over one step (deterministic: the ratio the step times would have on a quiet machine with
every op at the same speed). Then one step of each variant runs under torch.profiler, and
rank 0's self CPU time is split into bench_step.py's categories, with the time of the
adapters' own matmuls.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bench_step import ARGS, CATEGORIES, MATMUL, breakdown, interleaved_rounds, make_step, profile_step, random_batch
from llama import ModelArgs
from llama.lora import LoRAConfig, is_adapter
from llama.qlora import nf4_storage_bytes
from llama.training.build import keep_freed_host_memory
from llama.training.checkpoint import Checkpointer
from llama.training.flags import build_parser
from llama.training.optim import build_optimizer
from parallel.fsdp import build_parallel_model
from parallel.mesh import build_mesh

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=32)
VARIANTS = ("full", "lora", "qlora")  # qlora: LoRA on an NF4 base (--base-dtype nf4), not in --tiny
TARGET_RATIO = 0.75


def storage_bytes(tensors) -> int:
    """Bytes of the storages under `tensors` (DTensors: their local shards), each once."""
    storages, nf4 = {}, 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        if hasattr(local, "quantized_data"):  # an NF4Tensor (QLoRA): its parts, not one storage
            nf4 += nf4_storage_bytes(local)
            continue
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) + nf4


def state_bytes(model, optimizer) -> dict:
    """What this rank holds for training, with every gradient in place."""
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "params": storage_bytes(params),
        "grads": storage_bytes([p.grad for p in params if p.grad is not None]),
        "optimizer": storage_bytes(state),
    }


def directory_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def saved_model_tensors(path: Path) -> list:
    """The model's tensor names a checkpoint holds (torch.distributed.checkpoint metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return sorted(k.split(".", 1)[1] for k in keys if k.startswith("model."))


def low_rank_matmul_ms(prof, rank: int) -> tuple:
    """Self CPU time (ms) and count of the matmuls with an operand of `rank` rows or columns:
    the adapters' products, forward and backward (no other dimension of the model is 16)."""
    ms, count = 0.0, 0
    for event in prof.events():
        if event.name in MATMUL and any(rank in shape for shape in event.input_shapes if shape):
            ms, count = ms + event.self_cpu_time_total / 1000, count + 1
    return ms, count


def step_flops(step) -> int:
    """FLOPs of one step on this rank, counted by torch's FlopCounterMode (matmuls and
    attention; what the step's time should follow on a quiet machine)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def variants(opts) -> tuple:
    """The tiny model's projections hold fewer weights than one NF4 block unit (64 x 256)."""
    return VARIANTS[:2] if opts.tiny else VARIANTS


def _bench(opts, root: str) -> dict:
    keep_freed_host_memory()  # as train.py does on CPU
    args = TINY if opts.tiny else ARGS
    mesh = build_mesh(2)
    inputs, targets, global_tokens = random_batch(mesh, opts.micro_batch, opts.seq_len, args.vocab_size)
    train_defaults = build_parser()  # train.py's AdamW: its lr, weight decay, groups
    optim_opts = argparse.Namespace(**{k: train_defaults.get_default(k) for k in
                                       ("lr", "weight_decay", "decay_norms_and_embeddings")})

    steps, memory, trainable, adapters, checkpoint, saved, flops = {}, {}, {}, {}, {}, {}, {}
    for variant in variants(opts):
        lora = LoRAConfig(opts.rank) if variant != "full" else None
        base_dtype = "nf4" if variant == "qlora" else None
        model = build_parallel_model(args, mesh, sequence_parallel=True, lora=lora, base_dtype=base_dtype)
        optimizer = build_optimizer(model, optim_opts, "cpu")
        step = make_step(model, optimizer, inputs, targets, global_tokens)
        step()  # warm-up; the optimizer state exists from here on
        step(before_update=lambda: memory.__setitem__(variant, state_bytes(model, optimizer)))
        trainable[variant] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapters[variant] = sum(p.numel() for name, p in model.named_parameters() if is_adapter(name))
        save_dir = Path(root) / variant
        path = Checkpointer(save_dir, keep=1).save(2, model, optimizer, {"data": {}})
        if dist.get_rank() == 0:  # rank 0 renamed it into place: complete
            checkpoint[variant], saved[variant] = directory_bytes(save_dir), saved_model_tensors(path)
        flops[variant] = step_flops(step)
        steps[variant] = step

    result = interleaved_rounds(steps, opts.steps, opts.consecutive)
    profiles = {variant: profile_step(step, lambda prof: (*breakdown(prof), low_rank_matmul_ms(prof, opts.rank)),
                                      record_shapes=True) for variant, step in steps.items()}
    return dict(result, memory=memory, trainable=trainable, adapters=adapters, checkpoint=checkpoint,
                saved_tensors=saved, flops=flops, profile=profiles)


def print_table(result: dict, rank: int) -> None:
    full = result["medians"]["full"]
    print("| variant | ms/step, median (range) | x full | trainable params | params + grads + AdamW "
          "per rank, MB (max over ranks) | checkpoint, MB |")
    print("|---|---|---|---|---|---|")
    for variant in result["medians"]:
        seconds = result["medians"][variant]
        low, high = result["spread"][variant]
        mem = result["memory"][variant]
        split = " + ".join(f"{mem[k] / 1e6:.1f}" for k in ("params", "grads", "optimizer"))
        name = {"full": "full fine-tuning", "lora": f"LoRA r {rank}, 7 targets",
                "qlora": f"QLoRA r {rank}, 7 targets, NF4 base"}[variant]
        print(f"| {name} | {1000 * seconds:.0f} ({1000 * low:.0f}-{1000 * high:.0f}) | {seconds / full:.2f} "
              f"| {result['trainable'][variant]:,} | {sum(mem.values()) / 1e6:.1f} ({split}) "
              f"| {result['checkpoint'][variant] / 1e6:.2f} |")


def print_profiles(profiles: dict, top: int) -> None:
    print("profile of one step per variant, rank 0 (self CPU time, ms):")
    print(f"  {'category':18s} " + " ".join(f"{v:>9s}" for v in profiles))
    for cat in CATEGORIES + ("total",):
        cells = []
        for variant in profiles:
            totals = profiles[variant][0]
            cells.append(sum(totals.values()) if cat == "total" else totals[cat])
        print(f"  {cat:18s} " + " ".join(f"{c:9.1f}" for c in cells))
    ms, count = profiles["lora"][3]
    print(f"  of LoRA's matmul: {ms:.1f} ms in the {count} products with a rank-sized operand (the adapters')")
    if top:
        for variant in profiles:
            ops = profiles[variant][2]
            print(f"  top ops, {variant}: " + ", ".join(f"{n} {t:.1f}" for n, t in sorted(ops.items(), key=lambda x: -x[1])[:top]))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed rounds, each a peak probe and both variants' steps "
                        "(default: %(default)s)")
    parser.add_argument("--consecutive", type=int, default=2, help="steps in a row per variant and round "
                        "(default: %(default)s)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=512, help="default: %(default)s")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per dp rank (default: %(default)s)")
    parser.add_argument("--top", type=int, default=12, help="list each profile's N most costly ops (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (dim 64, 2 layers, vocab 256, seq 32, "
                        "micro-batch 2), one round of one step: a smoke test of the script, not a measurement")
    opts = parser.parse_args(argv)
    if opts.tiny:
        opts.steps, opts.consecutive, opts.seq_len, opts.micro_batch = 1, 1, 32, 2

    from parallel.spawn import run_on_ranks

    root = tempfile.mkdtemp(prefix="bench_lora_")
    try:
        results = run_on_ranks(_bench, 4, opts, root, timeout=1800)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = results[0]
    result["memory"] = {v: max((r["memory"][v] for r in results), key=lambda m: sum(m.values())) for v in result["medians"]}
    args = TINY if opts.tiny else ARGS
    print(f"2x2 CPU config (dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}, seq {opts.seq_len}, "
          f"micro-batch {opts.micro_batch} per dp rank, fp32, fused AdamW), {opts.steps} rounds of "
          f"{opts.consecutive} steps; fp32 matmul peak {result['peak']:.3f} TFLOP/s "
          f"({result['peaks'][0]:.3f}-{result['peaks'][1]:.3f})")
    print_table(result, opts.rank)
    ratio = result["medians"]["lora"] / result["medians"]["full"]
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(f"LoRA/full step time {ratio:.2f}: {verdict} the target of at most {TARGET_RATIO}x")
    flops = result["flops"]
    print("FLOPs per step on rank 0 (torch FlopCounterMode, deterministic): " + ", ".join(
        f"{v} {f / 1e9:.1f} G ({f / flops['full']:.3f})" for v, f in flops.items()))
    print("memory: storage bytes counted (params, grads before the update, AdamW state); torch has no peak "
          "counter for its CPU allocator, so none is reported")
    print_profiles(result["profile"], opts.top)
    return result


if __name__ == "__main__":
    main()
