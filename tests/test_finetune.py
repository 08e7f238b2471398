"""Fine-tuning: exact loss normalisation and validation on any mesh (a validation set
smaller than one global batch included), and an end-to-end chat SFT run whose model
answers prompts it never saw.

Tolerances: fp32; 1e-5 on losses and parameters."""

import contextlib
import io
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llama import ModelArgs, Transformer
from llama.data.chat_cache import load_conversation_cache
from llama.data.chat_packing import ChatDataset
from llama.data.loader import DistributedDataLoader, eval_batches, split_documents
from llama.tokenizer import ByteTokenizer
from parallel.spawn import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=64)
SEQ, GLOBAL_BATCH, GRAD_ACCUM, STEPS = 48, 8, 2, 2
MESHES = [(1, 4), (2, 2), (4, 1)]  # dp x tp
# a validation set smaller than one global batch (issue 21 item 8: 24 held-out
# conversations in 7 windows, global batch 8): its last batch is padded with ignored rows
SMALL_VAL = 7
# the small set on 4 ranks cut otherwise, tp 1: dp 2 ranks of 4 rows, each rank's rows cut
# into 4 pipeline microbatches of 1 row (dp rank 1's last is padding only); every row split
# over cp 2
SMALL_VAL_MESHES = {"pp2xdp2": dict(pp=2), "cp2xdp2": dict(cp=2)}


