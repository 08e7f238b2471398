"""Generation: greedy tokens equal Meta's reference decoding with its own KV cache, on one
device and under tp 2 and 4; the cached forward equals the uncached one; sampling agrees
across tp ranks; bad requests end with one clear line.

All multi-rank checks share one 4-process launch (launches cost seconds): the tp 2 mesh is
the ("dp", "tp") = (2, 2) mesh's tp dimension, so both tp 2 groups run the same work."""

import contextlib
import importlib.resources
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import ModelArgs, Transformer
from llama.generate import TextStream, generate, main, parse_args, sample_next
from parallel.spawn import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
LLAMA3_TOKENIZER = str(importlib.resources.files("llama_models") / "llama3" / "tokenizer.model")
CACHE_TOL = 1e-5  # fp32 logits, cached vs uncached
N_NEW = 64
PROMPT = [17, 200, 3, 88, 141, 9, 250, 64]
# GQA (8 query heads over 2 kv heads: sharded kv at tp 2, replicated at tp 4), tied output,
# and the RoPE scaling values Meta's reference hard-codes (factor 8, low 1, high 4, 8192).
GEN = ModelArgs(
    dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=32, rope_theta=500000.0,
    use_scaled_rope=True, rope_scale_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
    rope_original_context=8192, max_seq_len=128, tie_word_embeddings=True,
)
# With the default std 0.02 a tied model's logits favour the current token and greedy
# decoding repeats one token; std 0.2 gives a varied continuation (55 distinct of 64).
GEN_STD, GEN_SEED = 0.2, 4  # smallest top-2 logit gap over the 64 steps: 0.053
# 12 query heads over 3 kv heads: a rank's query heads straddle kv heads at tp 2 and 4
ODD_GQA = ModelArgs(dim=96, n_layers=2, n_heads=12, n_kv_heads=3, vocab_size=128, multiple_of=16, max_seq_len=32)


def build(args: ModelArgs, mesh=None, std: float = 0.02, seed: int = 0) -> Transformer:
    if mesh is None:  # from meta, to_empty would untie plain (non-DTensor) tied weights
        return Transformer(args).init_weights(seed=seed, std=std).eval()
    with torch.device("meta"):
        model = Transformer(args, mesh)
    return model.init_weights(seed=seed, device="cpu", std=std).eval()


def full_logits(logits) -> torch.Tensor:
    return logits.full_tensor() if hasattr(logits, "full_tensor") else logits


# ---------------------------------------------------------------- rank workers


@torch.inference_mode()
def meta_greedy(model: Transformer, prompt: list, n_new: int) -> tuple[list, float]:
    """Meta's generation loop: its model caches keys and values itself, fed
    tokens[prev:cur] at start position prev. Also returns the smallest gap between the top
    two logits, the room float noise has before it could change a greedy choice."""
    from tests.reference import meta_reference_model

    reference = meta_reference_model(model.args, model.state_dict(), max_batch_size=1)
    tokens, prev, gaps = list(prompt), 0, []
    for cur in range(len(prompt), len(prompt) + n_new):
        logits = reference(torch.tensor([tokens[prev:cur]]), prev)[0, -1]
        top2 = logits.topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        tokens.append(int(logits.argmax()))
        prev = cur
    return tokens[len(prompt) :], min(gaps)


@torch.inference_mode()
def cached_vs_full(model: Transformer, seqlen: int = 24) -> float:
    """Max |logit difference| between one uncached forward of a sequence and the same
    sequence fed through the cache as a prefill, a chunk at an offset, then one by one."""
    tokens = torch.randint(0, model.args.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(2))
    full = full_logits(model(tokens))
    cache = model.new_kv_cache(batch_size=1, max_seq_len=seqlen)
    pieces = [(0, 7), (7, 12)] + [(i, i + 1) for i in range(12, seqlen)]
    cached = torch.cat([full_logits(model(tokens[:, a:b], a, cache)) for a, b in pieces], dim=1)
    return (cached - full).abs().max().item()


