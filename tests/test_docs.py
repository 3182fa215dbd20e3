"""The README is a page, its quick-start commands parse, and the docs' commands and links hold."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from grandmother.commands import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def fenced_commands(text: str) -> list[str]:
    """Every `grandmother ...` line inside a fenced block (continuation lines joined, comments cut)."""
    out = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("grandmother "):
                out.append(line.split(" #", 1)[0].strip())
    return out


def quick_start() -> str:
    text = README.read_text()
    return text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]


def parses(command: str) -> None:
    build_parser().parse_args(shlex.split(command)[1:])  # argparse exits on an unknown flag or value


def test_readme_is_a_page():
    assert len(README.read_text().splitlines()) <= 200


def test_quick_start_commands_parse():
    commands = fenced_commands(quick_start())
    assert [c.split()[1] for c in commands] == ["testset", "ingest", "train", "probe", "visualize", "report"]
    for c in commands:
        parses(c)


def test_a_wrong_flag_would_be_caught():
    with pytest.raises(SystemExit):
        parses("grandmother train --no-such-flag 1 --out x")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_complete_command_in_the_docs_parses(page):
    """Commands written out in full parse; templates with `...` or [optional] parts are left out."""
    for c in fenced_commands(page.read_text()):
        if "..." not in c and "[" not in c:
            parses(c)


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_point_to_files(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name}: link to {target} goes nowhere"
