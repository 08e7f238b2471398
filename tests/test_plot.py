"""python -m llama.plot: metrics.jsonl of train.py runs -> one PNG of loss, lr and tokens/s."""

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib  # noqa: F401 - the test extra: missing, the file fails to load instead of skipping
import pytest

from llama.plot import build_figure, main, moving_average, plot_runs, read_metrics, run_names

ROOT = Path(__file__).resolve().parents[1]


def train_row(step, loss, **extra):
    return {"step": step, "loss": loss, "lr": 1e-3 * step / 30, "grad_norm": 0.5, "tokens_per_s": 1000.0 + step,
            "tokens_per_s_per_device": 250.0 + step / 4, "mfu": None, "memory_gb": 0.4, "samples_seen": 8 * step, **extra}


def write_run(save_dir: Path, rows, tail: str = "") -> Path:
    """A train.py --save-dir holding metrics.jsonl: rows, then tail written verbatim."""
    save_dir.mkdir(parents=True)
    path = save_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)
    return save_dir


# run "a": validation rows of their own (steps 0 and 20) and one inside a train row (step 30)
RUN_A = [
    {"step": 0, "val_loss": 6.0},
    train_row(1, 5.5),
    train_row(10, 4.0),
    {"step": 20, "val_loss": 3.9},
    train_row(20, 3.5, skipped_steps=1),
    train_row(30, 3.0, val_loss=3.2),
]
# run "b": killed while writing its step-30 row
RUN_B = [train_row(1, 5.6), train_row(10, 4.4), train_row(20, 3.8)]
TRUNCATED = '{"step": 30, "loss": 3.1, "lr": 0.00'


def lines_by_gid(fig) -> dict:
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_read_metrics_skips_a_truncated_last_line_with_a_warning_naming_file_and_line(tmp_path, capsys):
    save_dir = write_run(tmp_path / "b", RUN_B, tail=TRUNCATED)
    rows = read_metrics(save_dir / "metrics.jsonl")
    assert rows == RUN_B
    err = capsys.readouterr().err
    assert f"{save_dir / 'metrics.jsonl'}:4" in err and len(err.strip().splitlines()) == 1


def test_read_metrics_rejects_a_bad_line_in_the_middle_naming_file_and_line(tmp_path):
    save_dir = write_run(tmp_path / "b", RUN_B[:1], tail=TRUNCATED + "\n" + json.dumps(RUN_B[1]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{save_dir / 'metrics.jsonl'}:2: not valid JSON")):
        read_metrics(save_dir / "metrics.jsonl")


def test_figure_plots_train_and_val_loss_lr_and_tokens_per_s_against_step():
    fig = build_figure({"a": RUN_A, "b": RUN_B})
    lines = lines_by_gid(fig)
    assert sorted(lines) == sorted(f"{panel}/{run}" for panel in ("loss", "lr", "tokens_per_s") for run in "ab") + ["val_loss/a"]

    def xy(gid):
        return list(lines[gid].get_xdata()), list(lines[gid].get_ydata())

    assert xy("loss/a") == ([1, 10, 20, 30], [5.5, 4.0, 3.5, 3.0])
    assert xy("val_loss/a") == ([0, 20, 30], [6.0, 3.9, 3.2])
    assert xy("loss/b") == ([1, 10, 20], [5.6, 4.4, 3.8])
    assert xy("lr/a") == ([1, 10, 20, 30], [pytest.approx(1e-3 * s / 30, rel=1e-12) for s in (1, 10, 20, 30)])
    assert xy("tokens_per_s/b") == ([1, 10, 20], [1001.0, 1010.0, 1020.0])
    # val is dashed, in its run's colour; runs differ in colour
    assert lines["val_loss/a"].get_linestyle() == "--" and lines["loss/a"].get_linestyle() == "-"
    assert lines["val_loss/a"].get_color() == lines["loss/a"].get_color() == lines["lr/a"].get_color()
    assert lines["loss/a"].get_color() != lines["loss/b"].get_color()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["a train", "a val", "b train"]


def test_a_step_logged_twice_by_a_resumed_run_plots_its_later_row():
    resumed = RUN_B + [train_row(10, 9.9), train_row(20, 8.8)]  # resumed from step 1, relogged 10 and 20
    lines = lines_by_gid(build_figure({"b": resumed}))
    assert list(lines["loss/b"].get_xdata()) == [1, 10, 20]
    assert list(lines["loss/b"].get_ydata()) == [5.6, 9.9, 8.8]


def test_smooth_plots_the_moving_average_of_train_loss_over_the_raw_loss():
    assert moving_average([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    lines = lines_by_gid(build_figure({"a": RUN_A}, smooth=3))
    assert list(lines["loss_raw/a"].get_ydata()) == [5.5, 4.0, 3.5, 3.0]
    assert list(lines["loss/a"].get_ydata()) == pytest.approx([5.5, 4.75, 13.0 / 3, 3.5], abs=1e-12)
    assert list(lines["val_loss/a"].get_ydata()) == [6.0, 3.9, 3.2]  # validation is never smoothed


def test_run_names_are_directory_names_widened_by_parents_only_where_equal(tmp_path):
    dirs = [tmp_path / "sweep1" / "run", tmp_path / "sweep2" / "run", tmp_path / "sweep2" / "other"]
    assert run_names(dirs) == ["sweep1/run", "sweep2/run", "other"]


def test_plot_runs_writes_an_800x800_png_of_two_runs(tmp_path):
    dirs = [write_run(tmp_path / "a", RUN_A), write_run(tmp_path / "b", RUN_B, tail=TRUNCATED)]
    output = plot_runs(dirs, tmp_path / "out" / "curves.png", title="two runs")
    assert output == tmp_path / "out" / "curves.png"
    assert png_size(output) == (800, 800)


def test_a_save_dir_without_metrics_is_an_error_naming_the_path(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty"), "-o", str(tmp_path / "c.png")])
    assert f"{tmp_path / 'empty' / 'metrics.jsonl'} not found: pass a train.py --save-dir" in str(exit_info.value.code)
    assert not (tmp_path / "c.png").exists()


def test_missing_matplotlib_names_the_plot_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[plot\]'"):
        build_figure({"a": RUN_A})


def test_cli_writes_the_png_and_prints_its_path(tmp_path):
    dirs = [write_run(tmp_path / "x" / "run", RUN_A), write_run(tmp_path / "y" / "run", RUN_B, tail=TRUNCATED)]
    output = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, "-m", "llama.plot", *map(str, dirs), "-o", str(output), "--smooth", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(output)
    assert "y/run/metrics.jsonl:4" in result.stderr  # the truncated line, skipped
    assert png_size(output) == (800, 800)
