"""The house rules that code review alone lets slip: the import graph of pipeline/, workers/ and models/ has
no cycle, no project import hides inside a function, the leaf modules import no stage, and no pipeline module
outgrows one job (~400 lines)."""
from __future__ import annotations

import ast
import os

from helpers.paths import REPO_ROOT

PACKAGES = ("pipeline", "workers", "models")
# Modules every stage may import: they import only each other (and models/, storage libraries).
LEAVES = {"pipeline.config_files", "pipeline.config", "pipeline.records", "pipeline.images", "pipeline.storage",
          "pipeline.checkpoints", "pipeline.model_files", "pipeline.blur"}
MAX_LINES = 400


def _modules() -> dict[str, str]:
    """{dotted name: path} of every module of PACKAGES, subpackages included (a package's __init__.py is the
    package)."""
    out = {}
    for pkg in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(REPO_ROOT, pkg)):
            dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    out[os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")] = path
    return out


def _imports(mod: str, path: str, known: set[str]) -> list[tuple[str, bool]]:
    """(imported project module, whether the import is inside a function) for each import in ``path``."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    stem = ".".join(base + ([child.module] if child.module else []))
                else:
                    stem = child.module or ""
                names = [stem] + [f"{stem}.{a.name}" for a in child.names]
            for n in names:
                while n and n not in known:
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    found.append((n, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def _graph():
    mods = _modules()
    known = set(mods)
    return mods, {m: _imports(m, p, known) for m, p in mods.items()}


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                c = dfs(n)
                if c:
                    return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            c = dfs(m)
            if c:
                return c
    return None


def test_import_graph_has_no_cycle():
    _, imports = _graph()
    edges = {m: {n for n, _ in found if n not in PACKAGES} for m, found in imports.items()}
    assert _find_cycle(edges) is None, " -> ".join(_find_cycle(edges))


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_project_import_inside_a_function():
    """In pipeline/ and workers/: imports at the top, where the graph above sees them."""
    _, imports = _graph()
    hidden = sorted(f"{m} imports {n}" for m, found in imports.items() for n, inner in found
                    if inner and not m.startswith("models"))
    assert hidden == []


def test_leaf_modules_import_no_stage():
    _, imports = _graph()
    bad = sorted(f"{m} imports {n}" for m in LEAVES for n, _ in imports[m]
                 if n.startswith("pipeline.") and n not in LEAVES or n.startswith("workers"))
    assert bad == []


def test_pipeline_and_worker_modules_stay_small():
    mods, _ = _graph()
    sizes = {m: sum(1 for _ in open(p, encoding="utf-8")) for m, p in mods.items()
             if m.startswith(("pipeline.", "workers."))}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


# models/ holds the ports and networks, each module one part (the Triton kernels of a part may sit in a sibling
# module to stay under this).
MAX_MODEL_LINES = 600


def test_model_modules_stay_small():
    mods, _ = _graph()
    sizes = {m: sum(1 for _ in open(p, encoding="utf-8")) for m, p in mods.items() if m.startswith("models.")}
    assert any(m.startswith("models.alignment.") for m in sizes), "subpackages of models/ are not scanned"
    assert {m: n for m, n in sizes.items() if n > MAX_MODEL_LINES} == {}


# What the ports may import beyond themselves: the one way every Triton kernel of models/ is trusted.
SHARED_BY_THE_PORTS = {"models.kernel_check"}


def test_alignment_ports_know_nothing_of_e2style():
    """models/alignment/ (dlib's and Pillow's ports) imports only its own modules of the project and the shared
    kernel check: nothing of E2Style (models' other modules), pipeline/ or workers/, at the top or inside a
    function."""
    _, imports = _graph()
    ports = [m for m in imports if m.startswith("models.alignment")]
    assert len(ports) > 10
    outside = sorted(f"{m} imports {n}" for m in ports for n, _ in imports[m]
                     if not n.startswith("models.alignment") and n not in SHARED_BY_THE_PORTS)
    assert outside == []


# The modules that run jobs on Ray: only they import ``ray`` or ``workers`` (the Ray definitions); every other
# module of pipeline/ and models/ runs without Ray (tests, benchmarks, Ray Data's own processes).
JOB_MODULES = {"pipeline.runner", "pipeline.inversion", "pipeline.latents", "pipeline.cluster",
               "pipeline.training.cli"}


def _ray_importers() -> set[str]:
    """Modules of pipeline/ and models/ (subpackages included) with an import of ``ray`` or ``workers``
    anywhere in them, at the top or inside a function."""
    found = set()
    for pkg in ("pipeline", "models"):
        for folder, _, files in os.walk(os.path.join(REPO_ROOT, pkg)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                mod = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                    if any(n.split(".")[0] in ("ray", "workers") for n in names):
                        found.add(mod)
    return found


def test_only_the_job_modules_import_ray_or_workers():
    assert sorted(_ray_importers() - JOB_MODULES) == []


def test_architecture_md_names_every_module():
    """ARCHITECTURE.md has a line for every module of pipeline/ and workers/."""
    mods, _ = _graph()
    text = open(os.path.join(REPO_ROOT, "ARCHITECTURE.md"), encoding="utf-8").read()
    missing = [m for m in mods if m.startswith(("pipeline.", "workers."))
               and f"`{m.replace('.', '/')}.py`" not in text and f"`{m.replace('.', '/')}/" not in text
               and f"{m.rpartition('.')[2]}.py`" not in text]
    assert missing == []
