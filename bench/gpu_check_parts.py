"""The parts of bench/gpu_check.py that check train.py's step and train.py itself, and the
helpers that every part shares; the collectives and flex attention parts are in
gpu_check_attention.py, the runner, the budgets and the table in gpu_check.py. Every part
takes (opts, ctx) and returns a dict of results; a non-empty "failures" list in it marks
the part failed (its numbers are still reported)."""

import contextlib
import gc
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from llama import ModelArgs
from llama.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
NEEDS_CUDA = "skipped: needs CUDA"
# tied like 3.2-1B; a vocabulary of 512 holds train.py's byte tokenizer (264 ids)
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256,
                 tie_word_embeddings=True)

# ---- tolerances (explicit, per comparison)
# train.py's first logged loss of a random init: ln(vocab) plus the spread of random
# logits (0.02 std weights: ~0.4 nats at dim 2048)
FIRST_LOSS_TOL = 1.5


# ---------------------------------------------------------------- shared helpers


def model_args(opts) -> ModelArgs:
    args = TINY if opts.tiny else PRESETS["3.2-1b"]
    return replace(args, max_seq_len=max(args.max_seq_len, opts.seq_len))


def init_one_rank(device: str) -> None:
    """A one-rank process group (the meshes want one), from a file store so that nothing
    needs a free port: nccl on CUDA, gloo on CPU."""
    if dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(0)
    global STORE_PATH
    STORE_PATH = tempfile.mktemp(prefix="gpu_check_store_")
    store = dist.FileStore(STORE_PATH, 1)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=0, world_size=1)


STORE_PATH = None


