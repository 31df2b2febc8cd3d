"""dvc.yaml lists every file of code that a stage's command runs, derived from its imports.

A stage whose code changed but is not among its deps is served stale from DVC's cache: a silent
wrong answer. The closure is read statically from the source (every `import`, including the
ones inside functions), so it also covers code that only runs on some paths.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from helpers import REPO

PACKAGES = ("datm", "stages", "cli")


def _module_file(name: str) -> Path | None:
    """The repository file of a dotted module name, or None for third-party modules."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Dotted names of every module `path` imports, anywhere in the file."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            # `from datm import pipeline` imports the module datm.pipeline
            found |= {f"{module}.{alias.name}" for alias in node.names}
    # importing datm.pipeline.zca runs datm/pipeline/__init__.py first
    return found | {".".join(name.split(".")[:i]) for name in found
                    for i in range(1, name.count(".") + 1)}


def code_closure(module: str) -> set[str]:
    """Repository files (relative paths) that running `python -m module` may execute."""
    todo, seen = [module], set()
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += sorted(_imports(path))
    return {str(p.relative_to(REPO)) for p in seen if p.name != "__init__.py" or p.stat().st_size}


def _stages() -> dict[str, dict]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_deps_cover_the_code_its_command_imports(stage):
    spec = _stages()[stage]
    module = re.match(r"python -m (\S+)", spec["cmd"]).group(1)
    closure = code_closure(module)
    assert f"{module.replace('.', '/')}.py" in closure
    missing = sorted(p for p in closure if not _covered(p, spec["deps"]))
    assert not missing, f"dvc.yaml stage {stage} runs {missing} but does not list them in deps"


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_deps_list_no_code_it_does_not_run(stage):
    # Extra code deps re-run expensive stages (experts) for changes that cannot affect them.
    spec = _stages()[stage]
    module = re.match(r"python -m (\S+)", spec["cmd"]).group(1)
    closure = code_closure(module)
    extra = [d for d in spec["deps"] if d.endswith(".py") and d not in closure]
    assert not extra, f"dvc.yaml stage {stage} lists {extra}, which its command never imports"


def test_closure_follows_lazy_and_relative_imports():
    closure = code_closure("stages.summary")
    assert "datm/visual.py" in closure       # imported at module level by stages/summary.py
    assert "datm/artifacts.py" in closure    # reached through relative imports
    assert not any(p.startswith("tests/") for p in closure)


def test_download_stage_tracks_the_seed_its_split_uses():
    # The imagefolder train/test split is drawn with the top-level seed.
    assert "seed" in _stages()["download"]["params"]


def test_no_module_of_the_packages_imports_itself_in_a_circle():
    """Doors one way (cli -> stages -> datm.pipeline -> core -> config / artifacts -> errors): a
    circle would make two modules one unit that neither can be read or tested without."""
    graph = {}
    for path in sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")):
        targets = {_module_file(name) for name in _imports(path)}
        graph[path] = {t for t in targets if t and t != path and t.name != "__init__.py"}
    done: set[Path] = set()

    def visit(node: Path, trail: list[Path]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in trail:
                circle = [str(p.relative_to(REPO)) for p in trail[trail.index(nxt):]]
                pytest.fail(f"import circle: {' -> '.join(circle)} -> {circle[0]}")
            if nxt not in done:
                visit(nxt, [*trail, nxt])
        done.add(node)

    for start in graph:
        if start not in done:
            visit(start, [start])
