"""One self-contained HTML report of a run: training curves, Table 1, every figure, and the commands.

    grandmother report RUN_DIR --out report.html
    grandmother report RUN_DIR --out report.html --probe P1 --probe P2 --visualize V --invariance I --classify C

Where the results come from: the folders given with --probe / --visualize / --invariance / --classify
(each flag repeatable). When none is given, they are discovered: every folder directly inside RUN_DIR or
beside it (in RUN_DIR's parent) holding probe.json, visualize.json, invariance.json or classify.json
whose recorded "run_dir" is RUN_DIR (grandmother/results.py: one schema for every results file, the
run as an absolute path, so the report finds them from any working directory; files that record no
run_dir are taken too). Discovery is per kind: `--probe P` alone still discovers the visualize,
invariance and classify folders. That is the layout `grandmother run` writes: OUT/run, OUT/probe_NAME,
OUT/visualize_NAME, OUT/invariance_NAME, OUT/report.html.

Images are inlined as base64 PNG (data: URLs), so the one file can be mailed or opened anywhere.

Results files are data from wherever a run folder came from, so the report trusts none of them: every
value is escaped (or must be a number where a number is shown), a field of the wrong type is shown as
missing, and a file is embedded only from inside the result folder that names it (resolved paths,
symbolic links followed, that lead outside are refused with a note in the report).
"""
from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path

from grandmother.errors import GrandmotherError
from grandmother.io import atomic_write_text
from grandmother.report.html import _list, commands_html, concept_name, read_metrics, result_dirs, table_row
from grandmother.report.results import RESULT_FILES, read_result
from grandmother.report.sections import (
    section_classify,
    section_heldout,
    section_invariance,
    section_table1,
    section_training,
    section_visualize,
)

CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}
th{background:#f2f2f2}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:90%}
img{max-width:100%;margin:4px;vertical-align:top}.note{color:#555;font-size:90%}h2{border-bottom:1px solid #ccc}"""


def build_report(run_dir: Path, out: Path, probes=None, visualize=None, invariance=None, classify=None,
                 command: str | None = None, first_commands: list[str] | None = None) -> dict:
    """Write the HTML report; `first_commands` (e.g. the training command) are listed before the rest."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GrandmotherError(f"RUN_DIR {run_dir}: not a folder")
    records = read_metrics(run_dir)
    training, scale = section_training(run_dir, records)
    found = {kind: [(d, read_result(d / RESULT_FILES[kind])) for d in result_dirs(kind, given, run_dir)]
             for kind, given in (("probe", probes), ("visualize", visualize), ("invariance", invariance),
                                 ("classify", classify))}
    commands = list(first_commands or [])
    for kind in ("probe", "visualize", "invariance", "classify"):
        commands += [str(c) for _, j in found[kind] for c in _list(j.get("commands"))]
    if command:
        commands.append(command)
    title = f"grandmother report: {run_dir.resolve().name}"
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="note">Run directory {html.escape(str(run_dir.resolve()))}; written '
            f'{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Le et al., "Building High-level Features '
            f'Using Large Scale Unsupervised Learning", ICML 2012.</p>',
            section_table1(found["probe"]), section_heldout(found["probe"]), training, section_visualize(found["visualize"]),
            section_invariance(found["invariance"]), section_classify(found["classify"]),
            "<h2>Commands that produced these results</h2>", commands_html(commands)]
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    atomic_write_text(Path(out), page)
    return {"out": str(out), "scale": scale, "rows": [(concept_name(p, d), table_row(p)) for d, p in found["probe"]],
            "found": {k: [str(d) for d, _ in v] for k, v in found.items()}}
