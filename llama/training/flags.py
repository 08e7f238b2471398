"""train.py's flags: every one with its default in --help, read from the command line
over a --config TOML; what the run, the planner's defaults and the GPU check read."""

import argparse

from llama.data.chat import DATA_FORMATS, TRAIN_ON
from llama.config import PRESETS
from llama.lora import TARGETS as LORA_TARGETS, LoRAConfig
from llama.qlora import BASE_DTYPES
from parallel.fsdp import STRATEGIES
from parallel.pipeline import add_pipeline_arguments

from .preemption import PREEMPTED_EXIT_CODE
from .preference import DPO_LOSSES, DPOConfig
from .run_config import parse_with_config

OBJECTIVES = ("cross-entropy", "dpo")


def build_parser(description: str = None) -> argparse.ArgumentParser:
    """description: what --help prints above the flags (train.py gives its docstring)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file of flags (keys are flag names, e.g. seq-len = 2048); "
                                    "the command line overrides it (default: none)")
    a = p.add_argument_group("model")
    a.add_argument("--checkpoint", help="converted checkpoint directory (convert_weights.py) to start from (default: random init)")
    a.add_argument("--preset", default="debug", help=f"random-init model when no --checkpoint: {', '.join(PRESETS)} (default: %(default)s)")
    a = p.add_argument_group("data")
    a.add_argument("--data", nargs="*", help="text / .jsonl files or directories (default: Python's stdlib sources)")
    a.add_argument("--data-format", default="auto", choices=DATA_FORMATS,
                   help=".jsonl format: chat messages, alpaca, prompt-completion or text (default: detected per file)")
    a.add_argument("--train-on", default="assistant", choices=TRAIN_ON,
                   help="chat data: which tokens the loss applies to (default: %(default)s: every assistant turn)")
    a.add_argument("--skip-bad-lines", action="store_true", help="count and report bad .jsonl lines instead of stopping (default: stop)")
    a.add_argument("--document-masking", action=argparse.BooleanOptionalAction, default=True,
                   help="text data: attend only within each document, RoPE positions restart per document "
                        "(default: on; chat data is always masked per conversation)")
    a.add_argument("--tokenizer", default="bytes", help="tokenizer.model (Llama 3 or 2) or 'bytes' (default: %(default)s)")
    a.add_argument("--cache-dir", help="token cache directory (default: .token_cache next to the data)")
    a = p.add_argument_group("validation")
    a.add_argument("--val-data", nargs="*", help="held-out files or directories, read like --data (default: none)")
    a.add_argument("--val-fraction", type=float, help="hold out this fraction of the --data documents, chosen by --seed (default: none)")
    a.add_argument("--eval-every", type=int, default=50, help="steps between validation losses; also before step 1 and at the end (default: %(default)s)")
    a.add_argument("--eval-batches", type=int, default=4, help="global batches in the fixed validation set, at most: a smaller set is evaluated whole, its last batch padded with ignored rows (default: %(default)s)")
    a = p.add_argument_group("parallelism")
    a.add_argument("--tp", type=int, help="tensor-parallel size (default: on GPUs the smallest whose plan fits the GPU's memory, "
                                          "FSDP sharding the rest, see parallel.plan.choose_tp; on CPU 2 if it divides the world)")
    a.add_argument("--strategy", default="full", choices=STRATEGIES,
                   help="FSDP sharding strategy across dp; with --pp, full runs as grad_op and hybrid as hybrid_zero2, "
                        "keeping each stage gathered through the step (default: %(default)s)")
    a.add_argument("--dp-replicate", type=int, default=1, help="hybrid strategies: number of replica groups (default: %(default)s)")
    a.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=True,
                   help="split activations along the sequence between blocks when tp > 1 (default: on)")
    a.add_argument("--cp", type=int, default=1,
                   help="context-parallel size: each sequence is split over this many ranks, which all-gather "
                        "keys and values (default: %(default)s)")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (default: %(default)s)")
    add_pipeline_arguments(a)
    a.add_argument("--activation-checkpointing", default="none", choices=("none", "full", "selective"),
                   help="recompute activations in backward: every block, or every other one (default: %(default)s)")
    a.add_argument("--compile", action="store_true", help="torch.compile each transformer block (default: off)")
    a.add_argument("--dtype", choices=("fp32", "bf16"),
                   help="bf16: bf16 compute, fp32 master weights and reduce; fp32 uses TF32 matmuls on CUDA "
                        "(default: bf16 on CUDA, fp32 on CPU)")
    a = p.add_argument_group("LoRA (parameter-efficient fine-tuning: the base frozen, low-rank adapters train)")
    a.add_argument("--lora-rank", type=int, default=0, help="rank r of the adapters; 0 trains every parameter (default: %(default)s)")
    a.add_argument("--lora-alpha", type=float, help="adapter scale alpha / r (default: 2 x --lora-rank)")
    a.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default: %(default)s)")
    a.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                   help="projections that get an adapter, Meta's names (default: %(default)s)")
    a.add_argument("--lora-rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilised LoRA) (default: off)")
    a.add_argument("--base-dtype", choices=BASE_DTYPES,
                   help="with --lora-rank, the frozen base's storage: nf4 (QLoRA: the seven projections' weights 4-bit "
                        "NormalFloat, double quantised, each rank quantising its tp shard; needs pip install -e '.[qlora]') "
                        "(default: as --dtype stores it)")
    a = p.add_argument_group("objective")
    a.add_argument("--objective", default="cross-entropy", choices=OBJECTIVES,
                   help="cross-entropy: next-token loss (pretraining, SFT); dpo: direct preference optimisation on "
                        "{prompt, chosen, rejected} .jsonl pairs (default: %(default)s)")
    a.add_argument("--dpo-beta", type=float, default=0.1, help="DPO: how far the policy may move from the reference (default: %(default)s)")
    a.add_argument("--dpo-loss", default="sigmoid", choices=DPO_LOSSES,
                   help="DPO: sigmoid (Rafailov et al.) or ipo (Azar et al.) (default: %(default)s)")
    a.add_argument("--dpo-label-smoothing", type=float, default=0.0,
                   help="DPO: the assumed fraction of mislabelled pairs (cDPO), sigmoid only (default: %(default)s)")
    a.add_argument("--reference", help="DPO: the reference model's converted checkpoint; its log-probabilities are "
                                       "computed once and stored in SAVE_DIR/reference (default: the starting "
                                       "model; under --lora-rank the base with the adapters off)")
    a = p.add_argument_group("batch")
    a.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    a.add_argument("--micro-batch", type=int, default=4,
                   help="sequences (DPO: pairs) per dp rank per micro-step; with --pp, per pipeline micro-batch (default: %(default)s)")
    a.add_argument("--global-batch", type=int, help="sequences (DPO: pairs) per optimizer step; overrides --micro-batch "
                                                   "(default: micro-batch x dp x grad-accum, x pp-microbatches with --pp)")
    a.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default: %(default)s)")
    a = p.add_argument_group("optimisation")
    a.add_argument("--steps", type=int, default=150, help="optimizer steps of the whole run, which set the schedule (default: %(default)s)")
    a.add_argument("--stop-after", type=int, help="end this job after so many steps, with a checkpoint (default: run to --steps)")
    a.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    a.add_argument("--min-lr-ratio", type=float, default=0.1, help="floor of the decay, as a fraction of --lr (default: %(default)s)")
    a.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (default: %(default)s)")
    a.add_argument("--decay", default="cosine", choices=("cosine", "linear", "constant"), help="learning-rate decay after warm-up (default: %(default)s)")
    a.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: %(default)s)")
    a.add_argument("--decay-norms-and-embeddings", action="store_true", help="apply weight decay to them too (default: off)")
    a.add_argument("--clip", type=float, default=1.0, help="max global grad norm, 0 for none (default: %(default)s)")
    a.add_argument("--seed", type=int, default=0, help="seed of the random init, the data order and the validation split (default: %(default)s)")
    a = p.add_argument_group("checkpoints and logging")
    a.add_argument("--save-dir", default="runs/default", help="checkpoints and metrics.jsonl (default: %(default)s)")
    a.add_argument("--save-every", type=int, default=50, help="steps between checkpoints, 0 for only at the end (default: %(default)s)")
    a.add_argument("--keep", type=int, default=2, help="complete checkpoints to keep (default: %(default)s)")
    a.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --save-dir (default: off)")
    a.add_argument("--log-every", type=int, default=10, help="steps between log lines; step 1 and the last step always log (default: %(default)s)")
    a.add_argument("--async-checkpoint", action="store_true",
                   help="copy the shards to CPU memory and write them in the background while training goes on (default: off)")
    a.add_argument("--max-skips", type=int, default=10,
                   help="stop after this many consecutive steps with a non-finite loss or grad norm, whose updates "
                        "are skipped (default: %(default)s)")
    a.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: table on GPU, measured on CPU)")
    a.add_argument("--tensorboard", action="store_true", help="also write the logged scalars to SAVE_DIR/tensorboard (default: off)")
    a.add_argument("--profile-steps", metavar="A:B", help="write a torch profiler trace of steps A to B to SAVE_DIR/profile (default: none)")
    a.add_argument("--memory-snapshot", action="store_true",
                   help="CUDA: write the allocator history of the first 3 steps to SAVE_DIR/memory_snapshot_rankR.pickle (default: off)")
    a = p.add_argument_group("cluster")
    a.add_argument("--save-on-signal", default="SIGTERM,SIGUSR1",
                   help=f"on these signals, save at the next step boundary and exit with code {PREEMPTED_EXIT_CODE}; "
                        "'none' to leave signals alone (default: %(default)s)")
    a.add_argument("--time-limit", metavar="HH:MM",
                   help=f"wall-clock budget of this job: save and exit with code {PREEMPTED_EXIT_CODE} while the last step "
                        "and save still fit (default: none)")
    a.add_argument("--comm-timeout", type=float, default=30,
                   help="minutes a collective may wait before the job fails (default: %(default)s)")
    return p


def parse_args(argv=None, description: str = None) -> argparse.Namespace:
    parser = build_parser(description)
    opts = parse_with_config(parser, argv)
    try:
        LoRAConfig.from_options(opts)
    except ValueError as e:
        parser.error(str(e))
    if opts.base_dtype is not None and not opts.lora_rank:
        parser.error(f"--base-dtype {opts.base_dtype} stores a frozen base: it needs --lora-rank R (QLoRA)")
    if opts.objective == "dpo":
        try:
            DPOConfig.from_options(opts)
        except ValueError as e:
            parser.error(str(e))
    elif opts.reference:
        parser.error("--reference names DPO's reference model: it needs --objective dpo")
    if opts.val_data and opts.val_fraction:
        parser.error("--val-data and --val-fraction both choose the validation set; give one")
    return opts
