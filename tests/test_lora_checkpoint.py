"""A LoRA run's checkpoint at the tests' smallest size: under a quarter of a full one on any
mesh, because small tensors are stored whole (llama.training.checkpoint.WHOLE_BELOW) and not
as one torch.save archive per shard; it still loads on another mesh.

In-process on 2 gloo ranks (FSDP over dp 2, where the shards multiply), the run's own
Checkpointer and AdamW. fp32."""

from pathlib import Path

import torch

from llama import Transformer
from llama.weights.format import save_checkpoint
from parallel.spawn import run_on_ranks
from tests.test_train import TINY

RANK = 4  # test_lora_resume's --lora-rank, every projection adapted


def _state(model, optimizer) -> dict:
    """Every adapter and its AdamW state, whole, by name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    out = {name: value.full_tensor().clone() for name, value in model_state.items() if name.endswith(("lora_a", "lora_b"))}
    for name, state in optim_state["state"].items():
        out.update({f"{name}.{key}": getattr(value, "full_tensor", lambda v=value: v)().clone()
                    for key, value in state.items()})
    return out


def _save_lora_and_full_then_load_on_tp2(base: str, root: str) -> dict:
    from llama.lora import LoRAConfig
    from llama.training.checkpoint import Checkpointer, base_record, load_checkpoint
    from llama.training.flags import parse_args
    from llama.training.optim import build_optimizer
    from parallel.control import control_group
    from parallel.fsdp import build_parallel_model
    from parallel.layers import sum_adapter_gradients
    from parallel.mesh import build_mesh

    control_group()
    opts = parse_args(["--checkpoint", base, "--lora-rank", str(RANK), "--tp", "1"])
    lora = LoRAConfig.from_options(opts)
    tokens = torch.randint(0, TINY.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    saved = None
    for kind, config in (("lora", lora), ("full", None)):
        model = build_parallel_model(base, build_mesh(tp=1), lora=config)
        optimizer = build_optimizer(model, opts, "cpu")
        model(tokens[:, :-1]).float().square().mean().backward()
        sum_adapter_gradients(model)
        optimizer.step()
        optimizer.zero_grad()
        checkpoints = Checkpointer(Path(root) / kind, keep=1, base=base_record(opts) if config else None)
        checkpoints.save(1, model, optimizer, {"data": {}, "args": vars(opts) if config else {}})
        checkpoints.close()
        if config is not None:
            saved = _state(model, optimizer)
    # the whole tensors reshard: onto tp 2, where B of a column layer is split and A of a row one
    model = build_parallel_model(base, build_mesh(tp=2), lora=lora)
    optimizer = build_optimizer(model, opts, "cpu")
    load_checkpoint(Path(root) / "lora" / "step_00000001", model, optimizer)
    loaded = _state(model, optimizer)
    return {"same_keys": loaded.keys() == saved.keys(), "keys": len(saved),
            "worst": max((loaded[k] - saved[k]).abs().max().item() for k in saved)}


def test_a_lora_checkpoint_of_the_tiny_model_is_under_a_quarter_of_a_full_one_and_loads_on_another_mesh(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    base = save_checkpoint(Transformer(TINY).init_weights(seed=5).state_dict(), TINY, tmp_path / "base")
    results = run_on_ranks(_save_lora_and_full_then_load_on_tp2, 2, str(base), str(tmp_path))
    step = {kind: tmp_path / kind / "step_00000001" for kind in ("lora", "full")}
    size = {kind: sum(f.stat().st_size for f in path.iterdir()) for kind, path in step.items()}
    assert size["lora"] < 0.25 * size["full"], f"LoRA checkpoint {size['lora']} B, full {size['full']} B"
    # why: each of the LoRA checkpoint's tensors is one stored chunk, written once, as on one device
    metadata = FileSystemReader(str(step["lora"])).read_metadata()
    chunks = [len(entry.chunks) for entry in metadata.state_dict_metadata.values() if hasattr(entry, "chunks")]
    assert len(chunks) == 4 * 2 * 7 * TINY.n_layers  # A and B of 7 projections: weight, exp_avg, exp_avg_sq, step
    assert set(chunks) == {1}
    assert len(metadata.storage_data) == len(metadata.state_dict_metadata)
    for result in results:
        assert result["same_keys"] and result["keys"] == 4 * 2 * 7 * TINY.n_layers
        assert result["worst"] == 0.0, f"adapters or AdamW state differ by {result['worst']:.3g} after loading on tp 2"
