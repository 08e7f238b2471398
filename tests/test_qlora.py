"""QLoRA (llama/qlora.py, --base-dtype nf4): the seven projections' frozen weights stored as
NF4 (block 64, scales double quantised in blocks of 256), each rank quantising its own tp
shard; the model computes with exactly the weights that NF4 dequantises to, trains the
same on every mesh with the same tp, and stores what the planner counts.

The model: dim 256, 4 heads of 64, 2 kv heads, ffn 768, so that every projection's tp-2
shard holds whole blocks of 64 x 256 weights (wk/wv: 64 x 256, wq/wo: 128 x 256 and
256 x 128, w1/w3: 384 x 256, w2: 256 x 384). One 4-rank launch (dp 2 x tp 2) trains 3
steps with train.py's step; the oracle is a plain single-device LoRA model whose base is
the per-tp-2-shard dequantised weights. fp32, 1e-5."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

pytest.importorskip("torchao")  # the qlora extra, in the test extra

from llama import ModelArgs, Transformer
from llama.data.loader import DistributedDataLoader
from llama.lora import LoRAConfig, add_adapters
from llama.qlora import dequantized_base, nf4_storage_bytes, nf4_weights, projections, quantize_base_nf4_
from parallel.plan.lora import nf4_bytes
from parallel.spawn import run_on_ranks
from tests.test_lora import ACCUM, GLOBAL_BATCH, MAX_NORM, STEPS, FixedWindows, _full, _optimizer, windows

ROOT = Path(__file__).resolve().parent.parent
ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=256, max_seq_len=32)
LORA = LoRAConfig(rank=4)
SEED, TOL, TP = 0, 1e-5, 2
ROW_PARALLEL = ("wo", "w2")  # Shard(1): cut along their input dim; the others along their rows


def _tp_shards(model, tp: int) -> dict:
    """weight name -> (dim, parts): how tp cuts each projection's weight."""
    return {f"{name}.weight": (1 if name.endswith(ROW_PARALLEL) else 0, tp) for name in projections(model)}


def _plain_lora_model() -> Transformer:
    model = Transformer(ARGS)
    add_adapters(model, LORA)
    return model.init_weights(SEED)


def _dequantized_oracle(tp: int) -> Transformer:
    """A plain (unquantised) LoRA model whose projections hold what the NF4 base of a run at
    tp `tp` dequantises to: each tp shard quantised alone, as its rank does."""
    model = _plain_lora_model()
    state = dequantized_base(model.state_dict(), _tp_shards(model, tp))
    model.load_state_dict(state)
    return model


def _tokens() -> torch.Tensor:
    return torch.from_numpy(windows()[0][:4]).long()


def _train_one_device(model) -> dict:
    from llama.training.step import Trainee, train_step

    optimizer = _optimizer(model)
    loader = DistributedDataLoader(FixedWindows(*windows()), global_batch=GLOBAL_BATCH, grad_accum=ACCUM)
    losses = [float(train_step(Trainee(model), optimizer, loader, "cpu", MAX_NORM)[0]["loss"]) for _ in range(STEPS)]
    adapters = {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}
    return {"losses": losses, "adapters": adapters}


# ---------------------------------------------------------------- the 4-rank launch


def _worker(data: tuple) -> dict:
    from llama.training.step import Trainee, train_step
    from parallel.fsdp import build_parallel_model
    from parallel.mesh import build_mesh, dp_rank, dp_size
    from parallel.train_utils import sum_over_batch

    mesh = build_mesh(TP, device="cpu")  # dp 2 x tp 2 on 4 ranks
    model = build_parallel_model(ARGS, mesh, sequence_parallel=True, seed=SEED, lora=LORA, base_dtype="nf4")
    with torch.no_grad():
        logits = _full(model(_tokens()))
    nf4 = nf4_weights(model)
    storage = {name: (nf4_storage_bytes(w), w.numel(), type(w).__name__) for name, w in nf4.items()}
    optimizer = _optimizer(model)
    loader = DistributedDataLoader(FixedWindows(*data), global_batch=GLOBAL_BATCH, dp_rank=dp_rank(mesh),
                                   dp_size=dp_size(mesh), grad_accum=ACCUM)
    losses = [sum_over_batch(float(train_step(Trainee(model), optimizer, loader, "cpu", MAX_NORM)[0]["loss"]), mesh)
              for _ in range(STEPS)]
    adapters = {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, storage)
    return {"logits": logits, "losses": losses, "adapters": adapters, "storage": gathered} if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def launch():
    return run_on_ranks(_worker, 4, windows())[0]


# ---------------------------------------------------------------- forward


def test_a_qlora_forward_on_one_device_equals_the_plain_model_of_its_dequantised_base():
    qlora = _plain_lora_model()
    assert quantize_base_nf4_(qlora) == 2 * 7
    with torch.no_grad():
        got, want = qlora(_tokens()), _dequantized_oracle(tp=1)(_tokens())
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    # and NF4 is a real 4-bit base: far from the fp32 weights it came from
    with torch.no_grad():
        assert (got - _plain_lora_model()(_tokens())).abs().max() > 1e-2


