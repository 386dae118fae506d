"""The architecture as a checked fact: lvit's packages import downward only, at the top of each file, with no cycle,
and no module grows past 400 lines. Each failure names the file, the line and the import at fault."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lvit"
MAX_LINES = 400

# Top to bottom. A module may import from its own package and from any layer below its own; packages that share a
# layer are siblings and import nothing from each other. `lvit` itself (its `__init__`) is the floor.
LAYERS = [
    ["lvit.__main__"],
    ["lvit.cli"],  # one module per command group; the only place where lvit imports may wait inside a function
    ["lvit.demo"],
    ["lvit.export", "lvit.train"],
    ["lvit.eval"],
    ["lvit.infer"],
    ["lvit.data"],
    ["lvit.model"],
    ["lvit.templates", "lvit.runs"],
    ["lvit.llm", "lvit.recipe"],
    ["lvit.console", "lvit.textfiles"],
    ["lvit.errors"],
    ["lvit"],
]
LOCAL_IMPORTS_ALLOWED = ("lvit.cli",)  # `lvit --help` stays fast: commands import what they run when they run


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _layer_of(module: str) -> tuple[int, str]:
    """(layer index, the package that places it) for a module: the longest listed prefix wins."""
    best = None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (index, name)
    assert best is not None, f"{module} is in no layer of tests/test_layers.py: add its package to LAYERS"
    return best


def _lvit_imports(module: str, path: Path, modules: dict[str, Path]):
    """(line, imported lvit module, inside a function?) for every import of an lvit module in `path`, `if
    TYPE_CHECKING:` blocks excepted (they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = node.module or ""
        if node.level:
            anchor = package
            for _ in range(node.level - 1):
                anchor = anchor.rpartition(".")[0]
            base = f"{anchor}.{base}" if base else anchor
        return [f"{base}.{alias.name}" for alias in node.names] + [base]

    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                seen = set()
                for target in targets(child):
                    hit = resolve(target)
                    if hit and hit != module and hit.split(".")[0] == "lvit" and hit not in seen:
                        seen.add(hit)
                        found.append((child.lineno, hit, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def layer_problems(root: Path = PACKAGE) -> list[str]:
    """Every breach of the layering under `root`, one line each: file:line, what it imports and why it may not."""
    modules = _modules(root)
    problems, edges = [], {m: set() for m in modules}
    for module, path in modules.items():
        where = path.relative_to(root.parent)
        layer, package = _layer_of(module)
        for line, target, in_function in _lvit_imports(module, path, modules):
            edges[module].add(target)
            if in_function and not module.startswith(LOCAL_IMPORTS_ALLOWED):
                problems.append(
                    f"{where}:{line}: imports {target} inside a function; lvit modules import lvit at the top of "
                    "the file (only lvit.cli defers them)"
                )
            target_layer, target_package = _layer_of(target)
            if target_package in (package, module):
                continue
            if target_layer < layer:
                problems.append(f"{where}:{line}: imports {target}, a layer above {package} (upward import)")
            elif target_layer == layer:
                problems.append(f"{where}:{line}: imports {target}; {package} and {target_package} are siblings")
    for cycle in _cycles(edges):
        problems.append("import cycle among: " + ", ".join(cycle))
    return problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a list of modules."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_lvit_imports_downward_only_at_the_top_of_each_file_without_cycles():
    problems = layer_problems()
    assert not problems, "\n".join(problems)


def test_no_lvit_module_is_longer_than_400_lines():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules by concept (at most {MAX_LINES} lines each): {long}"


@pytest.mark.parametrize(
    ("where", "planted", "expected"),
    [
        (
            "data/packing.py",
            "\n\ndef _planted():\n    from lvit.train.run import run\n\n    return run\n",
            ["inside a function", "upward import"],
        ),
        ("templates/builtin.py", "\nfrom lvit.templates.encoder import get_template  # noqa\n", ["import cycle"]),
        ("runs/files.py", "\nfrom lvit.templates.conversation import Conversation  # noqa\n", ["are siblings"]),
    ],
)
def test_the_contract_fails_on_a_planted_breach(tmp_path, where, planted, expected):
    import shutil

    copy = tmp_path / "lvit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "recipes"))
    assert layer_problems(copy) == []
    with (copy / where).open("a", encoding="utf-8") as f:
        f.write(planted)
    problems = "\n".join(layer_problems(copy))
    for text in expected:
        assert text in problems, problems
    assert f"lvit/{where}" in problems or "import cycle" in problems
