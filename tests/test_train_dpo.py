"""train.py --objective dpo under torchrun on 4 CPU processes, end to end on a synthetic
preference: prompts "Reply to WORD", chosen "yes, WORD", rejected "no, WORD". From a random
base, DPO must make the held-out chosen replies win (reward accuracy) and the greedy replies
open with "yes"; the run starts at exactly log 2 (the policy is its own reference), stores
the reference's log-probabilities once, and a resume on another mesh reads them and
continues the same run.

The step's numbers against an independent oracle on every mesh are in tests/test_dpo.py;
the pair data in tests/test_pairs.py. fp32; 1e-5 on resumed losses."""

import json
import math
import random
import shutil

import pytest

from llama import Transformer
from llama.training.flags import parse_args
from llama.weights.format import save_checkpoint
from tests.test_train import TINY, check, metrics, torchrun

DPO = ("--objective", "dpo", "--seq-len", 64, "--global-batch", 8, "--steps", 6, "--save-every", 3,
       "--eval-every", 3, "--warmup", 2, "--log-every", 1, "--lr", 3e-3)


def write_pairs(path, n: int, seed: int) -> list:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        rows.append({"prompt": f"Reply to {word}", "chosen": f"yes, {word}", "rejected": f"no, {word}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """A random base, 96 training and 24 held-out pairs, and a 2x2 DPO run of 6 steps."""
    root = tmp_path_factory.mktemp("dpo")
    base = save_checkpoint(Transformer(TINY).init_weights(seed=5).state_dict(), TINY, root / "base")
    write_pairs(root / "train.jsonl", 96, seed=0)
    held_out = write_pairs(root / "val.jsonl", 24, seed=1)
    common = ("--checkpoint", base, "--data", root / "train.jsonl", "--val-data", root / "val.jsonl", *DPO)
    result = torchrun(*common, "--tp", 2, "--save-dir", root / "run")
    check(result)
    return {"root": root, "base": base, "common": common, "run": root / "run", "held_out": held_out,
            "stdout": result.stdout}


def greedy_replies(checkpoint, prompts: list) -> list:
    from llama.generate import generate
    from llama.tokenizer import load_tokenizer
    from llama.weights.loading import load_model

    tokenizer = load_tokenizer("bytes")
    model = load_model(checkpoint).eval()
    stop = [tokenizer.special_tokens["<|eot_id|>"]]
    return [tokenizer.decode(generate(model, tokenizer.encode_dialog([{"role": "user", "content": p}]), 8,
                                      stop_tokens=stop)) for p in prompts]


def test_a_dpo_run_starts_at_log_2_and_its_held_out_reward_accuracy_reaches_0_9(dpo_run):
    rows = metrics(dpo_run["run"])
    start = rows[0]
    assert start["step"] == 0 and abs(start["val_loss"] - math.log(2)) <= 1e-6, start
    assert start["val_reward_accuracy"] == 0 and start["val_reward_margin"] == 0, start
    trained = [r for r in rows if "loss" in r]
    assert [r["step"] for r in trained] == list(range(1, 7))
    assert abs(trained[0]["loss"] - math.log(2)) <= 1e-5  # the reference is the starting model
    assert all({"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"} <= r.keys() for r in trained)
    curve = [(r["step"], r["val_reward_accuracy"]) for r in rows if "val_reward_accuracy" in r]
    assert [s for s, _ in curve] == [0, 3, 6]
    assert curve[-1][1] >= 0.9, f"held-out reward accuracy per eval step: {curve}"
    assert rows[-1]["val_loss"] < start["val_loss"]


def test_after_dpo_the_greedy_replies_open_with_the_preferred_yes(dpo_run):
    prompts = [r["prompt"] for r in dpo_run["held_out"]]
    before = greedy_replies(dpo_run["base"], prompts)
    after = greedy_replies(dpo_run["run"] / "step_00000006", prompts)
    assert sum(r.startswith("yes") for r in before) == 0, before[:4]
    won = sum(r.startswith("yes") for r in after)
    assert won >= 0.9 * len(prompts), f"{won}/{len(prompts)} replies open with 'yes': {after[:4]}"


def test_the_reference_is_computed_once_and_stored_in_the_run(dpo_run):
    assert dpo_run["stdout"].count("reference pass: 120 pairs") == 1, dpo_run["stdout"]
    stored = list((dpo_run["run"] / "reference").glob("*.pt"))
    assert len(stored) == 1, stored


def test_a_dpo_resume_on_another_mesh_reads_the_stored_reference_and_continues_the_same_run(dpo_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(dpo_run["run"], moved)
    shutil.rmtree(moved / "step_00000006")
    result = torchrun(*dpo_run["common"], "--tp", 1, "--save-dir", moved, "--resume")
    check(result)
    assert "reference pass" not in result.stdout
    assert "reference log-probabilities of 120 pairs read from" in result.stdout, result.stdout
    whole, resumed = metrics(dpo_run["run"]), metrics(moved)
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    for a, b in zip(whole, resumed):
        for key in ("loss", "reward_margin", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5, (key, a, b)


@pytest.mark.parametrize("argv, message", [
    (["--reference", "x"], "--reference names DPO's reference model: it needs --objective dpo"),
    (["--objective", "dpo", "--dpo-beta", "0"], "--dpo-beta must be > 0"),
    (["--objective", "dpo", "--dpo-loss", "ipo", "--dpo-label-smoothing", "0.1"], "sigmoid only"),
])
def test_dpo_flags_are_checked_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_planner_counts_a_dpo_micro_batch_of_pairs_as_twice_the_sequences():
    from parallel.plan.config import StepConfig

    assert StepConfig.from_options(parse_args(["--objective", "dpo", "--micro-batch", "2"])).batch == 4
    assert StepConfig.from_options(parse_args(["--micro-batch", "2"])).batch == 2
