"""A non-editable install holds every module: the wheel pyproject.toml builds, unpacked
alone on sys.path (the source tree not on it), imports every module of llama and parallel
and the two entry points."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.test_layering import module_files

ROOT = Path(__file__).resolve().parent.parent


def source_copy(dest: Path) -> Path:
    """The files git would commit, copied: a build in the checkout itself would reuse the
    stale build/ of an earlier one."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_the_wheel_holds_and_imports_every_module(tmp_path):
    source = source_copy(tmp_path / "source")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("llama_tp-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    wanted = sorted(m for m in module_files() if m.split(".")[0] in ("llama", "parallel", "train", "convert_weights"))
    in_wheel = {str(p.relative_to(site)) for p in site.rglob("*.py")}
    missing = [m for m, path in module_files().items() if m in wanted and str(path.relative_to(ROOT)) not in in_wheel]
    assert not missing, f"not in {wheel.name}: {missing}; pyproject.toml's [tool.setuptools.packages.find] misses them"
    # -I: isolated, so neither the current directory nor PYTHONPATH puts the source tree back
    script = ("import importlib, sys\nfor m in sys.argv[1:]:\n"
              "    assert importlib.import_module(m).__file__.startswith(sys.path[0]), m\nprint(len(sys.argv) - 1)")
    run = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n{script}", *wanted],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) == len(wanted) > 30
