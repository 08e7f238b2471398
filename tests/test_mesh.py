"""The ("dp", "tp") / ("dp_replicate", "dp_shard", "tp") mesh: shapes, defaults from
torchrun's environment, and one clear error for a world that does not fit. Mesh layouts
on real ranks are checked in test_fsdp.py's launch; here a fake process group stands in."""

import os

import pytest
import torch.distributed as dist

import parallel.mesh as mesh_mod
from parallel.mesh import (
    batch_mesh, build_mesh, cp_mesh, default_tp, dp_cp_mesh, dp_mesh, dp_size, is_hybrid, mesh_shape, pp_mesh, tp_mesh)
from parallel.plan.fake_world import init_fake_world


def one_line_error(fn, *fragments):
    with pytest.raises(ValueError) as error:
        fn()
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_mesh_shape_is_dp_by_tp_or_replicate_by_shard_by_tp():
    assert mesh_shape(16, 8) == {"dp": 2, "tp": 8}
    assert mesh_shape(128, 8, dp_replicate=4) == {"dp_replicate": 4, "dp_shard": 4, "tp": 8}
    assert mesh_shape(4, 2, hybrid=True) == {"dp_replicate": 1, "dp_shard": 2, "tp": 2}
    assert mesh_shape(4, 4) == {"dp": 1, "tp": 4}


def test_4d_mesh_is_pp_dp_cp_tp_and_size_one_dims_leave_no_trace():
    assert mesh_shape(64, 8, cp=2, pp=2) == {"pp": 2, "dp": 2, "cp": 2, "tp": 8}
    assert list(mesh_shape(64, 4, dp_replicate=2, cp=2, pp=2)) == ["pp", "dp_replicate", "dp_shard", "cp", "tp"]
    assert mesh_shape(16, 8, cp=1, pp=1) == mesh_shape(16, 8) == {"dp": 2, "tp": 8}  # a 2-D run stays 2-D
    one_line_error(lambda: mesh_shape(12, 2, cp=4), "--pp 1 x --cp 4 x --tp 2 = 8 must divide the world size 12")
    one_line_error(lambda: mesh_shape(8, 2, pp=0), "--pp 0 must be 1 or more")


def test_world_that_does_not_fit_gets_one_line_naming_the_flag():
    one_line_error(lambda: mesh_shape(12, 8), "--tp 8 must divide the world size 12")
    one_line_error(lambda: mesh_shape(16, 0), "--tp 0")
    one_line_error(lambda: mesh_shape(16, 4, dp_replicate=3), "--dp-replicate 3 must divide the data-parallel size 4")
    one_line_error(lambda: mesh_shape(16, 4, dp_replicate=2, hybrid=False), "--dp-replicate 2", "hybrid")


def test_default_tp_is_the_gpus_of_one_node(monkeypatch):
    monkeypatch.setattr(mesh_mod, "device_type", lambda: "cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_tp() == 8
    monkeypatch.setattr(mesh_mod, "device_type", lambda: "cpu")
    # train.py's default on CPU too: 4 processes make the 2x2 demo mesh
    assert (default_tp(1), default_tp(3), default_tp(4)) == (1, 1, 2)


@pytest.fixture
def fake_world():
    def start(size):
        init_fake_world(size)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def test_build_mesh_names_dims_and_flattens_hybrid_dp(fake_world):
    fake_world(16)
    mesh = build_mesh(4, device="cpu")
    assert mesh.mesh_dim_names == ("dp", "tp") and not is_hybrid(mesh)
    assert dp_size(mesh) == 4 and tp_mesh(mesh).size() == 4
    hybrid = build_mesh(4, dp_replicate=2, device="cpu")
    assert hybrid.mesh_dim_names == ("dp_replicate", "dp_shard", "tp") and is_hybrid(hybrid)
    assert dp_mesh(hybrid).size() == 4 and dp_mesh(hybrid).mesh_dim_names == ("dp",)
    assert tp_mesh(build_mesh(1, device="cpu")) is None  # tp 1: plain parameters, no size-1 collectives


def test_build_mesh_4d_groups_cp_with_dp_for_fsdp_and_pp_with_both_for_the_loss(fake_world):
    # pp 2, dp 3, cp 4, tp 5: every dimension a different size, so a group built over the
    # wrong dimensions (cp swapped with tp, or pp with dp) has the wrong size and ranks
    fake_world(120)
    mesh = build_mesh(5, device="cpu", cp=4, pp=2)
    assert mesh.mesh_dim_names == ("pp", "dp", "cp", "tp") and dp_size(mesh) == 3

    def ranks(group):  # this rank's (rank 0's) group, in mesh order
        return group.mesh.flatten().tolist()

    # row-major over (pp 2, dp 3, cp 4, tp 5): a step of 1 along tp, 5 along cp, 20 along dp, 60 along pp
    assert ranks(tp_mesh(mesh)) == [0, 1, 2, 3, 4]
    assert ranks(cp_mesh(mesh)) == [0, 5, 10, 15]
    assert ranks(dp_mesh(mesh)) == [0, 20, 40]
    assert ranks(pp_mesh(mesh)) == [0, 60]
    assert ranks(dp_cp_mesh(mesh)) == list(range(0, 60, 5))  # FSDP shards over dp x cp: 12 ranks of stage 0
    assert ranks(batch_mesh(mesh)) == list(range(0, 120, 5))  # every rank of tp position 0 holds part of the loss
    flat = build_mesh(2, device="cpu")
    assert cp_mesh(flat) is None and pp_mesh(flat) is None and batch_mesh(flat) == dp_mesh(flat) == dp_cp_mesh(flat) == flat["dp"]


def test_build_mesh_checks_the_world_size(fake_world):
    fake_world(8)
    one_line_error(lambda: build_mesh(2, world_size=16, device="cpu"), "world size 16", "8 ranks")
    one_line_error(lambda: build_mesh(3, device="cpu"), "--tp 3 must divide the world size 8")


# Two gloo ranks leave collectives in flight on a group that outlives destroy_process_group
# (as a DeviceMesh's groups do), so gloo's threads drop those tensors while the process ends.
# With sys.exit in place of exit_without_teardown, 4 runs of 4 aborted.
_EXIT_WHILE_GLOO_HOLDS_TENSORS = """
import torch, torch.distributed as dist
from parallel.mesh import exit_without_teardown
dist.init_process_group("gloo")
group = dist.new_group(backend="gloo")
for _ in range(50):
    dist.all_reduce(torch.ones(1 << 14), group=group, async_op=True)
dist.destroy_process_group()
print("done")  # unflushed: exit_without_teardown must flush it
exit_without_teardown(0)
"""


def test_a_finished_worker_exits_0_while_gloo_threads_still_hold_its_tensors(tmp_path):
    """train.py's exit: no abort ("terminate called without an active exception") when a
    gloo thread lets go of a collective's tensors as the process ends, and what was
    printed before is not lost."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "exit.py"
    script.write_text(_EXIT_WHILE_GLOO_HOLDS_TENSORS)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", "localhost:0", str(script)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "terminate called" not in result.stderr
    assert result.stdout.count("done") == 2, result.stdout
