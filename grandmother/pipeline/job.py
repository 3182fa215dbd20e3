"""`grandmother run SRC... --out DIR`: from folders of videos and images to the HTML report, one resumable job.

    grandmother run ~/my_videos --out my_run                       # the face test set shipped in the package
    grandmother run ~/clips ~/photos --out r --minutes 30 --testset tests_cats --testset tests_bodies

Stages, in order (the names --restart-from takes):

    testsets    each --testset checked against the network's input; without --testset, the face test
                set shipped in the package (sample/faces_test) is built at that size   -> DIR/testset_faces
    ingest      every SRC at the network's size and colour, every test set's excluded.txt left out,
                `frames_per_video` frames of each video                                 -> DIR/data
    train       the preset for --steps N, or as many steps as --minutes M allows        -> DIR/run
    probe       every unit on each test set, with the Table 1 baselines                 -> DIR/probe_NAME
    visualize   each concept's unit (shown_unit: the top-stage unit chosen on the held-out protocol's
                selection half): histogram, top images, optimal stimulus               -> DIR/visualize_NAME
    invariance  its scale and translation curves                                        -> DIR/invariance_NAME
    report      one HTML file                                                           -> DIR/report.html

DIR/run.json records, per stage, when it started and finished, what it produced and the fingerprint of
its inputs (files with sizes and modification times, test-set digests, the settings). Re-running the same
command continues at the first unfinished stage and never redoes a finished one; an interrupted stage
resumes with its own machinery (ingest's finished shards, the trainer's checkpoints, the probe's
cache). Inputs or settings that changed since a stage ran are refused in one line naming the change,
unless --restart-from names that stage or an earlier one: then it and every later stage are redone.

--minutes M: a warm-up of WARMUP_STEPS timed training steps on random pixels (the step's arithmetic
does not depend on them) gives seconds per step; the step count is 90% of the budget divided by that,
leaving room for data loading and checkpoints. The count is recorded in run.json and reused on resume.

Bad input is one line each, before any long work: a SRC without images or videos, fewer images than
one batch could hold, a test set of another size or colour or with one class. After ingest (which
skips, counts and lists unreadable files): no readable image at all, or fewer images than a batch.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grandmother.errors import GrandmotherError
from grandmother.io import atomic_write_json, atomic_write_text

STAGES = ("testsets", "ingest", "train", "probe", "visualize", "invariance", "report")
RUN_FILE = "run.json"
RUN_FORMAT = "grandmother-run/1"
# The paper takes one frame per video from 10 million videos; a user's folder holds tens, so `run`
# takes up to this many distinct frames of each (exact duplicates are dropped by ingest).
FRAMES_PER_VIDEO = 100
# Probe settings of `run` (the demo's): 1,000 linear-filter templates from the ingested training data.
PROBE_OPTIONS = {"linear_filters": 1000}
WARMUP_STEPS = 3
MINUTES_FRACTION = 0.9
INVARIANCE_IMAGES = 10
# Which parts of the job's inputs each stage depends on (see job_inputs).
STAGE_INPUTS = {
    "testsets": ("format", "testsets"),
    "ingest": ("format", "testsets", "sources", "ingest"),
    "train": ("config", "budget"),
    "probe": ("testsets", "probe"),
    "visualize": (),
    "invariance": (),
    "report": (),
}


def _q(path) -> str:
    return shlex.quote(str(path))


def _threshold_flag(unit: dict) -> str:
    return "" if unit.get("threshold") is None else f" --threshold {unit['threshold']:.6g}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt_s(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- test sets

@dataclass
class Concept:
    name: str  # the concept: folder names probe_NAME, visualize_NAME, ... and the report's row
    path: Path
    builtin: bool  # the in-package face test set, built by this job into DIR/testset_faces


def name_test_sets(paths: list[str], out: Path) -> list[Concept]:
    if not paths:
        return [Concept("faces", out / "testset_faces", True)]
    sets, used = [], set()
    for p in paths:
        base = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(p).resolve().name) or "testset"
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        sets.append(Concept(name, Path(p).resolve(), False))
    return sets


def check_test_set(ts: Concept, size: int, channels: int, preset: str) -> dict:
    """One line for a test set that cannot be probed by this network; returns its digest part."""
    from grandmother.data.testset import open_testset
    ds, labels, index = open_testset(ts.path)
    have = (int(index.get("channels", 0)), int(index.get("size", 0)))
    if have != (channels, size):
        color = lambda c: "gray" if c == 1 else "rgb"
        raise GrandmotherError(
            f"--testset {ts.path}: {have[1]}x{have[1]} {color(have[0])} images, but preset {preset} takes "
            f"{size}x{size} {color(channels)}; rebuild it with `grandmother testset ... --size {size} "
            f"--color {color(channels)}`")
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == len(labels):
        raise GrandmotherError(f"--testset {ts.path}: one class only ({n_pos} positives of {len(labels)}); the "
                               f"probe needs positives and negatives")
    h = hashlib.sha256()
    for f in ("index.json", "labels.npy", "excluded.txt"):
        if (ts.path / f).is_file():
            h.update((ts.path / f).read_bytes())
    return {"path": str(ts.path), "digest": h.hexdigest()[:32], "images": len(labels), "positives": n_pos}


def builtin_test_set_part() -> dict:
    from grandmother.data.samples import SAMPLE_DIR
    root = SAMPLE_DIR / "faces_test"
    for needed in (root / "positive", root / "negative", SAMPLE_DIR / "invariance"):
        if not needed.is_dir():
            raise GrandmotherError(f"the in-package sample is missing {needed}; run scripts/build_sample.py")
    return {"builtin": str(root), "files": file_digest(sorted(p for p in root.rglob("*") if p.is_file()))}


def file_digest(files) -> str:
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------- the job's inputs and what changed

def source_part(sources: list[str]) -> tuple[dict, list]:
    """Every input file of every SRC with its size and modification time; and ingest's units."""
    from grandmother.data.ingest import expand_sources
    units, _ = expand_sources(sources)
    files = {}
    for _, p, _ in units:
        st = p.stat()
        files[str(p.resolve())] = [st.st_size, st.st_mtime_ns]
    return {"srcs": [str(Path(s).resolve()) for s in sources], "files": files}, units


