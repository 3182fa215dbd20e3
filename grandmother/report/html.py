"""Pieces of the HTML report: escaping, numbers, embedded images, reading results files and metrics.

Every value read from a results file is untrusted (see grandmother/report/page.py)."""
from __future__ import annotations

import base64
import html
import json
import math
import sys
from pathlib import Path

from grandmother.errors import GrandmotherError
from grandmother.report.results import RESULT_FILES, read_result


# ---------------------------------------------------------------- reading results

def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _list(x) -> list:
    return x if isinstance(x, list) else []


def esc(value) -> str:
    """Any value from a results file, as HTML text."""
    return html.escape(str(value))


def num(value, spec: str = ".4g", missing: str = "?") -> str:
    """A number from a results file formatted with `spec`; anything else escaped (or `missing`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return missing if value is None else esc(value)
    return format(value, spec)


def contained_file(folder: Path, name) -> Path | None:
    """`folder / name` if it is a file whose resolved path lies inside the resolved `folder`, else None."""
    if not isinstance(name, str) or not name:
        return None
    base = Path(folder).resolve()
    try:
        path = (base / name).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        return None
    if not path.is_relative_to(base):
        print(f"warning: report: {name!r} named in {folder} lies outside that folder; not embedded", file=sys.stderr)
        return None
    return path if path.is_file() else None


def embed(folder: Path, name, alt: str) -> str:
    """The PNG `name` of result folder `folder`, inlined; a note instead when it is missing or refused."""
    path = contained_file(folder, name)
    if path is None:
        return f'<p class="note">({esc(alt)}: file {esc(name)} not found inside {esc(Path(folder).name)})</p>'
    try:
        return inline_png(path, alt)
    except OSError as e:
        return f'<p class="note">({esc(alt)}: {esc(name)} unreadable: {esc(e.strerror or e)})</p>'


def result_dirs(kind: str, given: list[Path] | None, run_dir: Path) -> list[Path]:
    """Folders holding `kind`'s JSON: the given ones (checked), or the discovered ones."""
    name = RESULT_FILES[kind]
    if given:
        for d in given:
            if not (Path(d) / name).is_file():
                raise GrandmotherError(f"--{kind} {d}: no {name} there")
        return [Path(d) for d in given]
    run_dir = Path(run_dir).resolve()
    found = []
    for parent in (run_dir, run_dir.parent):
        for d in sorted(p for p in parent.iterdir() if p.is_dir()):
            f = d / name
            if f.is_file() and d.resolve() not in [x.resolve() for x in found]:
                recorded = read_result(f).get("run_dir")
                if recorded is None or (isinstance(recorded, str) and Path(recorded).resolve() == run_dir):
                    found.append(d)
    return found


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl records with a step; torn or foreign lines are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and _is_number(rec.get("step")) and _is_number(rec.get("loss")):
                if not _is_number(rec.get("images", 0)):
                    rec.pop("images")
                stages = rec.get("stages", [])
                if not isinstance(stages, list) or not all(isinstance(st, dict) for st in stages):
                    stages = []
                rec["stages"] = [{k: v for k, v in st.items() if _is_number(v)} for st in stages]
                records.append(rec)
    # A run resumed from an older checkpoint logs some steps twice: keep the latest line of each step.
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def percent(value) -> float | None:
    """An accuracy as a percentage; probe files may hold fractions (0.817) or dicts with "accuracy".
    Anything that is not a finite number counts as missing."""
    if isinstance(value, dict):
        value = value.get("accuracy")
    if not _is_number(value) or not math.isfinite(value):
        return None
    value = float(value)
    return value * 100.0 if value <= 1.0 else value


def concept_name(probe: dict, folder: Path) -> str:
    name = probe.get("concept") or folder.name
    name = name if isinstance(name, str) else str(name)
    return name[len("probe_"):] if name.startswith("probe_") else name


def table_row(probe: dict) -> dict[str, float | None]:
    row = {str(key): percent(v) for key, v in _dict(probe.get("baselines")).items()}
    row["best"] = percent(probe.get("best"))
    return row


# ---------------------------------------------------------------- pieces of HTML

def inline_png(path: Path, alt: str, width: int | None = None) -> str:
    """A PNG file inlined as a data: URL (callers with a results file's names use `embed`)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    w = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"{w}>'


def png_tag(data: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{html.escape(alt)}">'


def section_filters(run_dir: Path) -> str:
    """Stage 0's encoder and decoder filters, drawn from the latest checkpoint."""
    import io
    from PIL import Image
    from grandmother.training.runs import load_run
    from grandmother.report.plots import first_stage_filters
    _, net, _ = load_run(run_dir)
    buf = io.BytesIO()
    Image.fromarray(first_stage_filters(net)).save(buf, format="PNG")
    return ("<h3>First-stage filters</h3><p class=\"note\">Five locations (centre, then the four quadrants' "
            "centres); per location one row of encoder vectors (gray frames) and one of decoder vectors (black "
            "frames), one column per map, each filter scaled to its own range.</p>" + png_tag(buf.getvalue(), "first-stage filters"))


def fmt(v: float | None) -> str:
    return "\u2014" if v is None else f"{v:.1f}"  # an em dash: plain text, safe inside escaped cells too


def table_html(rows: list[tuple[str, dict]], columns: list[tuple[str, str]], bold_best: bool = True) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = []
    for concept, row in rows:
        cells = []
        # Bold the row's highest accuracy, whichever column holds it: at small scale a baseline can beat
        # the best trained unit, and the table should show that, not highlight the trained unit anyway.
        shown = [round(row[k], 1) for k, _ in columns if row.get(k) is not None]
        top = max(shown) if shown else None
        for key, _ in columns:
            v = row.get(key)
            cell = fmt(v)
            bold = bold_best and v is not None and round(v, 1) == top
            cells.append(f"<td><b>{cell}</b></td>" if bold else f"<td>{cell}</td>")
        body.append(f"<tr><th>{html.escape(concept)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>concept</th>{head}</tr>{''.join(body)}</table>"


def commands_html(commands: list[str]) -> str:
    if not commands:
        return "<p>(no commands recorded)</p>"
    return "<pre>" + "\n".join(html.escape(c) for c in commands) + "</pre>"


def kv_table(pairs: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in pairs) + "</table>"


# ---------------------------------------------------------------- sections


# ---------------------------------------------------------------- the report

