"""Greedy decode tokens/s of `llama.generate` against Meta's reference generation loop
(llama-models' Transformer with its own KV cache), same weights, same prompt, same
number of new tokens, one CPU process with one thread each.

    python bench/bench_generate.py [--new-tokens 128] [--prompt-len 32] [--repeats 3] [--tp 2]

Prefill is timed apart from decode; each figure is the best of --repeats runs (the
machine is shared). With --tp N ours is also run on N gloo processes, for the record:
on CPU a tp step adds 2 all-reduces per layer, which costs more than it saves at this size."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llama import ModelArgs, Transformer  # noqa: E402
from llama.generate import Timer, generate  # noqa: E402
from parallel.spawn import run_on_ranks  # noqa: E402

# the debug preset's shape, with the RoPE scaling Meta's reference hard-codes
ARGS = ModelArgs(
    dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=64, rope_theta=500000.0,
    use_scaled_rope=True, rope_scale_factor=8.0, rope_original_context=8192, max_seq_len=1024,
)
SEED = 0


def prompt_tokens(n: int) -> list[int]:
    return torch.randint(0, ARGS.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def time_ours(model: Transformer, prompt: list, n_new: int) -> tuple[Timer, list]:
    timer = Timer(len(prompt))
    tokens = generate(model, prompt, n_new, on_token=lambda _: timer.tick())
    return timer, tokens


@torch.inference_mode()
def time_meta(reference, prompt: list, n_new: int) -> tuple[Timer, list]:
    """Meta's loop: feed tokens[prev:cur] at start position prev, take the argmax."""
    timer, tokens, prev = Timer(len(prompt)), list(prompt), 0
    for cur in range(len(prompt), len(prompt) + n_new):
        logits = reference(torch.tensor([tokens[prev:cur]]), prev)
        tokens.append(int(logits[0, -1].argmax()))
        timer.tick()
        prev = cur
    return timer, tokens[len(prompt) :]


def best(run, repeats: int) -> tuple[Timer, list]:
    run(4)  # warm-up
    runs = [run(None) for _ in range(repeats)]
    return max(runs, key=lambda r: r[0].decode_tokens_per_s)


def single_process(prompt_len: int, n_new: int, repeats: int) -> dict:
    from tests.reference import meta_reference_model

    prompt = prompt_tokens(prompt_len)
    ours = Transformer(ARGS).init_weights(seed=SEED).eval()
    reference = meta_reference_model(ARGS, ours.state_dict(), max_batch_size=1)
    out = {}
    out["ours"] = best(lambda n: time_ours(ours, prompt, n or n_new), repeats)
    out["meta"] = best(lambda n: time_meta(reference, prompt, n or n_new), repeats)
    return {name: (timer, tokens) for name, (timer, tokens) in out.items()}


def tensor_parallel(prompt_len: int, n_new: int, repeats: int):
    from torch.distributed.device_mesh import init_device_mesh
    import torch.distributed as dist

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    with torch.device("meta"):
        model = Transformer(ARGS, mesh)
    model.init_weights(seed=SEED, device="cpu").eval()
    prompt = prompt_tokens(prompt_len)
    return best(lambda n: time_ours(model, prompt, n or n_new), repeats)


def report(name: str, timer: Timer) -> None:
    print(
        f"{name:<22} prefill {timer.prompt_tokens_per_s:8.1f} tokens/s   "
        f"decode {timer.decode_tokens_per_s:7.1f} tokens/s  ({timer.n_tokens} new tokens)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tp", type=int, default=0, help="also time ours on this many processes")
    a = p.parse_args()

    print(
        f"model: dim {ARGS.dim}, {ARGS.n_layers} layers, {ARGS.n_heads} heads / {ARGS.n_kv_heads} kv, "
        f"vocab {ARGS.vocab_size}; prompt {a.prompt_len} tokens, greedy, {a.new_tokens} new tokens, "
        f"1 thread per process, best of {a.repeats}"
    )
    results = run_on_ranks(single_process, 1, a.prompt_len, a.new_tokens, a.repeats)[0]
    (ours, our_tokens), (meta, meta_tokens) = results["ours"], results["meta"]
    report("ours (1 process)", ours)
    report("Meta reference", meta)
    if a.tp > 1:
        tp_timer, tp_tokens = run_on_ranks(tensor_parallel, a.tp, a.prompt_len, a.new_tokens, a.repeats)[0]
        report(f"ours (tp {a.tp})", tp_timer)
    print(f"decode ratio ours / Meta: {ours.decode_tokens_per_s / meta.decode_tokens_per_s:.2f}x")
    print(f"prefill ratio ours / Meta: {ours.prompt_tokens_per_s / meta.prompt_tokens_per_s:.2f}x")
    same = sum(x == y for x, y in zip(our_tokens, meta_tokens))
    print(f"same greedy tokens as Meta: {same}/{len(meta_tokens)}")


if __name__ == "__main__":
    main()
