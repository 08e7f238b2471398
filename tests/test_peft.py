"""A LoRA run's checkpoints and what leaves the project from them: the checkpoint holds the
adapters alone and is small; convert_weights.py --to-peft writes REFERENCE.md's PEFT
adapter (names, shapes, config fields, B of q/k in HF's RoPE layout); --to-hf --merge-lora
writes base + scale * B A; load_model(base, adapter=) and generate --adapter run the
adapters unmerged; a wrong base, rank or target is one clear error each.

The run is two AdamW steps on 2 gloo ranks (tp 2), saved by the run's Checkpointer, so B is
no longer zero. fp32; 1e-5 on logits."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import ModelArgs, Transformer
from llama.weights.format import save_checkpoint
from parallel.spawn import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
# dim 128: the smallest of the tests' models whose LoRA checkpoint DCP's per-entry overhead
# (about 1.3 KB a stored shard, torch.save's) does not dominate (see test_..._small)
ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=264, multiple_of=32, max_seq_len=64)
RANK, ALPHA = 4, 16  # scale 4: a forgotten scale shows
TOL = 1e-5
HF_PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _train_and_save(base: str, lora_dir: str, full_dir: str) -> None:
    """Two steps of a LoRA run on the base and one of a full run, each saved as train.py saves."""
    from llama.lora import LoRAConfig
    from llama.training.checkpoint import Checkpointer, base_record
    from llama.training.flags import parse_args
    from parallel.control import control_group
    from parallel.fsdp import build_parallel_model
    from parallel.layers import sum_adapter_gradients
    from parallel.mesh import build_mesh

    control_group()
    opts = parse_args(["--checkpoint", base, "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--tp", "2"])
    tokens = torch.randint(0, ARGS.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    for save_dir, lora, steps in ((lora_dir, LoRAConfig.from_options(opts), 2), (full_dir, None, 1)):
        model = build_parallel_model(base, build_mesh(tp=2), lora=lora)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(steps):
            model(tokens[:, :-1]).float().square().mean().backward()
            sum_adapter_gradients(model)
            optimizer.step()
            optimizer.zero_grad()
        record = base_record(opts) if lora is not None else None
        checkpoints = Checkpointer(Path(save_dir), keep=1, base=record)
        checkpoints.save(steps, model, optimizer, {"data": {}, "args": vars(opts) if lora is not None else {}})
        checkpoints.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    base = save_checkpoint(Transformer(ARGS).init_weights(seed=3).state_dict(), ARGS, root / "base")
    run_on_ranks(_train_and_save, 2, str(base), str(root / "lora"), str(root / "full"))
    return {"base": base, "step": root / "lora" / "step_00000002", "full": root / "full" / "step_00000001",
            "root": root}


def convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), "--quiet", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def stored_adapters(step: Path) -> dict:
    """Our adapter name -> full tensor, read back from the run's DCP checkpoint."""
    from llama.weights.peft import open_run

    run = open_run(step)
    return {name: run.read(name) for name in run.shapes}


def test_a_lora_checkpoint_holds_the_adapters_and_their_state_only_and_is_under_a_quarter_of_a_full_one(run):
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(run["step"])).read_metadata().state_dict_metadata
    model_keys = {k for k in stored if k.startswith("model.")}
    assert model_keys and all(k.endswith((".lora_a", ".lora_b")) for k in model_keys), sorted(model_keys)[:3]
    assert len(model_keys) == 2 * 7 * ARGS.n_layers
    lora_bytes = sum(f.stat().st_size for f in run["step"].iterdir())
    full_bytes = sum(f.stat().st_size for f in run["full"].iterdir())
    assert lora_bytes < 0.25 * full_bytes, f"LoRA checkpoint {lora_bytes} B, full {full_bytes} B"
    trainer = json.loads((run["step"] / "trainer.json").read_text())
    assert trainer["base"]["checkpoint"] == str(run["base"].absolute())
    assert len(trainer["base"]["fingerprint"]) == 64


def test_peft_files_hold_exactly_the_names_shapes_and_config_fields_of_reference_md(run, tmp_path):
    from safetensors import safe_open

    done = convert("--to-peft", run["step"], tmp_path / "peft")
    assert done.returncode == 0, done.stderr
    hidden = 352  # ARGS' FFN: 32 * ceil(int(8 * 128 / 3) / 32)
    dims = {"q_proj": (128, 128), "k_proj": (128, 64), "v_proj": (128, 64), "o_proj": (128, 128),
            "gate_proj": (128, hidden), "up_proj": (128, hidden), "down_proj": (hidden, 128)}  # (in, out)
    expected = {}
    for n in range(ARGS.n_layers):
        for proj, group in HF_PROJECTIONS.items():
            prefix = f"base_model.model.model.layers.{n}.{group}.{proj}"
            fan_in, fan_out = dims[proj]
            expected[f"{prefix}.lora_A.weight"] = (RANK, fan_in)
            expected[f"{prefix}.lora_B.weight"] = (fan_out, RANK)
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), framework="pt") as f:
        found = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    assert found == expected
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "task_type", "use_rslora")} \
        == {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0, "bias": "none",
            "task_type": "CAUSAL_LM", "use_rslora": False}
    assert sorted(config["target_modules"]) == sorted(HF_PROJECTIONS)
    assert config["base_model_name_or_path"] == str(run["base"].absolute())


