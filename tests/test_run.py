"""`grandmother run`: the whole job, resumable; killed and re-run it ends where an uninterrupted run ends."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grandmother.errors import GrandmotherError
from grandmother.pipeline.inputs import describe_change
from grandmother.pipeline.job import Job, run_pipeline
from grandmother.pipeline.stages import STAGE_NAMES as STAGES, shown_unit
from grandmother.data.samples import SAMPLE_DIR

ROOT = Path(__file__).resolve().parents[1]
# The tiniest job that still runs every stage: the small preset's shape with 2 maps per stage.
TINY = ["model.stages.*.maps=2", "train.batch_size=20", "train.checkpoint_every=5", "train.log_every=5"]

# Runs the CLI in a subprocess that SIGKILLs itself right after the nth file whose destination matches
# PATTERN is renamed into place (checkpoints, probe caches): a crash at a known point, no race.
KILLER = r"""
import os, re, signal, sys
pattern, nth = re.compile(sys.argv[1]), int(sys.argv[2])
seen = [0]
def wrap(fn):
    def renamed(src, dst, *a, **k):
        out = fn(src, dst, *a, **k)
        if pattern.search(os.fspath(dst)):
            seen[0] += 1
            if seen[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return out
    return renamed
os.replace, os.rename = wrap(os.replace), wrap(os.rename)
from grandmother.commands import main
sys.exit(main(sys.argv[3:]))
"""


def cli(args, kill_at: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    pattern, nth = kill_at or ("^$", 0)
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.run([sys.executable, "-c", KILLER, pattern, str(nth), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def stage_status(out: Path) -> dict:
    return {k: v["status"] for k, v in json.loads((out / "run.json").read_text())["stages"].items()}


def results(out: Path) -> dict:
    """Everything a finished job computed, with its folder name taken out of the paths."""
    latest = (out / "run" / "checkpoints" / "latest").read_text().strip()
    got = {"weights": (out / "run" / "checkpoints" / latest / "model.safetensors").read_bytes()}
    index = json.loads((out / "data" / "index.json").read_text())
    index.pop("elapsed_s", None)
    got["data"] = index
    for path in sorted(out.glob("*_*/*.json")):
        if path.parent.name.startswith(("probe_", "visualize_", "invariance_")):
            got[f"{path.parent.name}/{path.name}"] = json.loads(path.read_text().replace(str(out.resolve()), "OUT")
                                                                .replace(str(out), "OUT"))
    got["report_rows"] = json.loads((out / "run.json").read_text())["stages"]["report"]["result"]["rows"]
    return got


# ---------------------------------------------------------------- the in-package sample, no --testset

@pytest.mark.slow
def test_run_on_the_sample_without_testset_resumes_and_refuses_changes(tmp_path, capsys):
    out = tmp_path / "job"
    res = run_pipeline([SAMPLE_DIR / "train"], out, overrides=TINY, steps=6, progress=False)
    rec = res["record"]
    assert [s for s in STAGES if rec["stages"][s]["status"] == "done"] == list(STAGES)
    assert rec["stages"]["train"]["result"]["steps"] == 6
    # rebalanced by default to at most 20% faces: the detector finds a face in 495 of the 2,500 sample images
    # (built at 20%), so nothing is removed, and the report says so
    rb = rec["stages"]["ingest"]["result"]["rebalance"]
    assert rb["before"] == {"images": 2500, "faces": 495, "fraction": 495 / 2500} and rb["method"] == "detector"
    assert rb["after"] == rb["before"] and rb["max_face_fraction"] == 0.2
    assert rec["stages"]["ingest"]["result"]["images"] == 2500
    # the face test set shipped in the package, built at the network's size; a face row in the report
    probe = json.loads((out / "probe_faces" / "probe.json").read_text())
    assert probe["concept"] == "faces" and probe["n_images"] == 848 and probe["n_positive"] == 299
    # the face row of the held-out protocol: chosen on the selection half, scored on the evaluation half
    ho = probe["heldout"]
    assert ho["protocol"]["selection"]["images"] + ho["protocol"]["evaluation"]["images"] == 848
    shown = rec["stages"]["probe"]["result"]["faces"]
    assert shown == shown_unit(probe) and shown["unit"] == ho["top_stage"]["unit"]
    assert shown["unit"].startswith("s2.") and shown["evaluation_accuracy"] == ho["top_stage"]["evaluation_accuracy"]
    assert json.loads((out / "visualize_faces" / "visualize.json").read_text())["unit"] == shown["unit"]
    rows = dict((name, row) for name, row in rec["stages"]["report"]["result"]["rows"])
    assert rows["faces"]["best"] == pytest.approx(100 * probe["best"]["accuracy"])
    page = (out / "report.html").read_text()
    assert "faces" in page and probe["best"]["unit"] in page and shown["unit"] in page
    assert ("<th>faces in training data</th><td>before 19.8%, after 19.8%: nothing removed, the data hold fewer "
            "faces than the target 20.0%</td>") in page
    heldout_section = page[page.index("<h2>Held-out evaluation: faces</h2>"):]
    assert f"<b>{100 * ho['top_stage']['evaluation_accuracy']:.1f}</b>" in heldout_section
    for name in ("histogram.png", "top_images.png", "optimal_stimulus.png"):
        assert (out / "visualize_faces" / name).is_file()
    assert (out / "invariance_faces" / "scale.png").is_file()
    lines = capsys.readouterr().out.splitlines()
    for i, stage in enumerate(STAGES, 1):  # one line per stage with its ETA, one when done
        assert sum(bool(re.match(rf"\[run\] {i}/7 {stage}: .*ETA \d", ln)) for ln in lines) == 1, stage
        assert sum(bool(re.match(rf"\[run\] {i}/7 {stage}: done in ", ln)) for ln in lines) == 1, stage

    # the same command again: nothing is redone
    before = (out / "run.json").read_text()
    run_pipeline([SAMPLE_DIR / "train"], out, overrides=TINY, steps=6, progress=False)
    assert "done before" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["stages"] == json.loads(before)["stages"]

    # changed settings are refused, naming the change; --restart-from an earlier stage is refused too
    with pytest.raises(GrandmotherError, match=r"train\.lr: 0\.003 -> 0\.02 .*--restart-from train"):
        run_pipeline([SAMPLE_DIR / "train"], out, overrides=TINY + ["train.lr=0.02"], steps=6, progress=False)
    with pytest.raises(GrandmotherError, match=r"--steps: 6 -> 7"):
        run_pipeline([SAMPLE_DIR / "train"], out, overrides=TINY, steps=7, restart_from="probe", progress=False)
    with pytest.raises(GrandmotherError, match=r"the SRC list changed"):
        extra = tmp_path / "more"
        extra.mkdir()
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(extra / "x.png")
        run_pipeline([SAMPLE_DIR / "train", extra], out, overrides=TINY, steps=6, progress=False)
    assert (out / "run.json").read_text() == before

    # --restart-from redoes that stage and the later ones only
    old_visualize = json.loads(before)["stages"]["visualize"]["finished"]
    run_pipeline([SAMPLE_DIR / "train"], out, overrides=TINY, steps=6, restart_from="invariance", progress=False)
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert stages["visualize"]["finished"] == old_visualize
    assert stages["probe"] == json.loads(before)["stages"]["probe"]
    assert all(stages[s]["status"] == "done" for s in STAGES)


def test_changes_are_named():
    old = {"srcs": ["/a"], "files": {"/a/1.png": [10, 1], "/a/2.png": [10, 1], "/a/3.png": [10, 1]}}
    new = {"srcs": ["/a"], "files": {"/a/1.png": [10, 1], "/a/2.png": [11, 2], "/a/4.png": [10, 1]}}
    assert describe_change("sources", old, old) is None
    assert describe_change("sources", old, new) == ("input files changed: 1 file(s) added (first: /a/4.png); 1 file(s) "
                                                    "removed (first: /a/3.png); 1 file(s) modified (first: /a/2.png)")
    assert describe_change("config", {"model": {"stages": [{"maps": 8}]}}, {"model": {"stages": [{"maps": 4}]}}) == \
        "setting model.stages[0].maps: 8 -> 4"
    assert describe_change("budget", {"steps": 300}, {"minutes": 5.0}) == "--minutes: <unset> -> 5.0"


def test_minutes_budget_chooses_steps_from_the_measured_warmup(tmp_path):
    job = Job([SAMPLE_DIR / "train"], tmp_path / "job", overrides=TINY, minutes=0.5, progress=False)
    job.prepare()
    job.measure()
    sps = job.warmup["seconds_per_step"]
    assert sps > 0 and job.warmup["timed_steps"] == 3
    plan, eta, what = job.stage("train").plan({})
    assert plan["steps"] == max(1, int(0.5 * 60 * 0.9 / sps)) and plan["warmup"] == job.warmup
    assert eta == pytest.approx(plan["steps"] * sps) and f"{plan['steps']} steps chosen for 0.5 min" in what
    # a resumed train stage keeps the recorded count whatever a new warm-up would say
    plan, _, what = job.stage("train").plan({"steps": 7})
    assert plan == {} and what.startswith("7 steps")


# ---------------------------------------------------------------- rebalancing (issue 20)

def test_run_rebalances_the_face_fraction_and_records_it(tmp_path, capsys):
    from test_data import expected_faces_kept, faces_folder
    src = faces_folder(tmp_path / "src", faces=20, others=30)
    flags = dict(overrides=TINY, steps=2, testsets=[_testset32(tmp_path)], progress=False, workers=1)
    assert Job([src], tmp_path / "x", **flags).rebalance.max_face_fraction == 0.2  # on by default
    job = Job([src], tmp_path / "job", max_face_fraction=0.25, face_paths=["*/faces/*"], **flags)
    job.start()
    for name in ("testsets", "ingest"):
        job.run_stage(job.stage(name))
    assert "faces (by path): 20 of 50 images (40.0%) before, 10 of 40 (25.0%) after" in capsys.readouterr().out
    ingest_rec = json.loads((tmp_path / "job" / "run.json").read_text())["stages"]["ingest"]
    assert ingest_rec["inputs"]["ingest"] == {"frames_per_video": 100, "seed": 0, "max_face_fraction": 0.25,
                                              "face_paths": ["*/faces/*"], "rebalance_seed": 0}
    rb = ingest_rec["result"]["rebalance"]
    assert rb["before"]["fraction"] == 0.4 and rb["after"]["fraction"] == 0.25 and ingest_rec["result"]["images"] == 40
    faces = [str(p) for p in sorted((src / "faces").rglob("*.png"))]
    from grandmother.data.dataset import open_dataset
    kept = {it["path"] for it in open_dataset(tmp_path / "job" / "data").items() if "/faces/" in it["path"]}
    assert kept == expected_faces_kept(faces, 30, 0.25, seed=0)
    # another fraction is a changed setting of the ingest stage; --max-face-fraction 1 turns it off
    with pytest.raises(GrandmotherError, match=r"ingest setting max_face_fraction: 0\.25 -> 0\.5 .*--restart-from "
                                               r"ingest"):
        Job([src], tmp_path / "job", max_face_fraction=0.5, face_paths=["*/faces/*"], **flags).prepare()
    off = Job([src], tmp_path / "off", max_face_fraction=1, **flags)
    off.prepare()
    assert off.inputs["ingest"]["max_face_fraction"] == 1.0 and not off.rebalance.active
    assert off.rebalance.flags() == "" and "--max-face-fraction 0.25 --face-paths '*/faces/*'" in job.rebalance.flags()


# ---------------------------------------------------------------- bad input: one line, before long work

def test_run_bad_input_one_line_each(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(GrandmotherError, match=r"SRC .*empty: no images or videos found"):
        run_pipeline([empty], tmp_path / "a", progress=False)
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40), 40 * i, np.uint8)).save(few / f"{i}.png")
    with pytest.raises(GrandmotherError, match=r"too few images for a batch: .* at most 3, and a batch is 100"):
        run_pipeline([few], tmp_path / "b", progress=False)
    with pytest.raises(GrandmotherError, match=r"--restart-from 'nope'"):
        run_pipeline([few], tmp_path / "c", restart_from="nope", progress=False)
    with pytest.raises(GrandmotherError, match=r"--steps or --minutes|not both"):
        run_pipeline([few], tmp_path / "c", steps=3, minutes=1.0, progress=False)
    with pytest.raises(GrandmotherError, match=r"--out .*few: exists and is not a `grandmother run` folder"):
        run_pipeline([few], few, progress=False)
    # a test set at another size than the network's input
    from grandmother.data.testset import build_testset
    faces = SAMPLE_DIR / "faces_test"
    ts = tmp_path / "ts48"
    build_testset([str(faces / "positive")], [str(faces / "negative")], ts, size=48, color="gray", count=20,
                  progress=False)
    with pytest.raises(GrandmotherError, match=r"--testset .*ts48: 48x48 gray images, but preset small takes 32x32 gray"):
        run_pipeline([few], tmp_path / "d", testsets=[ts], progress=False)
    assert not (tmp_path / "d").exists()  # refused before anything was written
    # every file unreadable: ingest skips and lists them, then one line
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(12):
        (bad / f"{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(GrandmotherError, match=r"no readable image or video frame in the 12 input file\(s\)"):
        run_pipeline([bad], tmp_path / "e", overrides=["train.batch_size=10"], testsets=[_testset32(tmp_path)],
                     progress=False)
    assert not (tmp_path / "e" / "run").exists()  # nothing trained


def _testset32(tmp_path) -> Path:
    from grandmother.data.testset import build_testset
    faces = SAMPLE_DIR / "faces_test"
    ts = tmp_path / "ts32"
    if not ts.exists():
        build_testset([str(faces / "positive")], [str(faces / "negative")], ts, size=32, color="gray", count=20,
                      progress=False)
    return ts


# ---------------------------------------------------------------- real videos and folders, killed twice

@pytest.mark.slow
@pytest.mark.shared_data
def test_run_on_shared_videos_killed_in_training_and_in_probing_ends_as_uninterrupted(shared_data, tmp_path):
    from grandmother.data.testset import build_testset
    objects = shared_data / "objects" / "caltech101"
    srcs = [shared_data / "video", *(objects / c for c in ("garfield", "gerenuk", "metronome", "wild_cat"))]
    cats = tmp_path / "cats"
    build_testset([str(shared_data / "cats" / "kaggle")], [str(shared_data / "dogs" / "kaggle")], cats, size=32,
                  color="gray", count=60, group_by="file", progress=False)
    flags = ["--steps", "15", "--frames-per-video", "20", "--testset", cats, "--workers", "1"]
    flags += [x for o in TINY for x in ("--set", o)]

    whole = tmp_path / "whole"
    r = cli(["run", *srcs, "--out", whole, *flags])
    assert r.returncode == 0, r.stderr[-2000:]
    expected = results(whole)
    index = expected["data"]
    assert [s["videos"] for s in index["sources"]] == [3, 0, 0, 0, 0]
    assert index["sources"][0]["images"] > 3 and index["images"] > 80  # frames of every video, and the folders

    job = tmp_path / "job"
    # 1) killed right after the second training checkpoint (step 10 of 15)
    r = cli(["run", *srcs, "--out", job, *flags], kill_at=(r"/job/run/checkpoints/latest$", 2))
    assert r.returncode == -9, r.stderr[-2000:]
    assert stage_status(job)["train"] == "started"
    assert (job / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    # 2) the same command: training resumes at step 10; killed again when the probe first caches its state
    r = cli(["run", *srcs, "--out", job, *flags], kill_at=(r"/job/probe_[^/]+/(?!probe\.json$)[^/]", 1))
    assert r.returncode == -9, r.stderr[-2000:]
    assert "resuming" in r.stdout and "ingest: done before" in r.stdout
    assert stage_status(job)["train"] == "done" and stage_status(job)["probe"] == "started"
    assert not (job / "probe_cats" / "probe.json").exists()
    # 3) the same command again finishes; everything equals the uninterrupted run
    r = cli(["run", *srcs, "--out", job, *flags])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train: done before" in r.stdout
    got = results(job)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], key
