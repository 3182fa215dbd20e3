"""The Python half of scripts/gpu_check.sh: the face run, the paper preset's step, the one JSON.

    python scripts/gpu_check.py face --out DIR [--device cuda] [--minutes 5] [--dry-run] [--set KEY=VALUE ...]
    python scripts/gpu_check.py paper --bench DIR/bench.json --out DIR/paper.json [--device cuda] [--set ...]
    python scripts/gpu_check.py summary DIR --mode MODE --parts LIST --tests-rc N --bench-rc N --start EPOCH_S

face: the face recipe of the experiments (FACE_RECIPE in experiments/recipes.py: the small preset, Adam 1e-3,
decoder vectors at unit norm) trained at 10% faces for a fixed budget on the device, then scored with the
held-out protocol (grandmother.analysis.heldout through `grandmother probe`'s held-out entry), all from
what a checkout carries: the in-package sample (grandmother/sample/train for training, faces_test for the
test set, as `grandmother run` builds it). Steps come from the budget as in `grandmother run --minutes`
(a timed warm-up, MINUTES_FRACTION of the budget), in two legs so data loading is counted (face_run).
Writes DIR/face.json: images/s of the whole training (data loading included) and of the warm-up steps,
their fractions of the device's float32 matmul rate (timed in the same process), and the top stage's best
unit (chosen on the selection half, scored on the evaluation half) against the same architecture with
random weights.

paper: the paper preset's training step (seconds, images/s, peak memory) from the benchmark's JSON; where
the benchmark has no training row (it refused the preset for memory, or ran out of time), the paper
preset cut to its first n stages, for the largest n whose training step fits the device's free memory.

summary: DIR/gpu_check.json from the parts' outputs, and the headline lines on stdout.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

FACE_RECIPE = "decnorm_fewfaces"  # experiments/recipes.py: "training data with 10% faces"
FACE_FRACTION = 0.1
MIN_STEPS = 2
WORK = ("face.json", "testset_faces", "data", "data.excluded.txt", "run", "probe_faces")  # face_run's outputs


def _say(msg: str) -> None:
    print(f"[gpu_check.py] {msg}", flush=True)


# ======================================================================================================
# THE FACE-FRACTION STEP (one function; switch it to the rebalance flag when that is on this branch).
# Today: a training file is a face when a folder of its path (below train_dir) starts with "faces"
# (the sample's faces_caltech/ and faces_lfw/, ../shared/data's faces/); faces are cut to `fraction` of
# the images by a seeded choice, and the rest are left out through ingest's exclusion list.
# With `grandmother ingest --max-face-fraction F`, the body becomes one call:
#     return ingest([str(train_dir)], data_dir, size=size, color=color, exclude=str(excluded),
#                   max_face_fraction=fraction, overwrite=True, progress=False)
# (`every` thins the non-face images for --dry-run only: every n-th is kept.)
# ======================================================================================================
def face_fraction_data(train_dir: Path, data_dir: Path, fraction: float, *, size: int, color: str,
                       excluded: Path, seed: int = 0, every: int = 1) -> dict:
    import numpy as np

    from grandmother.data.images import list_images
    from grandmother.data.ingest import ingest
    from grandmother.errors import GrandmotherError

    if not 0 < fraction < 1:
        raise GrandmotherError(f"face fraction {fraction}: must be between 0 and 1")
    files = list_images(train_dir)
    is_face = [any(part.startswith("faces") for part in f.relative_to(train_dir).parts[:-1]) for f in files]
    faces = [f for f, face in zip(files, is_face) if face]
    others = [f for f, face in zip(files, is_face) if not face]
    kept_others = others[::every]
    keep = min(len(faces), int(fraction * len(kept_others) / (1 - fraction) + 1e-9))  # faces = fraction of all
    chosen = set(np.random.default_rng(seed).permutation(len(faces))[:keep].tolist())
    kept = set(kept_others)
    dropped = [f for i, f in enumerate(faces) if i not in chosen] + [f for f in others if f not in kept]
    listed = excluded.read_text().splitlines() if excluded.is_file() else []
    exclude_file = data_dir.parent / f"{data_dir.name}.excluded.txt"
    exclude_file.write_text("".join(line + "\n" for line in listed + [str(f.resolve()) for f in dropped]))
    index = ingest([str(train_dir)], data_dir, size=size, color=color, exclude=str(exclude_file), overwrite=True,
                   progress=False)
    return {"images": index["images"], "faces": keep, "others": len(kept_others),
            "face_fraction": keep / max(1, keep + len(kept_others)), "rule": "folder name starts with 'faces'"}


def face_config(device: str, sets: list[str]):
    from recipes import BASE, RECIPES

    from grandmother.config import load_config
    return load_config("small", BASE + RECIPES[FACE_RECIPE]["sets"] + [f"train.device={device}"] + sets)


def top_stage_result(heldout: dict) -> dict:
    """The top stage's best unit (chosen on selection, scored on evaluation) against random weights' top stage
    (best and mean over the seeds), and the best unit of any stage against random weights' best."""
    top = heldout["top_stage"]
    stage = max(r["stage"] for r in heldout["per_stage"])
    row = next(r for r in heldout["per_stage"] if r["stage"] == stage and r["sublayer"] is None)
    rnd = row.get("random", {})
    rw = heldout["baselines"].get("random_weights", {})
    return {"stage": stage, "unit": top["unit"], "evaluation_accuracy": top["evaluation_accuracy"],
            "ci95": top["ci95"], "random_weights_best": rnd.get("best"), "random_weights_mean": rnd.get("mean"),
            "random_seeds": len(rnd.get("per_seed", [])),
            "best_unit": {**{k: heldout["best"][k] for k in ("unit", "evaluation_accuracy", "ci95")},
                          "random_weights_best": rw.get("best")},
            "evaluation_images": heldout["protocol"]["evaluation"]["images"]}


