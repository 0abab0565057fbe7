"""The folder order of src/lorakit is its import order: no import circle, and no import from a lower folder to a
higher one (README "Architecture"). The graph is read from the source with ``ast``, function-local and TYPE_CHECKING
imports included, so a late import cannot hide a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"

# Bottom first. A module may import from its own folder or from a folder before it, never from one after it.
ORDER = ("io", "quant", "ops", "fast", "config_base", "sub_configs", "config_checks", "config_json", "config")
ORDER += ("adapters", "api", "export", "data", "training", "commands")
ORDER += ("__init__", "cli")

# The few function-local imports the tree keeps, each heavy or optional (the comment beside it says why).
LOCAL_IMPORTS_ALLOWED = 12


def module_name(path: Path, root: Path = SRC) -> str:
    parts = ("lorakit",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported lorakit module, line, function-local?) for every import in ``path``: ``from lorakit.a import b``
    counts as an import of ``lorakit.a.b`` when that is a module, else of ``lorakit.a``."""
    tree = ast.parse(path.read_text())
    local_lines = {
        n.lineno
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            names = subs or [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name in modules:
                found.append((name, node.lineno, node.lineno in local_lines))
    return found


def graph(root: Path = SRC) -> dict[str, list[tuple[str, int, bool]]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(files)
    return {m: [i for i in imports(p, modules) if i[0] != m] for m, p in files.items()}


def tier(module: str) -> int:
    """The position in ORDER of the folder (or top-level module) ``module`` lives in."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return ORDER.index(top)


def upward_imports(edges: dict[str, list[tuple[str, int, bool]]]) -> list[str]:
    return [
        f"{m}:{line} imports {target} ({ORDER[tier(target)]} is above {ORDER[tier(m)]})"
        for m, targets in edges.items()
        for target, line, _ in targets
        if tier(target) > tier(m)
    ]


def circles(edges: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for target, _, _ in edges[m]:
            if state.get(target) == 1:
                found.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_every_module_is_in_a_folder_of_the_order():
    stray = [m for m in graph() if m.split(".")[1:2] and m.split(".")[1] not in ORDER]
    assert stray == [], f"modules outside the folders of ORDER (add the folder to ORDER, in its place): {stray}"


def test_imports_only_run_downward():
    assert upward_imports(graph()) == []


def test_no_import_circle():
    assert circles(graph()) == []


def test_function_local_imports_stay_few():
    local = [f"{m}:{line} {target}" for m, ts in graph().items() for target, line, is_local in ts if is_local]
    assert len(local) <= LOCAL_IMPORTS_ALLOWED, "\n".join(local)


@pytest.mark.parametrize(
    ("files", "expect_upward", "expect_circle"),
    [
        ({"io/files.py": "from lorakit.adapters import model\n", "adapters/model.py": ""}, True, False),
        ({"adapters/a.py": "import lorakit.adapters.b\n",
          "adapters/b.py": "def f():\n    from lorakit.adapters import a\n"}, False, True),
        ({"config.py": "from lorakit.io.files import x\n", "io/files.py": "x = 1\n"}, False, False),
    ],
)
def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path, files, expect_upward, expect_circle):
    """The checks themselves on a made-up tree: an upward import and a (function-local) circle are found."""
    root = tmp_path / "lorakit"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    edges = graph(root)
    assert bool(upward_imports(edges)) == expect_upward
    assert bool(circles(edges)) == expect_circle


def test_test_file_names_are_unique():
    """tests/ has no __init__.py files (pytest's default import mode), so two test files of one name in two folders
    would shadow each other: "import file mismatch"."""
    names = [p.name for p in Path(__file__).parent.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_public_names_are_listed_once_for_runtime_and_type_checkers():
    """lorakit/__init__.py imports its public names on first use from the table _MODULES; its TYPE_CHECKING block (for
    type checkers and the import graph above) must import exactly the same names from the same modules."""
    import lorakit

    tree = ast.parse((SRC / "__init__.py").read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))
    static = {(node.module, a.name) for node in guarded.body if isinstance(node, ast.ImportFrom) for a in node.names}
    table = {(module, name) for module, names in lorakit._MODULES.items() for name in names}
    assert static == table
    assert lorakit.__all__ == sorted(name for _, name in table)
    assert all(getattr(lorakit, name) is not None for name in lorakit.__all__)
