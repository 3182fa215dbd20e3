"""scripts/gpu_check.sh, prepared on the CPU: its --dry-run end to end (tests collected, bench, paper step, the
face recipe at 10% faces trained then scored held out, one JSON and one log), and the parts of
scripts/gpu_check.py that the dry run does not reach: the paper preset cut to the stages that fit, and the
face-fraction step's counts."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_images
from grandmother.errors import GrandmotherError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.image_size=16", "model.stages.*.receptive_field=4", "model.stages.*.maps=2",
        "model.stages.*.pool_size=2", "model.stages.*.lcn_size=3"]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_script", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_trains_scores_and_writes_one_json_and_one_log(tmp_path):
    """35-50 s on the loaded 2-core machine (load average 8); the face run trains 3 s on a quarter of the
    sample."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["mode"] == "dry" and res["parts"] == ["tests", "bench", "paper", "face"]
    assert res["tests"]["exit_status"] == 0 and "collected" in res["tests"]["summary"]
    assert res["bench"]["exit_status"] == 0 and {r["impl"] for r in res["bench"]["rows"]} == {"rowshift", "tiled"}
    assert res["bench"]["keras_peer"] == {"skipped": "turned off (GRANDMOTHER_KERAS_PYTHON=none)"}
    paper = res["paper_step"]
    assert paper["fits"] and paper["from"] == "bench" and set(paper["train"]) == {"rowshift", "tiled"}
    face = res["face"]
    assert face["recipe"] == "decnorm_fewfaces" and face["data"]["face_fraction"] == pytest.approx(0.1, abs=0.01)
    assert face["steps"] >= face["first_leg_steps"] >= 2 and face["images_seen"] == 20 * face["steps"]
    assert face["images_per_s"] > 0 and 0 < face["fraction_of_matmul"] < 1
    assert face["fraction_of_matmul"] == pytest.approx(
        face["images_per_s"] * face["train_flops_per_image"] / face["matmul_gflops"] / 1e9)
    top = face["top_stage"]
    assert top["stage"] == 2 and top["unit"].startswith("s2.") and top["random_seeds"] == 2
    assert 0 < top["evaluation_accuracy"] <= 1 and 0 < top["random_weights_best"] <= 1
    assert top["random_weights_mean"] <= top["random_weights_best"]
    log = (out / "gpu_check.log").read_text()
    assert len(res["headlines"]) == 4 and all(line in log and line in done.stdout for line in res["headlines"])
    assert res["headlines"][0].startswith("face run (decnorm_fewfaces, 10% faces") and "of the" in res["headlines"][0]
    assert res["headlines"][1].startswith("top stage (stage 2") and "vs random weights" in res["headlines"][1]
    assert "s/step" in res["headlines"][2] and "peak memory" in res["headlines"][2]


def test_bad_flags_are_one_line(tmp_path):
    for flags, say in ((["--parts", "tests,nope"], "unknown part nope"), (["--minutes", "0"], "--minutes 0"),
                       (["--frobnicate"], "unknown argument --frobnicate")):
        done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out",
                               str(tmp_path / "o"), *flags], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and say in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "o").exists()


def test_the_paper_step_falls_back_to_the_largest_prefix_of_stages_that_fits():
    gc = load_script()
    from grandmother.bench.kernels import kernel_workspace, memory_estimate
    from grandmother.config import load_config
    cfg = load_config("paper", TINY)
    need = []
    for n in (1, 2, 3):
        cfg.model.stages = load_config("paper", TINY).model.stages[:n]
        need.append(memory_estimate(cfg, 100, kernel_workspace(cfg, 100, "rowshift", "cpu"))["total"])
    assert need[0] < need[1] < need[2]
    got = gc.paper_step(None, "cpu", TINY, memory_bytes=(need[1] + need[2]) // 2)
    assert got["stages"] == 2 and got["of_stages"] == 3 and not got["fits"] and got["from"] == "gpu_check.py"
    assert got["memory_estimate_bytes"]["total"] == need[1] and got["train"]["rowshift"]["seconds_per_batch"] > 0
    assert "first 2 of 3 stages" in gc.headlines({"paper_step": got})[0]
    nothing = gc.paper_step({"error": "no benchmark JSON"}, "cpu", TINY, memory_bytes=need[0] - 1)
    assert nothing["stages"] == 0 and "not even the first stage fits" in nothing["error"]
    assert gc.headlines({"paper_step": nothing}) == [f"paper preset: {nothing['error']}"]


def test_the_face_fraction_step_keeps_a_tenth_faces(tmp_path):
    gc = load_script()
    train = tmp_path / "train"
    make_images(train / "objects", n=36, size=40)
    make_images(train / "faces_a", n=5, size=40, seed=1)
    make_images(train / "faces_b" / "person", n=5, size=40, seed=2)
    (tmp_path / "test_excluded.txt").write_text(str((train / "objects" / "img_000.png").resolve()) + "\n")
    got = gc.face_fraction_data(train, tmp_path / "data", 0.1, size=32, color="gray",
                                excluded=tmp_path / "test_excluded.txt")
    assert (got["faces"], got["others"], got["images"]) == (4, 36, 35 + 4)  # 36 / 9 = 4 faces; one test file out
    listed = (tmp_path / "data.excluded.txt").read_text().splitlines()
    assert len(listed) == 1 + 6 and all("faces_" in p for p in listed[1:])
    thinned = gc.face_fraction_data(train, tmp_path / "data", 0.1, size=32, color="gray",
                                    excluded=tmp_path / "none.txt", every=4)
    assert (thinned["faces"], thinned["others"], thinned["images"]) == (1, 9, 10)
    with pytest.raises(GrandmotherError, match="face fraction 1.5"):
        gc.face_fraction_data(train, tmp_path / "data", 1.5, size=32, color="gray", excluded=tmp_path / "none.txt")
