"""AdamW's schedule and groups (llama.training.optim): the learning rate of every step under
warm-up and each decay, and which parameters get weight decay.

lr_at takes the 0-based index of the step about to run (train.py: lr_at(state.step) before
step state.step + 1). Tolerance: 1e-12 relative, float64 arithmetic of a few operations."""

import math
from types import SimpleNamespace

import pytest

from llama import ModelArgs, Transformer
from llama.training.optim import build_optimizer, lr_at, param_groups

RTOL = 1e-12
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16, max_seq_len=16)


def schedule(decay: str, **overrides) -> SimpleNamespace:
    # 4 warm-up steps, then 100 steps of decay, from 1e-3 to a floor of 1e-4
    return SimpleNamespace(**{"lr": 1e-3, "min_lr_ratio": 0.1, "warmup": 4, "steps": 104, "decay": decay, **overrides})


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=0.0)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_warm_up_rises_linearly_to_the_peak_lr(decay):
    opts = schedule(decay)
    assert [lr_at(s, opts) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=RTOL)
    assert close(lr_at(4, opts), 1e-3)  # the first step after warm-up starts the decay at the peak
    assert close(lr_at(0, schedule(decay, warmup=0)), 1e-3)  # no warm-up: the peak from step 1


def test_cosine_decay_falls_on_a_half_cosine_to_the_floor():
    opts, floor = schedule("cosine"), 1e-4
    for done, shape in [(25, 0.5 * (1 + math.cos(math.pi / 4))), (50, 0.5), (75, 0.5 * (1 - math.cos(math.pi / 4)))]:
        assert close(lr_at(4 + done, opts), floor + (1e-3 - floor) * shape), done
    assert close(lr_at(104, opts), floor)  # the floor, min_lr_ratio x lr, after the last step
    # the last step that trains (index steps - 1) is one step of decay above the floor
    assert close(lr_at(103, opts), floor + (1e-3 - floor) * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    lrs = [lr_at(s, opts) for s in range(4, 105)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and min(lrs) >= floor


def test_linear_decay_falls_in_equal_steps_to_the_floor():
    opts, floor = schedule("linear"), 1e-4
    for done in (25, 50, 75, 99):
        assert close(lr_at(4 + done, opts), 1e-3 - (1e-3 - floor) * done / 100), done
    assert close(lr_at(104, opts), floor)


def test_constant_decay_holds_the_peak_and_ignores_the_floor():
    opts = schedule("constant")
    assert all(lr_at(s, opts) == 1e-3 for s in range(4, 105))


def test_min_lr_ratio_sets_the_floor():
    for ratio in (0.0, 0.1, 0.5):
        for decay in ("cosine", "linear"):
            assert lr_at(104, schedule(decay, min_lr_ratio=ratio)) == pytest.approx(1e-3 * ratio, rel=RTOL, abs=1e-18)


# ---------------------------------------------------------------- param_groups


def group_names(model, groups) -> list:
    names = {id(p): n for n, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in group["params"]) for group in groups]


NO_DECAY = ["layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "layers.1.attention_norm.weight",
            "layers.1.ffn_norm.weight", "norm.weight", "tok_embeddings.weight"]


def test_norms_and_the_embedding_get_no_weight_decay_and_every_matrix_does():
    model = Transformer(ARGS)
    groups = param_groups(model, SimpleNamespace(weight_decay=0.1, decay_norms_and_embeddings=False))
    decay, no_decay = group_names(model, groups)
    assert no_decay == NO_DECAY
    assert decay == sorted(n for n, _ in model.named_parameters() if n not in NO_DECAY)
    assert "output.weight" in decay and "layers.1.feed_forward.w2.weight" in decay
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_decay_norms_and_embeddings_puts_every_parameter_in_the_decayed_group():
    model = Transformer(ARGS)
    groups = param_groups(model, SimpleNamespace(weight_decay=0.1, decay_norms_and_embeddings=True))
    decay, no_decay = group_names(model, groups)
    assert decay == sorted(n for n, _ in model.named_parameters()) and no_decay == []


def test_frozen_parameters_get_no_group_and_no_optimizer_state():
    model = Transformer(ARGS)
    frozen = {"tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.ffn_norm.weight"}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    opts = SimpleNamespace(lr=1e-3, weight_decay=0.1, decay_norms_and_embeddings=False)
    decay, no_decay = group_names(model, param_groups(model, opts))
    assert frozen.isdisjoint(decay + no_decay)
    assert sorted(decay + no_decay) == sorted(n for n, _ in model.named_parameters() if n not in frozen)
    optimizer = build_optimizer(model, opts, "cpu")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all((id(p) in held) == (n not in frozen) for n, p in model.named_parameters())
