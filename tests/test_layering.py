"""The layering of the project, read from the source (every import, the lazy ones inside
functions included), so that the layout docs/architecture.md draws is the one the code has.

    python tests/test_layering.py     # prints each layer's modules with their line counts

Layers, bottom up; a module may import its own layer and the layers below it:

    0  ground floor   parallel.mesh, layers, lora_layers, losses, context, control, spawn, compat
    1  llama          the model, formats, data, tokenizer, generation (not llama.training)
    2  parallel       fsdp, pipeline, plan, train_utils, devices: 2D-4D applied to a built model
    3  the run        llama.training
    4  entry points   train.py, convert_weights.py, llama.plot, the `python -m` mains
    5  tests, bench/  may import anything but the entry points (a test may call their `main`)

compat is on the ground floor: the layers and context parallelism resolve version-dependent
collectives through it, and it imports nothing of ours."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ("llama", "parallel", "train", "convert_weights", "bench", "tests")
GROUND_FLOOR = {"parallel.mesh", "parallel.layers", "parallel.lora_layers", "parallel.losses", "parallel.context",
                "parallel.control", "parallel.spawn", "parallel.compat"}
ENTRY_POINTS = {"train", "convert_weights", "llama.plot"}
MAX_LINES = 600
LAYER_NAMES = ["ground floor", "llama", "parallel", "the run", "entry points", "tests and benchmarks"]


def module_files() -> dict:
    """Module name -> file, for every Python file of ours."""
    files = [ROOT / "train.py", ROOT / "convert_weights.py"]
    for folder in ("llama", "parallel", "bench", "tests"):
        files += sorted((ROOT / folder).rglob("*.py"))
    modules = {}
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict) -> set:
    """The modules of ours that `name` imports anywhere in its file. `from a.b import c`
    counts as an import of a.b.c where that is a module, else of a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] in OURS)
    found.discard(name)
    return found


def layer(name: str) -> int:
    if name.split(".")[0] in ("tests", "bench"):
        return 5
    if name in ENTRY_POINTS or name.endswith(".__main__"):
        return 4
    if name in GROUND_FLOOR:
        return 0
    if name == "llama.training" or name.startswith("llama.training."):
        return 3
    if name.split(".")[0] == "llama":
        return 1
    if name == "parallel":  # the package's __init__: empty, so that llama can import the ground floor
        return 0
    return 2


def graph() -> dict:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(edges: dict) -> list:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


# ---------------------------------------------------------------- the rules


def test_no_module_imports_another_that_imports_it_back():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(group) for group in found)


def test_ground_floor_imports_only_the_ground_floor():
    edges = graph()
    wrong = {m: sorted(d - GROUND_FLOOR - {"parallel"}) for m in GROUND_FLOOR for d in [edges[m]] if d - GROUND_FLOOR - {"parallel"}}
    assert not wrong, wrong


def test_every_import_points_down_the_layers():
    """A module imports only its own layer and the layers below: the model, the formats and
    the data import nothing of parallel's upper modules or of the run, parallel nothing of
    the run, and nothing below the entry points imports one."""
    edges = graph()
    wrong = [f"{m} (layer {LAYER_NAMES[layer(m)]}) imports {d} (layer {LAYER_NAMES[layer(d)]})"
             for m, deps in sorted(edges.items()) for d in sorted(deps)
             if d in edges and layer(d) > layer(m) and layer(m) != 5]
    assert not wrong, "\n".join(wrong)


def test_model_and_format_modules_import_nothing_of_the_run():
    edges = graph()
    run = {m for m in edges if layer(m) == 3}
    below = {m for m in edges if layer(m) in (0, 1, 2)}
    wrong = {m: sorted(edges[m] & run) for m in below if edges[m] & run}
    assert not wrong, wrong


def test_entry_points_are_imported_only_by_tests_calling_main():
    """train.py and convert_weights.py are scripts: no module imports them; a test may, to
    call its `main` (and nothing else of it)."""
    modules = module_files()
    wrong = []
    for name, path in modules.items():
        deps = imports_of(name, path, modules) & {"train", "convert_weights"}
        if not deps:
            continue
        if not name.startswith("tests."):
            wrong.append(f"{name} imports {sorted(deps)}")
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in deps:
                names = [a.name for a in node.names]
                if names != ["main"]:
                    wrong.append(f"{name} imports {names} from {node.module}")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in deps:
                if node.attr != "main":
                    wrong.append(f"{name} uses {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_no_module_is_over_600_lines():
    modules = module_files()
    long = {name: n for name, path in modules.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_layers_are_what_the_docstring_says():
    """The rules above cannot pass vacuously: the graph holds the modules they are about."""
    edges = graph()
    assert GROUND_FLOOR <= edges.keys()
    assert {"llama.model", "llama.training.step", "parallel.fsdp", "train"} <= edges.keys()
    assert "parallel.layers" in edges["llama.model"]  # an edge the reader of the AST must see
    assert layer("llama.model") == 1 and layer("parallel.fsdp") == 2 and layer("llama.training.step") == 3
    # lazy imports count: llama.training.checkpoint imports the weights' format inside a method
    assert any(d.startswith("llama.weights") for d in edges["llama.training.checkpoint"])


def report() -> str:
    modules, edges = module_files(), graph()
    lines = []
    for level, title in enumerate(LAYER_NAMES):
        names = sorted(m for m in edges if layer(m) == level)
        total = sum(len(modules[m].read_text().splitlines()) for m in names)
        lines.append(f"{level} {title}: {len(names)} modules, {total} lines")
        if level < 5:
            for m in names:
                n = len(modules[m].read_text().splitlines())
                lines.append(f"    {m:<40} {n:5d}  imports {', '.join(sorted(edges[m])) or '-'}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
