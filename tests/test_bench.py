"""The Keras peer of `grandmother bench --peers` (grandmother/bench/keras_peer.py, scripts/keras_peer.py):
the request it sends, the answer it parses (a fake runner), one-line refusals, and (only where
scripts/keras_peer.sh built its environment) the real runner's answer. The skip path through the whole
bench: tests/test_kernels.py::test_bench_runs_on_a_tiny_shape."""
from __future__ import annotations

import json
import re
import stat

import pytest
import torch

from grandmother.bench import keras_peer
from grandmother.bench.peers import _keras_rows, format_peers
from grandmother.errors import GrandmotherError

SHAPES = [{"stage": 0, "C": 1, "H": 9, "W": 9, "k": 4, "M": 2, "stride": 1},
          {"stage": 1, "C": 2, "H": 6, "W": 6, "k": 3, "M": 2, "stride": 1}]


def fake_runner(tmp_path, monkeypatch, stdout: str, status: int = 0, stderr: str = "") -> tuple:
    """A stand-in for the Keras environment's Python: keeps the request it was sent, prints `stdout`."""
    request = tmp_path / "request.json"
    (tmp_path / "out.txt").write_text(stdout)
    (tmp_path / "err.txt").write_text(stderr)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\ncat > {request}\ncat {tmp_path / 'out.txt'}\ncat {tmp_path / 'err.txt'} >&2\n"
                      f"exit {status}\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(keras_peer.PYTHON_ENV, str(python))
    return python, request


def answer(seconds=0.5, rows=None) -> str:
    rows = rows if rows is not None else [
        {"stage": s["stage"], "implementation": i, "seconds": seconds, "note": None}
        for s in SHAPES for i in keras_peer.IMPLEMENTATIONS]
    return json.dumps({"tensorflow": "9.9", "tf_keras": "9.9", "threads": 3, "rows": rows})


def test_the_answer_of_a_runner_becomes_peer_rows(tmp_path, monkeypatch):
    rows = [{"stage": s["stage"], "implementation": i, "seconds": 0.25 * (1 + s["stage"]) if i == 2 else None,
             "note": None if i == 2 else "too many locations"} for s in SHAPES for i in keras_peer.IMPLEMENTATIONS]
    _, request = fake_runner(tmp_path, monkeypatch, "TensorFlow chatter on stdout\n" + answer(rows=rows) + "\n")
    out = []
    record = _keras_rows(SHAPES, torch.device("cpu"), 7, 2, 1 << 30, 100.0, out)
    assert record == {"tensorflow": "9.9", "tf_keras": "9.9", "threads": 3}
    sent = json.loads(request.read_text())
    assert sent["shapes"] == SHAPES and sent["batch"] == 7 and sent["repeats"] == 2
    assert sent["threads"] == torch.get_num_threads() and sent["memory_bytes"] == 1 << 30
    assert sent["implementations"] == list(keras_peer.IMPLEMENTATIONS)
    by = {(r["stage"], r["impl"]): r for r in out}
    assert set(by) == {(s["stage"], keras_peer.impl_name(i)) for s in SHAPES for i in keras_peer.IMPLEMENTATIONS}
    # stage 1: 6 * B * Ho * Wo * M * C * k^2 FLOPs in 0.5 s, against a 100 GFLOP/s matmul
    r = by[(1, "keras-i2")]
    assert r["gflops"] == pytest.approx(6 * 7 * 4 * 4 * 2 * 2 * 9 / 0.5 / 1e9)
    assert r["fraction_of_matmul"] == pytest.approx(r["gflops"] / 100.0)
    assert by[(0, "keras-i1")]["seconds"] is None and by[(0, "keras-i1")]["note"] == "too many locations"
    table = format_peers(out, [], record)
    assert "keras-i2" in table and "keras-i1" in table and "n/a: keras-i1 stage 0: too many locations" in table
    assert table.splitlines()[-1] == "Keras peer: tensorflow 9.9, tf_keras 9.9, 3 thread(s)"


