"""The import rules of ARCHITECTURE.md, checked on the source of every module (parsed, not imported):
the layers of compressor/, no import cycle, the modules with a short list of allowed imports, the
stacks compressor/ and the serving core never load, imports at the top of a module; and no
function over 100 lines."""

from __future__ import annotations

import ast
import fnmatch
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top, as ARCHITECTURE.md draws them: a module imports its own layer or the ones below.
LAYERS = {
    "base": ["compressor", "compressor.errors", "compressor.atomic", "compressor.config", "compressor.distributed",
             "compressor.artifact", "compressor.select", "compressor.ids", "compressor.markdown"],
    "data": ["compressor.data", "compressor.data.*"],
    "model": ["compressor.model_card", "compressor.modeling"],
    "measure": ["compressor.speed", "compressor.evaluate", "compressor.baselines", "compressor.compare", "compressor.memory",
                "compressor.fisher", "compressor.training", "compressor.training.*", "compressor.pretrained", "compressor.sampled_softmax"],
    "methods": ["compressor.teacher", "compressor.importance", "compressor.importance.*", "compressor.prune",
                "compressor.prune.*", "compressor.lowrank", "compressor.truncate", "compressor.distill",
                "compressor.distill.*", "compressor.export", "compressor.quantize", "compressor.quantize_*",
                "compressor.recommend", "compressor.recommend_*", "compressor.report"],
    "pipeline": ["compressor.pipeline", "compressor.pipeline.*"],
    "cli": ["compressor.cli", "compressor.__main__"],
}
# Inside the pipeline package: config <- context <- stages <- __init__.
PIPELINE = ["compressor.pipeline.config", "compressor.pipeline.context", "compressor.pipeline.stages",
            "compressor.pipeline"]
# Modules that may import only these project modules: distributed.py so that every layer may use
# it; artifact.py because the Bento ships it (and what it imports) to serve without the project.
ONLY = {"compressor.distributed": {"compressor.errors"},
        "compressor.artifact": {"compressor.atomic", "compressor.errors"}}
# Imported inside the function that needs them, guarded there: not every install has them.
OPTIONAL = {"bentoml", "locust", "onnxruntime", "faiss", "pyarrow", "ray", "gguf"}
SERVING_CORE = ["serving/runtime.py", "serving/retrieval.py", "serving/recommender.py"]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted((ROOT / "compressor").rglob("*.py"))}


def _imports(path: Path, top_only: bool = False) -> set[str]:
    """Every module `path` imports (`from a import b` is a.b when b is a module), anywhere in it
    or, with `top_only`, in its module body (including `if` / `try` blocks there)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree)
    if top_only:
        nodes = [n for stmt in tree.body if not isinstance(stmt, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
                 for n in ast.walk(stmt)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in _modules() else node.module)
    return found


def _project_imports(name: str) -> set[str]:
    return {m for m in _imports(_modules()[name]) if m in _modules() and m != name}


def _layer(name: str) -> int:
    hits = [i for i, patterns in enumerate(LAYERS.values()) if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    assert len(hits) == 1, f"{name}: in {len(hits)} layers of LAYERS (add it to the one it belongs to)"
    return hits[0]


def test_every_module_imports_only_its_own_layer_and_the_ones_below():
    names = list(LAYERS)
    bad = [f"{m} ({names[_layer(m)]}) imports {t} ({names[_layer(t)]})"
           for m in _modules() for t in sorted(_project_imports(m)) if _layer(t) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_anywhere_in_compressor():
    graph = {m: _project_imports(m) for m in _modules()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*path[path.index(t):], t]))
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_pipeline_package_imports_one_way_and_nothing_below_it_imports_it():
    for i, name in enumerate(PIPELINE):
        above = set(PIPELINE[i + 1:])
        assert not _project_imports(name) & above, f"{name} imports {sorted(_project_imports(name) & above)}"
    users = {m for m in _modules() if any(t.startswith("compressor.pipeline") for t in _project_imports(m))}
    assert users <= {*PIPELINE, "compressor.cli"}, users  # the report reads stage records, not the pipeline


@pytest.mark.parametrize("name", sorted(ONLY))
def test_modules_with_a_short_list_import_only_that(name):
    assert _project_imports(name) <= ONLY[name], _project_imports(name) - ONLY[name]


def test_compressor_never_imports_serving_benchmarks_or_the_serving_and_load_test_stacks():
    for name, path in _modules().items():
        roots = {m.split(".")[0] for m in _imports(path)}
        assert not roots & {"serving", "benchmarks", "bentoml", "locust"}, (name, roots)


@pytest.mark.parametrize("path", SERVING_CORE)
def test_the_serving_core_imports_neither_bentoml_nor_torch(path):
    roots = {m.split(".")[0] for m in _imports(ROOT / path)}
    assert not roots & {"bentoml", "torch"}, roots


def test_locust_is_imported_by_the_locustfile_only():
    """Locust monkey-patches the process it is imported in: everything else runs it as a subprocess."""
    users = {p.name for p in ROOT.glob("benchmarks/**/*.py") if "locust" in {m.split(".")[0] for m in _imports(p)}}
    assert users <= {"locustfile.py"}, users



def test_no_function_in_compressor_is_over_100_lines():
    """A function a newcomer can read in one screen or two (the long ones were split by concern)."""
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, path in _modules().items() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 100]
    assert not long, long


def test_compressor_imports_at_the_top_except_optional_dependencies():
    """An import inside a function hides an edge of the graph above. Allowed there: packages an
    install may lack (OPTIONAL), torch's FSDP machinery (distributed.py loads it only when a run
    shards: ~1 s of import for every process otherwise), and cli.py's commands, which import what
    they run so that `compressor --help` and a one-line argument error stay quick (0.2 s instead of
    the ~9 s of loading torch, transformers and the stages)."""
    late = {}
    for name, path in _modules().items():
        if name == "compressor.cli":
            continue
        inner = {m for m in _imports(path) - _imports(path, top_only=True)
                 if m.split(".")[0] not in OPTIONAL
                 and not (name == "compressor.distributed" and m.startswith("torch.distributed."))}
        if inner:
            late[name] = sorted(inner)
    assert not late, "\n".join(f"{k}: {v}" for k, v in sorted(late.items()))
