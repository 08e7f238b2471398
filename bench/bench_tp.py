"""Forward + backward tokens/s of the built-in tensor-parallel model against the same
model made parallel from outside with PyTorch's `parallelize_module`.

    python bench/bench_tp.py [--steps 6] [--seq-len 256]

4 CPU processes: tp 2 (two tp groups side by side) and tp 4. The outside model is a
plain nn.Linear / nn.Embedding Llama holding the same weights, sharded with a
Colwise/Rowwise plan and `loss_parallel`; the two are checked to give the same loss."""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llama import ModelArgs, Transformer  # noqa: E402
from llama.model import RMSNorm  # noqa: E402
from llama.rope import apply_rope, rope_table  # noqa: E402
from parallel.losses import vocab_parallel_cross_entropy  # noqa: E402
from parallel.spawn import run_on_ranks  # noqa: E402

ARGS = ModelArgs(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=256, max_seq_len=1024)


class PlainAttention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        # -1 heads: after parallelize_module the projections return this rank's heads
        q = apply_rope(self.wq(x).view(b, s, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(b, s, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class PlainBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention = PlainAttention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.w1 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        z = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(z)) * self.w3(z))


class PlainLlama(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(PlainBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens):
        cos, sin = rope_table(self.args, tokens.shape[1])
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))


def plain_from(model: Transformer) -> PlainLlama:
    plain = PlainLlama(model.args)
    state = {}
    for name, value in model.state_dict().items():
        state[name.replace("feed_forward.", "")] = value
    plain.load_state_dict(state)
    return plain


def parallelize_from_outside(plain: PlainLlama, mesh):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }
    for i in range(plain.args.n_layers):
        plan.update({
            f"layers.{i}.attention.wq": ColwiseParallel(),
            f"layers.{i}.attention.wk": ColwiseParallel(),
            f"layers.{i}.attention.wv": ColwiseParallel(),
            f"layers.{i}.attention.wo": RowwiseParallel(),
            f"layers.{i}.w1": ColwiseParallel(),
            f"layers.{i}.w3": ColwiseParallel(),
            f"layers.{i}.w2": RowwiseParallel(),
        })
    return parallelize_module(plain, mesh, plan)


def _time_steps(step, steps):
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def _bench(tp: int, batch: int, seq_len: int, steps: int):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
    tp_mesh = mesh["tp"]
    gen = torch.Generator().manual_seed(100 + mesh["dp"].get_local_rank())
    tokens = torch.randint(0, ARGS.vocab_size, (batch, seq_len + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    with torch.device("meta"):
        built_in = Transformer(ARGS, tp_mesh)
    built_in.init_weights(seed=0)
    outside = parallelize_from_outside(plain_from(Transformer(ARGS).init_weights(seed=0)), tp_mesh)

    def step_built_in():
        loss = vocab_parallel_cross_entropy(built_in(inputs), targets)
        loss.backward()
        return loss

    def step_outside():
        with loss_parallel():
            logits = outside(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
        return loss

    loss_diff = abs(step_built_in().item() - step_outside().full_tensor().item())
    t_in = _time_steps(step_built_in, steps)
    t_out = _time_steps(step_outside, steps)
    tokens_per_step = batch * seq_len * (world // tp)  # all tp groups together
    return {"tp": tp, "built_in": tokens_per_step / t_in, "outside": tokens_per_step / t_out, "loss_diff": loss_diff}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    opts = parser.parse_args()
    print(f"model: dim {ARGS.dim}, {ARGS.n_layers} layers, {ARGS.n_heads}/{ARGS.n_kv_heads} heads, vocab {ARGS.vocab_size}; "
          f"batch {opts.batch} x seq {opts.seq_len} per tp group, 4 processes, fp32, {opts.steps} timed steps")
    for tp in (2, 4):
        r = run_on_ranks(_bench, 4, tp, opts.batch, opts.seq_len, opts.steps)[0]
        print(f"tp {tp}: built-in {r['built_in']:8.0f} tok/s   parallelize_module {r['outside']:8.0f} tok/s   "
              f"ratio {r['built_in'] / r['outside']:.2f}   (loss difference {r['loss_diff']:.1e})")


if __name__ == "__main__":
    main()
