"""grandmother report: one self-contained HTML file; results found by run_dir from any working directory."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from grandmother.config import save_config
from grandmother.errors import GrandmotherError
from grandmother.nn.model import Network
from grandmother.report.page import build_report
from grandmother.report.results import result_fields

from conftest import write_run
from test_visualize import one_stage_config


def test_report_is_one_html_file_with_table1_and_inlined_figures(tmp_path):
    cfg = one_stage_config(size=16, channels=1, field=5, maps=2)
    run = write_run(tmp_path / "out" / "run", cfg, Network(cfg.model))
    probe = tmp_path / "out" / "probe_faces"
    probe.mkdir()
    (probe / "probe.json").write_text(json.dumps({
        "concept": "faces", "run_dir": str(run.resolve()),
        "best": {"unit": "s0.lcn.m1.y3.x4", "accuracy": 0.7345, "threshold": 0.5},
        "top": [{"unit": "s0.lcn.m1.y3.x4", "accuracy": 0.7345}],
        "baselines": {"random_guess": 0.648, "random_weights": 0.6612, "linear_filter": 0.7011, "first_stage": 0.7345},
        "commands": ["grandmother probe RUN --testset T --out P"]}))
    other = tmp_path / "out" / "probe_other_run"  # another run's probe: must not be picked up
    other.mkdir()
    (other / "probe.json").write_text(json.dumps({"concept": "cats", "run_dir": str(tmp_path / "elsewhere"),
                                                  "best": {"unit": "s0.lcn.m0.y0.x0", "accuracy": 0.9}}))
    vis = tmp_path / "out" / "visualize"
    vis.mkdir()
    for name in ("histogram.png", "top_images.png", "optimal_stimulus.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(vis / name)
    (vis / "visualize.json").write_text(json.dumps({"unit": "s0.lcn.m1.y3.x4", "concept": "faces",
                                                    "commands": ["grandmother visualize RUN ..."]}))
    out = tmp_path / "out" / "report.html"
    res = build_report(run, out, command="grandmother report RUN --out report.html")
    page = out.read_text()
    assert res["found"]["probe"] == [str(probe)]
    # the row's highest accuracy is bold, here a tie of the first-stage and the best unit
    assert "<th>faces</th><td>64.8</td><td>66.1</td><td>70.1</td><td><b>73.5</b></td><td><b>73.5</b></td>" in page
    assert "cats" not in page.split("The paper")[0]
    assert "81.7" in page  # the paper's numbers beside ours
    assert page.count("data:image/png;base64,") == 5  # training curves + first-stage filters + 3 figures
    assert "First-stage filters" in page
    assert "grandmother probe RUN --testset T --out P" in page and "grandmother report RUN" in page
    assert "5 steps" in page and "40 images seen" in page
    assert "src=\"http" not in page and "src='http" not in page  # self-contained
    with pytest.raises(GrandmotherError, match="no checkpoint"):
        (tmp_path / "bare").mkdir()
        save_config(cfg, tmp_path / "bare" / "config.yaml")
        build_report(tmp_path / "bare", tmp_path / "r.html")


def test_table1_bolds_the_winner_even_when_it_is_a_baseline():
    from grandmother.report.html import table_html
    cols = [("random_guess", "Random guess"), ("random_weights", "Random weights"), ("best", "Best neuron")]
    page = table_html([("faces", {"random_guess": 64.7, "random_weights": 81.2, "best": 75.4})], cols)
    assert "<td>64.7</td><td><b>81.2</b></td><td>75.4</td>" in page


def test_results_are_found_by_run_dir_from_any_working_directory(tmp_path, monkeypatch):
    """A probe run with a relative RUN_DIR records it resolved; the report, started from another
    folder, matches it to the run (the old probe.json recorded the path as typed and was dropped)."""
    cfg = one_stage_config(size=16, channels=1, field=5, maps=2)
    work = tmp_path / "work"
    run = write_run(work / "runs" / "main", cfg, Network(cfg.model))
    monkeypatch.chdir(work)
    meta = {"step": 5, "images_seen": 40}
    probe = work / "runs" / "probe_faces"
    probe.mkdir()
    fields = result_fields("runs/main", meta, "grandmother probe runs/main --testset T --out runs/probe_faces")
    assert fields["run_dir"] == str(run.resolve()) and fields["checkpoint_step"] == 5
    (probe / "probe.json").write_text(json.dumps({
        **fields, "concept": "faces", "best": {"unit": "s0.lcn.m1.y3.x4", "accuracy": 0.7, "threshold": 0.5},
        "baselines": {"random_guess": 0.6}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = build_report(run, elsewhere / "r.html")
    assert res["found"]["probe"] == [str(probe)]


def test_report_heldout_tables(tmp_path):
    cfg = one_stage_config(size=16, channels=1, field=5, maps=2)
    run = write_run(tmp_path / "out" / "run", cfg, Network(cfg.model))
    probe = tmp_path / "out" / "probe_faces"
    probe.mkdir()
    rec = lambda acc, unit="s0.lcn.m1.y3.x4": {"unit": unit, "evaluation_accuracy": acc, "ci95": [acc - 0.05, acc + 0.04],
                                              "selection_accuracy": 0.9, "auc_evaluation": 0.8123, "direction": "negative",
                                              "same_set_accuracy": 0.95}
    heldout = {
        "protocol": {"seed": 0, "selection": {"images": 60, "positives": 20}, "evaluation": {"images": 61, "positives": 21},
                     "direction": "either", "identities": "<b>persons</b>", "bootstrap": {"resamples": 1000}},
        "best": rec(0.812), "top_stage": rec(0.701, "<script>alert(1)</script>"),
        "baselines": {"random_guess": rec(0.648, "always negative"),
                      "random_weights": {"seeds": [0, 1, 2, 3, 4], "mean": 0.7, "best": 0.75, "best_seed": 2,
                                         "ci95_mean": [0.66, 0.74], "ci95_best": [0.7, 0.8], "unit": "s0.pool.m0.y0.x0"},
                      "trivial_cues": {"mean": rec(0.66, "mean"), "contrast": rec(0.6, "contrast")},
                      "best_trivial_cue": {"cue": "mean"}},
        "differences": {"best_minus": {"random_weights_best": [0.01, 0.1], "best_trivial_cue": [0.1, 0.2]}},
        "per_stage": [{"stage": 0, "sublayer": None, "trained": rec(0.812),
                       "random": {"mean": 0.7, "best": 0.75, "ci95_best": [0.7, 0.8], "auc_mean": 0.7, "auc_best": 0.75}},
                      {"stage": 0, "sublayer": "lcn", "trained": rec(0.8), "trained_auc": {"auc_evaluation": 0.81,
                                                                                           "direction": "negative"}}]}
    (probe / "probe.json").write_text(json.dumps({
        "concept": "faces", "run_dir": str(run.resolve()), "best": {"unit": "s0.lcn.m1.y3.x4", "accuracy": 0.85, "threshold": 0.5},
        "baselines": {"random_guess": 0.648}, "heldout": heldout}))
    build_report(run, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "Held-out evaluation: faces" in page
    assert "<td><b>81.2</b> [76.2, 85.2]</td>" in page  # evaluation accuracy and its interval
    assert "random weights, mean of 5 seeds" in page and "<td><b>70.0</b> [66.0, 74.0]</td>" in page
    assert "random weights, best of 5 seeds (seed 2)" in page and "1.0 to 10.0" in page  # paired difference
    assert "trivial cue: mean (chosen on selection)" in page and "10.0 to 20.0" in page
    assert "<td>95.0</td>" in page  # the paper's same-set number beside
    assert "stage 0 (all)" in page and "stage 0 lcn" in page and "0.810 negative" in page
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;persons" in page


def test_report_shows_the_face_fraction_of_the_training_data_before_and_after_rebalancing(tmp_path):
    cfg = one_stage_config(size=16, channels=1, field=5, maps=2)
    pages = {}
    for name, rebalance in [
        ("cut", {"method": "detector", "max_face_fraction": 0.1, "seed": 0, "fewer_faces_than_target": False,
                 "before": {"images": 1980, "faces": 354, "fraction": 354 / 1980},
                 "after": {"images": 1806, "faces": 180, "fraction": 180 / 1806}}),
        ("few", {"method": "paths", "max_face_fraction": 0.1, "seed": 0, "fewer_faces_than_target": True,
                 "before": {"images": 100, "faces": 5, "fraction": 0.05},
                 "after": {"images": 100, "faces": 5, "fraction": 0.05}}),
        ("none", None),
        ("broken", {"before": "<script>", "after": []}),
    ]:
        data = tmp_path / name / "data"
        data.mkdir(parents=True)
        (data / "index.json").write_text(json.dumps({"images": 1, **({"rebalance": rebalance} if rebalance else {})}))
        run = write_run(tmp_path / name / "run", cfg, Network(cfg.model), meta={"data": str(data)})
        build_report(run, tmp_path / name / "report.html")
        pages[name] = (tmp_path / name / "report.html").read_text()
    assert "<th>faces in training data</th><td>before 17.9%, after 10.0% (target: at most 10.0%)</td>" in pages["cut"]
    assert ("<th>faces in training data</th><td>before 5.0%, after 5.0%: nothing removed, the data hold fewer faces "
            "than the target 10.0%</td>") in pages["few"]
    assert "faces in training data" not in pages["none"] and "faces in training data" not in pages["broken"]