def write_chats(path: Path, n: int, seed: int) -> Path:
    """Conversations of uneven length and uneven trained share: 1-3 turns, long and short
    prompts and answers, sometimes a system turn."""
    rng = random.Random(seed)

    def text(lo, hi):
        return "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(lo, hi))).strip() or "x"

    with open(path, "w") as f:
        for i in range(n):
            messages = [{"role": "system", "content": text(3, 12)}] if i % 4 == 0 else []
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": text(1, 20)}, {"role": "assistant", "content": text(1, 8)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_small_val(path: Path) -> Path:
    """SMALL_VAL short conversations, answers of 2-14 characters: one window each at SEQ,
    each with targets."""
    with open(path, "w") as f:
        for i in range(SMALL_VAL):
            answer = "abcdefg"[:i + 1] * 2
            f.write(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def datasets(data: Path, cache_dir: Path):
    """(train, validation, small validation): the small set is the file write_small_val
    writes beside `data`."""
    cache = load_conversation_cache(data, ByteTokenizer(), cache_dir, quiet=True)
    train_docs, val_docs = split_documents(cache.num_docs, 0.25, seed=0)
    small_cache = load_conversation_cache(data.with_name("small_val.jsonl"), ByteTokenizer(), cache_dir, quiet=True)
    small = ChatDataset(small_cache, SEQ, seed=0)
    assert small.num_samples == SMALL_VAL < GLOBAL_BATCH
    assert all(small.num_targets(s) > 0 for s in range(SMALL_VAL))
    return (ChatDataset(cache, SEQ, seed=0, documents=train_docs), ChatDataset(cache, SEQ, seed=0, documents=val_docs),
            small)


def small_validation(trainee, small_val, mesh, micro_batch: int, device) -> tuple:
    """(the loss over the small set as train.py evaluates it, what eval_batches wrote to
    this rank's stderr). --eval-batches 4: more than the set fills."""
    from llama.training.evaluation import evaluate
    from parallel.mesh import dp_rank, dp_size

    with contextlib.redirect_stderr(io.StringIO()) as said:
        batches = list(eval_batches(small_val, 4, GLOBAL_BATCH, dp_rank(mesh), dp_size(mesh), micro_batch))
    assert sum(len(b.inputs) for b in batches) * dp_size(mesh) == GLOBAL_BATCH  # one global batch, padded
    return evaluate(trainee, batches, device, mesh)["val_loss"], said.getvalue()


def _mesh_worker(data: Path, cache_dir: Path) -> dict:
    from llama.training.evaluation import evaluate
    from llama.training.optim import param_groups
    from llama.training.step import Trainee, train_step
    from parallel.fsdp import build_parallel_model
    from parallel.mesh import build_mesh, cp_mesh, dp_rank, dp_size, local_device
    from parallel.pipeline import PipelineConfig, build_pipeline
    from parallel.train_utils import sum_over_dp

    opts = SimpleNamespace(weight_decay=0.1, decay_norms_and_embeddings=False)
    out = []
    for dp, tp in MESHES:
        mesh = build_mesh(tp)
        train_set, val_set, small_val = datasets(data, cache_dir)
        loader = DistributedDataLoader(
            train_set, global_batch=GLOBAL_BATCH, dp_rank=dp_rank(mesh), dp_size=dp_size(mesh), grad_accum=GRAD_ACCUM
        )
        validation = list(eval_batches(val_set, 1, GLOBAL_BATCH, dp_rank(mesh), dp_size(mesh), loader.micro_batch))
        model = build_parallel_model(ARGS, mesh, sequence_parallel=tp > 1, seed=0)
        optimizer = torch.optim.AdamW(param_groups(model, opts), lr=1e-3, betas=(0.9, 0.95))
        device = local_device()
        # this rank's share of the first step's targets: uneven across ranks by design
        first = dp_rank(mesh) * loader.micro_batch
        per_micro = loader.micro_batch * dp_size(mesh)
        my_targets = sum(
            train_set.num_targets(m * per_micro + first + j) for m in range(GRAD_ACCUM) for j in range(loader.micro_batch)
        )
        val_loss = evaluate(Trainee(model), validation, device, mesh)["val_loss"]
        small_val_loss, said = small_validation(Trainee(model), small_val, mesh, loader.micro_batch, device)
        losses = []
        for _ in range(STEPS):
            share, _, _ = train_step(Trainee(model), optimizer, loader, device, clip=1.0)
            losses.append(sum_over_dp(share["loss"].item(), mesh))
        # numpy: tensors sent back through the queue would live in this process's shared memory
        params = {n: p.detach().full_tensor().numpy().copy() for n, p in model.named_parameters()}
        out.append({"mesh": (dp, tp), "val_loss": val_loss, "losses": losses, "params": params, "targets": my_targets,
                    "small_val_loss": small_val_loss, "said": said})
    small_val_only = []
    for name, cut in SMALL_VAL_MESHES.items():
        mesh = build_mesh(1, device="cpu", **cut)
        if "pp" in cut:
            pipeline = build_pipeline(ARGS, mesh, PipelineConfig(microbatches=4, fewer_end_layers=False), seed=0)
            trainee = Trainee(pipeline.model, pipeline)
        else:
            trainee = Trainee(build_parallel_model(ARGS, mesh, seed=0), cp=cp_mesh(mesh))
        small_val_loss, said = small_validation(trainee, small_val, mesh, GLOBAL_BATCH // dp_size(mesh), local_device())
        small_val_only.append({"mesh": name, "small_val_loss": small_val_loss, "said": said})
    return {"meshes": out, "small_val_meshes": small_val_only}


def oracle(train_set, val_set, small_val) -> dict:
    """One device, the whole global batch at once, F.cross_entropy's mean over the targets
    that are not ignored: what every mesh must report. Then STEPS steps of a one-device
    AdamW (the groups, clipping and hyperparameters of _mesh_worker) on those full batches,
    with no accumulation: the parameters every mesh must end with."""
    from llama.training.optim import param_groups
    from llama.training.step import Trainee

    model = Transformer(ARGS).init_weights(seed=0)

    def mean_loss(batch):
        logits = model(batch.inputs, document_ids=batch.document_ids)
        return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100)

    with torch.no_grad():
        step1 = mean_loss(train_set.get_batch(0, 0, 1, GLOBAL_BATCH)).item()
        val = mean_loss(val_set.get_batch(0, 0, 1, GLOBAL_BATCH)).item()
        small = mean_loss(small_val.get_batch(0, 0, 1, SMALL_VAL)).item()  # the 7 windows alone: no padding
        # one device, train.py's padded global batch of 8 rows, summed and counted as evaluate does
        padded = list(eval_batches(small_val, 4, GLOBAL_BATCH, 0, 1, GLOBAL_BATCH))
        sums = [Trainee(model).loss_sum(batch) for batch in padded]
        small_padded = (sum(loss for loss, _ in sums) / sum(count for _, count in sums)).item()
    opts = SimpleNamespace(weight_decay=0.1, decay_norms_and_embeddings=False)
    optimizer = torch.optim.AdamW(param_groups(model, opts), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for step in range(STEPS):
        loss = mean_loss(train_set.get_batch(step * GLOBAL_BATCH, 0, 1, GLOBAL_BATCH))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    return {"step1": step1, "val": val, "small_val": small, "small_val_padded": small_padded, "padded_rows":
            sum(len(b.inputs) for b in padded), "losses": losses, "params": params}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One 4-rank launch for every test below: (each rank's results, the oracle's)."""
    root = tmp_path_factory.mktemp("finetune")
    data = write_chats(root / "chats.jsonl", 120, seed=1)
    write_small_val(root / "small_val.jsonl")
    sets = datasets(data, root / "cache")  # built here once, opened by every rank
    return run_on_ranks(_mesh_worker, 4, data, root / "cache"), oracle(*sets)


@pytest.fixture(scope="module")
def mesh_runs(spawned):
    """Per rank, the runs on MESHES."""
    results, expected = spawned
    return [r["meshes"] for r in results], expected


def test_step_loss_is_the_mean_over_unmasked_targets_on_any_mesh_with_uneven_masks(mesh_runs):
    results, expected = mesh_runs
    for run in results[0]:
        assert abs(run["losses"][0] - expected["step1"]) <= TOL, f"{run['mesh']}: {run['losses'][0]} vs {expected['step1']}"
    # the masks really are uneven: on 4x1 the four dp ranks hold different numbers of targets
    on_4x1 = [rank_runs[MESHES.index((4, 1))]["targets"] for rank_runs in results]
    assert len(set(on_4x1)) > 1, on_4x1


def test_parameters_after_steps_with_accumulation_are_those_of_one_device_on_1x4_2x2_and_4x1(mesh_runs):
    """Two micro-steps per step on every mesh, against one device stepping on the whole
    global batch: the same losses and, after STEPS AdamW steps, the same parameters."""
    results, expected = mesh_runs
    assert set(expected["params"]) == {n for n, _ in Transformer(ARGS).named_parameters()}
    for run in results[0]:
        assert set(run["params"]) == set(expected["params"]), run["mesh"]
        for i, (a, b) in enumerate(zip(run["losses"], expected["losses"])):
            assert abs(a - b) <= TOL, f"{run['mesh']} step {i + 1}: loss {a} vs {b} on one device"
        worst = max(float(abs(run["params"][n] - p).max()) for n, p in expected["params"].items())
        assert worst <= TOL, f"{run['mesh']}: a parameter differs by {worst:.3g} from the one-device AdamW"
    init = Transformer(ARGS).init_weights(seed=0).state_dict()
    moved = max(float(abs(p - init[n].numpy()).max()) for n, p in expected["params"].items())
    assert moved > 100 * TOL, f"the steps moved the parameters by {moved:.3g} only: the comparison would be empty"


def test_validation_loss_is_equal_on_1x4_2x2_and_4x1(mesh_runs):
    results, expected = mesh_runs
    for rank_runs in results:
        for run in rank_runs:
            assert abs(run["val_loss"] - expected["val"]) <= TOL, f"{run['mesh']}: {run['val_loss']} vs {expected['val']}"


def test_a_validation_set_smaller_than_one_global_batch_is_evaluated_whole_on_any_mesh(spawned):
    """7 windows, global batch 8: one batch padded with a row the loss ignores. Its loss is
    F.cross_entropy's mean over the 7 windows' targets on one device, on 1x4, 2x2 and 4x1
    (with 2 micro-steps: on 4x1 a rank's second micro-batch is padding only), under pp 2
    (a pipeline microbatch of padding only) and cp 2; rank 0 alone warns, once."""
    results, expected = spawned
    assert expected["padded_rows"] == GLOBAL_BATCH
    assert abs(expected["small_val_padded"] - expected["small_val"]) <= TOL, expected
    for rank, result in enumerate(results):
        runs = result["meshes"] + result["small_val_meshes"]
        assert [run["mesh"] for run in runs] == MESHES + list(SMALL_VAL_MESHES)
        for run in runs:
            got = run["small_val_loss"]
            assert abs(got - expected["small_val"]) <= TOL, f"{run['mesh']}: {got} vs {expected['small_val']} on one device"
            warnings = run["said"].splitlines()
            if rank > 0:
                assert warnings == [], f"rank {rank} warned too: {warnings}"
                continue
            assert len(warnings) == 1, warnings
            for words in (f"has {SMALL_VAL} windows", f"global batch {GLOBAL_BATCH}", "padded with 1 row the loss ignores"):
                assert words in warnings[0], warnings[0]


# ---------------------------------------------------------------- end to end

LETTERS = "abcdefgh"  # 4096 words: 2000 conversations leave most of them unseen
# 0.44M parameters, the byte tokenizer's vocabulary: 200 steps take seconds on two CPU cores
SHOUT_MODEL = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=264, multiple_of=32, max_seq_len=128)


def shout_chats(path: Path, n: int, seed: int) -> set:
    """The task: the user says a 4-letter word, the assistant repeats it in capitals; one or
    two such exchanges per conversation. A character-level rule (each answer letter sits a
    fixed 17 tokens after its lowercase twin) that SHOUT_MODEL learns in under 100 steps and
    applies to words it never saw. Returns the words used."""
    rng = random.Random(seed)
    words = set()
    with open(path, "w") as f:
        for _ in range(n):
            messages = []
            for _ in range(rng.choice([1, 1, 2])):
                word = "".join(rng.choice(LETTERS) for _ in range(4))
                words.add(word)
                messages += [{"role": "user", "content": word}, {"role": "assistant", "content": word.upper()}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return words


def torchrun(*args, nproc: int = 1, threads: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", str(ROOT / "train.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def test_chat_sft_learns_a_rule_that_answers_held_out_prompts(tmp_path):
    """Validated on a file smaller than one global batch (issue 21 item 8): 12 held-out
    conversations in 7 windows, global batch 16; refused before, now evaluated whole."""
    from llama.generate import generate
    from llama.weights.format import save_checkpoint
    from llama.weights.loading import load_model

    seen = shout_chats(tmp_path / "shout.jsonl", 2000, seed=0)
    # the training set --val-fraction 0.05 leaves (the same windows in the same order: packing
    # depends on the lengths and the seed only), and 12 of the 100 it holds out as --val-data
    lines = (tmp_path / "shout.jsonl").read_text().splitlines(keepends=True)
    train_docs, val_docs = split_documents(len(lines), 0.05, seed=0)
    (tmp_path / "train.jsonl").write_text("".join(lines[i] for i in train_docs))
    (tmp_path / "val.jsonl").write_text("".join(lines[i] for i in val_docs[:12]))
    rng = random.Random(1)
    held_out = []
    while len(held_out) < 16:
        word = "".join(rng.choice(LETTERS) for _ in range(4))
        if word not in seen and word not in held_out:
            held_out.append(word)

    # fine-tuning starts from a converted checkpoint; a random one, since the rule is learnt here
    initial = tmp_path / "init"
    save_checkpoint(Transformer(SHOUT_MODEL).init_weights(seed=0).state_dict(), SHOUT_MODEL, initial)
    # the loss plateaus near 1.7 (each capital a guess among 8) until the copying rule clicks.
    # With 8 sequences a step the click wandered with rounding (step 100-250 on the debug
    # preset, where fused vs foreach AdamW moved it by 100; 60-130 on this model, one run then
    # stuck near 0.5 for 50 steps); 16 steadies it. 12 runs, each with its own init, --seed,
    # words and held-out words, on 1 and 2 threads: val loss under 0.5 at step 60-90, at step
    # 200 0.0002-0.0004 of its start, 16/16 right (and 64/64 of a larger held-out set) in
    # every run. 200 steps are twice the latest click.
    steps = 200
    run = torchrun(
        "--checkpoint", initial, "--data", tmp_path / "train.jsonl", "--val-data", tmp_path / "val.jsonl",
        "--seq-len", 64, "--micro-batch", 16, "--steps", steps, "--warmup", 20, "--log-every", 50, "--eval-every", 50,
        "--eval-batches", 2, "--save-every", 0, "--save-dir", tmp_path / "run",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "packing efficiency" in run.stdout and "0 conversations truncated" in run.stdout, run.stdout
    assert f"validation: a fixed set of 7 windows of {tmp_path / 'val.jsonl'}" in run.stdout, run.stdout
    warnings = [line for line in run.stderr.splitlines() if "validation set has" in line]
    assert len(warnings) == 1 and "7 windows" in warnings[0] and "global batch 16" in warnings[0], run.stderr[-3000:]
    assert "the last padded with 9 rows the loss ignores" in warnings[0], warnings[0]

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert [s for s, _ in val] == list(range(0, steps + 1, 50))  # before step 1, every 50, at the end
    assert all(math.isfinite(v) for _, v in val), val
    assert val[-1][1] < 0.05 * val[0][1], f"validation loss did not fall enough: {val}"

    checkpoint = tmp_path / "run" / f"step_{steps:08d}"
    tokenizer = ByteTokenizer()
    model = load_model(checkpoint).eval()
    answers = {}
    for word in held_out:
        prompt = tokenizer.encode_dialog([{"role": "user", "content": word}])
        answers[word] = tokenizer.decode(generate(model, prompt, 8, stop_tokens=tokenizer.stop_tokens))
    right = sum(answers[w] == w.upper() for w in held_out)
    assert right >= 14, f"{right}/16 held-out prompts answered right: {answers}"

    # the command line: a training checkpoint, --chat, and a stop at <|eot_id|>
    cli = subprocess.run(
        [sys.executable, "-m", "llama.generate", "--checkpoint", str(checkpoint), "--tokenizer", "bytes", "--chat",
         "--prompt", held_out[0], "--max-new-tokens", "32"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == answers[held_out[0]] + "\n"  # nothing after the reply: it stopped
    assert "decode: 4 tokens" in cli.stderr  # 4 letters of the 32 allowed: <|eot_id|> ended it


def test_bad_chat_line_stops_train_py_with_one_line_naming_file_and_line(tmp_path):
    data = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HI"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "HI"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    run = torchrun("--data", data, "--steps", 1, "--save-dir", tmp_path / "run", "--seq-len", 32)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and f"{data}:2" in errors[0] and "'bot'" in errors[0], run.stderr[-2000:]
