"""Training curves of one or several train.py runs, from their metrics.jsonl, as one PNG.

    python -m llama.plot runs/default -o curves.png
    python -m llama.plot runs/a runs/b --smooth 5 --title "lr sweep"

Three panels against the optimizer step: loss (train solid, validation dashed with
markers, in the run's colour), learning rate, and tokens/s. The legend names each run
by its directory, with as many parent directories as it takes to tell equal names
apart. Needs matplotlib: pip install -e '.[plot]'.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from llama.training.metrics import read_metrics

METRICS_FILE = "metrics.jsonl"  # what train.py writes into --save-dir
INSTALL_HINT = "pip install -e '.[plot]'"


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that carry key, sorted by step. A run resumed from an
    older checkpoint may log a step twice: the later row wins."""
    by_step = {row["step"]: row[key] for row in rows if row.get(key) is not None}
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    out = []
    for i in range(len(values)):
        recent = values[max(0, i - window + 1): i + 1]
        out.append(sum(recent) / len(recent))
    return out


def run_names(dirs: Sequence) -> list[str]:
    """Each run's directory name, widened by parent directories until no other run shares it:
    a/x, b/x, c/y -> a/x, b/x, y."""
    paths = [Path(d).resolve() for d in dirs]
    names = []
    for path in paths:
        depth = 1
        while depth < len(path.parts) and sum(other.parts[-depth:] == path.parts[-depth:] for other in paths) > 1:
            depth += 1
        names.append(Path(*path.parts[-depth:]).as_posix())
    return names


def metrics_path(save_dir) -> Path:
    save_dir = Path(save_dir)
    path = save_dir if save_dir.is_file() else save_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a train.py --save-dir, the directory that holds {METRICS_FILE}")
    return path


def _matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"python -m llama.plot needs matplotlib: {INSTALL_HINT}") from e
    return matplotlib


def build_figure(runs: dict[str, list[dict]], title: Optional[str] = None, smooth: Optional[int] = None):
    """A matplotlib Figure of the runs ({legend name: metrics rows}). Every line has a gid,
    "<panel>/<run name>" with panel one of loss, loss_raw (the unsmoothed loss under a
    --smooth line), val_loss, lr, tokens_per_s, so that tests can find what was plotted."""
    _matplotlib()
    from matplotlib import rcParams
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # files only, no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax, speed_ax = fig.subplots(3, 1, sharex=True, height_ratios=[2, 1, 1])
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, rows) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        steps, loss = series(rows, "loss")
        if smooth and smooth > 1:
            loss_ax.plot(steps, loss, color=colour, alpha=0.3, linewidth=1, gid=f"loss_raw/{name}")
            loss = moving_average(loss, smooth)
        loss_ax.plot(steps, loss, color=colour, label=f"{name} train", gid=f"loss/{name}")
        val_steps, val_loss = series(rows, "val_loss")
        if val_steps:
            loss_ax.plot(val_steps, val_loss, color=colour, linestyle="--", marker="o", markersize=4,
                         label=f"{name} val", gid=f"val_loss/{name}")
        lr_ax.plot(*series(rows, "lr"), color=colour, gid=f"lr/{name}")
        speed_ax.plot(*series(rows, "tokens_per_s"), color=colour, gid=f"tokens_per_s/{name}")

    loss_ax.set_ylabel("loss" + (f" ({smooth}-point moving average)" if smooth and smooth > 1 else ""))
    loss_ax.legend(loc="upper right")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    speed_ax.set_ylabel("tokens/s")
    speed_ax.set_ylim(bottom=0)
    speed_ax.set_xlabel("step")
    for ax in (loss_ax, lr_ax, speed_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_runs(dirs: Sequence, output="curves.png", title: Optional[str] = None, smooth: Optional[int] = None) -> Path:
    """Read each save dir's metrics.jsonl, draw them into one figure, write it to output."""
    if not dirs:
        raise ValueError("no runs to plot: pass one or more train.py --save-dir directories")
    paths = [metrics_path(d) for d in dirs]
    runs = {}
    for name, path in zip(run_names([p.parent for p in paths]), paths):
        rows = read_metrics(path)
        if not rows:
            raise ValueError(f"{path} has no rows yet: train.py writes one per --log-every steps")
        runs[name] = rows
    fig = build_figure(runs, title=title, smooth=smooth)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    return output


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("save_dirs", nargs="+", metavar="SAVE_DIR",
                   help=f"train.py --save-dir directories, each holding a {METRICS_FILE} (required)")
    p.add_argument("-o", "--output", default="curves.png", help="PNG file to write (default: %(default)s)")
    p.add_argument("--title", help="title above the panels (default: none)")
    p.add_argument("--smooth", type=int, metavar="N",
                   help="plot the moving average of N logged train losses over the raw ones (default: none)")
    opts = p.parse_args(argv)
    if opts.smooth is not None and opts.smooth < 1:
        p.error(f"--smooth must be at least 1, got {opts.smooth}")
    return opts


def main(argv=None) -> None:
    opts = parse_args(argv)
    try:
        path = plot_runs(opts.save_dirs, opts.output, title=opts.title, smooth=opts.smooth)
    except (ImportError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(path)


if __name__ == "__main__":
    main()
