"""A DPO step against an SFT step of the same tokens on 4 CPU processes (gloo), 2x2 mesh:
step time, and memory per rank with the stored reference against a reference model kept
in memory (TRL's default).

    PYTHONPATH=. python bench/bench_dpo.py [--steps 6] [--consecutive 2] [--pairs-per-rank 2]
                                           [--epoch-pairs 10000] [--rank 16] [--tiny]

The 2x2 CPU config of bench/bench_step.py (dim 512, 4 layers, 8 heads / 4 kv heads, vocab
8192, seq 512, fp32) with train.py's step on CPU: sequence parallelism on, FSDP full, fused
AdamW over `param_groups` with train.py's defaults, `--clip` 1.0, each step run by
llama.training.step.train_step as train.py runs it. A micro-batch is P pairs per dp rank,
2 P sequences (P = 2: bench_step's 4 sequences). Variants:

    sft              next-token cross-entropy on the same 2 P sequences (targets on the replies)
    dpo              DPO (sigmoid, beta 0.1), the reference's log-probabilities from a stored
                     table (ReferenceLogps)
    dpo-lora         LoRA r 16 on the seven projections, the reference the base with its
                     adapters off: one more forward per step (PreferenceLoss(reference_forward=True))
    dpo-lora-stored  the same LoRA policy, the reference from a stored table

The table holds `--epoch-pairs` pairs (one epoch of data; the loader draws from them). Its
values are synthetic, not from a reference pass (one would take a forward of every pair):
-ln(vocab) per target token, within about 1% of what the freshly drawn policy gives, so
the losses are of a run's size (0.1 to 2 at this model's start). Nothing in a step's cost
depends on them.

All variants step in every round, after one peak probe, as bench_step.py times them;
figures are medians over the rounds with the range. Memory per rank is counted as
bench_lora.py counts it (storage bytes of the parameters' local shards, their gradients
with every gradient in place before the update, and AdamW's state; torch keeps no peak for
its CPU allocator, so no allocator peak, and no RSS), plus the reference's own bytes: the
table's storage, against a reference model kept in memory as TRL keeps one by default, a
second, frozen copy of the model built and sharded on the same mesh (FSDP full over dp,
tensor-parallel), whose parameters' storage is counted (TRL with a PEFT model turns the
adapters off instead, as dpo-lora does: there the in-memory column is what a full frozen
copy would add). Under the adapters off the table is allocated too, each batch's rows
written to it. Activations, and the reference forward's under LoRA, are in neither.
FLOPs per step: torch's FlopCounterMode over one step.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

from bench_lora import TINY, step_flops, storage_bytes, state_bytes
from bench_step import ARGS, interleaved_rounds
from llama.data.loader import DistributedDataLoader
from llama.data.windows import IGNORE_INDEX, Batch, WindowDataset
from llama.lora import LoRAConfig
from llama.training.build import keep_freed_host_memory
from llama.training.flags import build_parser
from llama.training.objective import NextTokenLoss
from llama.training.optim import build_optimizer
from llama.training.preference import DPOConfig, PreferenceLoss
from llama.training.reference import ReferenceLogps
from llama.training.step import Trainee, train_step
from parallel.fsdp import build_parallel_model
from parallel.mesh import build_mesh, dp_rank, dp_size

VARIANTS = ("sft", "dpo", "dpo-lora", "dpo-lora-stored")
NAMES = {"sft": "SFT, cross-entropy", "dpo": "DPO, stored reference", "dpo-lora": "DPO LoRA r {r}, base as reference",
         "dpo-lora-stored": "DPO LoRA r {r}, stored reference"}
CONFIG = DPOConfig(beta=0.1, loss="sigmoid")


class RandomPairs(WindowDataset):
    """`pairs` preference pairs of seq_len-token rows, drawn per pair from its own seed, as
    llama.data's pair dataset lays them out: row 2i chosen, 2i + 1 rejected, the same prompt,
    targets on the reply only, then padding (ignored targets). A micro-batch of P pairs is
    2 P rows (tests/test_dpo.py's FixedPairs, without holding every row in memory)."""

    def __init__(self, pairs: int, seq_len: int, vocab_size: int, seed: int = 0):
        super().__init__()
        self.seq_len, self.seed, self.name, self.num_samples = seq_len, seed, "random pairs", pairs
        self.num_tokens, self.vocab_size = 2 * pairs * (seq_len + 1), vocab_size
        # what decides the targets, for every pair at once (num_targets is O(1)): the prompt's
        # end, and the chosen and the rejected reply's end
        rng, half = np.random.default_rng([seed, pairs]), seq_len // 2
        self.prompt_ends = rng.integers(seq_len // 8, half, pairs)
        self.reply_ends = rng.integers(half + 1, seq_len + 1, (pairs, 2))

    def rows(self, pair: int) -> tuple:
        """(inputs, targets), each (2, seq_len): the chosen row, then the rejected."""
        prompt, ends = self.prompt_ends[pair], self.reply_ends[pair]
        rng = np.random.default_rng([self.seed, pair])
        tokens = rng.integers(0, self.vocab_size, (2, self.seq_len + 1))
        tokens[1, :prompt + 1] = tokens[0, :prompt + 1]  # one prompt, two replies
        targets = tokens[:, 1:].copy()
        where = np.arange(self.seq_len)
        for row, end in enumerate(ends):
            targets[row, (where < prompt) | (where >= end)] = IGNORE_INDEX
        return tokens[:, :-1], targets

    def row(self, window: int):
        inputs, targets = self.rows(window)
        return inputs[0], targets[0], None

    def target_counts(self) -> np.ndarray:
        """(pairs, 2): every pair's chosen and rejected target count."""
        return self.reply_ends - self.prompt_ends[:, None]

    def num_targets(self, sample: int) -> int:
        pair = self.window_index(sample)
        return int(self.reply_ends[pair].sum() - 2 * self.prompt_ends[pair])

    def get_batch(self, first_sample, dp_rank, dp_size, micro_batch, stop=None) -> Batch:
        first = first_sample + dp_rank * micro_batch
        pairs = [self.window_index(s) for s in range(first, first + micro_batch)]
        inputs, targets = (np.concatenate(part) for part in zip(*(self.rows(p) for p in pairs)))
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), None, torch.tensor(pairs))


