"""bench/bench_lora.py runs end to end with a tiny model (`--tiny`, 4 gloo ranks on a 2x2
mesh), so the benchmark cannot rot. Structure only, no timing: the LoRA variant trains
exactly its adapters (r x (in + out) per target projection), full fine-tuning trains
every parameter, LoRA holds less gradient and AdamW state and saves a smaller checkpoint
of its adapters only,
and the markdown table has both rows (QLoRA, on an NF4 base, needs projections of at
least one 64 x 256 block unit, so it runs only at the benchmark's real size)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_lora  # noqa: E402
import torch  # noqa: E402
from llama.model import Transformer  # noqa: E402

RANK = 4  # small against the tiny model's dim 64, as 16 is against 512: fewer FLOPs than full


def adapter_count(args, rank: int) -> int:
    """r x (in + out) for each of the seven projections of every layer."""
    head_dim = args.dim // args.n_heads
    kv = args.n_kv_heads * head_dim
    with torch.device("meta"):
        hidden = Transformer(args).layers[0].feed_forward.w1.weight.shape[0]  # multiple_of's rounding
    shapes = [(args.dim, args.dim), (args.dim, kv), (args.dim, kv), (args.dim, args.dim),
              (args.dim, hidden), (hidden, args.dim), (args.dim, hidden)]
    return args.n_layers * sum(rank * (i + o) for i, o in shapes)


def test_tiny_bench_lora_trains_only_the_adapters_and_saves_less(capsys):
    result = bench_lora.main(["--tiny", "--rank", str(RANK)])
    out = capsys.readouterr().out

    expected = adapter_count(bench_lora.TINY, RANK)
    assert result["adapters"]["lora"] == expected
    assert result["trainable"]["lora"] == expected
    assert result["adapters"]["full"] == 0
    assert result["trainable"]["full"] > 3 * expected  # every parameter of the tiny model

    full, lora = result["memory"]["full"], result["memory"]["lora"]
    assert lora["params"] > full["params"]  # the frozen base (fp32 here) and the adapters
    assert lora["grads"] < full["grads"] and lora["optimizer"] < full["optimizer"]
    assert 0 < result["checkpoint"]["lora"] < result["checkpoint"]["full"]
    saved = result["saved_tensors"]
    assert saved["lora"] and all(name.endswith((".lora_a", ".lora_b")) for name in saved["lora"])  # no base
    assert len(saved["lora"]) == 2 * 7 * bench_lora.TINY.n_layers
    assert "tok_embeddings.weight" in saved["full"] and not any("lora" in name for name in saved["full"])

    assert 0 < result["flops"]["lora"] < result["flops"]["full"]  # no weight gradients of the frozen base
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| variant |")
    # QLoRA runs only at the real size: the tiny projections are under one NF4 block unit
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| full fine-tuning", f"| LoRA r {RANK}, 7 targets"]
    assert "LoRA/full step time" in out