def config_part(cfg) -> dict:
    d = cfg.to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k != "steps"}  # the budget part holds the length
    return d


def _flat(d, prefix="") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list):
        out = {}
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: d}


def describe_change(part: str, old, new) -> str | None:
    """None when equal, else one phrase naming what changed."""
    if old == new:
        return None
    if part == "sources":
        if old.get("srcs") != new.get("srcs"):
            return f"the SRC list changed ({' '.join(old.get('srcs', []))} -> {' '.join(new['srcs'])})"
        a, b = old.get("files", {}), new["files"]
        added = sorted(set(b) - set(a))
        removed = sorted(set(a) - set(b))
        modified = sorted(k for k in set(a) & set(b) if a[k] != b[k])
        bits = [f"{len(x)} file(s) {what} (first: {x[0]})" for x, what in
                ((added, "added"), (removed, "removed"), (modified, "modified")) if x]
        return "input files changed: " + "; ".join(bits)
    fa, fb = _flat(old), _flat(new)
    for key in sorted(set(fa) | set(fb)):
        if fa.get(key, "<unset>") != fb.get(key, "<unset>"):
            if part == "budget":
                return f"--{key}: {fa.get(key, '<unset>')} -> {fb.get(key, '<unset>')}"
            label = {"config": "setting", "ingest": "ingest setting",
                     "format": "input format", "testsets": "test set", "probe": "probe setting"}.get(part, part)
            return f"{label} {key}: {fa.get(key, '<unset>')} -> {fb.get(key, '<unset>')}"
    return f"{part} changed"


# ---------------------------------------------------------------- run.json