class CountingLoader(DistributedDataLoader):
    """The loader, counting the tokens of the micro-batches it hands out on this rank."""

    tokens = 0

    def __next__(self) -> Batch:
        batch = super().__next__()
        self.tokens += batch.inputs.numel()
        return batch


def synthetic_reference(dataset: RandomPairs) -> ReferenceLogps:
    """The table of every pair, valued -ln(vocab) per target token (see the docstring)."""
    reference = ReferenceLogps(dataset.num_samples, "cpu")
    reference.table[:-1] = -np.log(dataset.vocab_size) * torch.from_numpy(dataset.target_counts()).float()
    return reference


def reference_model_bytes(args, mesh) -> int:
    """A second, frozen model kept in memory (TRL's default reference), sharded as the
    policy is on this mesh: its parameters' storage bytes on this rank."""
    model = build_parallel_model(args, mesh, sequence_parallel=True).requires_grad_(False)
    count = storage_bytes(list(model.parameters()))
    del model
    return count


def _bench(opts) -> dict:
    keep_freed_host_memory()  # as train.py does on CPU
    args = TINY if opts.tiny else ARGS
    mesh = build_mesh(2)
    dataset = RandomPairs(opts.epoch_pairs, opts.seq_len, args.vocab_size)
    train_defaults = build_parser()  # train.py's AdamW and clipping
    optim_opts = argparse.Namespace(**{k: train_defaults.get_default(k) for k in
                                       ("lr", "weight_decay", "decay_norms_and_embeddings")})
    clip = train_defaults.get_default("clip")

    steps, memory, reference_bytes, flops, forwards, tokens = {}, {}, {}, {}, {}, {}
    for variant in VARIANTS:
        lora = LoRAConfig(opts.rank) if variant.startswith("dpo-lora") else None
        trainee = Trainee(build_parallel_model(args, mesh, sequence_parallel=True, lora=lora))
        if variant == "sft":
            trainee.objective = NextTokenLoss()
        else:
            on_the_fly = variant == "dpo-lora"
            # under LoRA's adapters off the table is still allocated: each batch's rows are written to it
            reference = ReferenceLogps(dataset.num_samples, "cpu") if on_the_fly else synthetic_reference(dataset)
            trainee.objective = PreferenceLoss(CONFIG, reference, reference_forward=on_the_fly)
            reference_bytes[variant] = storage_bytes([reference.table])
        optimizer = build_optimizer(trainee.model, optim_opts, "cpu")
        loader = CountingLoader(dataset, global_batch=opts.pairs_per_rank * dp_size(mesh),
                                dp_rank=dp_rank(mesh), dp_size=dp_size(mesh))

        def step(trainee=trainee, optimizer=optimizer, loader=loader):
            return train_step(trainee, optimizer, loader, "cpu", clip)

        step()  # warm-up; the optimizer state exists from here on

        def count_memory(opt, *_, variant=variant, model=trainee.model):
            memory[variant] = state_bytes(model, opt)

        def count_forward(*_, variant=variant):
            forwards[variant] += 1

        # one step counted: memory with every gradient in place, before the update; the
        # model's forwards; the tokens this rank's loader hands out
        hooks = [optimizer.register_step_pre_hook(count_memory), trainee.model.register_forward_pre_hook(count_forward)]
        forwards[variant], before = 0, loader.tokens
        step()
        tokens[variant] = loader.tokens - before
        for hook in hooks:
            hook.remove()
        flops[variant] = step_flops(step)
        steps[variant] = step

    result = interleaved_rounds(steps, opts.steps, opts.consecutive)
    return dict(result, memory=memory, reference_bytes=reference_bytes, flops=flops, forwards=forwards, tokens=tokens,
                reference_model=reference_model_bytes(args, mesh))