def test_b_of_q_and_k_is_permuted_like_their_weights_and_the_permutation_round_trips(run):
    from llama.weights.names import meta_to_hf_rope
    from llama.weights.peft import from_peft, to_peft, to_peft_name

    ours = stored_adapters(run["step"])
    assert all(ours[n].abs().max() > 0 for n in ours if n.endswith(".lora_b")), "B still zero: nothing would be tested"
    peft = to_peft(ours, ARGS)
    back = from_peft(peft, ARGS, ours)
    assert all(torch.equal(back[n], ours[n]) for n in ours)
    for layer, heads in (("layers.1.attention.wq", ARGS.n_heads), ("layers.1.attention.wk", ARGS.n_kv_heads)):
        a, b = ours[f"{layer}.lora_a"], ours[f"{layer}.lora_b"]
        a_hf, b_hf = peft[to_peft_name(f"{layer}.lora_a")], peft[to_peft_name(f"{layer}.lora_b")]
        assert torch.equal(a_hf, a)  # A's rows are the rank, not q/k rows
        assert not torch.equal(b_hf, b)
        # the update in HF's layout is the weight's update permuted as HF permutes the weight
        torch.testing.assert_close(b_hf @ a_hf, meta_to_hf_rope(b @ a, heads), rtol=0, atol=1e-6)
    for name in ("layers.0.attention.wv.lora_b", "layers.0.feed_forward.w2.lora_b"):
        assert torch.equal(peft[to_peft_name(name)], ours[name])


def test_merged_export_equals_base_plus_scaled_b_a_and_the_unmerged_adapter_model(run, tmp_path):
    from llama.weights.hf import hf_source
    from llama.weights.loading import load_model

    done = convert("--to-hf", "--merge-lora", run["step"], tmp_path / "merged")
    assert done.returncode == 0, done.stderr
    merged = {name: t.read() for name, t in hf_source(tmp_path / "merged").tensors.items()}
    base = Transformer(ARGS).init_weights(seed=3).state_dict()
    adapters = stored_adapters(run["step"])
    scale = ALPHA / RANK
    for name, weight in base.items():
        layer = name.removesuffix(".weight")
        want = weight + scale * adapters[f"{layer}.lora_b"] @ adapters[f"{layer}.lora_a"] \
            if f"{layer}.lora_a" in adapters else weight
        torch.testing.assert_close(merged[name], want, rtol=0, atol=TOL, msg=name)
    reloaded = Transformer(ARGS)
    reloaded.load_state_dict(merged)
    unmerged = load_model(run["base"], adapter=run["step"])
    tokens = torch.randint(0, ARGS.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, c = reloaded(tokens), unmerged(tokens), Transformer(ARGS).init_weights(seed=3)(tokens)
    assert (a - b).abs().max() <= TOL
    assert (a - c).abs().max() > 100 * TOL  # the adapters change the logits: the comparison is not empty


def test_generate_with_adapter_uses_the_adapters_unmerged(run):
    from llama.generate import generate
    from llama.tokenizer import ByteTokenizer
    from llama.weights.loading import load_model

    tokenizer = ByteTokenizer()
    model = load_model(run["base"], adapter=run["step"]).eval()
    want = tokenizer.decode(generate(model, tokenizer.encode("ab", bos=True), 6))
    base_only = tokenizer.decode(generate(load_model(run["base"]).eval(), tokenizer.encode("ab", bos=True), 6))
    assert want != base_only
    cli = subprocess.run(
        [sys.executable, "-m", "llama.generate", "--checkpoint", str(run["base"]), "--adapter", str(run["step"]),
         "--tokenizer", "bytes", "--prompt", "ab", "--max-new-tokens", "6"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == "ab" + want + "\n"


def edited_run(run, tmp_path, **args) -> Path:
    """A copy of the run's checkpoint whose trainer.json records other --lora-* flags."""
    step = tmp_path / "edited" / run["step"].name
    shutil.copytree(run["step"], step)
    trainer = json.loads((step / "trainer.json").read_text())
    trainer["args"].update(args)
    (step / "trainer.json").write_text(json.dumps(trainer))
    return step


def test_an_adapter_on_another_base_is_one_error_naming_both(run, tmp_path):
    from llama.weights.loading import load_model

    other = save_checkpoint(Transformer(ARGS).init_weights(seed=4).state_dict(), ARGS, tmp_path / "other")
    with pytest.raises(ValueError, match="not the base the adapters of") as err:
        load_model(other, adapter=run["step"])
    assert str(other) in str(err.value) and str(run["base"].absolute()) in str(err.value)
    done = convert("--to-hf", "--merge-lora", "--base", other, run["step"], tmp_path / "merged")
    errors = done.stderr.splitlines()
    assert done.returncode == 1 and len(errors) == 1 and "not the base the adapters of" in errors[0], done.stderr
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("args, message", [
    ({"lora_rank": 8}, "--lora-rank 8 wants [8, 128]"),
    ({"lora_targets": "wq,wk,wv,wo,w1,w2,w3,wz"}, "the model has no projection wz"),
    ({"lora_targets": "wq,wk,wv,wo"}, "the model has no adapted layer layers.0.feed_forward.w1"),
])
def test_a_rank_or_target_the_stored_adapters_do_not_match_is_one_clear_error(run, tmp_path, args, message):
    step = edited_run(run, tmp_path, **args)
    done = convert("--to-peft", step, tmp_path / "peft")
    errors = done.stderr.splitlines()
    assert done.returncode == 1 and len(errors) == 1 and message in errors[0], done.stderr
    assert not (tmp_path / "peft").exists()