def _with_steps(cfg, steps: int):
    c = copy.deepcopy(cfg)
    c.train.steps = steps
    return c


def face_run(out: Path, device: str, minutes: float, sets: list[str], dry: bool) -> dict:
    import torch

    from grandmother.analysis.heldout import testset_cue_scores
    from grandmother.analysis.probe import run_probe
    from grandmother.analysis.probe_heldout import HeldoutSettings
    from grandmother.bench.kernels import device_name, matmul_gflops
    from grandmother.data.samples import SAMPLE_DIR
    from grandmother.data.testset import build_testset
    from grandmother.nn.shapes import stage_shapes
    from grandmother.pipeline.inputs import measure_step_seconds
    from grandmother.pipeline.stages import MINUTES_FRACTION, PROBE_OPTIONS
    from grandmother.training.loop import train

    out.mkdir(parents=True, exist_ok=True)
    for name in WORK:  # a fresh run each time: what an earlier check left here is removed
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    cfg = face_config(device, sets)
    dev = torch.device(device)
    size, color = cfg.model.image_size, "gray" if cfg.model.channels == 1 else "rgb"
    t0 = time.perf_counter()
    _say(f"test set: {SAMPLE_DIR / 'faces_test'} at {size}x{size} {color}")
    test_dir = out / "testset_faces"
    root = SAMPLE_DIR / "faces_test"
    build_testset([str(root / "positive")], [str(root / "negative")], test_dir, size=size, color=color, seed=0,
                  overwrite=True, progress=False, cue_scorer=testset_cue_scores)
    _say(f"training data at {FACE_FRACTION:.0%} faces from {SAMPLE_DIR / 'train'}")
    data = face_fraction_data(SAMPLE_DIR / "train", out / "data", FACE_FRACTION, size=size, color=color,
                              excluded=test_dir / "excluded.txt", seed=cfg.train.seed, every=4 if dry else 1)
    prep_s = time.perf_counter() - t0

    # The budget in two legs: a fifth of the steps the warm-up allows, timed with the data loading, logging and
    # checkpoint of a real run; then the run is resumed (bit-identical to one that did not stop) up to the
    # step count that this measured rate allows in the rest of MINUTES_FRACTION of the budget.
    warm = measure_step_seconds(cfg)
    budget_s = minutes * 60 * MINUTES_FRACTION
    first = max(MIN_STEPS, int(budget_s / max(warm["seconds_per_step"], 1e-9)) // 5)
    _say(f"train {FACE_RECIPE} on {device}, batches of {cfg.train.batch_size}, {minutes} min: first {first} steps "
         f"(warm-up {warm['seconds_per_step']:.4g} s/step)")
    run_dir = out / "run"
    t = time.perf_counter()
    summary = train(_with_steps(cfg, first), out / "data", run_dir, progress=False)
    elapsed = time.perf_counter() - t
    total = first + int((budget_s - elapsed) / (elapsed / first)) if elapsed < budget_s else first
    if total > first:
        _say(f"measured {elapsed / first:.4g} s/step with data loading: resumed to {total} steps")
        summary = train(_with_steps(cfg, total), out / "data", run_dir, resume=True, progress=False)
    train_s = time.perf_counter() - t

    mm = matmul_gflops(dev)
    flops_per_image = sum(s.flops_train for s in stage_shapes(cfg.model))
    images_per_s = summary["images_seen"] / train_s
    step_images_per_s = cfg.train.batch_size / warm["seconds_per_step"]
    _say("score: held-out protocol")
    settings = HeldoutSettings(random_seeds=2, bootstrap=100) if dry else HeldoutSettings()
    t = time.perf_counter()
    probe = run_probe(run_dir, test_dir, out / "probe_faces", concept="faces", train_data=out / "data",
                      device=device, heldout=settings, linear_filters=50 if dry else PROBE_OPTIONS["linear_filters"],
                      progress=False)
    score_s = time.perf_counter() - t
    result = {"recipe": FACE_RECIPE, "device": device_name(dev), "sets": sets, "data": data,
              "budget_minutes": minutes, "first_leg_steps": first, "steps": summary["steps"],
              "images_seen": summary["images_seen"],
              "final_loss": (summary.get("final") or {}).get("loss"),
              "train_seconds": train_s, "images_per_s": images_per_s, "step_images_per_s": step_images_per_s,
              "matmul_gflops": mm, "train_flops_per_image": flops_per_image,
              "fraction_of_matmul": images_per_s * flops_per_image / (mm * 1e9),
              "step_fraction_of_matmul": step_images_per_s * flops_per_image / (mm * 1e9),
              "prepare_seconds": prep_s, "score_seconds": score_s, "probe": str(out / "probe_faces" / "probe.json")}
    if "top_stage" in probe.get("heldout", {}):
        result["top_stage"] = top_stage_result(probe["heldout"])
    else:
        result["top_stage"] = {"skipped": probe.get("heldout", {}).get("skipped", "no held-out entry")}
    (out / "face.json").write_text(json.dumps(result, indent=1))
    return result


def paper_step(bench: dict | None, device: str, sets: list[str], memory_bytes: int | None = None,
               kernel: str = "rowshift") -> dict:
    """The paper preset's training step from the benchmark's JSON; else the largest prefix of its stages that
    fits `memory_bytes` (default: the device's free memory), timed here with `kernel`, batch 100."""
    from grandmother.config import load_config

    def step_rows(result: dict) -> dict:
        return {r["impl"]: {k: r[k] for k in ("seconds_per_batch", "images_per_s", "peak_memory_bytes",
                                              "fraction_of_matmul")}
                for r in result["rows"] if r["step"] == "train"}

    cfg = load_config("paper", sets)
    stages = len(cfg.model.stages)
    if bench and any(r.get("step") == "train" for r in bench.get("rows", [])):
        return {"preset": bench["preset"], "stages": stages, "of_stages": stages, "fits": True,
                "batch_size": bench["batch_size"], "train": step_rows(bench),
                "memory_estimate_bytes": bench["memory_estimate_bytes"], "from": "bench"}
    import torch

    from grandmother.bench.kernels import _available_memory, kernel_workspace, memory_estimate, run_bench
    dev = torch.device(device)
    have = memory_bytes if memory_bytes is not None else _available_memory(dev)
    batch = cfg.train.batch_size
    for n in range(stages, 0, -1):
        c = copy.deepcopy(cfg)
        c.model.stages = c.model.stages[:n]
        est = memory_estimate(c, batch, kernel_workspace(c, batch, kernel, dev.type))
        if est["total"] <= have:
            _say(f"paper preset, first {n} of {stages} stages: about {est['total'] / 2**30:.1f} GiB; timing it")
            result = run_bench(c, dev, batch, [kernel], repeats=1)
            return {"preset": "paper", "stages": n, "of_stages": stages, "fits": n == stages, "batch_size": batch,
                    "train": step_rows(result), "memory_estimate_bytes": est, "from": "gpu_check.py"}
    return {"preset": "paper", "stages": 0, "of_stages": stages, "fits": False,
            "error": f"not even the first stage fits {have / 2**30:.1f} GiB at batch {batch}"}


def headlines(result: dict) -> list[str]:
    lines = []
    face = result.get("face") or {}
    if "images_per_s" in face:
        lines.append(f"face run ({face['recipe']}, {face['data']['face_fraction']:.0%} faces, {face['device']}): "
                     f"{face['images_seen']:,} images in {face['train_seconds']:.0f} s, "
                     f"{face['images_per_s']:,.0f} images/s = {100 * face['fraction_of_matmul']:.1f}% of the "
                     f"{face['matmul_gflops']:,.0f} GFLOP/s matmul (training steps alone: "
                     f"{face['step_images_per_s']:,.0f} images/s, {100 * face['step_fraction_of_matmul']:.1f}%)")
        top = face["top_stage"]
        if "evaluation_accuracy" in top:
            lo, hi = top["ci95"]
            lines.append(f"top stage (stage {top['stage']}, {top['unit']}): held-out "
                         f"{100 * top['evaluation_accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] on "
                         f"{top['evaluation_images']} images vs random weights "
                         f"{100 * top['random_weights_best']:.1f}% (best of {top['random_seeds']} seeds; mean "
                         f"{100 * top['random_weights_mean']:.1f}%); best unit of any stage "
                         f"{100 * top['best_unit']['evaluation_accuracy']:.1f}% vs "
                         f"{100 * top['best_unit']['random_weights_best']:.1f}%")
        else:
            lines.append(f"top stage: not scored ({top.get('skipped')})")
    elif face:
        lines.append(f"face run: failed ({face.get('error')})")
    paper = result.get("paper_step") or {}
    for impl, r in (paper.get("train") or {}).items():
        what = f"{paper['preset']} preset" + (
            "" if paper["fits"] else f", first {paper['stages']} of {paper['of_stages']} stages")
        lines.append(f"{what}, batch {paper['batch_size']}, {impl}: {r['seconds_per_batch']:.3f} s/step, "
                     f"{r['images_per_s']:,.0f} images/s, peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB "
                     f"(estimate {paper['memory_estimate_bytes']['total'] / 2**30:.2f} GiB)")
    if paper and not paper.get("train"):
        lines.append(f"paper preset: {paper.get('error', 'no training step measured')}")
    return lines


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"error": f"no {what} JSON ({e})"}