def close_one_rank() -> None:
    """Ends the one-rank group and removes its store file (torch 2.11 leaves it behind)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if STORE_PATH and os.path.exists(STORE_PATH):
        os.remove(STORE_PATH)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions in full fp32 (TF32 off) for a reference, then the
    settings as they were (train.py's TF32 on CUDA), so the parts after it see those."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])  # sets matmul.allow_tf32 too; then the saved flags
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def tf32_settings() -> dict:
    return {"matmul_precision": torch.get_float32_matmul_precision(),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


def worst(values) -> float:
    """The largest, or NaN where any is (max() of floats with a NaN depends on their order)."""
    values = list(values)
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def difference(a: torch.Tensor, ref: torch.Tensor) -> dict:
    a, ref = a.detach().double(), ref.detach().double()
    return {"max_abs": (a - ref).abs().max().item(),
            "rel": (torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref).clamp(min=1e-30)).item()}


# ---------------------------------------------------------------- train.py's data, checkpoint and step


def work_dir(opts, ctx) -> Path:
    """A temporary directory with a small generated text corpus (one file per document,
    as llama.data reads text), shared by the parts; removed at the end. On CUDA it holds
    the 1B checkpoint and train.py's final save (model and AdamW state): /dev/shm when it
    has room (RAM speed), else the temp directory."""
    if "work" in ctx:
        return ctx["work"]
    args = model_args(opts)
    need = args.num_params() * (2 + 12) * 1.2  # bf16 checkpoint + fp32 params and two AdamW moments
    shm = Path("/dev/shm")
    base = shm if opts.device == "cuda" and shm.is_dir() and shutil.disk_usage(shm).free > need else None
    work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=base))
    if shutil.disk_usage(work).free < need:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"{work.parent} has {shutil.disk_usage(work.parent).free / 2**30:.1f} GiB free; "
                           f"the checkpoint and train.py's save need {need / 2**30:.1f}: set TMPDIR to a disk with room")
    ctx["work"] = work
    data = work / "data"
    data.mkdir()
    rng = random.Random(0)
    words = "the of and to in is that for it as with was on be by this are from at or an which model attention".split()
    # documents of ~seq_len / 10 to ~seq_len bytes (byte tokens): most windows pack several
    # and cut one; four times the tokens that the steps read
    tokens_needed = 4 * (opts.steps + 2) * opts.micro_batch * (opts.seq_len + 1)
    written, n = 0, 0
    while written < tokens_needed:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(max(2, opts.seq_len // 40), opts.seq_len // 4)))
        (data / f"doc{n:05d}.txt").write_text(text)
        written, n = written + len(text), n + 1
    return work


def remove_work_dir(ctx) -> None:
    work = ctx.pop("work", None)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)


def train_py_options(opts, ctx):
    """train.py's own flags and defaults for this device, on the generated corpus; --tp 1
    for this one process (train.py's default is the GPUs of the node)."""
    from llama.training.build import default_dtype
    from llama.training.flags import parse_args

    argv = ["--data", str(work_dir(opts, ctx) / "data"), "--seq-len", str(opts.seq_len),
            "--micro-batch", str(opts.micro_batch), "--tp", "1"]
    t_opts = parse_args(argv)
    t_opts.dtype = t_opts.dtype or default_dtype(torch.device(opts.device))
    return t_opts


def build_train_py_step(opts, ctx, compile=False) -> dict:
    """train.py's trainee, optimizer and loader (its own functions) on a 1-rank mesh, from
    random init; compile: False, or a torch.compile backend for every block (--compile)."""
    from llama.tokenizer import load_tokenizer
    from llama.training.build import build_trainee
    from llama.training.inputs import batch_layout, build_data
    from llama.training.optim import build_optimizer
    from parallel.mesh import build_mesh

    init_one_rank(opts.device)
    t_opts = train_py_options(opts, ctx)
    t_opts.compile = True if compile == "inductor" else compile  # train.py's --compile is inductor
    mesh = build_mesh(tp=1, device=opts.device)
    args = model_args(opts)
    global_batch = batch_layout(t_opts, args, 1)
    data = build_data(t_opts, load_tokenizer(t_opts.tokenizer), mesh, global_batch, args.vocab_size)
    trainee = build_trainee(args, mesh, t_opts, init=True)
    optimizer = build_optimizer(trainee.model, t_opts, torch.device(opts.device))
    return {"trainee": trainee, "optimizer": optimizer, "loader": data.loader, "opts": t_opts}


def run_train_step(step: dict, device: str) -> tuple:
    """One optimizer step through train.py's train_step: ({"loss": ...}, grad norm, skipped) tensors."""
    from llama.training.step import train_step

    return train_step(step["trainee"], step["optimizer"], step["loader"], torch.device(device), step["opts"].clip)


def default_train_py_step(opts, ctx) -> dict:
    """train.py's default path (no --compile), built once for the parts that share it."""
    if "default_step" not in ctx:
        ctx["default_step"] = build_train_py_step(opts, ctx)
    return ctx["default_step"]


def timed_train_steps(opts, step: dict, warmup: int = 2) -> dict:
    from parallel.devices import peak_tflops

    args = model_args(opts)
    for _ in range(warmup):
        run_train_step(step, opts.device)
    synchronize(opts.device)
    start = time.perf_counter()
    for _ in range(opts.steps):
        shares, grad_norm, skipped = run_train_step(step, opts.device)
    synchronize(opts.device)
    seconds = (time.perf_counter() - start) / opts.steps
    tokens_per_s = opts.micro_batch * opts.seq_len / seconds
    peak = peak_tflops(device_name(opts.device), step["opts"].dtype) if opts.device == "cuda" else None
    achieved = tokens_per_s * args.training_flops_per_token(opts.seq_len) / 1e12
    result = {"step_s": seconds, "tokens_per_s": tokens_per_s, "tflops": achieved, "peak_tflops": peak,
              "mfu": None if peak is None else achieved / peak, "loss": shares["loss"].item(), "grad_norm": grad_norm.item(),
              "dtype": step["opts"].dtype}
    result["failures"] = [] if math.isfinite(result["loss"]) and not skipped.item() else [f"loss {result['loss']}"]
    return result


def check_compile(opts, ctx) -> dict:
    """train.py's step with --compile (every block torch.compile'd, flex inside them)."""
    ctx.pop("default_step", None)
    free_memory(opts.device)
    if opts.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step = build_train_py_step(opts, ctx, compile=opts.compile_backend)
    result = timed_train_steps(opts, step)
    result["backend"] = opts.compile_backend
    result["with_warmup_s"] = time.perf_counter() - start
    if opts.device == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def kernel_kind(names) -> str:
    """The attention kernel among profiled op and kernel names: cudnn, flash, efficient,
    flex or math. Inductor names its template kernels triton_tem_*; without max-autotune
    (train.py's) flex attention is the only template."""
    text = " ".join(names).lower()
    for kind, marks in [
        ("cudnn", ("cudnn_attention", "cudnn_generated_fort_native_sdpa", "sdpa_cudnn")),
        ("flash", ("flash",)),
        ("efficient", ("efficient_attention", "fmha_cutlass", "mem_efficient")),
        ("flex", ("flex_attention", "flexattention", "triton_tem_")),
        ("math", ("_scaled_dot_product_attention_math", "math")),
    ]:
        if any(m in text for m in marks):
            return kind
    return "none found"


def profiled_attention(device: str, work) -> tuple:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        work()
        synchronize(device)
    marks = ("attention", "flash", "fmha", "sdpa", "cudnn", "flex", "triton_tem_")
    names = sorted({e.name for e in prof.events() if any(m in e.name.lower() for m in marks)})
    return kernel_kind(names), names[:8]


def check_kernels(opts, ctx) -> dict:
    """The attention kernels train.py's step runs (document-masked: flex on CUDA, SDPA with
    a dense mask on CPU) and the plain causal path (--no-document-masking, decoding)."""
    from parallel.losses import vocab_parallel_cross_entropy

    step = default_train_py_step(opts, ctx)
    kind, names = profiled_attention(opts.device, lambda: run_train_step(step, opts.device))
    model = step["trainee"].model
    tokens = torch.randint(0, 256, (1, opts.seq_len + 1), generator=torch.Generator().manual_seed(0)).to(opts.device)

    def causal_step():
        vocab_parallel_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).backward()

    causal_kind, causal_names = profiled_attention(opts.device, causal_step)
    step["optimizer"].zero_grad(set_to_none=True)
    return {"kernel": kind, "names": names, "causal_kernel": causal_kind, "causal_names": causal_names}