def cli(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def tp_run(mesh) -> dict:
    model = build(GEN, mesh, GEN_STD, GEN_SEED)
    return {
        "greedy": generate(model, PROMPT, N_NEW),
        "sampled": generate(model, PROMPT, 16, temperature=0.8, top_p=0.9, seed=5),
        "cache_diff": [cached_vs_full(build(args, mesh)) for args in (GEN, ODD_GQA)],
    }


def four_ranks() -> dict:
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    fs_init.initialize_model_parallel(1)  # creates groups: every rank must join, rank 0 uses it
    rank, out = dist.get_rank(), {}
    if rank == 0:  # the two single-device jobs run side by side
        out["meta"], out["gap"] = meta_greedy(build(GEN, None, GEN_STD, GEN_SEED), PROMPT, N_NEW)
    if rank == 1:
        out["single"] = tp_run(None)
    out["tp4"] = tp_run(init_device_mesh("cpu", (4,), mesh_dim_names=("tp",)))
    out["tp2"] = tp_run(init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["tp"])
    out["cli"] = cli(["--preset", "debug", "--tokenizer", "bytes", "--prompt", "Hi", "--max-new-tokens", "6", "--tp", "4"])
    return out


@pytest.fixture(scope="module")
def ranks() -> list:
    return run_on_ranks(four_ranks, 4)


# ---------------------------------------------------------------- parity and tp


def test_greedy_tokens_equal_meta_reference_single_device(ranks):
    meta, gap = ranks[0]["meta"], ranks[0]["gap"]
    assert len(set(meta)) > 16, f"degenerate reference continuation {meta}"
    # float noise between implementations is ~1e-6 on these logits: a gap 100x the cache
    # tolerance leaves no room for a tie to flip a greedy choice
    assert gap > 100 * CACHE_TOL, f"top-2 logit gap {gap:.3g} is too small for an exact greedy comparison"
    assert ranks[1]["single"]["greedy"] == meta


@pytest.mark.parametrize("tp", ["tp2", "tp4"])
def test_greedy_tokens_equal_meta_reference_under_tp(ranks, tp):
    for rank, result in enumerate(ranks):
        assert result[tp]["greedy"] == ranks[0]["meta"], f"{tp} rank {rank}"


@pytest.mark.parametrize("tp", ["single", "tp2", "tp4"])
def test_cached_forward_equals_uncached(ranks, tp):
    results = [ranks[1]["single"]] if tp == "single" else [r[tp] for r in ranks]
    for result in results:
        for args, diff in zip(("GEN", "ODD_GQA"), result["cache_diff"]):
            assert diff <= CACHE_TOL, f"{tp} {args}: max abs logit difference {diff:.3g}"


@pytest.mark.parametrize("tp", ["tp2", "tp4"])
def test_sampling_picks_the_same_tokens_on_every_rank(ranks, tp):
    sampled = [r[tp]["sampled"] for r in ranks]
    assert len(sampled[0]) == 16 and all(s == sampled[0] for s in sampled)
    assert sampled[0] != ranks[0][tp]["greedy"][:16]  # it did sample


def test_cli_under_tp_prints_on_rank_zero_only(ranks):
    code, out, err = ranks[0]["cli"]
    assert code == 0 and out.startswith("Hi") and "decode:" in err
    for rank in ranks[1:]:
        assert rank["cli"] == (0, "", "")


# ---------------------------------------------------------------- sampling and streaming


def test_sampling_rules():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, 1.0, gen) == 0
    assert sample_next(logits, 1.0, 1e-6, gen) == 0  # top_p ~0 keeps only the best token
    draws = {sample_next(logits, 1.0, 0.75, gen) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.75; the 0.2 token is cut


def test_same_seed_same_samples_and_vocab_limit():
    model = build(GEN, std=GEN_STD, seed=GEN_SEED)
    a = generate(model, PROMPT, 12, temperature=1.0, seed=3)
    assert a == generate(model, PROMPT, 12, temperature=1.0, seed=3)
    limited = generate(model, PROMPT, 12, temperature=1.0, seed=3, vocab_limit=10)
    assert max(limited) < 10


def test_stop_token_ends_generation_and_streams_tokens():
    model = build(GEN, std=GEN_STD, seed=GEN_SEED)
    greedy = generate(model, PROMPT, 10)
    seen = []
    assert generate(model, PROMPT, 10, stop_tokens=[greedy[4]], on_token=seen.append) == greedy[:4] == seen
    # the context bounds the output: a 120-token prompt leaves 8 of max_seq_len 128
    assert len(generate(model, PROMPT * 15, 100)) == GEN.max_seq_len - 120


def test_text_stream_holds_back_split_characters():
    from llama.tokenizer import ByteTokenizer

    stream = TextStream(ByteTokenizer())
    assert [stream.push(t) for t in "aé€".encode()] == ["a", "", "é", "", "", "€"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "prompt, message",
    [([], "prompt is empty"), ([1] * 128, "shorten it to at most 127 tokens"), ([5, 256], "outside the model's vocabulary"),
     ([-1], "outside the model's vocabulary"), ([1.5], "must be integer ids")],
)
def test_bad_prompt_is_one_value_error_line(prompt, message):
    model = build(GEN)
    with pytest.raises(ValueError, match=message) as err:
        generate(model, prompt, 4)
    assert "\n" not in str(err.value)


def test_cached_forward_needs_a_cache_that_fits():
    model = build(GEN)
    with pytest.raises(ValueError, match="needs a KVCache"):
        model(torch.tensor([[1, 2]]), start_pos=3)
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        model(torch.tensor([[1, 2]]), start_pos=3, cache=model.new_kv_cache(1, 4))


def test_cli_generates_with_chat_and_sampling():
    code, out, err = cli(["--preset", "debug", "--tokenizer", "bytes", "--prompt", "Hi", "--chat", "--max-new-tokens", "5",
                          "--temperature", "0.7", "--top-p", "0.9", "--seed", "2"])
    assert code == 0, err
    # bytes: BOS, <header>user</header>\n\n, Hi, <eot>, <header>assistant</header>\n\n
    assert "prompt: 25 tokens" in err and "tokens/s" in err


@pytest.fixture(scope="module")
def byte_checkpoint(tmp_path_factory) -> str:
    """Fixed weights for the byte tokenizer's 264 ids, so that --seed only seeds the draw
    (with --preset it also seeds the weights)."""
    from llama.weights.format import save_checkpoint

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=264, multiple_of=32, max_seq_len=64)
    path = tmp_path_factory.mktemp("bytes_model")
    save_checkpoint(Transformer(args).init_weights(seed=9, std=0.2).state_dict(), args, path)
    return str(path)


