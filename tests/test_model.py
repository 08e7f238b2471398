"""The model: presets, parity with Meta's reference, tensor-parallel equality, bad input.

Tolerances: fp32 everywhere; 1e-5 absolute on logits, loss and gradients."""

import time
from dataclasses import replace

import pytest
import torch

from llama import PRESETS, ModelArgs, Transformer
from parallel.layers import head_layout, reduce_partial_gradients
from parallel.losses import vocab_parallel_cross_entropy
from parallel.spawn import run_on_ranks
from tests.reference import meta_reference_model

TOL = 1e-5
PUBLISHED_PARAMS = {
    "3.2-1b": 1_235_814_400,
    "3.2-3b": 3_212_749_824,
    "3.1-8b": 8_030_261_248,
    "3.1-70b": 70_553_706_496,
    "3.1-405b": 405_853_388_800,
}
# GQA (8 query heads over 2 kv heads) and Llama 3 RoPE scaling with the values Meta's
# reference hard-codes (factor 8, context 8192); head_dim 16 puts wavelengths on both
# sides of the scaling band.
TINY = ModelArgs(
    dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=32, ffn_dim_multiplier=1.3,
    rope_theta=500000.0, use_scaled_rope=True, rope_scale_factor=8.0, rope_original_context=8192, max_seq_len=64,
)
# 12 query heads over 3 kv heads: at tp 4 a rank's 3 query heads straddle two kv heads
ODD_GQA = ModelArgs(dim=96, n_layers=1, n_heads=12, n_kv_heads=3, vocab_size=128, multiple_of=16, max_seq_len=32)


def tp_mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))


def batch(args: ModelArgs, bsz=2, seqlen=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (bsz, seqlen), generator=gen)
    targets = torch.randint(0, args.vocab_size, (bsz, seqlen), generator=gen)
    targets[0, :3] = -100  # ignored positions take part in no sum
    return tokens, targets


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_equal_published(name):
    args = ModelArgs.from_preset(name)
    with torch.device("meta"):
        model = Transformer(args)
    assert model.num_params() == args.num_params() == PUBLISHED_PARAMS[name]


def test_presets_cover_debug_and_all_published_sizes():
    assert set(PRESETS) == {"debug", *PUBLISHED_PARAMS}


def test_ffn_hidden_dims_equal_published():
    expected = {"3.2-1b": 8192, "3.2-3b": 8192, "3.1-8b": 14336, "3.1-70b": 28672, "3.1-405b": 53248}
    assert {name: ModelArgs.from_preset(name).ffn_hidden_dim for name in expected} == expected


