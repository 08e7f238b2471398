"""The GPU path as far as a CPU can observe it: peak TFLOP/s per accelerator model, the GPU
each rank picks, clipping that never waits for the device, and a tp-1 cross-entropy that
never holds the whole sequence's logits in fp32."""

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import parallel.devices as devices
import parallel.losses as losses
import parallel.mesh as mesh_module
from llama import ModelArgs, Transformer
from parallel.devices import device_model, peak_tflops, warn_unknown_device
from parallel.layers import reduce_partial_gradients
from parallel.losses import chunked_cross_entropy, vocab_parallel_cross_entropy
from parallel.mesh import init_distributed, local_rank, warn_if_tp_crosses_nodes
from parallel.spawn import run_on_ranks
from parallel.train_utils import clip_grad_norm_

TOL = 1e-6

# ---------------------------------------------------------------- peak TFLOP/s

# torch.cuda.get_device_name() as each part reports itself
DEVICE_NAMES = {
    "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA H800": "H800",
    "NVIDIA H800 PCIe": "H800 PCIe",
    "NVIDIA H20": "H20",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA B200": "B200",
    "NVIDIA A100-SXM4-40GB": "A100 40GB",
    "NVIDIA A100-PCIE-40GB": "A100 40GB",
    "NVIDIA A100-SXM4-80GB": "A100 80GB",
    "NVIDIA A100 80GB PCIe": "A100 80GB",
    "NVIDIA A10": "A10",
    "NVIDIA A10G": "A10G",
    "NVIDIA L4": "L4",
    "NVIDIA L40S": "L40S",
    "NVIDIA GeForce RTX 4090": "RTX 4090",
    "AMD Instinct MI300X": "MI300X",
}


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_each_device_name_maps_to_its_own_model(name):
    assert device_model(name) == DEVICE_NAMES[name]


def test_lookalike_names_are_not_taken_for_each_other():
    # the defect: substring matching took PCIe and NVL parts for SXM, and GH200 for H200
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert peak_tflops("NVIDIA H100 NVL", "bf16") == 835.5
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5
    assert device_model("NVIDIA GH200 480GB") != device_model("NVIDIA H200")
    assert device_model("NVIDIA A10") != device_model("NVIDIA A100-SXM4-80GB")
    assert device_model("NVIDIA L40S") != device_model("NVIDIA L4")


def test_peaks_are_dense_and_ordered_bf16_over_tf32_over_fp32():
    for model, peak in devices.PEAKS.items():
        assert peak.bf16 >= peak.tf32 >= peak.fp32 > 0, model
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0  # not the 312 with sparsity
    assert peak_tflops("AMD Instinct MI300X", "bf16") == 1307.4


def test_unknown_devices_and_mig_slices_have_no_peak():
    assert peak_tflops("NVIDIA Tesla T4", "bf16") is None
    assert peak_tflops("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16") is None
    with pytest.raises(ValueError, match="fp16"):
        peak_tflops("NVIDIA H200", "fp16")


