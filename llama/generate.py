"""Text generation with a KV cache, on one device or tensor-parallel.

    python -m llama.generate --checkpoint DIR --tokenizer PATH --prompt "..."
    torchrun --nproc-per-node 4 -m llama.generate --tp 4 --checkpoint DIR --tokenizer PATH --prompt "..."
    python -m llama.generate --preset debug --seed 0 --tokenizer bytes --prompt "Hi"   # random weights
    python -m llama.generate --checkpoint BASE --adapter RUN/step_N --tokenizer PATH --prompt "..."  # LoRA

The prompt runs through the model once (prefill), then one token per step (decode),
each step reading the cached keys and values of the earlier positions. Under tensor
parallelism every rank caches only its own kv heads, and every rank must pick the same
next token: each gathers the last position's full-vocabulary logits (one small
all-gather) and samples from them with a generator seeded the same everywhere.
"""

import argparse
import contextlib
import operator
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .config import PRESETS, ModelArgs
from .model import Transformer

# train.py's spellings, and torch's names, which earlier versions of this command took
DTYPES = {
    "fp32": torch.float32, "bf16": torch.bfloat16,
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def default_dtype(device: torch.device) -> str:
    """bf16 where tensor cores and fused attention want it, fp32 on CPU."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


# ---------------------------------------------------------------- sampling


def last_position_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary float32 logits of sequence 0's last position. With a tp mesh each
    rank holds a slice of the vocabulary: gather that one position, not the whole output."""
    if isinstance(logits, DTensor):
        last = logits.to_local()[:, -1:]
        logits = DTensor.from_local(last, logits.device_mesh, logits.placements, run_check=False).full_tensor()
    return logits[0, -1].float()


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy when temperature is 0, else nucleus sampling: draw from the smallest set of
    most likely tokens whose probability reaches top_p.

    Runs on the logits' device. The draw is one uniform number from a CPU `generator`, a
    Python float that reaches the device as a kernel argument (inverse-CDF sampling), so
    every rank and every device type draws alike and no tensor crosses to the device.
    The one read back is the chosen id, which streaming and stop tokens need anyway."""
    if temperature <= 0:
        return int(logits.argmax())
    probs, order = torch.softmax(logits.float() / temperature, dim=-1).sort(descending=True)
    if top_p < 1.0:
        mass_before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)  # the most likely token always survives
    cdf = probs.cumsum(-1)
    u = torch.rand((), generator=generator).item()  # host memory: no device sync
    pick = torch.searchsorted(cdf, cdf[-1:] * u, right=True).clamp_(max=cdf.shape[0] - 1)
    return int(order[pick])


# ---------------------------------------------------------------- generation


def check_request(model: Transformer, prompt_tokens: Sequence[int], max_new_tokens: int, temperature: float, top_p: float):
    """Raise one ValueError line for what the model cannot run; every rank checks alike,
    so a bad request ends all of them before any collective."""
    context, vocab = model.args.max_seq_len, model.args.vocab_size
    if len(prompt_tokens) == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. the tokenizer's BOS)")
    if len(prompt_tokens) >= context:
        raise ValueError(
            f"the prompt has {len(prompt_tokens)} tokens but the model's context (max_seq_len) is {context}; "
            f"shorten it to at most {context - 1} tokens to leave room for generation"
        )
    for pos, token in enumerate(prompt_tokens):
        if not 0 <= token < vocab:
            raise ValueError(
                f"prompt token {token!r} at position {pos} is outside the model's vocabulary [0, {vocab}); "
                "does the tokenizer match the model?"
            )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens (--max-new-tokens) must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature (--temperature) must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p (--top-p) must be in (0, 1], got {top_p}")


def as_token_list(tokens) -> list[int]:
    """Python ints from a list, numpy array or tensor of ids."""
    try:
        return [operator.index(t) for t in tokens]
    except TypeError:
        raise ValueError(f"prompt tokens must be integer ids, got {type(tokens).__name__} of {tokens!r:.60}") from None


def model_device(model: Transformer) -> torch.device:
    weight = model.tok_embeddings.weight
    return weight.to_local().device if isinstance(weight, DTensor) else weight.device


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_tokens: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
    on_token: Optional[Callable[[int], None]] = None,
    vocab_limit: Optional[int] = None,
) -> list[int]:
    """The new tokens after `prompt_tokens`, at most `max_new_tokens` and no further than
    the model's context. A stop token ends generation and is not returned. `on_token(id)`
    sees each token as soon as it is chosen (streaming). `vocab_limit`: never choose ids
    at or above it (a model whose vocabulary is padded beyond its tokenizer's). Under tp,
    call it on every rank with the same arguments; all ranks return the same tokens."""
    prompt_tokens = as_token_list(prompt_tokens)
    check_request(model, prompt_tokens, max_new_tokens, temperature, top_p)
    n_new = min(max_new_tokens, model.args.max_seq_len - len(prompt_tokens))
    if n_new == 0:
        return []
    device = model_device(model)
    # the last new token is never fed back, so it needs no cache slot
    cache = model.new_kv_cache(batch_size=1, max_seq_len=len(prompt_tokens) + n_new - 1)
    # a CPU generator: identical draws on every rank and every device type
    generator = torch.Generator().manual_seed(seed)
    stop = set(stop_tokens)

    new: list[int] = []
    inputs, start_pos = torch.tensor([prompt_tokens], device=device), 0
    step_input = torch.empty((1, 1), dtype=torch.long, device=device)  # each decoded token is written here
    while True:
        logits = last_position_logits(model(inputs, start_pos, cache, last_only=True))
        if vocab_limit is not None and vocab_limit < logits.shape[0]:
            logits[vocab_limit:] = float("-inf")
        token = sample_next(logits, temperature, top_p, generator)
        if token in stop:
            break
        new.append(token)
        if on_token is not None:
            on_token(token)
        if len(new) == n_new:
            break
        start_pos += inputs.shape[1]
        inputs = step_input.fill_(token)  # a fill kernel with the id as its argument: no copy, no new tensor
    return new


# ---------------------------------------------------------------- streaming and timing


@dataclass
class TextStream:
    """Turns tokens into printable text as they arrive. A token can end in the middle of
    a multi-byte character, so text is held back while it decodes to a replacement char."""

    tokenizer: object
    tokens: list = field(default_factory=list)
    shown: int = 0  # characters already returned

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown :], len(text)
        return new


@dataclass
class Timer:
    """Prompt and decode speed seen from outside `generate`: the first token marks the end
    of the prefill (it needs the prompt's logits), each later token one decode step.
    Reading a token's id waits for the device, so the clock times finished work."""

    prompt_len: int
    start: float = field(default_factory=time.perf_counter)
    first: Optional[float] = None
    last: Optional[float] = None
    n_tokens: int = 0

    def tick(self) -> None:
        now = time.perf_counter()
        self.first = now if self.first is None else self.first
        self.last = now
        self.n_tokens += 1

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_len / (self.first - self.start) if self.first else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.n_tokens - 1
        return steps / (self.last - self.first) if steps > 0 and self.last > self.first else float("nan")

    def summary(self) -> str:
        return (
            f"prompt: {self.prompt_len} tokens, {self.prompt_tokens_per_s:.1f} tokens/s | "
            f"decode: {self.n_tokens} tokens, {self.decode_tokens_per_s:.1f} tokens/s"
        )


# ---------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama.generate", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="converted checkpoint directory, convert_weights.py output (required: this or --preset)")
    source.add_argument("--preset", choices=sorted(PRESETS),
        help="random-init model of this size (required: this or --checkpoint)")
    p.add_argument("--adapter", metavar="RUN/step_N",
        help="a LoRA run's checkpoint (train.py --lora-rank): its adapters on the --checkpoint base, unmerged "
             "(default: none)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model, a directory holding one, or 'bytes' (required)")
    p.add_argument("--prompt", required=True, help="text to continue, or with --chat the user's message (required)")
    p.add_argument("--chat", action="store_true",
        help="wrap the prompt as a user turn in the Llama 3 chat format (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=128,
        help="tokens to generate at most; fewer at a stop token (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
        help="sampling temperature; 0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0,
        help="nucleus sampling: draw from the most likely tokens holding this probability; 1 = all (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
        help="sampling seed, and the weights' seed with --preset (default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
        help="weights and compute dtype, as train.py spells it: fp32 or bf16; torch's names also work "
             "(default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--tp", type=int, default=None,
        help="tensor-parallel size; must equal the number of processes (default: the number of processes)")
    return p.parse_args(argv)


def setup_tp(tp: Optional[int]):
    """The tp mesh (None on one process). Generation uses every process as one tp group."""
    from parallel.mesh import build_mesh, init_distributed

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    tp = world if tp is None else tp
    if tp != world:
        raise ValueError(f"--tp {tp} must equal the number of processes {world}; launch with torchrun --nproc-per-node {tp}")
    if tp == 1:
        return None
    init_distributed()
    return build_mesh(tp)["tp"]


def build_model(args: argparse.Namespace, tp_mesh) -> Transformer:
    from parallel.mesh import local_device

    dtype = DTYPES[args.dtype or default_dtype(local_device())]
    if args.adapter and not args.checkpoint:
        raise ValueError("--adapter needs --checkpoint: the converted base the adapters were trained on")
    if args.checkpoint:
        from .weights.loading import load_model

        return load_model(args.checkpoint, tp_mesh, dtype, device=local_device(), adapter=args.adapter)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_preset(args.preset), tp_mesh)
    return model.to(dtype=dtype).init_weights(seed=args.seed, device=local_device())


def encode_prompt(tokenizer, args: argparse.Namespace) -> list[int]:
    if args.chat:
        return tokenizer.encode_dialog([{"role": "user", "content": args.prompt}])
    return tokenizer.encode(args.prompt, bos=True)


def run(args: argparse.Namespace) -> None:
    from .tokenizer import load_tokenizer

    tp_mesh = setup_tp(args.tp)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tokenizer = load_tokenizer(args.tokenizer)
    model = build_model(args, tp_mesh).eval()
    prompt = encode_prompt(tokenizer, args)
    check_request(model, prompt, args.max_new_tokens, args.temperature, args.top_p)  # before any output

    stream, timer = TextStream(tokenizer), Timer(len(prompt))

    def on_token(token: int) -> None:
        timer.tick()
        if rank == 0:
            print(stream.push(token), end="", flush=True)

    if rank == 0 and not args.chat:  # a chat reply reads alone; a plain continuation follows its prompt
        print(args.prompt, end="", flush=True)
    generate(
        model,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_tokens=tokenizer.stop_tokens,
        on_token=on_token,
        vocab_limit=tokenizer.vocab_size,
    )
    if rank == 0:
        print(flush=True)
        print(timer.summary(), file=sys.stderr, flush=True)


def main(argv=None) -> int:
    """Exit code: 0, or 1 with one `error:` line on stderr for a request it cannot run."""
    args = parse_args(argv)
    created_group = not dist.is_initialized()
    try:
        run(args)
        return 0
    except (ValueError, NotImplementedError) as err:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if created_group and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


if __name__ == "__main__":
    from parallel.mesh import exit_without_teardown

    exit_without_teardown(main())