_PUSH = TextStream.push


def cli_tokens(monkeypatch, checkpoint: str, *flags) -> list:
    """The token ids the CLI draws (the stream sees each one), from 'Hi' in the chat format."""
    import llama.generate

    drawn = []
    monkeypatch.setattr(llama.generate.TextStream, "push", lambda self, token: drawn.append(token) or _PUSH(self, token))
    code, _, err = cli(["--checkpoint", checkpoint, "--tokenizer", "bytes", "--prompt", "Hi", "--chat",
                        "--max-new-tokens", "24", *map(str, flags)])
    assert code == 0, err
    return drawn


def test_cli_temperature_top_p_and_seed_decide_what_is_drawn(monkeypatch, byte_checkpoint):
    def draw(temperature, top_p, seed):
        return cli_tokens(monkeypatch, byte_checkpoint, "--temperature", temperature, "--top-p", top_p, "--seed", seed)

    greedy = cli_tokens(monkeypatch, byte_checkpoint)  # the defaults: temperature 0
    sampled = draw(1.0, 1.0, 2)
    assert len(greedy) == len(sampled) == 24  # no stop token drawn: the comparisons below see 24 tokens
    assert draw(1.0, 1.0, 2) == sampled  # the same seed draws the same tokens
    assert draw(1.0, 1.0, 3) != sampled  # --seed
    assert draw(0.0, 1.0, 3) == greedy  # temperature 0 is greedy, whatever the seed
    assert draw(1.0, 1e-6, 3) == greedy  # --top-p near 0 keeps only the most likely token
    assert draw(1.0, 0.5, 2) != sampled  # --top-p cuts the tail
    assert draw(0.3, 1.0, 2) != sampled  # --temperature sharpens the distribution


def help_entries(text: str) -> dict:
    """--help's options section: flag -> its whole (wrapped) entry."""
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])[1:]
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries}


def test_help_gives_every_flag_a_line_with_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    entries = help_entries(capsys.readouterr().out)
    assert {"--prompt", "--seed", "--top-p", "--temperature", "--tp"} <= entries.keys()
    for flag, entry in entries.items():
        assert flag == "-h" or "(default" in entry or "(required" in entry, entry


@pytest.mark.parametrize(
    "extra, message",
    [(["--prompt", "x" * 1100], "prompt has 1101 tokens"), (["--prompt", "hi", "--tp", "2"], "--tp 2 must equal"),
     (["--prompt", "hi", "--tokenizer", "/nonexistent/tokenizer.model"], "tokenizer file not found"),
     (["--prompt", "hi", "--tokenizer", LLAMA3_TOKENIZER], "does the tokenizer match the model?")],
)
def test_cli_bad_request_is_one_error_line(extra, message):
    code, out, err = cli(["--preset", "debug", "--tokenizer", "bytes", *extra])
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err


def test_cli_process_exits_nonzero_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "llama.generate", "--preset", "debug", "--tokenizer", "bytes", "--prompt", "x" * 1100],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: the prompt has 1101 tokens") and proc.stderr.count("\n") == 1, proc.stderr