def test_a_qlora_forward_on_dp2xtp2_equals_the_plain_model_of_its_tp2_shards_dequantised(launch):
    with torch.no_grad():
        want = _dequantized_oracle(tp=TP)(_tokens()).numpy()
    np.testing.assert_allclose(launch["logits"], want, rtol=0, atol=TOL)


def test_each_tp_shard_quantises_to_other_values_than_the_whole_tensor():
    """The truth about mesh equality: NF4 keeps one mean of the block scales per quantised
    tensor, so the tp-2 shards of wq (Shard(0), blocks aligned) and of wo (Shard(1)) both
    dequantise to other values than the whole tensor's; runs equal each other only at the
    same tp (dp and FSDP do not touch the NF4 base)."""
    whole, per_shard = _dequantized_oracle(tp=1).state_dict(), _dequantized_oracle(tp=TP).state_dict()
    for name in ("layers.0.attention.wq.weight", "layers.0.attention.wo.weight"):
        assert (whole[name] - per_shard[name]).abs().max() > 1e-4, name


# ---------------------------------------------------------------- training


def test_three_qlora_steps_on_one_device_equal_the_plain_model_of_its_dequantised_base():
    qlora = _plain_lora_model()
    quantize_base_nf4_(qlora)
    got, want = _train_one_device(qlora), _train_one_device(_dequantized_oracle(tp=1))
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=0, atol=TOL)
    for name, value in want["adapters"].items():
        np.testing.assert_allclose(got["adapters"][name], value, rtol=0, atol=TOL, err_msg=name)


def test_three_qlora_steps_on_dp2xtp2_equal_the_single_device_oracle_of_the_tp2_base(launch):
    want = _train_one_device(_dequantized_oracle(tp=TP))
    np.testing.assert_allclose(launch["losses"], want["losses"], rtol=0, atol=TOL)
    assert set(launch["adapters"]) == set(want["adapters"])
    for name, value in want["adapters"].items():
        np.testing.assert_allclose(launch["adapters"][name], value, rtol=0, atol=TOL, err_msg=name)


# ---------------------------------------------------------------- storage


def test_each_rank_holds_its_tp_shard_of_the_nf4_base_in_the_planners_bytes(launch):
    """Every rank: 14 NF4 weights, each 1/tp of its projection (not 1/(dp x tp): FSDP leaves
    them alone), in codes n/2 + int8 scales n/64 + fp32 factors per 256 scales + mean and
    levels, exactly parallel.plan.lora.nf4_bytes."""
    whole = {f"{n}.weight": l.weight.numel() for n, l in projections(_plain_lora_model()).items()}
    for storage in launch["storage"]:
        assert set(storage) == set(whole)
        for name, (nbytes, numel, kind) in storage.items():
            assert kind == "NF4Tensor" and numel == whole[name] // TP, name
            assert nbytes == nf4_bytes(numel, 4), name
    total = sum(b for b, _, _ in launch["storage"][0].values())
    assert total < sum(whole.values()) * 4 / TP / 7  # under 1/7 of the fp32 shards


def test_a_shard_without_whole_nf4_blocks_is_one_error_naming_the_tensor_and_the_fix():
    from llama.qlora import check_nf4_shapes

    model = Transformer(replace(ARGS, dim=64, n_heads=4, multiple_of=32))  # wk: 32 x 64 weights
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq\.weight's shard .* \(64, 64\).*--tp"):
        check_nf4_shapes(model)


# ---------------------------------------------------------------- train.py


def test_base_dtype_without_lora_rank_is_one_error_line_and_exit_code_2():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--base-dtype", "nf4"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["train.py: error: --base-dtype nf4 stores a frozen base: it needs --lora-rank R (QLoRA)"]


def test_train_py_qlora_on_tp2_from_a_converted_checkpoint_lowers_the_loss(tmp_path):
    """train.py --lora-rank 4 --base-dtype nf4 on 2 ranks (tp 2), from a converted
    checkpoint of the test model (vocab as train.py's byte tokenizer needs): the loss falls."""
    from llama.weights.format import save_checkpoint
    from tests.test_train import RUN, check, metrics, torchrun

    args = replace(ARGS, vocab_size=264, max_seq_len=128)
    converted = save_checkpoint(Transformer(args).init_weights(seed=5).state_dict(), args, tmp_path / "base")
    corpus = tmp_path / "corpus.txt"
    files = sorted((Path(torch.__file__).parent / "nn" / "modules").glob("*.py"))[:6]
    corpus.write_text("\n\n".join(f.read_text() for f in files)[:60_000])
    check(torchrun("--checkpoint", converted, "--data", corpus, "--save-dir", tmp_path / "run", "--tp", 2,
                   "--steps", 6, *RUN[:-2], "--lr", "1e-2", "--lora-rank", "4", "--base-dtype", "nf4", nproc=2))
    losses = [r["loss"] for r in metrics(tmp_path / "run")]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
