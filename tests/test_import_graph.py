"""The house's floors (docs/architecture.md): the import graph of the packages has no cycle,
the library never imports the benchmarks or the scripts, and no script imports another script.

The graph is drawn from the source with `ast` (every `import` / `from ... import`, including
imports inside functions), module by module, resolving relative imports; only edges between
this repository's modules count.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("lragent_jax", "pallas_kernels", "bench")


def _modules() -> dict[str, str]:
    """module name -> file path, for the packages and scripts/."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    for f in os.listdir(os.path.join(ROOT, "scripts")):
        if f.endswith(".py"):
            out["scripts." + f[:-3]] = os.path.join(ROOT, "scripts", f)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    script_names = {m.split(".", 1)[1] for m in mods if m.startswith("scripts.")}
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if mod.startswith("scripts.") and t in script_names:  # `import generate` from a script
                    t = "scripts." + t
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def _package_level(graph):
    """Edges between modules, dropping a package's edge to its own submodules (re-exports)."""
    return {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}


def find_cycle(graph):
    color, stack = {}, []

    def visit(n):
        color[n] = 1
        stack.append(n)
        for t in sorted(graph[n]):
            if color.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if not color.get(t):
                found = visit(t)
                if found:
                    return found
        color[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if not color.get(n):
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(_package_level(import_graph()))
    assert cycle is None, " -> ".join(cycle)


def test_library_imports_neither_benchmarks_nor_scripts():
    bad = [(m, t) for m, ts in import_graph().items() if m.split(".")[0] in ("lragent_jax", "pallas_kernels")
           for t in ts if t.split(".")[0] in ("bench", "scripts")]
    assert not bad, bad


def test_kernels_package_stands_alone():
    bad = [(m, t) for m, ts in import_graph().items() if m.startswith("pallas_kernels")
           for t in ts if not t.startswith("pallas_kernels")]
    assert not bad, bad


def test_no_script_imports_another_script():
    bad = [(m, t) for m, ts in import_graph().items() if m.startswith("scripts.") for t in ts
           if t.startswith("scripts.")]
    assert not bad, bad


def test_the_checker_sees_a_cycle():
    """The cycle finder is not vacuous."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "lragent_jax.model" in graph["lragent_jax.engine"]  # edges are really collected
    assert "pallas_kernels" in graph["lragent_jax.attention"]