# The configs as Meta and Hugging Face publish them for Llama 3.1 8B and 3.2 1B.
PUBLISHED_CONFIGS = {
    "3.1-8b": (
        {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "vocab_size": 128256, "tie_word_embeddings": False,
         "max_position_embeddings": 131072,
         "rope_parameters": {"rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
        {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
         "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True},
    ),
    "3.2-1b": (
        {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "vocab_size": 128256, "tie_word_embeddings": True,
         "max_position_embeddings": 131072, "rope_theta": 500000.0,
         "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
        {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256,
         "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True},
    ),
}


def ffn_as_width(args: ModelArgs) -> ModelArgs:
    """HF stores the FFN width, Meta the recipe that yields it: compare the width."""
    return replace(args, ffn_hidden_size=args.ffn_hidden_dim, multiple_of=256, ffn_dim_multiplier=None)


@pytest.mark.parametrize("preset", PUBLISHED_CONFIGS)
def test_hf_and_meta_configs_read_into_the_same_args(tmp_path, preset):
    """Every field (rope_theta, norm_eps, tie_word_embeddings, max_seq_len, the scaling
    numbers...) equals the preset, from either reader."""
    import json

    hf_config, meta_params = PUBLISHED_CONFIGS[preset]
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    (tmp_path / "params.json").write_text(json.dumps(meta_params))
    hf, meta = ModelArgs.from_hf_config(tmp_path), ModelArgs.from_meta_params(tmp_path)
    want = ffn_as_width(ModelArgs.from_preset(preset))
    assert ffn_as_width(hf) == want
    assert ffn_as_width(meta) == want


# ---------------------------------------------------------------- parity with Meta's reference


def _single_device_parity(configs):
    results = []
    for args in configs:
        model = Transformer(args).init_weights(seed=7, std=0.1)
        tokens, _ = batch(args, seqlen=args.max_seq_len // 2)
        with torch.no_grad():
            ours = model(tokens)
        theirs = meta_reference_model(args, model.state_dict(), tokens.shape[0])(tokens, 0)
        results.append(((ours - theirs).abs().max().item(), theirs.abs().max().item()))
    return results


def test_single_device_logits_match_meta_reference_with_gqa_and_rope_scaling():
    tied = ModelArgs(**{**TINY.to_dict(), "tie_word_embeddings": True})
    for max_diff, scale in run_on_ranks(_single_device_parity, 1, [TINY, tied])[0]:
        assert scale > 0.5  # the logits are not trivially small
        assert max_diff <= TOL, f"max abs logit difference {max_diff:.3g} vs Meta's reference"


# ---------------------------------------------------------------- tensor parallel equals one device


def _compare_with_single_device(args: ModelArgs, sequence_parallel: bool) -> dict:
    mesh = tp_mesh()
    tokens, targets = batch(args)
    reference = Transformer(args).init_weights(seed=3)
    ref_logits = reference(tokens)
    ref_loss = vocab_parallel_cross_entropy(ref_logits, targets)
    ref_loss.backward()

    with torch.device("meta"):
        model = Transformer(args, mesh, sequence_parallel=sequence_parallel)
    model.init_weights(seed=3)
    logits = model(tokens)
    loss = vocab_parallel_cross_entropy(logits, targets)
    loss.backward()
    reduce_partial_gradients(model)

    ref_params = dict(reference.named_parameters())
    grad_diff = {
        name: (param.grad.full_tensor() - ref_params[name].grad).abs().max().item()
        for name, param in model.named_parameters()
    }
    return {
        "logits": (logits.full_tensor() - ref_logits).abs().max().item(),
        "local_vocab": logits.to_local().shape[-1],
        "loss": abs(loss.item() - ref_loss.item()),
        "grad": max(grad_diff.values()),
        "grads_compared": len(grad_diff),
        "all_grads_present": len(grad_diff) == len(ref_params),
    }


def _tp_suite(configs):
    import torch.distributed as dist

    out = {}
    for name, args in configs.items():
        for sp in (False, True):
            out[(name, sp)] = _compare_with_single_device(args, sp)
    # bad mesh: 6 heads do not split over this tp; raised before any allocation
    try:
        Transformer(ModelArgs(dim=48, n_layers=1, n_heads=6, n_kv_heads=6, vocab_size=64), tp_mesh())
        out["bad_tp"] = None
    except ValueError as err:
        out["bad_tp"] = str(err)
    out["world"] = dist.get_world_size()
    return out


def _check_tp_results(results, configs):
    for rank_result in results:
        world = rank_result["world"]
        for name, args in configs.items():
            for sp in (False, True):
                r = rank_result[(name, sp)]
                where = f"{name} tp={world} sequence_parallel={sp}"
                assert r["logits"] <= TOL, f"{where}: logits differ by {r['logits']:.3g}"
                assert r["loss"] <= TOL, f"{where}: loss differs by {r['loss']:.3g}"
                assert r["grad"] <= TOL, f"{where}: a gradient differs by {r['grad']:.3g}"
                assert r["all_grads_present"] and r["grads_compared"] > 0
                assert r["local_vocab"] == args.vocab_size // world  # logits stay vocab-sharded
        if 6 % world:
            assert "must divide n_heads 6" in rank_result["bad_tp"]


@pytest.mark.compat
def test_tp2_logits_loss_and_gradients_match_single_device():
    configs = {"tiny": TINY}
    _check_tp_results(run_on_ranks(_tp_suite, 2, configs), configs)


@pytest.mark.compat
def test_tp4_with_more_ranks_than_kv_heads_matches_single_device():
    configs = {"tiny": TINY, "odd_gqa": ODD_GQA}
    _check_tp_results(run_on_ranks(_tp_suite, 4, configs), configs)


def test_head_layout_replicates_kv_heads_when_tp_exceeds_them():
    class FakeMesh:
        def __init__(self, size, rank):
            self._size, self._rank = size, rank

        def size(self):
            return self._size

        def get_local_rank(self):
            return self._rank

    # 405B at tp 16: 8 query heads per rank, all reading one kv head; two ranks share it
    layouts = [head_layout(128, 8, FakeMesh(16, r)) for r in range(16)]
    assert all(lay.n_local_heads == 8 and lay.n_local_kv_heads == 1 and not lay.kv_sharded for lay in layouts)
    assert [lay.kv_start for lay in layouts] == [r // 2 for r in range(16)]
    # tp 8: one kv head per rank, sharded
    assert all(head_layout(128, 8, FakeMesh(8, r)).kv_sharded for r in range(8))
    # 12 heads / 3 kv heads at tp 4: rank 1 holds heads 3, 4, 5 -> kv heads 0, 1, 1
    odd = head_layout(12, 3, FakeMesh(4, 1))
    assert (odd.kv_start, odd.n_local_kv_heads, odd.kv_for_head) == (0, 2, (0, 1, 1))


# ---------------------------------------------------------------- bad input


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model preset 'llama-9b'.*3\.1-405b"):
        ModelArgs.from_preset("llama-9b")


@pytest.mark.parametrize("bad_id", [-1, 256])
def test_token_ids_outside_the_vocabulary_are_not_read_back_by_the_forward(bad_id):
    # The forward checks no id values: that would wait for the device in every step. The
    # token cache is checked once at start-up (train.py, tests/test_sync_free.py) and a
    # prompt before generation (check_request); on CPU the embedding still bounds-checks.
    model = Transformer(TINY).init_weights()
    tokens = torch.zeros(1, 4, dtype=torch.long)
    tokens[0, 2] = bad_id
    with pytest.raises(IndexError, match="index out of range"):
        model(tokens)


def test_sequence_longer_than_the_rope_table_is_refused():
    model = Transformer(TINY).init_weights()
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_seq_len 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_inconsistent_config_is_refused():
    with pytest.raises(ValueError, match="n_heads 8 must be a multiple of n_kv_heads 3"):
        ModelArgs(dim=64, n_heads=8, n_kv_heads=3)


# ---------------------------------------------------------------- meta-device construction


def _build_405b_on_meta(tp: int):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
    start = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_preset("3.1-405b"), mesh)
    seconds = time.perf_counter() - start
    local = [p.to_local() for p in model.parameters()]
    return {
        "seconds": seconds,
        "all_meta": all(t.is_meta for t in local),
        "local_params": sum(t.numel() for t in local),
        "global_params": model.num_params(),
    }


def test_405b_builds_on_meta_at_tp8_in_seconds_with_nothing_allocated():
    r = run_on_ranks(_build_405b_on_meta, 1, 8)[0]
    assert r["all_meta"]
    assert r["seconds"] < 30
    assert r["global_params"] == PUBLISHED_PARAMS["3.1-405b"]
    # every weight is split 8 ways but the norms (dim 16384, 253 of them)
    norms = (2 * 126 + 1) * 16384
    assert r["local_params"] == (PUBLISHED_PARAMS["3.1-405b"] - norms) // 8 + norms


def test_init_weights_materialises_a_meta_model():
    with torch.device("meta"):
        model = Transformer(TINY)
    model.init_weights(seed=0)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.isfinite(model(batch(TINY)[0])).all()


def test_tied_output_stays_tied_after_materialisation_and_casts():
    args = ModelArgs(**{**TINY.to_dict(), "tie_word_embeddings": True})
    with torch.device("meta"):
        model = Transformer(args)
    model.init_weights(seed=0)
    model.to(torch.float64)
    assert model.output.weight is model.tok_embeddings.weight
    assert "output.weight" not in dict(model.named_parameters())


def test_cpu_rms_norm_matches_torch_rms_norm_forward_and_backward():
    import torch.nn.functional as F

    from llama.norm import rms_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(64, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 64, generator=g, dtype=torch.float64)
    ours = rms_norm(x, w, 1e-5)
    dx, dw = torch.autograd.grad(ours, (x, w), grad)
    theirs = F.rms_norm(x, (64,), w, 1e-5)
    tx, tw = torch.autograd.grad(theirs, (x, w), grad)
    for a, b in ((ours, theirs), (dx, tx), (dw, tw)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x[:1, :2, :8], w[:8].detach().requires_grad_()))

