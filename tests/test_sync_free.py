"""A training step that does not log never waits for the device, and the GPU-path choices
that a CPU can observe: when attention expands kv heads, the default dtypes, last-position
logits, token ids validated once on the host.

A host read is `aten._local_scalar_dense` (`.item()`, `float(t)`, `int(t)`, `if t:`): on
CUDA it blocks the host until the device has caught up. The recorder sees every op that
runs on the calling thread and in autograd's backward, on one device, under tp and
under FSDP2, through the model's forward, the backward, clip_grad_norm_ and the optimizer.

One exemption, named exactly: AdamW with foreach=True (and capturable=False, fused=False)
keeps each parameter's `step` counter as a CPU tensor and reads it with `.item()` to
compute the bias corrections as Python floats. On CUDA that counter stays in host
memory, so the read costs no device sync; the test checks that the only reads are of
those counters and that they are CPU tensors. train.py uses fused AdamW on CUDA and CPU (counters
on the device, read by the kernel): that variant is checked with no exemption at all.
"""

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llama.training.build import default_dtype
from llama.training.flags import parse_args
from llama.training.inputs import check_token_ids
from llama.training.optim import build_optimizer, param_groups
from llama.training.step import Trainee, train_step
from llama import ModelArgs, Transformer
from llama.data.loader import DistributedDataLoader
from llama.data.packed import PackedDataset
from llama.generate import DTYPES, generate, parse_args as generate_args
from llama.masks import gqa_needs_expanded_kv
from parallel.layers import head_layout, reduce_partial_gradients
from parallel.losses import vocab_parallel_cross_entropy
from parallel.spawn import run_on_ranks
from parallel.train_utils import clip_grad_norm_
from torch.utils._python_dispatch import TorchDispatchMode

TOL = 1e-6
SEQ = 16
# 6 query heads, 3 kv heads: at tp 2 rank 0 holds query heads 0-2, which read kv heads
# 0, 0, 1 (a group straddles the ranks: the uneven path with its kv index)
UNEVEN = ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=128, multiple_of=32, max_seq_len=SEQ)
OPTS = SimpleNamespace(lr=1e-3, weight_decay=0.1, decay_norms_and_embeddings=False)


# under inference mode `.item()` reaches the mode as aten.item, before it decomposes
READS = (torch.ops.aten._local_scalar_dense, torch.ops.aten.item)


class HostReads(TorchDispatchMode):
    """The tensors read on the host by the ops run inside it, and a count of every op."""

    def __init__(self):
        super().__init__()
        self.tensors, self.ops = [], Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket] += 1
        if func.overloadpacket in READS:
            self.tensors.append(args[0])
        return func(*args, **(kwargs or {}))


def not_ours(reads: HostReads, optimizer) -> list:
    """The reads left once foreach AdamW's CPU step counters are set aside (see the top)."""
    steps = {id(s["step"]) for s in optimizer.state.values()}
    assert all(s["step"].device.type == "cpu" for s in optimizer.state.values() if not optimizer.defaults["fused"])
    return [t for t in reads.tensors if id(t) not in steps or optimizer.defaults["fused"]]


def batch(args: ModelArgs, seed: int, documents: bool):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (2, SEQ + 1), generator=g)
    ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16]) if documents else None
    return tokens[:, :-1], tokens[:, 1:], ids


