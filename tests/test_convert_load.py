"""Converted checkpoints load on any mesh: load_model without a mesh, at tp 2 and at tp 4
computes Meta's reference logits, and each rank reads the bytes of its own shards, in the
calls the shards' shapes predict. Fixtures: tests/convert_fixtures.py."""

import os

import pytest
import torch

from parallel.spawn import run_on_ranks
from tests.convert_fixtures import ARGS, TIED, TOL, Fixtures, convert


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return Fixtures(tmp_path_factory.mktemp("sources"))


def _load_worker(cases, tokens):
    """Meta's reference vs load_model without a mesh, at tp 2 (a (2, 2) mesh's tp dim) and
    tp 4, for each converted checkpoint; plus the bytes each rank reads at tp 4."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import llama.weights.safetensors_io as safetensors_io
    from llama import load_model
    from parallel.layers import local_tensor
    from tests.reference import meta_reference_model

    world = dist.get_world_size()
    meshes = {2: init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))["tp"],
              4: init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))}
    results = {}
    for name, (path, args, weights) in cases.items():
        with torch.inference_mode():
            reference = meta_reference_model(args, weights, max_batch_size=tokens.shape[0]).forward(tokens, 0)
        with torch.no_grad():
            diffs = {"tp1": (load_model(path)(tokens) - reference).abs().max().item()}
            for tp, mesh in meshes.items():
                diffs[f"tp{tp}"] = (load_model(path, tp_mesh=mesh)(tokens).full_tensor() - reference).abs().max().item()
        results[name] = diffs

    reads, real_preadv = [], os.preadv
    def counting_preadv(fd, buffers, offset):
        n = real_preadv(fd, buffers, offset)
        reads.append(n)
        return n

    # per run: exactly the shard, one read per row of a column shard; in bands (the
    # default): a column shard's whole rows from its first run to its last, in one read
    results["bytes"] = {}
    for mode, max_hole in (("per run", 0), ("bands", safetensors_io.MAX_HOLE_BYTES)):
        reads.clear()
        safetensors_io.os.preadv, saved = counting_preadv, safetensors_io.MAX_HOLE_BYTES
        safetensors_io.MAX_HOLE_BYTES = max_hole
        try:
            model = load_model(cases["hf"][0], tp_mesh=meshes[4])
        finally:
            safetensors_io.os.preadv, safetensors_io.MAX_HOLE_BYTES = real_preadv, saved
        results["bytes"][mode] = (sum(reads), len(reads), _expected_reads(model, mode))
    return results


def _expected_reads(model, mode):
    """(bytes, calls) of loading an fp32 model's shards, from the shards' shapes alone."""
    from parallel.layers import local_tensor

    nbytes = calls = 0
    for p in model.parameters():
        local = local_tensor(p)
        columns = p.dim() == 2 and local.shape[1] != p.shape[1]
        if columns and mode == "bands":
            nbytes, calls = nbytes + ((local.shape[0] - 1) * p.shape[1] + local.shape[1]) * 4, calls + 1
        else:
            nbytes, calls = nbytes + local.numel() * 4, calls + (local.shape[0] if columns else 1)
    return nbytes, calls


def test_converted_checkpoints_load_on_any_mesh_like_meta_reference(fx, tmp_path):
    cases = {}
    for name, src, args, weights in [
        ("hf", fx.hf, ARGS, fx.hf_weights),
        ("hf_tied_bf16", fx.hf_tied, TIED, {k: v.float() for k, v in fx.tied_weights.items()}),
        ("meta2", fx.meta2, ARGS, fx.meta_weights),
        ("meta4_kv_repeated", fx.meta4, TIED, fx.meta4_weights),
    ]:
        assert convert(src, tmp_path / name) == 0
        cases[name] = (str(tmp_path / name), args, weights)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    results = run_on_ranks(_load_worker, 4, cases, tokens)
    for rank_results in results:
        for mode, (read, calls, expected) in rank_results.pop("bytes").items():
            assert (read, calls) == expected, f"{mode}: a rank read {read} bytes in {calls} calls, not {expected}"
        for name, diffs in rank_results.items():
            assert max(diffs.values()) <= TOL, (name, diffs)
