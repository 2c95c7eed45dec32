"""The codebase's own rules, read from its source: function length, private names, import layering.

Every check parses the library with ``ast``; nothing is imported or run.  A failure names the
file, the line and the rule.
"""
from __future__ import annotations

import ast
import pathlib

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
# The source folders, by the dotted package each one installs as (pyproject's package-dir).
PACKAGES = {"slimfit_fx": ROOT / "slimfit_fx", "slimfit_fx.passes": ROOT / "passes"}


def _modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> source file, for every module of the library."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _where(module: str, node: ast.AST) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{node.lineno}"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The module an ``import from`` names, made absolute."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _imports(module: str):
    """(imported library module, imported names, node) for every import in ``module``, nested ones too."""
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                if f"{target}.{alias.name}" in MODULES:
                    yield f"{target}.{alias.name}", [], node
            if target in MODULES:
                yield target, [a.name for a in node.names if f"{target}.{a.name}" not in MODULES], node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    yield alias.name, [], node


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_function_is_longer_than_a_screen():
    long = [f"{_where(m, n)} {n.name}: {n.end_lineno - n.lineno + 1} lines"
            for m, tree in TREES.items() for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_no_module_imports_a_private_name_of_another():
    found = []
    for module in MODULES:
        for target, names, node in _imports(module):
            if target == module:
                continue
            found += [f"{_where(module, node)} imports {n} from {target}" for n in names if _private(n)]
            if any(map(_private, target.split("."))):
                found.append(f"{_where(module, node)} imports the private module {target}")
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_every_module_and_public_name_is_documented():
    """A module docstring is its contract; every public function, class and method says what it does."""
    missing = [f"{MODULES[m].relative_to(ROOT)}: module docstring" for m, tree in TREES.items()
               if not ast.get_docstring(tree)]
    for module, tree in TREES.items():
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            members = [node] + [m for m in node.body if isinstance(node, ast.ClassDef)
                                and isinstance(m, ast.FunctionDef) and not m.name.startswith("_")]
            missing += [f"{_where(module, m)} {m.name}" for m in members if not ast.get_docstring(m)]
    assert not missing, "undocumented:\n" + "\n".join(missing)


def _import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    for module in MODULES:
        for target, _, _ in _imports(module):
            # A package's __init__ re-exporting its own submodules is not a dependency of theirs.
            if target != module and not (module != "slimfit_fx" and target.startswith(module + ".")):
                graph.add_edge(module, target)
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    graph.remove_node("slimfit_fx")  # the top-level package only re-exports
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + [c[0]]) for c in cycles)


@pytest.mark.parametrize("module,forbidden", [
    ("slimfit_fx.analysis", "slimfit_fx.ops"),
    ("slimfit_fx.op_table", "slimfit_fx.ops"),
    ("slimfit_fx.memory", "slimfit_fx.ops"),
])
def test_layering(module, forbidden):
    """The prediction does not depend on runtime code, and the core does not depend on its integrations."""
    sources = [m for m in MODULES if m == module or m.startswith(module + ".")]
    found = [f"{_where(m, node)} imports {target}" for m in sources for target, _, node in _imports(m)
             if target == forbidden or target.startswith(forbidden + ".")]
    assert not found, "\n".join(found)


# The integrations' public fronts: the package re-exports them, and ``backend`` is the torch.compile
# entry point (``slimfit_fx.backend:slimfit_backend`` in the package metadata).
FRONTS = {"slimfit_fx", "slimfit_fx.backend"}


def test_the_core_imports_nothing_from_the_integrations():
    """compiler, scheduler, analysis and the rest run without torch._dynamo, the Trainer or torch.distributed
    wiring; an integration registers itself with the core instead (``compiler.register_compiled_mode``)."""
    core = [m for m in MODULES if m not in FRONTS and not m.startswith("slimfit_fx.integrations")]
    found = [f"{_where(m, node)} imports {target}" for m in core for target, _, node in _imports(m)
             if target.startswith("slimfit_fx.integrations")]
    assert "slimfit_fx.compiler" in core and not found, "\n".join(found)


def test_the_checks_see_the_library():
    """Guards the checks above against passing vacuously: they read the passes and the analysis."""
    assert {"slimfit_fx.analysis", "slimfit_fx.passes.freeze_gate", "slimfit_fx.compiler"} <= set(MODULES)
    assert ("slimfit_fx.compiler", "slimfit_fx.analysis") in _import_graph().edges
