"""The defaults a GPU cluster runs, checked on CPU: tp from the model's memory plan (FSDP
alone where it fits) and sequence parallelism on, in train.py and in the planner alike."""

import json
import types

import pytest
import torch

import parallel.plan.cli as plan_cli
import parallel.plan.planner as planner
from llama.training import build, flags
from llama.training.build import choose_default_tp
from llama.config import PRESETS
from parallel.context import check_sequence_parallel_divides
from parallel.plan.config import StepConfig

H100 = 79.1  # GiB, as an 80 GB H100 reports its memory


def _on_gpus(monkeypatch, world: int, per_node: int = 8, gib: float = H100) -> None:
    """What choose_default_tp reads on a GPU node under torchrun, faked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(build, "cuda_device_for_rank", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=round(gib * 2**30)))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))


@pytest.mark.parametrize("preset", ["3.2-1b", "3.1-8b"])
def test_models_up_to_8b_train_fsdp_only_on_one_node_of_80_gb_gpus(monkeypatch, preset):
    _on_gpus(monkeypatch, world=8)
    opts = flags.parse_args(["--preset", preset])
    reason = choose_default_tp(opts)
    assert opts.tp == 1
    assert reason.startswith("--tp 1: the smallest tp whose plan fits 79.1 GiB per GPU"), reason


def test_tp_grows_only_as_far_as_the_memory_needs(monkeypatch):
    """8B at 8192 tokens without activation checkpointing needs 88.6 GiB at tp 1 on one node
    (the planner's estimate): tp 2 is the smallest that fits, and the line says why."""
    _on_gpus(monkeypatch, world=8)
    opts = flags.parse_args(["--preset", "3.1-8b", "--seq-len", "8192", "--micro-batch", "1"])
    reason = choose_default_tp(opts)
    assert opts.tp == 2 and "tp 1 needs 88.60" in reason, reason


def test_a_model_that_fits_nowhere_gets_the_node_and_a_line_naming_the_fixes(monkeypatch):
    _on_gpus(monkeypatch, world=8)
    opts = flags.parse_args(["--preset", "3.1-70b"])
    reason = choose_default_tp(opts)
    assert opts.tp == 8
    assert "no tp up to 8 GPUs per node fits 79.1 GiB" in reason and "--activation-checkpointing full" in reason


def test_a_given_tp_is_kept_and_cpu_keeps_its_demo_default(monkeypatch):
    opts = flags.parse_args(["--tp", "4"])
    assert choose_default_tp(opts) is None and opts.tp == 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    opts = flags.parse_args([])
    assert "on CPU 2" in choose_default_tp(opts) and opts.tp == 2


def test_the_planned_model_states_scale_exactly_to_the_real_dp():
    """choose_tp plans at most CHOOSE_TP_MAX_DP dp ranks and scales the sharded terms: the
    same total as planning them all."""
    args, cfg = PRESETS["3.1-8b"], StepConfig(seq_len=1024, batch=1)
    exact = planner.plan(args, 32, 1, 1, cfg, ("full",))["full"]["total_bytes"]
    original = planner.CHOOSE_TP_MAX_DP
    try:
        planner.CHOOSE_TP_MAX_DP = 4
        _, reason = planner.choose_tp(args, 32, 1, 1.0, cfg)  # 1 GiB: nothing fits, the line gives the total
    finally:
        planner.CHOOSE_TP_MAX_DP = original
    assert f"tp 1 needs {exact / 2**30:.2f} GiB" in reason, reason


def test_the_planner_without_tp_plans_what_train_py_chooses(capsys):
    assert plan_cli.main(["--model", "3.1-8b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tp"] == 1 and report["dp"] == 8
    assert plan_cli.main(["--model", "3.1-8b", "--seq-len", "8192", "--micro-batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "tp 2, dp 4" in out and "--tp 2: the smallest tp whose plan fits 79.1 GiB" in out


def test_sequence_parallelism_is_on_by_default_and_can_be_turned_off():
    assert flags.parse_args([]).sequence_parallel is True
    assert flags.parse_args(["--no-sequence-parallel"]).sequence_parallel is False
    assert StepConfig().sequence_parallel is True and plan_cli.parse_args(["--model", "3.1-8b"]).sequence_parallel
    assert StepConfig.from_options(flags.parse_args([])) == StepConfig()


def test_a_sequence_that_tp_cannot_split_is_one_line_naming_the_flags(capsys):
    with pytest.raises(ValueError, match=r"--seq-len 33 must be a multiple of --tp 2: .*--no-sequence-parallel"):
        check_sequence_parallel_divides(33, 1, 2, True)
    with pytest.raises(ValueError, match=r"--seq-len 36 / --cp 2 = 18 tokens per rank must be a multiple of --tp 4"):
        check_sequence_parallel_divides(36, 2, 4, True)
    check_sequence_parallel_divides(33, 1, 2, False)
    check_sequence_parallel_divides(33, 1, 1, True)
    assert plan_cli.main(["--model", "3.1-8b", "--tp", "8", "--seq-len", "260"]) == 2
    assert "--seq-len 260 must be a multiple of --tp 8" in capsys.readouterr().err
    assert plan_cli.main(["--model", "3.1-8b", "--tp", "8", "--seq-len", "260", "--no-sequence-parallel"]) == 0
