"""The shape of the code: no import cycles inside grandmother/, argparse only in grandmother/commands/."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "grandmother"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(grandmother modules imported anywhere in the file, including inside functions; top-level names of
    every imported package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    inner, outer = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                outer.add(a.name.split(".")[0])
                if a.name in known:
                    inner.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
                outer.add(target.split(".")[0])
            for a in node.names:  # `from . import x` imports the module x
                if f"{target}.{a.name}" in known:
                    inner.add(f"{target}.{a.name}")
                elif target in known:
                    inner.add(target)
    inner.discard(name)
    return inner, outer


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = modules()
    edges, outer = {}, {}
    for name, path in mods.items():
        edges[name], outer[name] = imports_of(name, path, set(mods))
    return edges, outer


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_in_grandmother():
    edges, _ = graph()
    assert "grandmother.commands.common" in edges["grandmother.commands.analysis"]  # the walk sees relative imports
    assert "grandmother.kernels.base" in edges["grandmother.kernels.tiled"]
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_argparse_only_in_the_command_layer():
    _, outer = graph()
    users = sorted(n for n, names in outer.items() if "argparse" in names)
    assert users and all(n == "grandmother.commands" or n.startswith("grandmother.commands.") for n in users), users


def test_the_library_never_imports_the_command_layer():
    edges, _ = graph()
    library = [n for n in edges if not n.startswith("grandmother.commands") and n != "grandmother.__main__"]
    bad = sorted(f"{n} -> {m}" for n in library for m in edges[n] if m.startswith("grandmother.commands"))
    assert not bad, bad
