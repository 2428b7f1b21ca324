"""The deployable unit: a Bento built from bentofile.yaml is complete by construction.

Two checks. Statically, every project module that serving imports (followed through the whole
import graph, imports inside functions included) is packed by `include`, and every third-party
package it imports is declared in `python.packages` (or comes with BentoML). End to end, the
Bento is built and served from an environment where this project is not importable (a fresh
virtual environment that sees the development packages but not the project's editable
install), which is what a container built from the Bento is; it must answer /readyz and a
/recommend.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata as md
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

from benchmarks.processes import ROOT, bentoml_server, server_env

BENTOFILE = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
PROJECT_PACKAGES = ("compressor", "serving", "benchmarks")


def _module_file(name: str) -> Path | None:
    """The source file of a project module (a package's __init__.py), or None when it is not one."""
    parts = name.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (absolute names)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return names


def serving_closure() -> tuple[set[Path], set[str]]:
    """(project files, third-party top-level modules) reachable from serving/service.py."""
    files, third_party, todo = set(), set(), [ROOT / "serving" / "service.py"]
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.add(path)
        # a package's __init__ runs on import of any of its modules
        parent = path.parent / "__init__.py"
        if parent != path and parent.exists():
            todo.append(parent)
        for name in _imports(path):
            found = _module_file(name)
            if found is not None:
                todo.append(found)
            elif name and name.split(".")[0] not in PROJECT_PACKAGES:
                third_party.add(name.split(".")[0])
    return files, third_party


def _packed(path: Path) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(fnmatch.fnmatch(rel, pattern) for pattern in BENTOFILE["include"])


def _requirement_closure(names: list[str]) -> set[str]:
    """Distributions installed for `names` and everything they require (markers ignored: an
    over-approximation is enough to say what a Bento's environment may import)."""
    seen, todo = set(), [re.split(r"[<>=!~\[ ;]", n, maxsplit=1)[0] for n in names]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [re.split(r"[<>=!~\[ ;(]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r]
    return seen


def test_every_project_module_serving_imports_is_packed_by_the_bentofile():
    files, _ = serving_closure()
    assert ROOT / "compressor" / "artifact.py" in files  # the closure follows serving into compressor
    missing = sorted(p.relative_to(ROOT).as_posix() for p in files if not _packed(p))
    assert not missing, f"bentofile.yaml `include` lacks {missing}: the built Bento would fail to import them"


def test_every_third_party_package_serving_imports_is_declared_for_the_bento():
    _, modules = serving_closure()
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    declared = _requirement_closure(BENTOFILE["python"]["packages"] + ["bentoml"])  # BentoML installs itself
    owners = md.packages_distributions()
    undeclared = {}
    for module in sorted(modules - stdlib):
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [])}
        assert dists, f"{module}: imported by serving but not installed here"
        if not dists & declared:
            undeclared[module] = sorted(dists)
    assert not undeclared, f"serving imports packages the Bento does not declare: {undeclared}"


def _clean_python(where: Path) -> Path:
    """A virtual environment that sees this interpreter's installed packages but not this project.

    The project is installed editable (a `.pth` hook): a `.pth` line that only names the
    development site-packages adds the packages without running the hooks inside it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    clean = where / "bin" / "python"
    site = subprocess.run([str(clean), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "development-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return clean


def test_built_bento_serves_from_an_environment_without_this_project(tiny_artifact_dir, tmp_path):
    """Build where the project is (a Model Store holding the artifact), export the Bento as one
    file, import it into a fresh BentoML home and serve it with an interpreter that cannot import
    the project: the situation of a container or another machine."""
    build_env = server_env(tmp_path / "build-home")
    build_env.pop("PYTHONPATH")
    name = BENTOFILE["name"]

    def run(*cmd: str, python: Path = Path(sys.executable), env: dict = build_env, cwd: Path = ROOT) -> str:
        done = subprocess.run([str(python), *cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-3000:])
        return done.stdout

    model_tag = BENTOFILE["models"][0].removesuffix(":latest")
    run("-m", "serving.model_store", str(tiny_artifact_dir), model_tag)
    run("-m", "bentoml", "build")
    archive = tmp_path / "recsys.bento"
    run("-m", "bentoml", "export", f"{name}:latest", str(archive))

    clean = _clean_python(tmp_path / "clean-env")
    env = server_env(tmp_path / "deploy-home")  # a BentoML home that has never seen the model
    env.pop("PYTHONPATH")
    probe = subprocess.run([str(clean), "-c", "import compressor.teacher"], env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'compressor'" in probe.stderr, probe.stderr[-500:]
    run("-m", "bentoml", "import", str(archive), python=clean, env=env, cwd=tmp_path)
    bento_dir = next(p for p in (tmp_path / "deploy-home" / "bentos" / name).iterdir() if p.is_dir())

    # what a container is built from: the sources, the model, the declared requirements
    src = bento_dir / "src"
    assert (src / "compressor" / "atomic.py").exists() and not (src / "compressor" / "teacher.py").exists()
    assert not (src / "runs").exists()  # the model travels as a model, not as a copied run directory
    # the archive carried the model: importing it filled the fresh home's Model Store
    stored = next(p for p in (tmp_path / "deploy-home" / "models" / model_tag).iterdir() if p.is_dir())
    assert (stored / "manifest.json").read_bytes() == (tiny_artifact_dir / "manifest.json").read_bytes()
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    for package in BENTOFILE["python"]["packages"]:
        assert re.split(r"[<>=]", package)[0] in requirements, (package, requirements[:500])
    assert "ENV RECSYS_MODEL_TAG" in (bento_dir / "env" / "docker" / "Dockerfile").read_text()

    with bentoml_server(env, tmp_path / "serve.log", ready_timeout=120, service=f"{name}:latest",
                        python=clean, cwd=tmp_path) as srv:
        import requests

        r = requests.post(f"{srv.url}/recommend", json={"history": [1, 2, 3], "k": 3}, timeout=30)
        assert r.status_code == 200 and len(r.json()["items"]) == 3, r.text
        assert requests.get(f"{srv.url}/readyz", timeout=10).status_code == 200
