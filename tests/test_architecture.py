"""The package layering of docs/ARCHITECTURE.md, checked on the source: each package imports only itself and
the packages below it, first-party imports sit at module level (none hidden in a function to dodge a cycle),
no module-level import cycle, and no library function longer than a screen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top: a package may import the packages before it in this list, never those after it.
LAYERS = ["core", "teachers", "synth_data", "evaluation", "students", "distill"]
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


MODULES = _modules()


def _guarded(tree: ast.Module) -> set[int]:
    """Nodes under `if TYPE_CHECKING:` or `if __name__ == "__main__":` (not imports of the library)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and any(s in ast.unparse(node.test) for s in ("TYPE_CHECKING", "__name__")):
            ids.update(id(sub) for sub in ast.walk(node))
    return ids


def _imports(tree: ast.Module) -> list[tuple[str, ast.stmt]]:
    """(first-party module imported, the statement) for every import of the tree outside guards."""
    guarded, out = _guarded(tree), []
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        out += [(name, node) for name in names if name.split(".")[0] in LAYERS]
    return out


def _resolve(name: str) -> str:
    """The module an import statement loads (`from pkg import mod` counts as `pkg`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def test_each_package_imports_only_the_packages_below_it():
    wrong = []
    for module, tree in MODULES.items():
        layer = LAYERS.index(module.split(".")[0])
        for target, node in _imports(tree):
            if LAYERS.index(target.split(".")[0]) > layer:
                wrong.append(f"{module}:{node.lineno} imports {target}")
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def test_first_party_imports_are_at_module_level():
    inner = [f"{module}:{node.lineno} imports {target}" for module, tree in MODULES.items()
             for target, node in _imports(tree) if node not in tree.body]
    assert not inner, "first-party imports inside functions:\n" + "\n".join(inner)


def test_no_module_import_cycle():
    graph = {module: {_resolve(t) for t, _ in _imports(tree)} - {module, ""} for module, tree in MODULES.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " → ".join(path[path.index(dep):] + [module, dep]))
            if dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_library_functions_fit_on_a_screen():
    long = [f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for module, tree in MODULES.items()
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_checks_see_the_whole_library():
    # A layer the walk missed (a renamed folder) would make every check above pass vacuously.
    assert {m.split(".")[0] for m in MODULES} == set(LAYERS)
    assert sum(len(_imports(tree)) for tree in MODULES.values()) > 100