def host_reads_of_steps(model, optimizer, args: ModelArgs, documents: bool, deliberate: bool = False) -> list:
    """Two steps (the first creates the optimizer state); the second's reads not exempt."""
    for step in range(2):
        inputs, targets, ids = batch(args, step, documents)
        with HostReads() as reads:
            logits = model(inputs, document_ids=ids)
            loss = vocab_parallel_cross_entropy(logits, targets)
            if deliberate:
                loss.item()
            loss.backward()
            reduce_partial_gradients(model)  # tp without FSDP: what FSDP's hooks do
            clip_grad_norm_(model, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return not_ours(reads, optimizer)


def optimizers(model):
    return {
        "foreach": torch.optim.AdamW(param_groups(model, OPTS), lr=1e-3, foreach=True),
        "fused": build_optimizer(model, OPTS, torch.device("cuda")),  # train.py's CUDA choice, here on CPU
    }


# ---------------------------------------------------------------- one device


@pytest.mark.parametrize("kind", ["foreach", "fused"])
@pytest.mark.parametrize("documents", [False, True], ids=["plain", "documents"])
def test_one_device_step_reads_nothing_on_the_host(kind, documents):
    model = Transformer(UNEVEN).init_weights(seed=0)
    assert host_reads_of_steps(model, optimizers(model)[kind], UNEVEN, documents) == []


def test_the_recorder_catches_a_deliberate_item():
    model = Transformer(UNEVEN).init_weights(seed=0)
    reads = host_reads_of_steps(model, optimizers(model)["fused"], UNEVEN, False, deliberate=True)
    assert len(reads) == 1 and reads[0].dim() == 0


def test_the_recorder_sees_into_backward():
    x = torch.ones(3, requires_grad=True)
    y = x * 2
    y.register_hook(lambda grad: grad.sum().item() and None)
    with HostReads() as reads:
        y.sum().backward()
    assert len(reads.tensors) == 1


def test_train_py_picks_fused_adamw_on_cuda_and_cpu_and_foreach_elsewhere():
    model = Transformer(UNEVEN).init_weights(seed=0)
    assert build_optimizer(model, OPTS, torch.device("cuda")).defaults["fused"] is True
    cpu = build_optimizer(model, OPTS, torch.device("cpu")).defaults
    assert (cpu["fused"], cpu["foreach"]) == (True, False)
    other = build_optimizer(model, OPTS, torch.device("meta")).defaults
    assert (other["fused"], other["foreach"]) == (False, True)


# ---------------------------------------------------------------- tp, FSDP2 and llama.training.step.train_step


def _tp_steps() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    out = {"uneven": not head_layout(UNEVEN.n_heads, UNEVEN.n_kv_heads, mesh).uniform_groups}
    for documents in (False, True):
        model = Transformer(UNEVEN, mesh).init_weights(seed=0)
        for kind, optimizer in optimizers(model).items():
            out[kind, documents] = len(host_reads_of_steps(model, optimizer, UNEVEN, documents))
    return out


def test_tp_step_with_uneven_heads_reads_nothing_on_the_host():
    for result in run_on_ranks(_tp_steps, 2):
        assert result.pop("uneven") is True
        assert result == {(kind, docs): 0 for kind in ("foreach", "fused") for docs in (False, True)}


def _train_steps(tp: int, deliberate: bool) -> list:
    from parallel.fsdp import build_parallel_model
    from parallel.mesh import build_mesh, dp_rank, dp_size

    mesh = build_mesh(tp)
    tokens = np.random.default_rng(0).integers(0, UNEVEN.vocab_size, 4000, dtype=np.uint32)
    dataset = PackedDataset(tokens, SEQ, seed=0, document_masking=True, doc_offsets=np.array([0, 700, 2500, 4000]))
    loader = DistributedDataLoader(dataset, global_batch=4, dp_rank=dp_rank(mesh), dp_size=dp_size(mesh), grad_accum=2)
    reads = {}
    for kind in ("foreach", "fused"):
        model = build_parallel_model(UNEVEN, mesh, seed=0)
        optimizer = optimizers(model)[kind]
        for _ in range(2):
            with HostReads() as recorded:
                loss, norm, _ = train_step(Trainee(model), optimizer, loader, torch.device("cpu"), clip=1.0)
                if deliberate:
                    float(norm)
        reads[kind] = len(not_ours(recorded, optimizer))
    return reads


# train_step skips the update of a step whose grad norm is not finite. The fused AdamW
# (train.py's, on CPU and CUDA) does that on the device; a foreach AdamW cannot, so
# train_step reads that one flag per step (the reads of the second step are counted).
@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "fsdp2"])
def test_train_step_through_the_loader_reads_nothing_on_the_host(tp):
    for reads in run_on_ranks(_train_steps, 2, tp, False):
        assert reads == {"foreach": 1, "fused": 0}


def test_train_step_recorder_catches_reading_the_norm():
    for reads in run_on_ranks(_train_steps, 2, 2, True):
        assert reads == {"foreach": 2, "fused": 1}


# ---------------------------------------------------------------- attention kernels


def test_kv_is_expanded_only_where_fused_kernels_refuse_grouped_heads(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    for dtype in (torch.float32, torch.bfloat16):
        assert not gqa_needs_expanded_kv(dtype, cpu, masked=True)  # the CPU flash kernel takes all
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert not gqa_needs_expanded_kv(torch.bfloat16, cuda)
    assert not gqa_needs_expanded_kv(torch.float16, cuda)
    assert gqa_needs_expanded_kv(torch.float32, cuda)  # flash is fp16/bf16 only
    assert gqa_needs_expanded_kv(torch.bfloat16, cuda, masked=True)  # flash takes no mask
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert gqa_needs_expanded_kv(torch.float16, cuda)  # no flash before sm80


@pytest.mark.parametrize("documents", [False, True], ids=["plain", "documents"])
def test_expanded_kv_gives_the_grouped_result(monkeypatch, documents):
    import llama.model

    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=SEQ)
    model = Transformer(args).init_weights(seed=1)
    inputs, _, ids = batch(args, 0, documents)
    with torch.no_grad():
        grouped = model(inputs, document_ids=ids)
        monkeypatch.setattr(llama.model, "gqa_needs_expanded_kv", lambda *a, **k: True)
        expanded = model(inputs, document_ids=ids)
    assert (grouped - expanded).abs().max().item() <= TOL