def test_an_unknown_device_warns_once(monkeypatch):
    monkeypatch.setattr(devices, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            warn_unknown_device("NVIDIA Tesla T4")
    assert len(caught) == 1
    assert "NVIDIA Tesla T4" in str(caught[0].message) and "--peak-tflops" in str(caught[0].message)


# ---------------------------------------------------------------- device selection


def _fake_cuda(monkeypatch, device_count: int) -> dict:
    """Pretend to be a CUDA process: record what init_distributed asks of torch."""
    calls = {}
    monkeypatch.setattr(mesh_module, "device_type", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: device_count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("set_device", device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.setdefault("init", kwargs))
    for name in ("LOCAL_RANK", "SLURM_LOCALID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    return calls


@pytest.mark.parametrize(
    "env, device_count, want",
    [
        ({"LOCAL_RANK": "3"}, 8, 3),
        ({"SLURM_LOCALID": "5"}, 8, 5),  # srun without torchrun
        ({"LOCAL_RANK": "2", "SLURM_LOCALID": "7"}, 8, 2),  # torchrun's own numbering wins
        ({"SLURM_LOCALID": "6"}, 1, 0),  # --gpus-per-task=1: each task sees only its GPU
        ({"LOCAL_RANK": "5"}, 4, 1),
        ({}, 8, 0),
    ],
)
def test_each_rank_binds_its_gpu_and_passes_it_to_the_process_group(monkeypatch, env, device_count, want):
    calls = _fake_cuda(monkeypatch, device_count)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    init_distributed()
    assert calls["set_device"] == torch.device("cuda", want)
    assert calls["init"] == {"backend": "nccl", "device_id": torch.device("cuda", want)}


def test_local_rank_on_cpu_reads_the_same_variables(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert local_rank() == 3


@pytest.mark.parametrize(
    "tp, per_node, crosses", [(8, 8, False), (4, 8, False), (1, 8, False), (16, 8, True), (3, 8, True)]
)
def test_tp_groups_that_span_nodes_are_warned_about(tp, per_node, crosses):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_if_tp_crosses_nodes(tp, per_node) == crosses
    assert len(caught) == int(crosses)
    if crosses:
        assert f"--tp {tp}" in str(caught[0].message)


# ---------------------------------------------------------------- clipping without host syncs


class OpRecorder(TorchDispatchMode):
    """Every aten op that runs inside it; `_local_scalar_dense` is a device-to-host read."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    @property
    def host_reads(self) -> int:
        return self.ops.count("aten._local_scalar_dense")


def test_the_recorder_sees_a_host_read():
    with OpRecorder() as recorder:
        float(torch.ones(()) * 2)
    assert recorder.host_reads == 1


def _model_with_grads(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    model(torch.randn(4, 16)).square().sum().backward()
    return model


@pytest.mark.parametrize("max_norm", [0.05, 1e3, float("inf"), None], ids=["clips", "no-clip", "inf", "none"])
def test_clipping_equals_torch_and_never_reads_the_norm_on_the_host(max_norm):
    model, reference = _model_with_grads(0), _model_with_grads(0)
    with OpRecorder() as recorder:
        norm = clip_grad_norm_(model, max_norm)
    want = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf") if max_norm is None else max_norm)
    assert recorder.host_reads == 0, recorder.ops
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0
    torch.testing.assert_close(norm.float(), want, rtol=TOL, atol=0)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=TOL, atol=TOL)
    if max_norm == 0.05:
        assert want > 10 * max_norm  # this case really clips


def test_clipping_off_scales_nothing():
    model = _model_with_grads(1)
    before = [p.grad.clone() for p in model.parameters()]
    with OpRecorder() as recorder:
        clip_grad_norm_(model, None)
    assert "aten._foreach_mul_" not in recorder.ops
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


TP_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=16)


def _clip_on_tp(max_norm: float):
    from torch.distributed.device_mesh import init_device_mesh

    tokens = torch.randint(0, TP_ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    reference = Transformer(TP_ARGS).init_weights(seed=3)
    vocab_parallel_cross_entropy(reference(inputs), targets).backward()
    want = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)

    model = Transformer(TP_ARGS, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))).init_weights(seed=3)
    vocab_parallel_cross_entropy(model(inputs), targets).backward()
    reduce_partial_gradients(model)
    with OpRecorder() as recorder:
        norm = clip_grad_norm_(model, max_norm)
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}
    grad_error = max(float((grads[n] - ref_grads[n]).abs().max()) for n in grads)
    return recorder.host_reads, float(norm), float(want), grad_error


def test_clipping_tp_dtensor_gradients_never_reads_the_norm_on_the_host():
    for host_reads, norm, want, grad_error in run_on_ranks(_clip_on_tp, 2, 0.1):
        assert host_reads == 0
        assert norm == pytest.approx(want, rel=1e-5)  # tp reassociates sums: 1e-5, as in test_model
        assert want > 0.1  # it clipped
        assert grad_error < 1e-6



def _clip_where_one_stage_has_no_gradients() -> list:
    """Two pipeline-like ranks, each holding its own DTensor parameters (on its own 1-rank
    dp mesh, as FSDP leaves them); one rank's are frozen, so it holds no gradient: rank 0's,
    then rank 1's. Both clip, then meet in one more collective, as the next step's first
    would."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("pp", "dp"))
    rank, results = dist.get_rank(), []
    for frozen_rank in (0, 1):
        weight = torch.nn.Parameter(distribute_tensor(torch.full((4, 3), float(rank + 1)), mesh["dp"], [Shard(0)]))
        if rank != frozen_rank:
            weight.grad = distribute_tensor(torch.full((4, 3), 2.0), mesh["dp"], [Shard(0)])
        norm = clip_grad_norm_([weight], 1.0)
        after = torch.ones(())
        dist.all_reduce(after)  # mismatched collectives before it would hang or mix up here
        grad = None if weight.grad is None else float(weight.grad.to_local().abs().max())
        results.append((frozen_rank, float(norm), float(after), grad))
    return results


def test_a_rank_without_gradients_still_joins_the_norms_all_reduce():
    """The norm is the world's: the rank without gradients adds 0 to the one all-reduce
    and clips nothing; the other clips by the same norm. A regression fails within the
    short collective timeout instead of hanging."""
    want = (12 * 2.0**2) ** 0.5
    for rank, results in enumerate(run_on_ranks(_clip_where_one_stage_has_no_gradients, 2, timeout=60, pg_timeout=15)):
        for frozen_rank, norm, after, grad in results:
            assert norm == pytest.approx(want) and after == 2.0
            assert grad is None if rank == frozen_rank else grad == pytest.approx(2.0 / want)


# ---------------------------------------------------------------- tp-1 cross-entropy in chunks


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, None])
def test_chunked_cross_entropy_equals_torch_with_ignored_targets(reduction, chunk_tokens):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 17, 50)).requires_grad_()
    targets = torch.randint(0, 50, (3, 17))
    targets[0, :5] = -100
    targets[2, -1] = -100
    loss = chunked_cross_entropy(logits, targets, -100, reduction, chunk_tokens)
    (grad,) = torch.autograd.grad(loss * 1.5, logits)
    want = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-100, reduction=reduction)
    (want_grad,) = torch.autograd.grad(want * 1.5, logits)
    torch.testing.assert_close(loss, want, rtol=TOL, atol=TOL)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=TOL)


