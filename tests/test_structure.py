"""The shape of the code: no import cycles inside grandmother/, argparse only in grandmother/commands/, no
block of six or more lines repeated inside grandmother/ (issue 13)."""
from __future__ import annotations

import ast
import re
from collections import defaultdict
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
    assert "grandmother.commands.common" in edges["grandmother.commands.analysis"]
    assert "grandmother.nn.kernels.base" in edges["grandmother.nn.kernels.tiled"]
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


# ---------------------------------------------------------------- no repeated blocks

# Lines that say nothing alone: closing brackets, pass, bare docstring quotes, imports (and the continuation
# lines of a parenthesised import), #include. A window of nothing else is no repeated block.
TRIVIAL = re.compile(r"""[)\]}{]+[,;:]?|pass|\"\"\"|'''|#include\b.*|(from\s+\S+\s+)?import\s.*""")


def code_lines(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text with white space folded, trivial) of every non-blank line of a file."""
    out, in_import = [], False
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        text = " ".join(raw.split())
        if not text:
            continue
        out.append((number, text, in_import or TRIVIAL.fullmatch(text) is not None))
        if re.match(r"from\s+\S+\s+import\s*\(", text) and ")" not in text:
            in_import = True
        elif in_import and ")" in text:
            in_import = False
    return out


def repeated_blocks(files, window: int = 6) -> dict[str, list[str]]:
    """Every run of `window` consecutive non-blank lines (white space folded) that stands in two or more
    places, with its places (path:first-last); runs of trivial lines only are left out."""
    places = defaultdict(list)
    for path in files:
        lines = code_lines(path)
        for i in range(len(lines) - window + 1):
            run = lines[i:i + window]
            if not all(trivial for _, _, trivial in run):
                places["\n".join(text for _, text, _ in run)].append(f"{path}:{run[0][0]}-{run[-1][0]}")
    return {text: where for text, where in places.items() if len(where) > 1}


def test_the_repeat_finder_finds_a_repeat(tmp_path):
    block = "def f(x):\n    y = x + 1\n    if y > 2:\n        y -= 1\n    z = [y,\n         x]\n    return z\n"
    (tmp_path / "a.py").write_text("import os\n\n" + block)
    (tmp_path / "b.cpp").write_text("int g;\n" + block.replace("    ", "  "))  # indented otherwise: the same
    found = repeated_blocks([tmp_path / "a.py", tmp_path / "b.cpp"])
    assert len(found) == 2 and all(len(where) == 2 for where in found.values()), found
    (tmp_path / "b.cpp").write_text(block.replace("y -= 1", "y -= 2"))  # one line differs: no run of 6 the same
    assert not repeated_blocks([tmp_path / "a.py", tmp_path / "b.cpp"])
    trivial = "from x import (a,\n    b)\nimport y\n)\n]\n}\npass\n\"\"\"\n"
    (tmp_path / "c.py").write_text(trivial + "x = 1\n" + trivial)
    assert not repeated_blocks([tmp_path / "c.py"])


def test_no_block_of_six_lines_is_repeated_in_grandmother():
    files = sorted(PACKAGE.rglob("*.py")) + sorted(PACKAGE.rglob("*.cpp"))
    assert len(files) > 40 and any(p.suffix == ".cpp" for p in files)
    found = repeated_blocks(files)
    assert not found, "repeated blocks (make one piece of code serve both):\n" + "\n".join(
        " ~ ".join(where) + "\n    " + text.replace("\n", "\n    ") for text, where in found.items())


# ---------------------------------------------------------------- subpackages and their floors

# The system's parts, bottom up (docs/code.md). A module imports only from its own floor or below:
# data and nn never import training, distributed, analysis or report.
TOP_LEVEL = {"grandmother", "grandmother.__main__", "grandmother.config", "grandmother.errors", "grandmother.io"}
FLOORS = {"data": 1, "nn": 1, "training": 2, "distributed": 3, "report": 3, "analysis": 4, "bench": 5,
          "pipeline": 6, "commands": 7}


def floor_of(module: str) -> int:
    if module == "grandmother.__main__":  # `python -m grandmother`: the command layer's entry point
        return FLOORS["commands"]
    if module in TOP_LEVEL:
        return 0
    return FLOORS[module.split(".")[1]]


def test_every_module_sits_in_a_subpackage():
    loose = sorted(m for m in modules() if m not in TOP_LEVEL and m.split(".")[1] not in FLOORS)
    assert not loose, f"modules outside the subpackages of docs/code.md: {loose}"


def test_no_import_runs_up_a_floor():
    edges, _ = graph()
    up = sorted(f"{n} -> {m}" for n, targets in edges.items() for m in targets if floor_of(m) > floor_of(n))
    assert not up, "imports from a lower part up to a higher one:\n" + "\n".join(up)


def test_the_floor_check_sees_an_upward_import():
    assert floor_of("grandmother.data.testset") < floor_of("grandmother.analysis.heldout")
    assert floor_of("grandmother.config") == 0 and floor_of("grandmother.nn.kernels.base") == 1


def test_experiments_define_no_scoring_function_of_their_own():
    """The held-out protocol exists once, in grandmother.analysis.heldout: experiments/ may call it, never
    re-implement it (no function there computes accuracies, AUCs, thresholds or unit tables)."""
    scoring = re.compile(r"(auc|accuracy|threshold|unit_table|counts|roc|bootstrap)", re.I)
    found = []
    for path in sorted((PACKAGE.parent / "experiments").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and scoring.search(node.name):
                found.append(f"{path.name}:{node.lineno} {node.name}")
    assert not found, found


def test_no_module_is_over_500_lines():
    long = sorted(f"{p.relative_to(PACKAGE.parent)}: {n}" for p in PACKAGE.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > 500)
    assert not long, f"modules over 500 lines (split them by concern): {long}"


def test_every_import_of_the_package_in_scripts_and_experiments_resolves():
    """scripts/ and experiments/ import the package inside functions too; after a module moves, those
    imports must move with it (experiments/check_leak.py and scripts/gpu_check.py once did not)."""
    import ast
    import importlib
    root = PACKAGE.parent
    bad = []
    for f in sorted((root / "scripts").glob("*.py")) + sorted((root / "experiments").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("grandmother"):
                pairs = [(node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                pairs = [(a.name, None) for a in node.names if a.name.startswith("grandmother")]
            else:
                continue
            for module, name in pairs:
                try:
                    m = importlib.import_module(module)
                    if name is not None and not hasattr(m, name):
                        importlib.import_module(f"{module}.{name}")
                except ImportError as e:
                    bad.append(f"{f.relative_to(root)}:{node.lineno}: {module} {name or ''}: {e}")
    assert not bad, "\n".join(bad)


def test_no_worker_pool_is_forked():
    """Forked workers inherit locks held by the parent's threads (OpenCV, FFmpeg, Ray, OpenMP) and can wait
    for ever: CI hung that way twice. Pools start their workers with spawn (data/images.decode_pool)."""
    forked = [f"{module_name(p)}: {line.strip()}" for p in modules().values()
              for line in p.read_text().splitlines()
              if re.search(r"""get_context\(\s*["']fork["']|os\.fork\(|set_start_method\(\s*["']fork""", line)]
    assert not forked, forked