def test_the_kv_index_is_built_once_per_device():
    layer = Transformer(UNEVEN).init_weights(seed=0).layers[0].attention
    first = layer.kv_index(torch.device("cpu"))
    assert layer.kv_index("cpu") is first


# ---------------------------------------------------------------- dtypes


def test_dtype_defaults_bf16_on_cuda_and_fp32_on_cpu():
    assert parse_args([]).dtype is None  # resolved by device in train()
    assert default_dtype(torch.device("cuda", 0)) == "bf16"
    assert default_dtype(torch.device("cpu")) == "fp32"


def test_generate_takes_train_spellings_and_the_old_torch_names():
    common = ["--preset", "debug", "--tokenizer", "bytes", "--prompt", "x"]
    for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16), ("float32", torch.float32),
                        ("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        assert DTYPES[generate_args([*common, "--dtype", name]).dtype] == dtype
    assert generate_args(common).dtype is None  # bf16 on CUDA, fp32 on CPU


# ---------------------------------------------------------------- last-position logits


def _last_only(mesh_size: int) -> float:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (mesh_size,), mesh_dim_names=("tp",)) if mesh_size > 1 else None
    model = Transformer(UNEVEN, mesh).init_weights(seed=2)
    inputs, _, _ = batch(UNEVEN, 3, False)

    def full(logits):
        return logits.full_tensor() if mesh is not None else logits

    with torch.no_grad():
        every = full(model(inputs))
        last = full(model(inputs, last_only=True))
    assert last.shape == (2, 1, UNEVEN.vocab_size)
    return (last - every[:, -1:]).abs().max().item()


def test_last_only_logits_equal_the_last_row_one_device_and_tp():
    assert _last_only(1) <= TOL
    assert all(diff <= TOL for diff in run_on_ranks(_last_only, 2, 2))


def test_prefill_computes_the_output_layer_for_the_last_position_only():
    model = Transformer(UNEVEN).init_weights(seed=2)
    rows = []
    model.output.register_forward_hook(lambda module, inputs, out: rows.append(inputs[0].shape[1]))
    generate(model, list(range(1, 12)), 3)
    assert rows == [1, 1, 1]  # prefill of 11 positions, then two decode steps


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_each_decoded_token_reads_one_id_and_builds_no_tensor(temperature):
    model = Transformer(UNEVEN).init_weights(seed=2)
    with HostReads() as reads:
        new = generate(model, list(range(1, 12)), 5, temperature=temperature, top_p=0.9, seed=1)
    chosen = [t for t in reads.tensors if t.dtype == torch.int64]  # the ids, read for streaming and stopping
    uniforms = [t for t in reads.tensors if t.dtype != torch.int64]  # sampling's draw, a CPU generator's
    assert len(chosen) == len(new) == 5
    assert len(uniforms) == (5 if temperature else 0) and all(t.device.type == "cpu" for t in uniforms)
    assert reads.ops[torch.ops.aten.lift_fresh] == 1  # torch.tensor(prompt) once; each token is written in place
    assert reads.ops[torch.ops.aten.fill_] == 4


# ---------------------------------------------------------------- token ids, once on the host


def test_token_cache_ids_are_checked_once_against_the_vocabulary(tmp_path):
    from llama.data.token_cache import load_token_cache
    from llama.tokenizer import load_tokenizer

    (tmp_path / "text.txt").write_text("plain ascii, then one byte above it: \u00ff")
    cache = load_token_cache([tmp_path / "text.txt"], load_tokenizer("bytes"), tmp_path / "cache", quiet=True)
    high = cache.max_token_id  # recorded when the cache was built: no scan at start-up
    assert high == int(np.asarray(cache.tokens).max())
    check_token_ids(high, high + 1, "the token cache")
    with pytest.raises(ValueError, match=rf"token cache holds token id {high} .* vocabulary is {high}.*--tokenizer.*--checkpoint"):
        check_token_ids(high, high, "the token cache")