@pytest.mark.parametrize("stdout,status,stderr,expect", [
    ("not json at all\n", 0, "", "not the expected JSON"),
    ("", 0, "", "not the expected JSON"),
    (json.dumps({"rows": [{"stage": 0}]}), 0, "", "not the expected JSON"),
    (answer(seconds=-1.0), 0, "", "not the expected JSON"),
    (answer(rows=[{"stage": 0, "implementation": 2, "seconds": 1.0, "note": None}]), 0, "", "answered for [(0, 2)]"),
    ("", 3, "ImportError: no tf_keras\n", "exited with status 3: ImportError: no tf_keras"),
])
def test_a_bad_runner_is_one_line_and_skips_the_peer(tmp_path, monkeypatch, stdout, status, stderr, expect):
    fake_runner(tmp_path, monkeypatch, stdout, status, stderr)
    with pytest.raises(GrandmotherError, match=re.escape(expect)) as e:
        keras_peer.run_keras(SHAPES, 2, 1, 1, 1 << 30)
    assert "\n" not in str(e.value)
    out = []
    record = _keras_rows(SHAPES, torch.device("cpu"), 2, 1, 1 << 30, 1.0, out)
    assert out == [] and expect in record["skipped"]


def test_no_environment_and_other_devices_skip_with_the_way_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(keras_peer.PYTHON_ENV, str(tmp_path / "absent" / "python"))
    out = []
    record = _keras_rows(SHAPES, torch.device("cpu"), 2, 1, 1 << 30, 1.0, out)
    assert out == [] and "absent" in record["skipped"] and "scripts/keras_peer.sh" in record["skipped"]
    assert format_peers(out, [], record).splitlines()[-1] == f"Keras peer skipped: {record['skipped']}"
    monkeypatch.setenv(keras_peer.PYTHON_ENV, "none")
    assert _keras_rows(SHAPES, torch.device("cpu"), 2, 1, 1 << 30, 1.0, out) == {
        "skipped": "turned off (GRANDMOTHER_KERAS_PYTHON=none)"} and out == []
    monkeypatch.delenv(keras_peer.PYTHON_ENV)
    record = _keras_rows(SHAPES, torch.device("meta"), 2, 1, 1 << 30, 1.0, out)
    assert out == [] and record == {"skipped": "the Keras peer runs on the CPU only, not on meta"}


def test_the_build_script_takes_its_default_from_the_module():
    """scripts/keras_peer.sh reads KERAS_VENV's line with sed: that line must stay in the form it reads."""
    text = (keras_peer.ROOT / "grandmother" / "bench" / "keras_peer.py").read_text()
    assert re.findall(r'^KERAS_VENV = "([^"]*)"', text, re.M) == [keras_peer.KERAS_VENV]
    assert "grandmother/bench/keras_peer.py" in (keras_peer.ROOT / "scripts" / "keras_peer.sh").read_text()


def test_the_real_keras_runner_answers():
    """Only where scripts/keras_peer.sh built the environment (about 700 MB: not in every checkout)."""
    try:
        keras_peer.keras_python()
    except GrandmotherError as e:
        pytest.skip(f"Keras peer not installed: {e}")
    shapes = SHAPES[:1] + [{"stage": 1, "C": 3, "H": 12, "W": 10, "k": 5, "M": 2, "stride": 2}]
    got = keras_peer.run_keras(shapes, 3, 1, 1, 1 << 30)
    assert re.fullmatch(r"2\.\d+\.\d+", got["tf_keras"]) and got["threads"] == 1
    assert len(got["rows"]) == 4 and all(r["seconds"] > 0 and r["note"] is None for r in got["rows"])
    # A dense kernel too large for the memory allowed is refused, not attempted; so is impl 1 at many locations
    big = [{"stage": 0, "C": 1, "H": 60, "W": 60, "k": 4, "M": 8, "stride": 1}]
    rows = {r["implementation"]: r for r in keras_peer.run_keras(big, 2, 1, 1, 1 << 20)["rows"]}
    assert rows[2]["seconds"] is None and "dense kernel needs" in rows[2]["note"]
    assert rows[1]["seconds"] is None and "3249 locations" in rows[1]["note"]
