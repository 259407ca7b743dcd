"""The package's layers: no import circle between files, and no import from a layer to a higher one.

Every `import` counts, at module level or inside a function (a lazy import is still a dependency).
The order, lowest first (a module may import its own layer and the layers below it):

  kernels        hcustom_kernels (imports nothing of hcustom_mc)
  base           hcustom_mc/__init__.py, console.py (rank-0 console), device.py (device and backend), errors.py
  segments       hcustom_mc/segments.py: the per-segment attention every rank runs
  parallel       hcustom_mc/parallel/: layouts, process groups, how attention is split across ranks
  model          hcustom_mc/model/: the DiT, handed its process groups (it imports parallel/, never the reverse)
  checkpoint     hcustom_mc/checkpoint/ (its convert / compare CLIs build models: they sit above them)
  encoders       hcustom_mc/encoders/ (raise their own errors; data/ translates them)
  data           hcustom_mc/data/
  inference      hcustom_mc/inference/: sampling on a TP x CP x CFG layout
  eval           hcustom_mc/eval/: metrics of sampled videos (reads the sampler's outputs)
  training       hcustom_mc/training/ (validation during training samples and scores: it sits above both)
  entry points   hcustom_mc/sample.py, preprocess.py, extract_subjects.py, launch.py (torchrun wrapper), plan/ (the
                 planner CLI)
"""

from __future__ import annotations

import ast
from pathlib import Path

from bench.checkout import REPO

LAYERS = [
    ("kernels", ("hcustom_kernels",)),
    ("base", ("hcustom_mc", "hcustom_mc.console", "hcustom_mc.device", "hcustom_mc.errors")),
    ("segments", ("hcustom_mc.segments",)),
    ("parallel", ("hcustom_mc.parallel",)),
    ("model", ("hcustom_mc.model",)),
    ("checkpoint", ("hcustom_mc.checkpoint",)),
    ("encoders", ("hcustom_mc.encoders",)),
    ("data", ("hcustom_mc.data",)),
    ("inference", ("hcustom_mc.inference",)),
    ("eval", ("hcustom_mc.eval",)),
    ("training", ("hcustom_mc.training",)),
    ("entry points", ("hcustom_mc.sample", "hcustom_mc.preprocess", "hcustom_mc.extract_subjects", "hcustom_mc.launch",
                      "hcustom_mc.plan")),
]
PACKAGES = {"hcustom_mc": Path(REPO) / "hcustom_mc", "hcustom_kernels": Path(REPO) / "kernels" / "hcustom_kernels"}


def module_files() -> dict[str, Path]:
    out = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (`from pkg import mod` names the module mod)."""
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                found = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in found:
                while target and target not in files:  # `import a.b.c` of a non-module attribute: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer: add it to tests/test_layering.py LAYERS (and its docstring)")
    return rank


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
            for src, targets in sorted(graph.items()) for dst in sorted(targets) if layer_of(dst) > layer_of(src)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each a circle of imports."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same imports between sub-packages (hcustom_mc.model, hcustom_mc.parallel, ...)."""
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    out: dict[str, set[str]] = {}
    for src, targets in graph.items():
        out.setdefault(top(src), set()).update(top(t) for t in targets if top(t) != top(src))
    return out


def test_the_checker_finds_circles_and_upward_imports():
    graph = {"hcustom_mc.model.a": {"hcustom_mc.parallel.b"}, "hcustom_mc.parallel.b": {"hcustom_mc.model.a"}}
    assert cycles(graph) == [["hcustom_mc.model.a", "hcustom_mc.parallel.b"]]
    assert upward_imports(graph) == ["hcustom_mc.parallel.b (parallel) imports hcustom_mc.model.a (model)"]
    assert cycles(package_graph({"hcustom_mc.training.x": {"hcustom_mc.inference.y"},
                                 "hcustom_mc.inference.y": {"hcustom_mc.training.z"}})) \
        == [["hcustom_mc.inference", "hcustom_mc.training"]]


def test_the_graph_sees_lazy_and_from_package_imports():
    graph = import_graph(module_files())
    assert "hcustom_mc.parallel.context" in graph["hcustom_mc.model.model"]  # module level
    assert "hcustom_mc.console" in graph["hcustom_mc.preprocess"]  # `from hcustom_mc import console`, in a function


def test_no_import_circles():
    graph = import_graph(module_files())
    assert cycles(graph) == []
    assert cycles(package_graph(graph)) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    assert upward_imports(import_graph(module_files())) == []