class RunRecord:
    """DIR/run.json: the stages started and finished, each with its inputs' fingerprint."""

    def __init__(self, out: Path):
        self.path = Path(out) / RUN_FILE
        self.data = {"format": RUN_FORMAT, "stages": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError as e:
                raise GrandmotherError(f"{self.path}: unreadable ({e}); move it away to start this job over") from None
            if self.data.get("format") != RUN_FORMAT:
                raise GrandmotherError(f"{self.path}: not a `grandmother run` record (format "
                                       f"{self.data.get('format')!r})")

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    def done(self, stage: str) -> bool:
        return self.stages.get(stage, {}).get("status") == "done"

    def save(self):
        atomic_write_json(self.path, self.data)


def check_changes(record: RunRecord, inputs: dict, restart_from: str | None) -> str | None:
    """The stage to redo from (restart_from or None); refuses inputs changed under a kept stage."""
    first = None
    for stage in STAGES:
        rec = record.stages.get(stage)
        if rec is None:
            continue
        for part in STAGE_INPUTS[stage]:
            change = describe_change(part, rec.get("inputs", {}).get(part), inputs[part])
            if change:
                first = first or (stage, change)
                break
    if first is None:
        return restart_from
    stage, change = first
    if restart_from is None or STAGES.index(restart_from) > STAGES.index(stage):
        raise GrandmotherError(f"{record.path.parent}: {change} since stage {stage} ran; re-run with the same "
                               f"inputs and settings, or add --restart-from {stage} to redo {stage} and what follows")
    return restart_from


# ---------------------------------------------------------------- measurements for the budget and the ETAs

def measure_step_seconds(cfg, steps: int = WARMUP_STEPS) -> dict:
    """Seconds per training step of `cfg`: the median of `steps` timed steps after one untimed one, on
    random pixels (the step's arithmetic does not depend on them); and of a forward and backward pass on
    4 images (the optimal stimulus's 4 restarts), for the ETAs. Touches no global RNG."""
    import torch

    from grandmother.nn.model import build_network
    from grandmother.training.optim import build_optimizer
    from grandmother.training.runtime import resolve_device
    from grandmother.training.loop import loss_and_terms
    device = resolve_device(cfg.train.device)
    net = build_network(cfg, device)
    opt = build_optimizer(net.parameters(), cfg.train)
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (cfg.train.batch_size, m.channels, m.image_size, m.image_size),
                          dtype=torch.uint8, generator=g).to(device)

    def timed(images, update):
        t = time.perf_counter()
        loss, _ = loss_and_terms(net, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if update:
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    step = [timed(batch, True) for _ in range(steps + 1)][1:]
    small = [timed(batch[:4], False) for _ in range(3)][1:]
    del net, opt
    return {"seconds_per_step": float(np.median(step)), "timed_steps": steps, "device": str(device),
            "batch_size": cfg.train.batch_size, "seconds_per_4_image_pass": float(np.median(small))}


def ingest_eta(units, frames_per_video: int, size: int, channels: int, workers: int) -> float:
    """Seconds to ingest, from decoding a few of the files now (images: whole files; videos: 10 frames)."""
    from grandmother.data.images import load_image
    from grandmother.data.ingest import media_kind
    images = [p for _, p, _ in units if media_kind(p) == "image"]
    videos = [p for _, p, _ in units if media_kind(p) == "video"]
    per_image = per_frame = 0.0
    sample = images[:: max(1, len(images) // 3)][:3]
    if sample:
        t = time.perf_counter()
        for p in sample:
            try:
                load_image(p, size, channels)
            except Exception:  # unreadable files are ingest's to count
                pass
        per_image = (time.perf_counter() - t) / len(sample)
    frames = 0
    if videos:
        import av
        for p in videos[:20]:
            try:
                with av.open(str(p)) as c:
                    s = c.streams.video[0]
                    frames += int(s.frames or (float(s.duration * s.time_base) * float(s.average_rate)
                                               if s.duration and s.average_rate else frames_per_video))
            except Exception:
                frames += frames_per_video
        frames = frames * len(videos) / min(20, len(videos))
        try:
            t = time.perf_counter()
            with av.open(str(videos[0])) as c:
                for i, _ in enumerate(c.decode(c.streams.video[0])):
                    if i == 9:
                        break
            per_frame = (time.perf_counter() - t) / 10
        except Exception:
            per_frame = 0.0
    return (len(images) * per_image + frames * per_frame) / max(1, min(workers, len(units)))


# ---------------------------------------------------------------- the unit shown for a concept

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


# ---------------------------------------------------------------- the job

class Job:
    def __init__(self, sources, out, *, preset="small", overrides=(), steps=None, minutes=None, testsets=(),
                 frames_per_video=FRAMES_PER_VIDEO, workers=2, restart_from=None, command=None, progress=True):
        from grandmother.config import load_config
        if steps is not None and minutes is not None:
            raise GrandmotherError("give --steps N or --minutes M, not both")
        if steps is not None and steps < 1:
            raise GrandmotherError(f"--steps {steps}: must be at least 1")
        if minutes is not None and not minutes > 0:
            raise GrandmotherError(f"--minutes {minutes}: must be positive")
        if frames_per_video < 1:
            raise GrandmotherError(f"--frames-per-video {frames_per_video}: must be at least 1")
        if restart_from is not None and restart_from not in STAGES:
            raise GrandmotherError(f"--restart-from {restart_from!r}: choose one of {', '.join(STAGES)}")
        self.out = Path(out)
        if self.out.exists() and (not self.out.is_dir() or (any(self.out.iterdir())
                                                            and not (self.out / RUN_FILE).is_file())):
            raise GrandmotherError(f"--out {self.out}: exists and is not a `grandmother run` folder (no {RUN_FILE}); "
                                   f"choose another --out")
        self.overrides = list(overrides)
        self.cfg = load_config(preset, self.overrides + ([f"train.steps={steps}"] if steps is not None else []))
        self.preset, self.minutes, self.workers, self.progress = preset, minutes, workers, progress
        self.frames_per_video, self.restart_from = frames_per_video, restart_from
        self.sources = [str(s) for s in sources]
        self.command = command or ("grandmother run " + " ".join(map(_q, self.sources)) + f" --out {_q(out)}")
        m = self.cfg.model
        self.size, self.channels = m.image_size, m.channels
        self.color = "gray" if m.channels == 1 else "rgb"
        self.run_dir, self.data_dir = self.out / "run", self.out / "data"
        self.testsets = name_test_sets(list(testsets), self.out)
        self.timings: dict[str, float] = {}

    # ============ checks and fingerprints: fast, before any long work ============
    def prepare(self) -> None:
        sources, self.units = source_part(self.sources)
        ts_part = {}
        for ts in self.testsets:
            ts_part[ts.name] = builtin_test_set_part() if ts.builtin else check_test_set(
                ts, self.size, self.channels, self.preset)
        from grandmother.data.ingest import media_kind
        n_videos = sum(media_kind(p) == "video" for _, p, _ in self.units)
        most = len(self.units) - n_videos + n_videos * self.frames_per_video
        batch = self.cfg.train.batch_size
        if most < batch:
            raise GrandmotherError(
                f"too few images for a batch: the SRCs hold {len(self.units) - n_videos} image(s) and {n_videos} "
                f"video(s) x {self.frames_per_video} frames = at most {most}, and a batch is {batch} (add data, "
                f"--frames-per-video, or --set train.batch_size=N)")
        budget = {"minutes": self.minutes} if self.minutes is not None else {"steps": self.cfg.train.steps}
        self.inputs = {
            "format": {"size": self.size, "color": self.color},
            "testsets": ts_part,
            "sources": sources,
            "ingest": {"frames_per_video": self.frames_per_video, "seed": self.cfg.train.seed},
            "config": config_part(self.cfg),
            "budget": budget,
            "probe": dict(PROBE_OPTIONS),
        }
        self.record = RunRecord(self.out)
        redo = check_changes(self.record, self.inputs, self.restart_from)
        if redo is not None:
            self.discard_from(redo)

    def measure(self) -> None:
        """The warm-up (once per job: recorded, and reused by a re-run)."""
        if "warmup" not in self.record.data:
            self.record.data["warmup"] = measure_step_seconds(self.cfg)
        self.warmup = self.record.data["warmup"]

    def discard_from(self, stage: str) -> None:
        """Forget `stage` and every later one, and delete what they wrote."""
        later = STAGES[STAGES.index(stage):]
        for s in later:
            for path in self.outputs(s):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            self.record.stages.pop(s, None)
        if "warmup" in self.record.data and "train" in later:
            self.record.data.pop("warmup")
        if self.record.path.is_file():
            self.record.save()
        print(f"[run] --restart-from {stage}: redoing {', '.join(later)}")

    def outputs(self, stage: str) -> list[Path]:
        o = self.out
        if stage == "testsets":
            return [t.path for t in self.testsets if t.builtin] + [o / "testset_faces.partial", o / "excluded.txt"]
        if stage == "ingest":
            return [self.data_dir, o / "data.partial"]
        if stage == "train":
            return [self.run_dir]
        if stage in ("probe", "visualize", "invariance"):
            return sorted(o.glob(f"{stage}_*"))
        return [o / "report.html"]

    # ============ stages ============
    def run(self) -> dict:
        t0 = time.perf_counter()
        self.prepare()
        self.out.mkdir(parents=True, exist_ok=True)
        self.record.data["command"] = self.command
        self.measure()
        self.record.save()
        for i, stage in enumerate(STAGES, 1):
            head = f"[run] {i}/{len(STAGES)} {stage}"
            if self.record.done(stage):
                print(f"{head}: done before ({self.record.path.name}), skipped")
                continue
            rec = self.record.stages.get(stage)
            resumed = rec is not None
            rec = rec or {"inputs": {p: self.inputs[p] for p in STAGE_INPUTS[stage]}, "started": _now()}
            rec["status"] = "started"
            plan, eta, what = getattr(self, f"plan_{stage}")(rec)
            rec.update(plan)
            self.record.stages[stage] = rec
            self.record.save()
            print(f"{head}: {what}{' (resuming)' if resumed else ''}; ETA {_fmt_s(eta)}", flush=True)
            t = time.perf_counter()
            result = getattr(self, f"do_{stage}")(rec)
            seconds = time.perf_counter() - t
            rec.update(status="done", finished=_now(), seconds=round(seconds, 3), result=result)
            self.record.save()
            self.timings[stage] = seconds
            print(f"{head}: done in {_fmt_s(seconds)}", flush=True)
        report = (self.out / "report.html").resolve()
        print(f"[run] finished in {_fmt_s(time.perf_counter() - t0)}; report: {report}")
        return {"out": str(self.out), "report": str(report), "record": self.record.data, "timings": self.timings}

    # testsets
    def plan_testsets(self, rec):
        build = [t for t in self.testsets if t.builtin]
        what = (f"building the face test set shipped in the package at {self.size}x{self.size} {self.color}"
                if build else f"{len(self.testsets)} test set(s) checked")
        return {}, 2.0 * len(build), what

    def do_testsets(self, rec) -> dict:
        from grandmother.data.samples import SAMPLE_DIR
        from grandmother.analysis.heldout import testset_cue_scores
        from grandmother.data.testset import build_testset, open_testset, read_excluded
        out = {}
        excluded = []
        for ts in self.testsets:
            if ts.builtin:
                root = SAMPLE_DIR / "faces_test"
                build_testset([str(root / "positive")], [str(root / "negative")], ts.path, size=self.size,
                              color=self.color, seed=0, overwrite=True, progress=False, cue_scorer=testset_cue_scores)
            _, labels, _ = open_testset(ts.path)
            out[ts.name] = {"path": str(ts.path), "images": int(len(labels)), "positives": int(labels.sum())}
            print(f"      {ts.name}: {int(labels.sum())} positives, {int(len(labels) - labels.sum())} negatives "
                  f"({ts.path})")
            if (ts.path / "excluded.txt").is_file():
                excluded += read_excluded(ts.path / "excluded.txt")
        atomic_write_text(self.out / "excluded.txt", "".join(p + "\n" for p in sorted(set(excluded))))
        return out

    # ingest
    def plan_ingest(self, rec):
        eta = ingest_eta(self.units, self.frames_per_video, self.size, self.channels, self.workers)
        return {}, eta, (f"{len(self.units)} file(s) from {len(self.sources)} SRC(s) at {self.size}x{self.size} "
                         f"{self.color}, up to {self.frames_per_video} frames per video")

    def do_ingest(self, rec) -> dict:
        from grandmother.data.ingest import ingest
        index = ingest(self.sources, self.data_dir, size=self.size, color=self.color, seed=self.cfg.train.seed,
                       frames_per_video=self.frames_per_video, workers=self.workers,
                       exclude=str(self.out / "excluded.txt"), progress=self.progress)
        n, skipped = index["images"], len(index.get("skipped", []))
        files = sum(s.get("files", 0) for s in index.get("sources", []))
        print(f"      {n} images; {skipped} unreadable file(s) skipped, {index.get('duplicates', 0)} duplicate(s) "
              f"dropped, {index.get('excluded', 0)} test-set file(s) left out")
        if skipped:
            first = index["skipped"][0]
            print(f"      unreadable files are listed in {self.data_dir / 'index.json'} (first: {first['path']}: "
                  f"{first['reason']})")
        if n == 0:
            raise GrandmotherError(f"no readable image or video frame in the {files} input file(s); all {skipped} "
                                   f"unreadable ones are listed in {self.data_dir / 'index.json'}")
        if n < self.cfg.train.batch_size:
            raise GrandmotherError(f"too few images for a batch: {n} readable (after {skipped} unreadable and "
                                   f"{index.get('duplicates', 0)} duplicates), batch size {self.cfg.train.batch_size}"
                                   f"; add data, --frames-per-video, or --set train.batch_size=N")
        return {"images": n, "skipped": skipped, "duplicates": index.get("duplicates", 0),
                "excluded": index.get("excluded", 0)}

    # train
    def plan_train(self, rec):
        sps = self.warmup["seconds_per_step"]
        plan = {}
        if "steps" not in rec:
            if self.minutes is not None:
                steps = max(1, int(self.minutes * 60 * MINUTES_FRACTION / max(sps, 1e-9)))
                plan = {"steps": steps, "budget_minutes": self.minutes, "warmup": self.warmup}
            else:
                plan = {"steps": self.cfg.train.steps}
        steps = plan.get("steps", rec.get("steps"))
        done = 0
        from grandmother.training.checkpoint import latest_checkpoint, read_meta
        ckpt = latest_checkpoint(self.run_dir) if self.run_dir.is_dir() else None
        if ckpt is not None:
            done = int(read_meta(ckpt).get("step", 0))
        how = (f"{steps} steps chosen for {self.minutes} min at {sps:.3g} s/step (warm-up)"
               if self.minutes is not None else f"{steps} steps")
        return plan, (steps - done) * sps, f"{how} of {self.cfg.train.batch_size} images, preset {self.preset}"

    def do_train(self, rec) -> dict:
        from grandmother.training.loop import train
        cfg = copy.deepcopy(self.cfg)
        cfg.train.steps = int(rec["steps"])
        summary = train(cfg, self.data_dir, self.run_dir, resume=True, progress=self.progress)
        final = summary.get("final") or {}
        return {"steps": summary["steps"], "images_seen": summary["images_seen"], "final_loss": final.get("loss")}

    # probe
    def _forward_seconds_per_image(self) -> float:
        return self.warmup["seconds_per_step"] / max(1, self.warmup.get("batch_size", 100)) / 3

    def plan_probe(self, rec):
        n = sum(self.inputs["testsets"][t.name].get("images", 850) for t in self.testsets)
        # paper protocol: the network and the random-weights baseline, two passes each; held out: one pass of
        # the network and of each of 5 random-weight seeds; plus the linear filters (about two more)
        eta = 1.0 * len(self.testsets) + 12 * n * self._forward_seconds_per_image()
        return {}, eta, f"every unit on {', '.join(t.name for t in self.testsets)} (+ baselines)"

    def do_probe(self, rec) -> dict:
        from grandmother.analysis.probe import run_probe
        out = {}
        for ts in self.testsets:
            pdir = self.out / f"probe_{ts.name}"
            cmd = (f"grandmother probe {_q(self.run_dir)} --testset {_q(ts.path)} --out {_q(pdir)} "
                   f"--concept {_q(ts.name)} --train-data {_q(self.data_dir)} "
                   + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PROBE_OPTIONS.items()))
            res = run_probe(self.run_dir, ts.path, pdir, concept=ts.name, train_data=self.data_dir, command=cmd,
                            progress=self.progress, **PROBE_OPTIONS)
            best = res["best"]
            print(f"      {ts.name}, paper protocol (chosen and scored on all images): best unit {best['unit']}, "
                  f"{100 * best['accuracy']:.1f}%")
            ho = res.get("heldout") or {}
            if "top_stage" in ho:
                from grandmother.analysis.probe import heldout_table
                print("\n".join(f"      {line}" for line in heldout_table(ho).splitlines()))
            elif "skipped" in ho:
                print(f"      held-out evaluation skipped: {ho['skipped']}")
            out[ts.name] = shown_unit(res)
            print(f"      shown: {out[ts.name]['unit']} ({out[ts.name]['chosen_by']})")
        return out

    def shown_units(self) -> dict:
        return self.record.stages["probe"]["result"]

    # visualize
    def plan_visualize(self, rec):
        # up to 300 iterations of a gradient and about two line-search values on 4 images
        eta = len(self.testsets) * (1.0 + 300 * 2 * self.warmup["seconds_per_4_image_pass"])
        return {}, eta, "histogram, top images and optimal stimulus of each concept's unit"

    def do_visualize(self, rec) -> dict:
        from grandmother.analysis.visualize import run_visualize
        out = {}
        for ts in self.testsets:
            shown = self.shown_units()[ts.name]
            vdir = self.out / f"visualize_{ts.name}"
            cmd = (f"grandmother visualize {_q(self.run_dir)} --testset {_q(ts.path)} --unit {shown['unit']}"
                   f"{_threshold_flag(shown)} --out {_q(vdir)}")
            res = run_visualize(self.run_dir, ts.path, shown["unit"], vdir, threshold=shown["threshold"],
                                concept=ts.name, command=cmd)
            out[ts.name] = {"optimal_stimulus_value": res["optimal_stimulus"]["value"]}
        return out

    # invariance
    def plan_invariance(self, rec):
        return {}, 1.0 * len(self.testsets), "scale and translation curves of each concept's unit"

    def invariance_images(self, ts: Concept, inv_dir: Path) -> Path:
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

    def do_invariance(self, rec) -> dict:
        from grandmother.analysis.invariance import run_invariance
        out = {}
        for ts in self.testsets:
            shown = self.shown_units()[ts.name]
            idir = self.out / f"invariance_{ts.name}"
            images = self.invariance_images(ts, idir)
            cmd = (f"grandmother invariance {_q(self.run_dir)} --unit {shown['unit']}{_threshold_flag(shown)} "
                   f"--images {_q(images)} --out {_q(idir)}")
            run_invariance(self.run_dir, shown["unit"], images, idir, threshold=shown["threshold"], command=cmd)
            out[ts.name] = {"images": str(images)}
        return out

    # report
    def plan_report(self, rec):
        return {}, 1.0, "writing the HTML report"

    def do_report(self, rec) -> dict:
        from grandmother.report.page import build_report
        names = [t.name for t in self.testsets]
        dirs = lambda kind: [self.out / f"{kind}_{n}" for n in names]
        report = self.out / "report.html"
        train_rec = self.record.stages["train"]
        first = [f"{self.command}   # all of the below, resumable (run.json)"]
        first += [f"grandmother ingest {' '.join(map(_q, self.sources))} --out {_q(self.data_dir)} --size {self.size} "
                  f"--color {self.color} --frames-per-video {self.frames_per_video} --seed {self.cfg.train.seed} "
                  f"--exclude {_q(self.out / 'excluded.txt')}",
                  f"grandmother train --preset {_q(self.preset)} --data {_q(self.data_dir)} --out {_q(self.run_dir)} "
                  f"--steps {train_rec['steps']} --resume" + "".join(f" --set {_q(o)}" for o in self.overrides)]
        res = build_report(self.run_dir, report, probes=dirs("probe"), visualize=dirs("visualize"),
                           invariance=dirs("invariance"), first_commands=first,
                           command=f"grandmother report {_q(self.run_dir)} --out {_q(report)}")
        return {"report": str(report.resolve()), "rows": res["rows"]}


def run_pipeline(sources, out, **options) -> dict:
    """The whole job (see the module docstring); returns {"out", "report", "record", "timings"}."""
    return Job(sources, out, **options).run()
