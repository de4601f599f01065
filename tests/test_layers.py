"""irkit's layers import only downward and its modules form no import cycle.

Every import statement counts, including those inside function bodies (a lazy import is still a
dependency). Layers, lowest first: base (errors, utils, config, distributed) → io → data → nn →
models → extract/store (store, extract, shard, export, ranking) → search/train/eval → pipeline/demo
→ cli/serve. The package's ``__init__`` (the public API) and the ``__main__`` entry points
(``python -m irkit``, ``python -m irkit.train``) sit above everything.
"""
from __future__ import annotations

import ast
from pathlib import Path

import irkit

ROOT = Path(irkit.__file__).parent
LAYERS = [
    {"irkit.errors", "irkit.utils", "irkit.config", "irkit.distributed"},
    {"irkit.io"},
    {"irkit.data"},
    {"irkit.nn"},
    {"irkit.models"},
    {"irkit.store", "irkit.extract", "irkit.shard", "irkit.export", "irkit.ranking"},
    {"irkit.search", "irkit.train", "irkit.eval"},
    {"irkit.pipeline", "irkit.demo"},
    {"irkit.cli", "irkit.serve"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    for i, group in enumerate(LAYERS):
        if any(module == g or module.startswith(g + ".") for g in group):
            return i
    return None


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` — a program entry point, run only as a script, never on import."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _nodes(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(c for c in ast.iter_child_nodes(node) if not _is_main_guard(c))


def imports_of(path: Path, module: str) -> set[str]:
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("irkit"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            if base.startswith("irkit"):
                if base != "irkit":  # `from irkit import distributed` names a submodule, not the API
                    out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)  # `from irkit.x import submodule`
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    g = {}
    for name, path in modules.items():
        g[name] = {m for m in imports_of(path, name) if m in modules and m != name}
    return g


def is_entry(module: str) -> bool:
    return module == "irkit" or module.endswith(".__main__")


def test_every_module_has_a_layer():
    assert [m for m in graph() if layer_of(m) is None and not is_entry(m)] == []


def test_layers_import_only_downward():
    bad = []
    for mod, deps in graph().items():
        if is_entry(mod):
            continue
        for dep in deps:
            if dep == "irkit" or layer_of(dep) > layer_of(mod):
                bad.append(f"{mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)})")
    assert bad == []


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g[node]):
            if dep.startswith(node + "."):  # a package importing its own submodules is no cycle
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_walker_sees_lazy_imports_and_skips_script_entry_points(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from irkit.serve import app\n    import irkit.cli\n"
                   "if __name__ == '__main__':\n    from irkit.train import trainer\n")
    assert imports_of(src, "irkit.nn.m") == {"irkit.serve", "irkit.serve.app", "irkit.cli"}
