"""`make demo` / `grandmother demo`: the whole job on the sample shipped inside the package.

    grandmother demo --out demo_out

1. train the small preset on grandmother/sample/train              -> OUT/run
2. build the labeled face test set from sample/faces_test          -> OUT/testset_faces
3. probe every unit, with the Table 1 baselines (modest settings)  -> OUT/probe_faces
4. visualize the best unit (histogram, top images, optimal stimulus) -> OUT/visualize
5. its invariance curves on the ten faces of sample/invariance     -> OUT/invariance
6. the HTML report                                                 -> OUT/report.html (path printed)

Re-running reuses what is done: training resumes from its last checkpoint (and returns at once when
finished), the test set is kept, the probe caches its activations; visualize and invariance redo
their few seconds of work. The sample is built by scripts/build_sample.py from ../shared/data.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path

from .config import load_config
from .errors import GrandmotherError
from .samples import SAMPLE_DIR

# The baselines at demo scale: 1,000 linear-filter templates drawn from the training images (paper:
# 100,000), random weights, first stage. The no-LCN network and the deep autoencoders need training runs
# of their own: too long for a 10-minute demo (README: Probing).
DEMO_PROBE_OPTIONS = {"linear_filters": 1000}


def _q(path) -> str:
    return shlex.quote(str(path))


def run_demo(out: Path, steps: int | None = None) -> dict:
    t_start = time.perf_counter()
    out = Path(out)
    train_dir, faces_test, invariance_dir = SAMPLE_DIR / "train", SAMPLE_DIR / "faces_test", SAMPLE_DIR / "invariance"
    for needed in (train_dir, faces_test / "positive", faces_test / "negative", invariance_dir):
        if not needed.is_dir():
            raise GrandmotherError(f"the in-package sample is missing {needed}; run scripts/build_sample.py")
    overrides = [f"train.steps={steps}"] if steps else []
    cfg = load_config("small", overrides)
    run_dir, test_dir = out / "run", out / "testset_faces"
    probe_dir, vis_dir, inv_dir = out / "probe_faces", out / "visualize", out / "invariance"
    report = out / "report.html"
    color = "gray" if cfg.model.channels == 1 else "rgb"
    commands = [
        f"grandmother train --preset small --data {_q(train_dir)} --out {_q(run_dir)} --resume"
        + (f" --steps {steps}" if steps else ""),
        f"grandmother testset --positive {_q(faces_test / 'positive')} --negative {_q(faces_test / 'negative')} "
        f"--out {_q(test_dir)} --size {cfg.model.image_size} --color {color} --seed 0",
    ]
    timings = {}

    # ============ 1. train ============
    from .train import train
    t = time.perf_counter()
    print(f"[demo] 1/6 training the small preset for {cfg.train.steps} steps on {train_dir}")
    summary = train(cfg, train_dir, run_dir, resume=True)
    timings["train"] = time.perf_counter() - t

    # ============ 2. the labeled face test set ============
    from .testset import build_testset, open_testset
    t = time.perf_counter()
    if (test_dir / "index.json").is_file():
        _, labels, _ = open_testset(test_dir)
        print(f"[demo] 2/6 reusing the test set {test_dir}")
    else:
        print(f"[demo] 2/6 building the face test set from {faces_test}")
        build_testset([str(faces_test / "positive")], [str(faces_test / "negative")], test_dir,
                      size=cfg.model.image_size, color=color, seed=0, progress=False)
        _, labels, _ = open_testset(test_dir)
    print(f"[demo]     {int(labels.sum())} faces, {int(len(labels) - labels.sum())} distractors")
    timings["testset"] = time.perf_counter() - t

    # ============ 3. probe ============
    from .probe import run_probe
    t = time.perf_counter()
    print(f"[demo] 3/6 probing every unit against the test set (+ baselines)")
    probe_cmd = (f"grandmother probe {_q(run_dir)} --testset {_q(test_dir)} --out {_q(probe_dir)} --concept faces "
                 f"--train-data {_q(train_dir)} "
                 + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_PROBE_OPTIONS.items()))
    probe = run_probe(run_dir, test_dir, probe_dir, concept="faces", train_data=train_dir, command=probe_cmd,
                      **DEMO_PROBE_OPTIONS)
    best = probe["best"]
    unit, threshold = best["unit"], best.get("threshold")
    print(f"[demo]     best unit {unit}: accuracy {best['accuracy']}")
    timings["probe"] = time.perf_counter() - t

    # ============ 4. visualize the best unit ============
    from .visualize import run_visualize
    t = time.perf_counter()
    print(f"[demo] 4/6 histogram, top images and optimal stimulus of {unit}")
    vis_cmd = (f"grandmother visualize {_q(run_dir)} --testset {_q(test_dir)} --probe {_q(probe_dir)} "
               f"--out {_q(vis_dir)}")
    run_visualize(run_dir, test_dir, unit, vis_dir, threshold=threshold, concept="faces", command=vis_cmd)
    timings["visualize"] = time.perf_counter() - t

    # ============ 5. invariance ============
    from .invariance import run_invariance
    t = time.perf_counter()
    print(f"[demo] 5/6 scale and translation curves on {invariance_dir}")
    inv_cmd = (f"grandmother invariance {_q(run_dir)} --probe {_q(probe_dir)} --images {_q(invariance_dir)} "
               f"--out {_q(inv_dir)}")
    run_invariance(run_dir, unit, invariance_dir, inv_dir, threshold=threshold, command=inv_cmd)
    timings["invariance"] = time.perf_counter() - t

    # ============ 6. report ============
    from .report import build_report
    print("[demo] 6/6 writing the report")
    build_report(run_dir, report, probes=[probe_dir], visualize=[vis_dir], invariance=[inv_dir],
                 command=f"grandmother report {_q(run_dir)} --out {_q(report)} --probe {_q(probe_dir)} "
                         f"--visualize {_q(vis_dir)} --invariance {_q(inv_dir)}",
                 first_commands=[f"grandmother demo --out {_q(out)}"
                                 + (f" --steps {steps}" if steps else "") + "   # all of the below", *commands])
    timings["total"] = time.perf_counter() - t_start
    print("[demo] seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"[demo] report: {report.resolve()}")
    return {"train": summary, "probe": probe, "report": str(report.resolve()), "timings": timings}