def summary(out: Path, mode: str, parts: list[str], tests_rc: int, bench_rc: int, start: float) -> dict:
    """DIR/gpu_check.json: each part asked for (tests, bench, paper, face) with its result or its error."""
    tests = (out / "tests.txt").read_text().strip().splitlines() if (out / "tests.txt").exists() else []
    result = {
        "mode": mode, "parts": parts, **_read_json(out / "env.json", "environment"),
        "tests": {"exit_status": tests_rc, "summary": tests[-1] if tests else ""},
        "bench": {"exit_status": bench_rc, **_read_json(out / "bench.json", "benchmark")},
        "paper_step": _read_json(out / "paper.json", "paper-step"),
        "face": _read_json(out / "face" / "face.json", "face-run"),
    }
    for part, key in (("tests", "tests"), ("bench", "bench"), ("paper", "paper_step"), ("face", "face")):
        if part not in parts:
            del result[key]
    result["headlines"] = headlines(result)
    result["seconds"] = round(time.time() - start, 1)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "gpu_check.json")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    p = sub.add_parser("face")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--dry-run", action="store_true", help="a quarter of the sample, a light held-out score")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p = sub.add_parser("paper")
    p.add_argument("--bench", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p = sub.add_parser("summary")
    p.add_argument("out")
    p.add_argument("--mode", required=True)
    p.add_argument("--parts", default="tests,bench,paper,face")
    p.add_argument("--tests-rc", type=int, required=True)
    p.add_argument("--bench-rc", type=int, required=True)
    p.add_argument("--start", type=float, required=True)
    args = ap.parse_args(argv)

    from grandmother.errors import GrandmotherError
    try:
        if args.part == "face":
            if args.minutes <= 0:
                raise GrandmotherError(f"--minutes {args.minutes}: must be more than 0")
            face_run(Path(args.out), args.device, args.minutes, args.sets, args.dry_run)
        elif args.part == "paper":
            bench = _read_json(Path(args.bench), "benchmark")
            Path(args.out).write_text(json.dumps(paper_step(bench, args.device, args.sets), indent=1))
        else:
            print("\n".join(summary(Path(args.out), args.mode, args.parts.split(","), args.tests_rc, args.bench_rc,
                                     args.start)["headlines"]))
    except GrandmotherError as e:
        print(f"gpu_check.py {args.part}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