def check_sync(opts, ctx) -> dict:
    """train.py's step (its train_step, optimizer and loader) under
    torch.cuda.set_sync_debug_mode("error"): a step that does not log must not wait."""
    if opts.device != "cuda":
        ctx.pop("default_step", None)  # its last user
        return {"status": NEEDS_CUDA}
    step = default_train_py_step(opts, ctx)
    run_train_step(step, opts.device)  # first-step work (optimizer state) may sync; the steady state must not
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_train_step(step, opts.device)
        return {"status": "pass: no host-device sync in train.py's step"}
    except RuntimeError as err:
        return {"status": "fail", "first_sync": str(err).strip().splitlines()[0][:200],
                "where": "".join(traceback.format_tb(err.__traceback__)[-3:])[-600:],
                "failures": ["a host-device sync in train.py's step"]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
        ctx.pop("default_step", None)  # a step interrupted halfway: not reused


# ---------------------------------------------------------------- train.py itself, under torchrun


def write_random_checkpoint(args: ModelArgs, out: Path, device: str) -> Path:
    """A random-init checkpoint in the project's format (llama.weights.format.save_checkpoint):
    bf16 on CUDA, drawn on the device (1.2B values drawn on the host take many seconds)."""
    from llama.weights.format import save_checkpoint
    from llama.weights.names import expected_shapes

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(0)
    state = {}
    for name, shape in expected_shapes(args).items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=dtype)
        else:
            state[name] = torch.randn(shape, generator=gen, device=device).mul_(0.02).to(dtype).cpu()
    return save_checkpoint(state, args, out)


def metrics_rows(path: Path) -> list:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]  # training rows; validation rows carry val_loss only