def test_chunked_cross_entropy_of_bf16_logits_matches_torch_on_their_fp32_copy():
    torch.manual_seed(1)
    logits = torch.randn(2, 33, 40).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 40, (2, 33))
    targets[1, 3] = -7
    loss = vocab_parallel_cross_entropy(logits, targets, ignore_index=-7)
    (grad,) = torch.autograd.grad(loss, logits)
    want = F.cross_entropy(logits.float().reshape(-1, 40), targets.reshape(-1), ignore_index=-7)
    (want_grad,) = torch.autograd.grad(want, logits)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want, rtol=TOL, atol=TOL)
    torch.testing.assert_close(grad, want_grad)  # bf16 rounding of the same fp32 gradient


class LargestFloat32(TorchDispatchMode):
    """The most elements of any fp32 tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.numel = max(self.numel, t.numel())
        return out


def test_tp1_cross_entropy_never_holds_the_whole_sequence_in_fp32(monkeypatch):
    tokens, vocab, chunk = 512, 1000, 64
    monkeypatch.setattr(losses, "CROSS_ENTROPY_CHUNK_BYTES", chunk * vocab * 4)
    torch.manual_seed(2)
    logits = torch.randn(1, tokens, vocab).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (1, tokens))
    with LargestFloat32() as largest:
        vocab_parallel_cross_entropy(logits, targets).backward()
    assert largest.numel <= chunk * vocab, f"{largest.numel} fp32 elements, one chunk is {chunk * vocab}"
    # the probe is able to see the full copy the old path made
    with LargestFloat32() as old:
        F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1)).backward()
    assert old.numel == tokens * vocab