def rank_figures(results: list, variant: str) -> dict:
    """The figures of the rank whose training state is largest (max over ranks, as
    bench_lora.py reports), with that rank's reference bytes."""
    rank = max(results, key=lambda r: sum(r["memory"][variant].values()))
    return {"state": rank["memory"][variant], "table": rank["reference_bytes"].get(variant, 0),
            "model": rank["reference_model"]}


def print_table(result: dict, figures: dict, tokens: dict, rank: int) -> None:
    sft = result["medians"]["sft"]
    print("| variant | ms/step, median (range) | x sft | tokens/step | forwards/step | FLOPs/step, G (x sft) "
          "| params + grads + AdamW per rank, bytes | reference per rank, bytes | total per rank, bytes "
          "| total with a reference model in memory instead, bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        seconds, (low, high) = result["medians"][variant], result["spread"][variant]
        state, table, model = figures[variant]["state"], figures[variant]["table"], figures[variant]["model"]
        held = sum(state.values())
        split = " + ".join(f"{state[k]:,}" for k in ("params", "grads", "optimizer"))
        if variant == "sft":
            reference, in_memory = "none", "-"
        else:
            reference, in_memory = f"{table:,} (table)", f"{held + model:,}"
        flops = result["flops"][variant]
        print(f"| {NAMES[variant].format(r=rank)} | {1000 * seconds:.0f} ({1000 * low:.0f}-{1000 * high:.0f}) "
              f"| {seconds / sft:.2f} | {tokens[variant]:,} | {result['forwards'][variant]} "
              f"| {flops / 1e9:.2f} ({flops / result['flops']['sft']:.3f}) | {held:,} ({split}) | {reference} "
              f"| {held + table:,} | {in_memory} |")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed rounds, each a peak probe and every variant's "
                        "steps (default: %(default)s)")
    parser.add_argument("--consecutive", type=int, default=2, help="steps in a row per variant and round "
                        "(default: %(default)s)")
    parser.add_argument("--pairs-per-rank", type=int, default=2, help="P, pairs per dp rank per step: 2 P "
                        "sequences (default: %(default)s, bench_step's micro-batch of 4 sequences)")
    parser.add_argument("--epoch-pairs", type=int, default=10_000, help="pairs in one epoch: the stored table's "
                        "rows (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=512, help="default: %(default)s")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (dim 64, 2 layers, vocab 256, seq 32, "
                        "1 pair per dp rank, LoRA r 4), one round of one step: a smoke test, not a measurement")
    opts = parser.parse_args(argv)
    if opts.tiny:
        opts.steps, opts.consecutive, opts.seq_len, opts.pairs_per_rank, opts.rank = 1, 1, 32, 1, 4

    from parallel.spawn import run_on_ranks

    results = run_on_ranks(_bench, 4, opts, timeout=1800)
    result = results[0]
    figures = {variant: rank_figures(results, variant) for variant in VARIANTS}
    args = TINY if opts.tiny else ARGS
    dp, tp = 2, 2
    # a step's tokens over the dp ranks (the tp ranks of a dp group read the same batch)
    tokens = {variant: sum(r["tokens"][variant] for r in results) // tp for variant in VARIANTS}
    print(f"2x2 CPU config (dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}, seq {opts.seq_len}, "
          f"{opts.pairs_per_rank} pair{'s' if opts.pairs_per_rank != 1 else ''} = {2 * opts.pairs_per_rank} sequences per dp rank, fp32, SP on, FSDP full, "
          f"fused AdamW, train_step), {opts.steps} rounds of {opts.consecutive} steps; fp32 matmul peak "
          f"{result['peak']:.3f} TFLOP/s ({result['peaks'][0]:.3f}-{result['peaks'][1]:.3f})")
    print(f"DPO: sigmoid, beta {CONFIG.beta}; a reference table of {opts.epoch_pairs:,} pairs (one epoch; "
          f"{opts.epoch_pairs + 1:,} rows of 2 fp32, the last for padding pairs), synthetic values; a reference "
          f"model in memory: {figures['dpo']['model']:,} bytes per rank (a frozen copy, sharded as the policy)")
    print_table(result, figures, tokens, opts.rank)
    extra = result["medians"]["dpo-lora"] - result["medians"]["dpo-lora-stored"]
    passes = opts.epoch_pairs / (opts.pairs_per_rank * dp)
    print(f"the base's forward as reference costs {1000 * extra:.0f} ms a step (dpo-lora - dpo-lora-stored); a "
          f"stored pass over {opts.epoch_pairs:,} pairs is about {passes:,.0f} such forwards "
          f"({passes * extra:,.0f} s, an estimate), paid once")
    print("memory: storage bytes counted (params, grads before the update, AdamW state, the reference's table or "
          "model); torch has no peak counter for its CPU allocator, so none is reported")
    return dict(result, figures=figures)


if __name__ == "__main__":
    main()
