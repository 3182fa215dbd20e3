"""The stages of `grandmother run`, in order (`STAGES` at the end): each one unit with its name, the inputs
it depends on, its outputs, its plan (ETA) and its run. grandmother/pipeline/stage.py says how to add one.

    testsets    -> DIR/testset_faces (built-in), DIR/excluded.txt
    ingest      -> DIR/data          (rebalanced to --max-face-fraction)
    train       -> DIR/run
    probe       -> DIR/probe_NAME
    visualize   -> DIR/visualize_NAME
    invariance  -> DIR/invariance_NAME
    report      -> DIR/report.html
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from grandmother.errors import GrandmotherError
from grandmother.io import read_path_list, write_path_list
from grandmother.pipeline.inputs import (Concept, builtin_test_set_part, check_test_set, config_part, ingest_eta,
                                         source_part)
from grandmother.pipeline.stage import Stage, quote

# Probe settings of `run` (the demo's): 1,000 linear-filter templates from the ingested training data.
PROBE_OPTIONS = {"linear_filters": 1000}
MINUTES_FRACTION = 0.9
INVARIANCE_IMAGES = 10


def _threshold_flag(unit: dict) -> str:
    return "" if unit.get("threshold") is None else f" --threshold {unit['threshold']:.6g}"


def shown_unit(probe: dict) -> dict:
    """The unit `run` visualizes for a concept: the top-stage unit chosen on the held-out protocol's selection
    half (as the demo always did: the paper's face neuron is a top-stage unit), scored on the evaluation half;
    where the held-out entry is missing or skipped (a test set that cannot be split), the paper protocol's
    best unit."""
    top = (probe.get("heldout") or {}).get("top_stage")
    if top:
        return {"unit": top["unit"], "threshold": top.get("threshold"), "direction": top.get("direction"),
                "chosen_by": "top stage, chosen on the selection half",
                "evaluation_accuracy": top.get("evaluation_accuracy"), "ci95": top.get("ci95")}
    best = probe["best"]
    return {"unit": best["unit"], "threshold": best.get("threshold"),
            "chosen_by": "paper protocol, chosen and scored on all images", "accuracy": best["accuracy"]}


# ---------------------------------------------------------------- testsets

class Testsets(Stage):
    name = "testsets"
    inputs = ("format", "testsets")

    def fingerprint(self) -> dict:
        job = self.job
        part = {ts.name: builtin_test_set_part() if ts.builtin else check_test_set(ts, job.size, job.channels,
                                                                                    job.preset)
                for ts in job.testsets}
        return {"format": {"size": job.size, "color": job.color}, "testsets": part}

    def outputs(self):
        o = self.job.out
        return [t.path for t in self.job.testsets if t.builtin] + [o / "testset_faces.partial", o / "excluded.txt",
                                                                   o / "excluded_persons.txt"]

    def plan(self, rec):
        job = self.job
        build = [t for t in job.testsets if t.builtin]
        what = (f"building the face test set shipped in the package at {job.size}x{job.size} {job.color}"
                if build else f"{len(job.testsets)} test set(s) checked")
        return {}, 2.0 * len(build), what

    def run(self, rec) -> dict:
        from grandmother.analysis.heldout import testset_cue_scores
        from grandmother.data.samples import SAMPLE_DIR
        from grandmother.data.testset import build_testset, open_testset, read_excluded
        job = self.job
        out, excluded, persons = {}, [], set()
        for ts in job.testsets:
            if ts.builtin:
                root = SAMPLE_DIR / "faces_test"
                build_testset([str(root / "positive")], [str(root / "negative")], ts.path, size=job.size,
                              color=job.color, seed=0, overwrite=True, progress=False, cue_scorer=testset_cue_scores)
            _, labels, index = open_testset(ts.path)
            out[ts.name] = {"path": str(ts.path), "images": int(len(labels)), "positives": int(labels.sum())}
            persons |= test_persons(index)
            print(f"      {ts.name}: {int(labels.sum())} positives, {int(len(labels) - labels.sum())} negatives "
                  f"({ts.path})")
            if (ts.path / "excluded.txt").is_file():
                excluded += read_excluded(ts.path / "excluded.txt")
        write_path_list(job.out / "excluded.txt", sorted(set(excluded)))
        write_path_list(job.out / "excluded_persons.txt", sorted(persons))
        return out


def test_persons(index: dict) -> set[str]:
    """The person folders of a test set grouped by folder (an LFW person's name): `ingest` leaves out every
    file in a folder of that name, so a test person's other photos in the user's sources (the same LFW
    person in ../shared/data as in the package's test set) never reach training."""
    if index.get("group_by", "folder") != "folder":
        return set()
    names = {ident.partition(":")[2] for ident in index.get("test_identities", [])}
    return {n for n in names if n and "/" not in n and n not in (".", "..")}


# ---------------------------------------------------------------- ingest (and rebalancing)

class Ingest(Stage):
    name = "ingest"
    inputs = ("format", "testsets", "sources", "ingest")

    def fingerprint(self) -> dict:
        from grandmother.data.ingest import media_kind
        job = self.job
        sources, self.units = source_part(job.sources)
        n_videos = sum(media_kind(p) == "video" for _, p, _ in self.units)
        most = len(self.units) - n_videos + n_videos * job.frames_per_video
        batch = job.cfg.train.batch_size
        if most < batch:
            raise GrandmotherError(
                f"too few images for a batch: the SRCs hold {len(self.units) - n_videos} image(s) and {n_videos} "
                f"video(s) x {job.frames_per_video} frames = at most {most}, and a batch is {batch} (add data, "
                f"--frames-per-video, or --set train.batch_size=N)")
        return {"sources": sources, "ingest": {"frames_per_video": job.frames_per_video, "seed": job.cfg.train.seed,
                                               **job.rebalance.record()}}

    def outputs(self):
        return [self.job.data_dir, self.job.out / "data.partial"]

    def plan(self, rec):
        job = self.job
        eta = ingest_eta(self.units, job.frames_per_video, job.size, job.channels, job.workers,
                         detect=job.rebalance.detect)
        return {}, eta, (f"{len(self.units)} file(s) from {len(job.sources)} SRC(s) at {job.size}x{job.size} "
                         f"{job.color}, up to {job.frames_per_video} frames per video, {job.rebalance.describe()}")

    def run(self, rec) -> dict:
        from grandmother.data.ingest import ingest
        from grandmother.data.rebalance import summary_line
        job = self.job
        index = ingest(job.sources, job.data_dir, size=job.size, color=job.color, seed=job.cfg.train.seed,
                       frames_per_video=job.frames_per_video, workers=job.workers,
                       exclude=str(job.out / "excluded.txt"), progress=job.progress, rebalance=job.rebalance,
                       exclude_folders=set(read_path_list(job.out / "excluded_persons.txt"))
                       if (job.out / "excluded_persons.txt").is_file() else set())
        n, skipped = index["images"], len(index.get("skipped", []))
        files = sum(s.get("files", 0) for s in index.get("sources", []))
        print(f"      {n} images; {skipped} unreadable file(s) skipped, {index.get('duplicates', 0)} duplicate(s) "
              f"dropped, {index.get('excluded', 0)} test-set file(s) and test persons' files left out")
        if skipped:
            first = index["skipped"][0]
            print(f"      unreadable files are listed in {job.data_dir / 'index.json'} (first: {first['path']}: "
                  f"{first['reason']})")
        if index.get("rebalance"):
            print(f"      {summary_line(index['rebalance'])}")
        if n == 0:
            raise GrandmotherError(f"no readable image or video frame in the {files} input file(s); all {skipped} "
                                   f"unreadable ones are listed in {job.data_dir / 'index.json'}")
        if n < job.cfg.train.batch_size:
            raise GrandmotherError(f"too few images for a batch: {n} readable (after {skipped} unreadable and "
                                   f"{index.get('duplicates', 0)} duplicates), batch size {job.cfg.train.batch_size}"
                                   f"; add data, --frames-per-video, or --set train.batch_size=N")
        result = {"images": n, "skipped": skipped, "duplicates": index.get("duplicates", 0),
                  "excluded": index.get("excluded", 0)}
        if index.get("rebalance"):
            result["rebalance"] = index["rebalance"]
        return result


# ---------------------------------------------------------------- train

class Train(Stage):
    name = "train"
    inputs = ("config", "budget")

    def fingerprint(self) -> dict:
        job = self.job
        budget = {"minutes": job.minutes} if job.minutes is not None else {"steps": job.cfg.train.steps}
        return {"config": config_part(job.cfg), "budget": budget}

    def outputs(self):
        return [self.job.run_dir]

    def plan(self, rec):
        from grandmother.training.checkpoint import latest_checkpoint, read_meta
        job = self.job
        sps = job.warmup["seconds_per_step"]
        plan = {}
        if "steps" not in rec:
            if job.minutes is not None:
                steps = max(1, int(job.minutes * 60 * MINUTES_FRACTION / max(sps, 1e-9)))
                plan = {"steps": steps, "budget_minutes": job.minutes, "warmup": job.warmup}
            else:
                plan = {"steps": job.cfg.train.steps}
        steps = plan.get("steps", rec.get("steps"))
        done = 0
        ckpt = latest_checkpoint(job.run_dir) if job.run_dir.is_dir() else None
        if ckpt is not None:
            done = int(read_meta(ckpt).get("step", 0))
        how = (f"{steps} steps chosen for {job.minutes} min at {sps:.3g} s/step (warm-up)"
               if job.minutes is not None else f"{steps} steps")
        return plan, (steps - done) * sps, f"{how} of {job.cfg.train.batch_size} images, preset {job.preset}"

    def run(self, rec) -> dict:
        from grandmother.training.loop import train
        job = self.job
        cfg = copy.deepcopy(job.cfg)
        cfg.train.steps = int(rec["steps"])
        summary = train(cfg, job.data_dir, job.run_dir, resume=True, progress=job.progress)
        final = summary.get("final") or {}
        return {"steps": summary["steps"], "images_seen": summary["images_seen"], "final_loss": final.get("loss")}


# ---------------------------------------------------------------- probe, visualize, invariance

class Probe(Stage):
    name = "probe"
    inputs = ("testsets", "probe")

    def fingerprint(self) -> dict:
        return {"probe": dict(PROBE_OPTIONS)}

    def outputs(self):
        return sorted(self.job.out.glob("probe_*"))

    def plan(self, rec):
        job = self.job
        n = sum(job.inputs["testsets"][t.name].get("images", 850) for t in job.testsets)
        per_image = job.warmup["seconds_per_step"] / max(1, job.warmup.get("batch_size", 100)) / 3
        # paper protocol: the network and the random-weights baseline, two passes each; held out: one pass of
        # the network and of each of 5 random-weight seeds; plus the linear filters (about two more)
        eta = 1.0 * len(job.testsets) + 12 * n * per_image
        return {}, eta, f"every unit on {', '.join(t.name for t in job.testsets)} (+ baselines)"

    def run(self, rec) -> dict:
        from grandmother.analysis.probe import heldout_table, run_probe
        job = self.job
        out = {}
        for ts in job.testsets:
            pdir = job.out / f"probe_{ts.name}"
            cmd = (f"grandmother probe {quote(job.run_dir)} --testset {quote(ts.path)} --out {quote(pdir)} "
                   f"--concept {quote(ts.name)} --train-data {quote(job.data_dir)} "
                   + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PROBE_OPTIONS.items()))
            res = run_probe(job.run_dir, ts.path, pdir, concept=ts.name, train_data=job.data_dir, command=cmd,
                            progress=job.progress, **PROBE_OPTIONS)
            best = res["best"]
            print(f"      {ts.name}, paper protocol (chosen and scored on all images): best unit {best['unit']}, "
                  f"{100 * best['accuracy']:.1f}%")
            ho = res.get("heldout") or {}
            if "top_stage" in ho:
                print("\n".join(f"      {line}" for line in heldout_table(ho).splitlines()))
            elif "skipped" in ho:
                print(f"      held-out evaluation skipped: {ho['skipped']}")
            out[ts.name] = shown_unit(res)
            print(f"      shown: {out[ts.name]['unit']} ({out[ts.name]['chosen_by']})")
        return out


class Visualize(Stage):
    name = "visualize"

    def outputs(self):
        return sorted(self.job.out.glob("visualize_*"))

    def plan(self, rec):
        # up to 300 iterations of a gradient and about two line-search values on 4 images
        eta = len(self.job.testsets) * (1.0 + 300 * 2 * self.job.warmup["seconds_per_4_image_pass"])
        return {}, eta, "histogram, top images and optimal stimulus of each concept's unit"

    def run(self, rec) -> dict:
        from grandmother.analysis.visualize import run_visualize
        job = self.job
        out = {}
        for ts in job.testsets:
            shown = self.result("probe")[ts.name]
            vdir = job.out / f"visualize_{ts.name}"
            cmd = (f"grandmother visualize {quote(job.run_dir)} --testset {quote(ts.path)} --unit {shown['unit']}"
                   f"{_threshold_flag(shown)} --out {quote(vdir)}")
            res = run_visualize(job.run_dir, ts.path, shown["unit"], vdir, threshold=shown["threshold"],
                                concept=ts.name, command=cmd)
            out[ts.name] = {"optimal_stimulus_value": res["optimal_stimulus"]["value"]}
        return out


class Invariance(Stage):
    name = "invariance"

    def outputs(self):
        return sorted(self.job.out.glob("invariance_*"))

    def plan(self, rec):
        return {}, 1.0 * len(self.job.testsets), "scale and translation curves of each concept's unit"

    def images(self, ts: Concept, inv_dir: Path) -> Path:
        """The in-package held-out faces for the built-in set, else the first positives of the test set."""
        from grandmother.data.samples import SAMPLE_DIR
        if ts.builtin:
            return SAMPLE_DIR / "invariance"
        from PIL import Image

        from grandmother.data.testset import open_testset
        ds, labels, _ = open_testset(ts.path)
        folder = inv_dir / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(np.flatnonzero(labels)[:INVARIANCE_IMAGES]):
            img = ds.get_batch([int(i)])[0].permute(1, 2, 0).numpy()
            Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(folder / f"positive_{k:02d}.png")
        return folder

    def run(self, rec) -> dict:
        from grandmother.analysis.invariance import run_invariance
        job = self.job
        out = {}
        for ts in job.testsets:
            shown = self.result("probe")[ts.name]
            idir = job.out / f"invariance_{ts.name}"
            images = self.images(ts, idir)
            cmd = (f"grandmother invariance {quote(job.run_dir)} --unit {shown['unit']}{_threshold_flag(shown)} "
                   f"--images {quote(images)} --out {quote(idir)}")
            run_invariance(job.run_dir, shown["unit"], images, idir, threshold=shown["threshold"], command=cmd)
            out[ts.name] = {"images": str(images)}
        return out


# ---------------------------------------------------------------- report

class Report(Stage):
    name = "report"

    def outputs(self):
        return [self.job.out / "report.html"]

    def plan(self, rec):
        return {}, 1.0, "writing the HTML report"

    def run(self, rec) -> dict:
        from grandmother.report.page import build_report
        job = self.job
        names = [t.name for t in job.testsets]
        dirs = lambda kind: [job.out / f"{kind}_{n}" for n in names]
        report = job.out / "report.html"
        first = [f"{job.command}   # all of the below, resumable (run.json)"]
        first.append(f"grandmother ingest {' '.join(map(quote, job.sources))} --out {quote(job.data_dir)} "
                     f"--size {job.size} --color {job.color} --frames-per-video {job.frames_per_video} "
                     f"--seed {job.cfg.train.seed} --exclude {quote(job.out / 'excluded.txt')}"
                     f"{job.rebalance.flags()}")
        first.append(f"grandmother train --preset {quote(job.preset)} --data {quote(job.data_dir)} "
                     f"--out {quote(job.run_dir)} --steps {job.record.stages['train']['steps']} --resume"
                     + "".join(f" --set {quote(o)}" for o in job.overrides))
        res = build_report(job.run_dir, report, probes=dirs("probe"), visualize=dirs("visualize"),
                           invariance=dirs("invariance"), first_commands=first,
                           command=f"grandmother report {quote(job.run_dir)} --out {quote(report)}")
        return {"report": str(report.resolve()), "rows": res["rows"]}


# The stages in the order they run (and the names --restart-from takes). A new stage: one class above,
# registered here at its place.
STAGES: tuple[type[Stage], ...] = (Testsets, Ingest, Train, Probe, Visualize, Invariance, Report)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
