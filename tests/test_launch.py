"""scripts/slurm/train.sbatch, run by bash as Slurm would run it, on one machine.

A fake `srun` starts the script's per-node command once per node of the job (2 nodes,
with their SLURM_NODEID / SLURM_PROCID). Like slurmstepd with a step's cgroup, it delivers
the signals it receives to every process of the step, and kills what is left of the step
once its tasks have exited. When the batch script exits, the job ends and the test kills
whatever its steps still run, as Slurm would. A fake `scontrol` names every node
127.0.0.1 and records requeues. Each fake node's torchrun starts 2 CPU ranks (gloo), so
train.py sees 4 ranks: a 2 x 2 mesh. `--kill-on-bad-exit` is accepted, not emulated."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm" / "train.sbatch"
STEPS = 20  # more than a first run reaches before its USR1 is answered
RUN = ["--steps", STEPS, "--seq-len", 32, "--micro-batch", 1, "--warmup", 2, "--log-every", 1,
       "--save-every", 0, "--peak-tflops", 1]
LAUNCH_TIMEOUT_S = 150  # per launch; a launch takes about 20 s on 2 idle cores

FAKE_SRUN = '''#!{python}
"""srun on one machine: the command once per node of the job, one task per node. Like the
cgroup of a Slurm step, it keeps every process the tasks start (as a child subreaper,
orphans stay its descendants), signals them all, and kills those left when the tasks end."""
import ctypes, os, signal, subprocess, sys

PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
with open(os.environ["FAKE_SLURM_STEPS"], "a") as f:  # the job's steps, for the end of the job
    print(os.getpid(), file=f)
args = sys.argv[1:]
while args and args[0].startswith("-"):
    option = args.pop(0)
    if option not in ("--ntasks-per-node=1", "--kill-on-bad-exit=1") and not option.startswith("--cpus-per-task="):
        sys.exit(f"fake srun: cannot emulate {{option}}")
nodes = int(os.environ["SLURM_NNODES"])
tasks = [
    subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": str(n), "SLURM_PROCID": str(n), "SLURM_LOCALID": "0",
                                "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_NUM_TASKS": str(nodes)}})
    for n in range(nodes)
]


def step_processes():
    """Every descendant of this srun: what the step's cgroup holds."""
    children = {{}}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{{entry}}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z":  # an exited process, not yet reaped
            children.setdefault(int(ppid), []).append(int(entry))
    found, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def deliver(signum, frame, processes=None):
    for pid in processes or step_processes():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, deliver)
codes = [t.wait() for t in tasks]
leftovers = step_processes()
if leftovers:  # slurmstepd ends a step whose tasks have exited by killing what is left in it
    print(f"fake srun: the tasks have exited; killing {{len(leftovers)}} processes left in the step", file=sys.stderr)
    deliver(signal.SIGKILL, None, leftovers)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
sys.exit(max(code if code >= 0 else 128 - code for code in codes))  # srun: the highest code
'''

FAKE_SCONTROL = '''#!/bin/bash
# scontrol on one machine: every node of the job is this one; requeues are recorded.
case "$1 $2" in
    "show hostnames") for ((n = 0; n < SLURM_NNODES; n++)); do echo 127.0.0.1; done ;;
    "requeue $SLURM_JOB_ID") echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
    *) echo "fake scontrol: cannot emulate: $*" >&2; exit 1 ;;
esac
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_cluster(tmp_path: Path) -> dict:
    """The environment of a 2-node batch job whose srun and scontrol are the fakes above."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN.format(python=sys.executable)), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_", "TORCHELASTIC_"))}
    return {
        **env,
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "llama-train",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_CPUS_ON_NODE": "1",
        "GPUS_PER_NODE": "2",
        "RDZV_PORT": str(free_port()),
        "SAVE_DIR": str(tmp_path / "run"),
        "FAKE_SLURM_LOG": str(tmp_path / "scontrol.log"),
        "FAKE_SLURM_STEPS": str(tmp_path / "steps.pids"),
    }


def descendants(pid: int) -> list:
    """The live processes below `pid`."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, ppid = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


def end_job(env: dict) -> int:
    """The batch script has exited, so the job ends: Slurm kills what its steps still run.
    Returns how many processes that was (none, when the script waited for its steps)."""
    steps = Path(env["FAKE_SLURM_STEPS"])
    pids = [int(pid) for pid in steps.read_text().split()] if steps.is_file() else []
    steps.unlink(missing_ok=True)
    killed = 0
    for srun in pids:
        try:
            if b"srun" not in Path(f"/proc/{srun}/cmdline").read_bytes():
                continue  # that srun has exited (and its pid been reused)
        except OSError:
            continue
        for pid in [*descendants(srun), srun]:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def launch(env: dict, args: list, usr1_after: str = None) -> tuple:
    """bash train.sbatch ARGS as a batch job; with `usr1_after`, the batch shell gets USR1
    (Slurm's --signal=B:USR1) once a line of the job's output matches it.
    -> (exit code, output, processes its steps still ran when the script exited)"""
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if usr1_after and re.search(usr1_after, line) and not any("USR1" in seen for seen in lines):
                os.kill(proc.pid, signal.SIGUSR1)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        code = None
    stragglers = end_job(env)
    reader.join(timeout=10)
    return code, "".join(lines), stragglers


def excerpt(out: str, lines: int = 30) -> str:
    """The job's output without torchrun's logging and tracebacks, for failure messages."""
    noise = (" ", "W1", "E1", "I1", "Traceback", "torch.distributed", "=", "-", "[", "train.py FAILED", "Failures:", "Root Cause")
    return "\n".join([line for line in out.splitlines() if not line.startswith(noise)][-lines:])


def test_usr1_before_the_time_limit_saves_requeues_and_the_requeued_job_resumes(tmp_path):
    data = tmp_path / "corpus.txt"
    sources = sorted((Path(torch.__file__).parent / "nn" / "modules").glob("*.py"))[:4]
    data.write_text("\n\n".join(f.read_text() for f in sources)[:40_000])
    env = fake_cluster(tmp_path)
    args = ["--data", data, "--cache-dir", tmp_path / "cache", *RUN]
    requeues = tmp_path / "scontrol.log"

    # the first run: USR1 once step 1 has been logged
    code, out, stragglers = launch(env, args, usr1_after=r"^step\s+1 \|")
    assert stragglers == 0, f"the batch script exited while {stragglers} processes of its step still ran"
    assert code != 0, f"the run finished before its USR1 was answered:\n{excerpt(out)}"
    assert "mesh dp 2 x tp 2" in out, excerpt(out)  # one mesh over the 4 ranks of both nodes
    preempted = re.search(r"preempted at step (\d+): checkpoint saved to (\S+)", out)
    assert preempted, excerpt(out)
    step = int(preempted.group(1))
    assert 1 <= step < STEPS
    assert (tmp_path / "run" / f"step_{step:08d}" / "trainer.json").is_file()
    assert requeues.read_text() == "requeue 4242\n"

    # the requeued job: the same script and arguments, one restart later
    code, out, stragglers = launch({**env, "SLURM_RESTART_COUNT": "1"}, args)
    assert code == 0 and stragglers == 0, excerpt(out)
    assert re.search(rf"resumed from \S*step_{step:08d} at step {step}\b", out), excerpt(out)
    assert "mesh dp 2 x tp 2" in out
    assert (tmp_path / "run" / f"step_{STEPS:08d}" / "trainer.json").is_file()
    assert requeues.read_text() == "requeue 4242\n"  # a finished job is not requeued