def check_train_py(opts, ctx) -> dict:
    """train.py itself, one process under torchrun, with its defaults for this device
    (CUDA: bf16, document masking with flex attention, fused AdamW; CPU: fp32, SDPA with a
    dense mask), from a random checkpoint on the generated corpus."""
    from parallel.devices import peak_tflops

    args, device = model_args(opts), opts.device
    ctx.pop("default_step", None)  # left by --parts without sync: its GPU memory is train.py's now
    free_memory(device)
    work = work_dir(opts, ctx)
    start = time.perf_counter()
    checkpoint = write_random_checkpoint(args, work / "checkpoint", device)
    free_memory(device)
    checkpoint_s = time.perf_counter() - start
    save_dir = work / "run"
    steps = opts.steps + 2  # the first two (compile, optimizer state) are not timed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(ROOT / "train.py"),
           "--checkpoint", str(checkpoint), "--data", str(work / "data"), "--seq-len", str(opts.seq_len),
           "--micro-batch", str(opts.micro_batch), "--steps", str(steps), "--log-every", "1", "--save-dir", str(save_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    log = work / "train_py.log"
    timeout = max(1.0, ctx["part_deadline"] - time.monotonic() - 5)  # stopped before the part's clock
    start = time.perf_counter()
    with log.open("w") as out:
        # its own session, so that torchrun and its worker are stopped together
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    wall = time.perf_counter() - start
    rows = metrics_rows(save_dir / "metrics.jsonl")
    config = tomllib.loads((save_dir / "config.toml").read_text()) if (save_dir / "config.toml").is_file() else {}
    expected_dtype = "bf16" if device == "cuda" else "fp32"
    failures = []
    if returncode is None:
        failures.append(f"train.py ran past the part's {timeout:.0f} s")
    elif returncode != 0:
        failures.append(f"train.py exited with {returncode}")
    if len(rows) != steps:
        failures.append(f"metrics.jsonl has {len(rows)} training rows, not {steps}")
    losses = [r["loss"] for r in rows]
    if not all(math.isfinite(x) for x in losses):
        failures.append(f"non-finite loss: {losses}")
    ln_vocab = math.log(args.vocab_size)
    if losses and not abs(losses[0] - ln_vocab) <= FIRST_LOSS_TOL:
        failures.append(f"first loss {losses[0]:.3f} is not within {FIRST_LOSS_TOL} of ln(vocab) {ln_vocab:.3f}")
    if config and (config.get("dtype") != expected_dtype or not config.get("document-masking")):
        failures.append(f"train.py ran dtype {config.get('dtype')}, document-masking {config.get('document-masking')}")
    saved = sorted(p.name for p in save_dir.glob("step_*")) if save_dir.is_dir() else []
    if returncode == 0 and not saved:
        failures.append(f"train.py wrote no checkpoint to {save_dir} at its last step")
    steady = rows[2:] or rows
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady) if steady else None
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    peak = peak_tflops(device_name(device), expected_dtype) if device == "cuda" else None
    result = {
        "returncode": returncode, "steps": len(rows), "losses": losses, "ln_vocab": ln_vocab,
        "tokens_per_s": tokens_per_s, "mfu": statistics.median(mfu) if mfu else None,
        # the same FLOPs (ModelArgs.training_flops_per_token) over the device table's peak
        "mfu_recomputed": None if peak is None or tokens_per_s is None
        else tokens_per_s * args.training_flops_per_token(opts.seq_len) / (peak * 1e12),
        "memory_gib": max((r["memory_gb"] for r in rows), default=None),
        "dtype": config.get("dtype"), "document_masking": config.get("document-masking"),
        "checkpoint_s": checkpoint_s, "wall_s": wall,
        "saved": saved, "failures": failures,
    }
    planned = ctx.get("plan", {}).get("allocated_bytes")
    if device == "cuda" and planned and result["memory_gib"]:
        result["planned_allocated_gib"] = planned / 2**30
        result["measured_over_planned"] = result["memory_gib"] * 2**30 / planned
    if failures:
        result["log_tail"] = log.read_text()[-2000:]
    shutil.rmtree(save_dir, ignore_errors=True)  # train.py's final save: 15 GB at 1B
    shutil.rmtree(checkpoint, ignore_errors=True)
    return result
