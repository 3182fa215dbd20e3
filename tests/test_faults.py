"""Fault injection: untrusted run folders, damaged checkpoints, kills, full disks and bad input.

Run alone with `pytest -m faults`. Every case of issue 12 has a test here:
- a run folder is data, never code (a pickle that would create a file, under every command that reads runs);
- checkpoints are never lost silently (damaged `latest`, stale `.tmp-step_*`, SIGTERM, changed settings);
- SIGKILL during ingest, training, a checkpoint write and probe, then the same command again: identical results;
- a disk-full checkpoint write (a small tmpfs where the test may mount one);
- the report escapes every value and embeds files only from inside their result folder;
- the embedded Ray of a Downpour run listens on 127.0.0.1 only;
- every bad input named in the issue gets one line naming the flag or file.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grandmother.training.checkpoint import (CKPT_DIR, LEGACY_STATE, STATE_JSON, STATE_TENSORS, latest_checkpoint,
                                    load_checkpoint, load_weights, pack_state, read_meta, rng_state, unpack_state)
from grandmother.commands import main as cli
from grandmother.config import load_config
from grandmother.data.dataset import open_dataset
from grandmother.errors import GrandmotherError
from grandmother.training.loop import train

from test_classify import make_labeled
from test_train import TINY, make_images
from test_visualize import make_testset

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
TINY_FLAGS = sum((["--set", o] for o in TINY), [])


def grandmother(*argv, timeout=120, **kw) -> subprocess.CompletedProcess:
    """The command line in a fresh process (what a user, or a scheduler's kill, sees)."""
    return subprocess.run([sys.executable, "-m", "grandmother", *map(str, argv)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kw)


def start(*argv, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "grandmother", *map(str, argv)], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(cond, proc: subprocess.Popen | None = None, timeout: float = 90.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def one_line_error(capsys, argv) -> str:
    code = cli([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert err.startswith("grandmother: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def weights(run: Path) -> dict:
    return load_weights(latest_checkpoint(run))[0]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained tiny run (2 steps), its training images, a labeled test set and a labeled folder."""
    tmp = tmp_path_factory.mktemp("faults")
    images = make_images(tmp / "imgs")
    run = tmp / "run"
    train(load_config("small", TINY + ["train.steps=2"]), images, run, progress=False)
    (tmp / "ts").mkdir()
    return {"tmp": tmp, "images": images, "run": run, "testset": make_testset(tmp / "ts"),
            "labeled": make_labeled(tmp / "labeled", n_per_class=6)}


def copy_run(world, dest: Path) -> Path:
    shutil.copytree(world["run"], dest)
    return dest


# ================================================================ run folders are data, never code

class CreatesFile:
    """Unpickling this calls open(path, "w"): a file appears if the pickle is ever executed."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_train_state_executes_nothing(world, tmp_path, capsys):
    marker = tmp_path / "EXECUTED"
    evil = tmp_path / "evil.pt"
    torch.save({"optimizer": CreatesFile(marker), "rng": {}}, evil)
    torch.load(evil, weights_only=False)  # the control: this pickle really does create the file when loaded
    assert marker.exists()
    marker.unlink()

    run = copy_run(world, tmp_path / "run")
    ckpt = latest_checkpoint(run)
    shutil.copy(evil, ckpt / LEGACY_STATE)  # beside the real (safetensors + JSON) resume state
    out = tmp_path / "out"
    commands = [
        ["probe", run, "--testset", world["testset"], "--out", out / "probe", "--linear-filters", "0",
         "--no-random-weights"],
        ["visualize", run, "--testset", world["testset"], "--unit", "s0.pool.m0.y0.x0", "--out", out / "vis",
         "--restarts", "1", "--iters", "3", "--top", "4", "--device", "cpu"],
        ["invariance", run, "--unit", "s0.pool.m0.y0.x0", "--images", world["images"], "--out", out / "inv",
         "--scales", "0.8,1.0", "--max-shift", "1", "--device", "cpu"],
        ["classify", run, "--data", world["labeled"], "--out", out / "cls", "--max-iter", "5", "--quiet",
         "--device", "cpu"],
        ["report", run, "--out", out / "report.html"],
        ["train", "--preset", "small", *TINY_FLAGS, "--steps", "3", "--data", world["images"], "--out", run,
         "--resume"],
    ]
    for argv in commands:
        assert cli([str(a) for a in argv]) == 0, (argv[0], capsys.readouterr().err[-2000:])
        assert not marker.exists(), f"`grandmother {argv[0]}` executed a pickle from the run folder"
    assert read_meta(latest_checkpoint(run))["step"] == 3

    # Only the pickle left as resume state (as an older version wrote it): refused in one line, nothing runs.
    ckpt = latest_checkpoint(run)
    (ckpt / STATE_JSON).unlink()
    (ckpt / STATE_TENSORS).unlink()
    shutil.copy(evil, ckpt / LEGACY_STATE)
    err = one_line_error(capsys, ["train", "--preset", "small", *TINY_FLAGS, "--steps", "4", "--data",
                                  world["images"], "--out", run, "--resume"])
    assert LEGACY_STATE in err and "refused" in err
    assert not marker.exists()


def test_resume_state_is_safetensors_and_json_and_round_trips(tmp_path):
    net = torch.nn.Linear(3, 2)
    opts = [torch.optim.Adagrad(net.parameters(), lr=0.1), torch.optim.Adam(net.parameters(), lr=0.1),
            torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)]
    for opt in opts:
        net(torch.randn(4, 3)).sum().backward()
        opt.step()
    state = {"optimizers": [o.state_dict() for o in opts], "rng": rng_state(),
             "shards": [{"version": 3, "last_seq": {0: 5, 1: 7}, "last_step": {0: 9}}]}
    tensors, skeleton = pack_state(state)
    text = json.dumps(skeleton)
    back = unpack_state(tensors, json.loads(text))
    for o, sd in zip(opts, back["optimizers"]):
        o.load_state_dict(sd)  # loads into the real optimizer
    assert back["shards"] == state["shards"]
    np_a, np_b = state["rng"]["numpy"], back["rng"]["numpy"]
    assert np_a[0] == np_b[0] and np.array_equal(np_a[1], np_b[1]) and np_b[1].dtype == np_a[1].dtype
    assert np_a[2:] == np_b[2:] and back["rng"]["python"] == state["rng"]["python"]
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    import random
    random.setstate(back["rng"]["python"])
    np.random.set_state(back["rng"]["numpy"])
    # a checkpoint folder holds no pickle at all
    from grandmother.training.checkpoint import save_checkpoint
    save_checkpoint(tmp_path, 1, net.state_dict(), state, {"images_seen": 0})
    names = sorted(p.name for p in (tmp_path / CKPT_DIR / "step_00000001").iterdir())
    assert names == ["meta.json", "model.safetensors", STATE_JSON, STATE_TENSORS]


# ================================================================ checkpoints are never lost silently

def _two_checkpoints(world, run: Path) -> Path:
    """A run with checkpoints at steps 2 and 4 (checkpoint_every=2)."""
    train(load_config("small", TINY + ["train.steps=4", "train.checkpoint_every=2"]), world["images"], run,
          progress=False)
    assert sorted(p.name for p in (run / CKPT_DIR).glob("step_*")) == ["step_00000002", "step_00000004"]
    return run


@pytest.mark.parametrize("damage, resumes_at", [
    ("delete newest meta.json", 2),
    ("empty latest", 4),
    ("latest names a missing folder", 4),
    ("delete latest", 4),
])
def test_damaged_pointer_never_starts_over(world, tmp_path, capsys, damage, resumes_at):
    run = _two_checkpoints(world, tmp_path / "run")
    root = run / CKPT_DIR
    if damage == "delete newest meta.json":
        (root / "step_00000004" / "meta.json").unlink()
    elif damage == "empty latest":
        (root / "latest").write_text("")
    elif damage == "latest names a missing folder":
        (root / "latest").write_text("step_00000099\n")
    else:
        (root / "latest").unlink()
    lines_before = (run / "metrics.jsonl").read_text().splitlines()
    capsys.readouterr()
    # without --resume: refused, nothing changed
    with pytest.raises(GrandmotherError, match="already holds a run"):
        train(load_config("small", TINY + ["train.steps=6", "train.checkpoint_every=2"]), world["images"], run,
              progress=False)
    assert (root / "step_00000002").is_dir()
    # with --resume: continues from the newest complete checkpoint, and says which
    train(load_config("small", TINY + ["train.steps=6", "train.checkpoint_every=2"]), world["images"], run,
          resume=True, progress=False)
    captured = capsys.readouterr()
    assert f"from step {resumes_at} " in captured.out
    assert f"using step_{resumes_at:08d}" in captured.err
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7)), "metrics.jsonl must describe one run"
    assert len(lines_before) == 4
    assert read_meta(latest_checkpoint(run))["step"] == 6


def test_step_folders_without_a_complete_one_are_refused(world, tmp_path, capsys):
    run = _two_checkpoints(world, tmp_path / "run")
    for p in (run / CKPT_DIR).glob("step_*"):
        (p / "meta.json").unlink()
    err = one_line_error(capsys, ["train", "--preset", "small", *TINY_FLAGS, "--steps", "6", "--data",
                                  world["images"], "--out", run, "--resume"])
    assert "none is complete" in err
    assert len(list((run / CKPT_DIR).glob("step_*"))) == 2  # nothing deleted


def test_stale_temporary_checkpoint_folder_is_removed_on_next_start(world, tmp_path):
    run = copy_run(world, tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that no longer runs
    stale = run / CKPT_DIR / f".tmp-step_00000009-{dead}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    train(load_config("small", TINY + ["train.steps=3"]), world["images"], run, resume=True, progress=False)
    assert not stale.exists()
    assert not list((run / CKPT_DIR).glob(".tmp-*"))


@pytest.mark.parametrize("flags, setting", [
    (["--no-lcn"], "model.lcn"),
    (["--batch-size", "4"], "train.batch_size"),
    (["--optimizer", "adagrad"], "train.optimizer"),  # the small preset trains with adam
    (["--data", "{other}"], "--data"),
])
def test_resume_refuses_changed_settings_unless_forced(world, tmp_path, capsys, flags, setting):
    run = copy_run(world, tmp_path / "run")
    other = make_images(tmp_path / "other", n=12, seed=5)
    flags = [f.replace("{other}", str(other)) for f in flags]
    data = [] if "--data" in flags else ["--data", world["images"]]
    argv = ["train", "--preset", "small", *TINY_FLAGS, "--steps", "3", *data, "--out", run, "--resume", *flags]
    config_before = (run / "config.yaml").read_bytes()
    err = one_line_error(capsys, argv)
    assert setting in err and "--force-resume" in err
    assert (run / "config.yaml").read_bytes() == config_before, "config.yaml rewritten before the checks passed"
    assert read_meta(latest_checkpoint(run))["step"] == 2
    assert cli([str(a) for a in argv + ["--force-resume"]]) == 0, capsys.readouterr().err
    assert read_meta(latest_checkpoint(run))["step"] == 3
    assert setting in capsys.readouterr().err  # the forced change is named


def test_free_settings_may_change_on_resume(world, tmp_path, capsys):
    run = copy_run(world, tmp_path / "run")
    assert cli(["train", "--preset", "small", *TINY_FLAGS, "--steps", "3", "--data", str(world["images"]),
                "--out", str(run), "--resume", "--checkpoint-every", "5", "--log-every", "2", "--workers", "0",
                "--kernel", "reference", "--device", "cpu"]) == 0, capsys.readouterr().err


# ================================================================ SIGTERM, SIGKILL and re-runs

def _train_argv(world, run: Path, steps: int, *extra):
    return ["train", "--preset", "small", *TINY_FLAGS, "--set", "train.checkpoint_every=2", "--steps", steps,
            "--data", world["images"], "--out", run, *extra]


def _metrics_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def start_patched(patch: str, *argv) -> subprocess.Popen:
    """The command line in a fresh process with `patch` (Python) run first: it slows one step down or
    stops at a chosen point and prints a line, so a signal lands where the test wants it, on any machine."""
    code = f"import sys, time\n{patch}\nfrom grandmother.commands import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# each metrics line (one per step here) takes 0.25 s: time for a signal to land mid-run
SLOW_STEPS = """
import grandmother.io as io
real = io.append_jsonl
def slow(path, record):
    real(path, record)
    time.sleep(0.25)
io.append_jsonl = slow
"""

# the process stops half-way through writing the checkpoint of step 4 (model written, resume state not)
STOP_IN_CHECKPOINT = """
import grandmother.training.checkpoint as ck
real = ck.save_file
def slow(tensors, filename, *a, **k):
    real(tensors, filename, *a, **k)
    if filename.endswith(ck.STATE_TENSORS) and "step_00000004" in filename:
        print("STOPPED", flush=True)
        time.sleep(120)
ck.save_file = slow
"""

# ingest stops after its second shard is written
STOP_AFTER_SHARD = """
import grandmother.data.ingest as ingest
real = ingest._ShardBuffer.write
def slow(self, work, k, *a, **kw):
    out = real(self, work, k, *a, **kw)
    if k == 1:
        print("STOPPED", flush=True)
        time.sleep(120)
    return out
ingest._ShardBuffer.write = slow
"""

# probe stops after its first progress save
STOP_AFTER_PROBE_SAVE = """
import grandmother.analysis.protocol as pp
real = pp.ProtocolState.save
def slow(self, path, fingerprint):
    real(self, path, fingerprint)
    print("STOPPED", flush=True)
    time.sleep(120)
pp.ProtocolState.save = slow
"""


def stopped(job: subprocess.Popen) -> None:
    line = job.stdout.readline()
    while line and line.strip() != "STOPPED":
        line = job.stdout.readline()
    assert line.strip() == "STOPPED", job.stderr.read()[-2000:]


def sigterm_stops_at_a_checkpoint(job: subprocess.Popen, run: Path, timeout: float, pid: int | None = None) -> dict:
    """SIGTERM a training job (or its process `pid`): exit status 128 + 15, "continue with --resume", and a
    checkpoint at the last completed step. Returns that checkpoint's meta."""
    os.kill(pid or job.pid, signal.SIGTERM)
    out, err = job.communicate(timeout=timeout)
    assert job.returncode == 143, err[-2000:]
    assert "terminated" in err and "--resume" in out
    meta = read_meta(latest_checkpoint(run))
    assert meta["step"] == _metrics_steps(run), "the checkpoint is at the last completed step"
    return meta


def test_sigterm_checkpoints_like_ctrl_c_and_sigkill_resumes_identically(world, tmp_path):
    reference = tmp_path / "reference"
    train(load_config("small", TINY + ["train.steps=12", "train.checkpoint_every=2"]), world["images"], reference,
          progress=False)
    run = tmp_path / "run"
    job = start_patched(SLOW_STEPS, *_train_argv(world, run, 12))
    wait_for(lambda: _metrics_steps(run) >= 3, job, what="3 training steps")
    at = sigterm_stops_at_a_checkpoint(job, run, timeout=60)["step"]
    assert 3 <= at < 12
    # SIGKILL (no handler can run): the re-run resumes from the last checkpoint
    job = start_patched(SLOW_STEPS, *_train_argv(world, run, 12, "--resume"))
    wait_for(lambda: _metrics_steps(run) >= at + 3, job, what="3 more steps")
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert read_meta(latest_checkpoint(run))["step"] < 12, "killed too late"
    done = grandmother(*_train_argv(world, run, 12, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert same_weights(run, reference), "kill + resume must equal the uninterrupted run"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_model_parallel_sigterm_checkpoints_like_ctrl_c(world, tmp_path):
    # the workers are processes of their own: the parent tells them, they stop at one step and checkpoint it
    run = tmp_path / "mp"
    job = start(*_train_argv(world, run, 100000, "--model-parallel", "2", "--device", "cpu"))
    wait_for(lambda: _metrics_steps(run) >= 3, job, what="3 model-parallel steps")
    pids = _descendants(job.pid)
    meta = sigterm_stops_at_a_checkpoint(job, run, timeout=90)
    assert meta["step"] >= 3
    assert meta["model_parallel"] == "2x1"
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids - {job.pid}):
        time.sleep(0.5)
    assert not any(Path(f"/proc/{p}").exists() for p in pids - {job.pid}), "a worker outlived the run"


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(world, tmp_path):
    reference = tmp_path / "reference"
    train(load_config("small", TINY + ["train.steps=6", "train.checkpoint_every=2"]), world["images"], reference,
          progress=False)
    run = tmp_path / "run"
    job = start_patched(STOP_IN_CHECKPOINT, *_train_argv(world, run, 6))
    stopped(job)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert list((run / CKPT_DIR).glob(".tmp-step_00000004-*")), "the kill should leave a half-written folder"
    assert latest_checkpoint(run).name == "step_00000002"
    done = grandmother(*_train_argv(world, run, 6, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "removed 1 unfinished checkpoint folder" in done.stderr
    assert not list((run / CKPT_DIR).glob(".tmp-*"))
    assert same_weights(run, reference)


def test_sigkill_during_ingest_then_rerun_gives_the_same_dataset(tmp_path):
    src = make_images(tmp_path / "src", n=40, size=24)
    argv = ["ingest", src, "--size", "32", "--color", "gray", "--workers", "1", "--shard-size", "8", "--quiet"]
    clean = grandmother(*argv, "--out", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    out = tmp_path / "killed"
    job = start_patched(STOP_AFTER_SHARD, *argv, "--out", out)
    stopped(job)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not (out / "index.json").is_file()
    again = grandmother(*argv, "--out", out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout and "2 of 5 shards" in again.stdout
    a, b = json.loads((tmp_path / "clean" / "index.json").read_text()), json.loads((out / "index.json").read_text())
    drop = ("created", "elapsed_s", "out", "command")
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    for shard in a["shards"]:
        assert np.array_equal(np.load(tmp_path / "clean" / shard["file"]), np.load(out / shard["file"]))


def test_sigkill_during_probe_then_rerun_gives_the_same_result(world, tmp_path):
    argv = ["probe", world["run"], "--testset", world["testset"], "--linear-filters", "0", "--batch-size", "1",
            "--no-random-weights", "--device", "cpu"]
    clean = grandmother(*argv, "--out", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    out = tmp_path / "killed"
    job = start_patched(STOP_AFTER_PROBE_SAVE, *argv, "--out", out)
    stopped(job)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert (out / "cache" / "network.npz").is_file() and not (out / "probe.json").exists()
    again = grandmother(*argv, "--out", out)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = json.loads((tmp_path / "clean" / "probe.json").read_text()), json.loads((out / "probe.json").read_text())
    assert a["best"] == b["best"] and a["baselines"] == b["baselines"] and a["top"] == b["top"]


# ================================================================ full disk, unwritable outputs

@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or 'mount failed'}); the disk-full "
                    f"checkpoint test needs one (root or CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_while_writing_a_checkpoint(world, small_tmpfs, capsys):
    run = small_tmpfs / "run"
    train(load_config("small", TINY + ["train.steps=2"]), world["images"], run, progress=False)
    free = shutil.disk_usage(small_tmpfs).free
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:  # leave less room than one checkpoint needs
        f.write(b"\0" * max(0, free - 2048))
    err = one_line_error(capsys, ["train", "--preset", "small", *TINY_FLAGS, "--steps", "4", "--data",
                                  world["images"], "--out", run, "--resume"])
    assert "No space left on device" in err and str(run) in err
    assert latest_checkpoint(run).name == "step_00000002"
    load_checkpoint(latest_checkpoint(run))  # the previous checkpoint is whole
    assert not list((run / CKPT_DIR).glob(".tmp-*"))
    filler.unlink()
    assert cli(["train", "--preset", "small", *TINY_FLAGS, "--steps", "4", "--data", str(world["images"]),
                "--out", str(run), "--resume"]) == 0
    assert read_meta(latest_checkpoint(run))["step"] == 4


def test_read_only_output_folder(world, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({r.stderr.strip() or 'mount failed'}); as root a "
                    f"chmod-ed folder stays writable, so this case needs a mount")
    try:
        err = one_line_error(capsys, ["train", "--preset", "small", *TINY_FLAGS, "--steps", "1", "--data",
                                      world["images"], "--out", ro / "run"])
        assert str(ro / "run") in err and "Read-only file system" in err
        err = one_line_error(capsys, ["report", world["run"], "--out", ro / "report.html"])
        assert str(ro / "report.html") in err and "Read-only file system" in err
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_unwritable_output_is_one_line_in_every_command(world, tmp_path, capsys):
    bad = Path("/proc/grandmother-cannot-write-here")
    run, ts, imgs = world["run"], world["testset"], world["images"]
    commands = [
        ["train", "--preset", "small", *TINY_FLAGS, "--steps", "1", "--data", imgs, "--out", bad],
        ["ingest", imgs, "--size", "32", "--out", bad],
        ["testset", "--positive", imgs, "--negative", world["labeled"], "--size", "16", "--out", bad],
        ["probe", run, "--testset", ts, "--linear-filters", "0", "--out", bad],
        ["visualize", run, "--testset", ts, "--unit", "s0.pool.m0.y0.x0", "--iters", "2", "--out", bad],
        ["invariance", run, "--unit", "s0.pool.m0.y0.x0", "--images", imgs, "--out", bad],
        ["classify", run, "--data", world["labeled"], "--max-iter", "2", "--quiet", "--out", bad],
        ["report", run, "--out", bad / "report.html"],
        ["run", imgs, "--out", bad, "--steps", "1", "--set", "train.batch_size=8"],
    ]
    for argv in commands:
        err = one_line_error(capsys, argv)
        assert str(bad) in err, (argv[0], err)


# ================================================================ report

EVIL = '<script>alert("x")</script>../../'


def _poison(obj):
    if isinstance(obj, str):
        return EVIL + obj
    if isinstance(obj, list):
        return [_poison(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _poison(v) for k, v in obj.items()}
    return obj


def _stringify(obj):
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return f"{EVIL}{obj}"
    if isinstance(obj, list):
        return [_stringify(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _stringify(v) for k, v in obj.items()}
    return obj


@pytest.mark.parametrize("mutate", [_poison, _stringify], ids=["strings", "numbers-as-strings"])
def test_report_escapes_every_value_and_embeds_only_files_inside(world, tmp_path, capsys, mutate):
    from grandmother.report.page import build_report
    out = tmp_path / "out"
    run = copy_run(world, out / "run")
    secret = tmp_path / "secret.png"  # outside every result folder
    Image.fromarray(np.full((3, 3), 7, np.uint8)).save(secret)
    png = Image.new("L", (2, 2))
    results = {
        "probe": {"concept": "faces", "run": str(run), "testset": "t",
                  "best": {"unit": "s0.lcn.m0.y0.x0", "accuracy": 0.7, "threshold": 0.5},
                  "top": [{"unit": "s0.lcn.m0.y0.x0", "accuracy": 0.7}],
                  "per_sublayer": {"s0.lcn": {"unit": "u", "accuracy": 0.6}},
                  "baselines": {"random_guess": 0.6, "random_weights": 0.61, "extra": 0.5}, "commands": ["c"]},
        "visualize": {"unit": "s0.pool.m0.y0.x0", "concept": "faces", "run_dir": str(run),
                      "files": {"histogram": str(secret), "top_images": "../secret.png",
                                "optimal_stimulus": "link.png"},
                      "histogram": {"images_per_class": 5}, "top_images": {"positives_among_top": 3, "count": 4},
                      "optimal_stimulus": {"radius": 1.0, "restarts": 2, "value": 3.0, "best_test_activation": 2.0},
                      "commands": ["v"]},
        "invariance": {"unit": "u", "run_dir": str(run), "files": {"scale": str(secret), "shift": "../secret.png"},
                       "images": ["a", "b"], "interpolation": "bilinear", "border": "reflect", "input_size": 16},
        "classify": {"run_dir": str(run), "accuracy": 0.9, "chance": 0.5, "baselines": {"pixels": 0.8},
                     "per_class": {"h": 0.9, "v": 0.8}},
    }
    for kind, data in results.items():
        folder = out / kind
        folder.mkdir()
        (folder / f"{kind}.json").write_text(json.dumps(mutate(data)))
        png.save(folder / "inside.png")
    (out / "visualize" / "link.png").symlink_to(secret)  # a link inside that leads outside
    (out / "classify" / "leak.png").symlink_to(secret)
    report = out / "report.html"
    build_report(run, report, probes=[out / "probe"], visualize=[out / "visualize"],
                 invariance=[out / "invariance"], classify=[out / "classify"])
    page = report.read_text()
    assert "<script" not in page.lower()
    import base64
    secret_b64 = base64.b64encode(secret.read_bytes()).decode()
    assert secret_b64 not in page, "a file outside its result folder was embedded"
    assert "&lt;script&gt;" in page  # the values are there, as text
    assert "outside" in capsys.readouterr().err


# ================================================================ Ray listens on 127.0.0.1 only

def _listening_sockets_of(pids: set[int]) -> list[str]:
    """host:port of every TCP LISTEN socket owned by `pids` (from /proc, as `ss -ltnp` reads it)."""
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            local, state, inode = f[1], f[3], f[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            host_hex, port_hex = local.split(":")
            raw = bytes.fromhex(host_hex)
            if v6:
                words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                b = b"".join(words)
                host = (f"{b[12]}.{b[13]}.{b[14]}.{b[15]}" if b[:12] == b"\0" * 10 + b"\xff\xff"
                        else ":".join(b[i:i + 2].hex() for i in range(0, 16, 2)))
            else:
                host = ".".join(str(x) for x in raw[::-1])
            out.append(f"{host}:{int(port_hex, 16)}")
    return out


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p))
    out, todo = set(), [pid]
    while todo:
        q = todo.pop()
        out.add(q)
        todo += children.get(q, [])
    return out


@pytest.mark.ray
def test_downpour_ray_listens_on_loopback_only_starts_no_dashboard_and_sigterm_checkpoints(world, tmp_path):
    pytest.importorskip("ray")
    run = tmp_path / "dp"
    job = start("train", "--preset", "small", *TINY_FLAGS, "--set", "downpour.ps_checkpoint_every=1000",
                "--set", "train.norm_control=none", "--engine", "downpour", "--replicas", "1", "--replica-cpus", "0.5", "--ps-shards", "2",
                "--steps", "100000", "--data", world["images"], "--out", run)
    wait_for(lambda: _metrics_steps(run) >= 3, job, timeout=120, what="3 Downpour steps")
    pids = _descendants(job.pid)
    addresses = _listening_sockets_of(pids)
    assert addresses, "found no listening socket of the Ray processes"
    assert all(a.startswith("127.0.0.1:") for a in addresses), addresses
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()
    ours = [line for line in ps if line.split(None, 1)[0].isdigit() and int(line.split(None, 1)[0]) in pids]
    assert any("raylet" in line for line in ours), ours  # ps does see the instance's processes ...
    assert not [line for line in ours if "dashboard.py" in line], "a dashboard process was started"  # ... but no dashboard
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=90)
    assert job.returncode == 143, err[-2000:]
    assert "Ray: embedded instance on 127.0.0.1" in err  # what Ray itself reported to the driver
    assert read_meta(latest_checkpoint(run))["step"] >= 3
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids - {job.pid}):
        time.sleep(0.5)


# ================================================================ one line for every bad input

@pytest.mark.parametrize("extra, needle", [
    (["--kernel", "bogus"], "bogus"),
    (["--checkpoint-every", "0"], "train.checkpoint_every"),
    (["--log-every", "0"], "train.log_every"),
    (["--lr", "nan"], "train.lr"),
    (["--workers", "-1"], "train.num_workers"),
    (["--set", "model.sparsity=[1"], "model.sparsity=[1"),
    (["--engine", "downpour", "--set", "train.norm_control=none", "--replica-cpus", "-1"], "downpour.replica_cpus"),
    (["--set", "downpour.warmstart_steps=-2"], "downpour.warmstart_steps"),
])
def test_bad_settings_are_one_line(world, tmp_path, capsys, extra, needle):
    err = one_line_error(capsys, ["train", "--preset", "small", *TINY_FLAGS, "--steps", "1", "--data",
                                  world["images"], "--out", tmp_path / "r", *extra])
    assert needle in err
    assert not (tmp_path / "r").exists()


def test_yaml_with_python_tag_is_refused_and_not_run(tmp_path, capsys):
    marker = tmp_path / "EXECUTED"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"model: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    err = one_line_error(capsys, ["model-info", "--preset", cfg])
    assert str(cfg) in err and "python" in err
    assert not marker.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--batch-size", "0"], "--batch-size 0"),
    (["--device", "bogus"], "--device 'bogus'"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_probe_flags_are_one_line(world, tmp_path, capsys, argv, needle):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = one_line_error(capsys, ["probe", world["run"], "--testset", world["testset"], "--out", tmp_path / "p",
                                  "--linear-filters", "0", *argv])
    assert needle in err and "checkpoint" not in err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong tensors"])
def test_damaged_model_file_is_one_line(world, tmp_path, capsys, damage):
    run = copy_run(world, tmp_path / "run")
    f = latest_checkpoint(run) / "model.safetensors"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "garbage":
        f.write_bytes(os.urandom(4096))
    else:
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(3)}, str(f))
    for argv in (["probe", run, "--testset", world["testset"], "--out", tmp_path / "p", "--linear-filters", "0"],
                 ["train", "--preset", "small", *TINY_FLAGS, "--steps", "3", "--data", world["images"], "--out",
                  run, "--resume"]):
        err = one_line_error(capsys, argv)
        assert "model.safetensors" in err, err


def test_testset_with_a_non_utf8_file_name(tmp_path, capsys):
    pos, neg = tmp_path / "pos", make_images(tmp_path / "neg", n=6, seed=1)
    person = make_images(pos / "person", n=6)  # one identity: all its files are excluded from training
    odd = os.fsencode(str(person)) + b"/caf\xe9.png"  # Latin-1, not valid UTF-8
    shutil.copy(person / "img_000.png", odd)
    out = tmp_path / "ts"
    assert cli(["testset", "--positive", str(pos), "--negative", str(neg), "--size", "16", "--color", "gray",
                "--out", str(out)]) == 0, capsys.readouterr().err
    assert not list(tmp_path.glob("*.partial*")) and not list(out.parent.glob(".*partial*"))
    excluded = (out / "excluded.txt").read_bytes().splitlines()
    assert odd in excluded  # the exact bytes of the name, so `ingest --exclude` matches it


def test_ingest_lists_links_it_cannot_follow_and_says_why_a_read_failed(tmp_path):
    src = make_images(tmp_path / "src", n=4)
    (src / "loop.png").symlink_to("loop.png")
    (src / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (src / "mem.png").symlink_to("/proc/self/mem")  # a file that fails on read (EIO), though stat says 0 bytes
    (src / "empty.png").write_bytes(b"")
    out = tmp_path / "data"
    r = grandmother("ingest", src, "--size", "32", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    skipped = {Path(s["path"]).name: s["reason"] for s in json.loads((out / "index.json").read_text())["skipped"]}
    assert set(skipped) == {"loop.png", "dangling.png", "mem.png", "empty.png"}, skipped
    assert "loop" in skipped["loop.png"] and "dangling" in skipped["dangling.png"]
    assert "empty" in skipped["empty.png"] and "empty" not in skipped["mem.png"]


# ================================================================ run, ingest and testset (issue 23)

RUN_TINY = ["model.stages.*.maps=2", "train.batch_size=20"]  # the small preset's 32x32 shape, 2 maps a stage


def first_stages(src, out, testset, **options):
    """A `grandmother run` job through its testsets and ingest stages (the rest is the trainer's and probe's)."""
    from grandmother.pipeline.job import Job
    job = Job([src], out, overrides=RUN_TINY, steps=1, testsets=[testset], workers=1, progress=False,
              max_face_fraction=1, **options)
    job.start()
    for name in ("testsets", "ingest"):
        job.run_stage(job.stage(name))
    return json.loads((out / "run.json").read_text())


def links_folder(tmp_path) -> Path:
    """24 images, a dangling link, a link loop, a linked folder of 4 more images outside it, and a link back
    to the folder itself from a subfolder (a folder loop)."""
    src = make_images(tmp_path / "src", n=24, size=40)
    (src / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (src / "loop.png").symlink_to("loop.png")
    (src / "linked").symlink_to(make_images(tmp_path / "elsewhere", n=4, size=40, seed=5), target_is_directory=True)
    (src / "sub").mkdir()
    (src / "sub" / "back").symlink_to(src, target_is_directory=True)
    return src


def test_ingest_follows_linked_folders_and_lists_a_folder_loop(tmp_path):
    src = links_folder(tmp_path)
    r = grandmother("ingest", src, "--size", "32", "--out", tmp_path / "data", "--workers", "1", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    index = json.loads((tmp_path / "data" / "index.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in index["skipped"]}
    assert set(skipped) == {"dangling.png", "loop.png", "back"}, skipped
    assert "folder" in skipped["back"] and "loop" in skipped["back"]
    names = [it["path"] for it in open_dataset(tmp_path / "data").items()]
    assert index["images"] == 28 and sum("/linked/" in p for p in names) == 4  # the linked folder, followed


def test_run_skips_and_lists_links_it_cannot_follow(tmp_path, capsys):
    from test_visualize import make_testset
    src = links_folder(tmp_path)
    (tmp_path / "ts").mkdir()
    rec = first_stages(src, tmp_path / "job", make_testset(tmp_path / "ts", size=32))
    result = rec["stages"]["ingest"]["result"]
    assert result["images"] == 28 and result["skipped"] == 3
    assert "3 unreadable file(s) skipped" in capsys.readouterr().out
    files = rec["stages"]["ingest"]["inputs"]["sources"]["files"]
    assert str(tmp_path / "nowhere.png") in files and str(src / "loop.png") in files  # fingerprinted by the link


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """24 training images and a 32x32 test set, for `grandmother run` jobs."""
    from test_visualize import make_testset
    tmp = tmp_path_factory.mktemp("run_inputs")
    (tmp / "ts").mkdir()
    return make_images(tmp / "src", n=24, size=40), make_testset(tmp / "ts", size=32)


@pytest.mark.parametrize("content, needle", [
    ("[1, 2]", "damaged (a JSON array, not an object)"),
    ('{"format": "grandmother-run/1", "stages": {"ingest": "done"}}', 'damaged (stage "ingest" is a JSON string'),
    ('{"format": "grandmother-run/1", "stages": []}', 'damaged ("stages" is a JSON array'),
    ('{"format": "grandmother-run/1", "stages": {"train": {"status": "done", "steps": "7"}}}', '"steps" is a JSON string'),
    ("{not json", "damaged (unreadable"),
], ids=["array", "stage-string", "stages-array", "steps-string", "not-json"])
def test_malformed_run_json_is_one_line(run_inputs, tmp_path, capsys, content, needle):
    src, ts = run_inputs
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "run.json").write_text(content)
    err = one_line_error(capsys, ["run", src, "--out", tmp_path / "job", "--testset", ts, "--steps", "1",
                                  *sum((["--set", o] for o in RUN_TINY), [])])
    assert needle in err and "re-run with --restart-from testsets to start this job over" in err, err


def test_the_hint_for_a_damaged_run_json_works(run_inputs, tmp_path, capsys):
    """--restart-from testsets starts the job over in the same folder (moving run.json away would leave a
    folder that is no `grandmother run` folder)."""
    from grandmother.pipeline.job import Job
    src, ts = run_inputs
    out = tmp_path / "job"
    (out / "data").mkdir(parents=True)  # what an earlier run left
    (out / "run.json").write_text('{"format": "grandmother-run/1", "stages": {"ingest": "done"}}')
    job = Job([src], out, overrides=RUN_TINY, steps=1, testsets=[ts], workers=1, progress=False,
              restart_from="testsets")
    job.start()
    job.run_stage(job.stage("testsets"))
    assert "damaged (stage \"ingest\" is a JSON string, not an object); --restart-from testsets: starting the job " \
           "over" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["stages"]["testsets"]["status"] == "done"
    assert not (out / "data").exists()


def test_disk_full_during_ingest_says_no_space_left(small_tmpfs, tmp_path, capsys):
    src = make_images(tmp_path / "src", n=120, size=20)  # 120 x 128x128x3 bytes: more than the 4 MB there
    out = small_tmpfs / "data"
    err = one_line_error(capsys, ["ingest", src, "--size", "128", "--out", out, "--workers", "1", "--quiet"])
    assert "No space left on device" in err and str(out) in err and "requested" not in err, err
    assert not [p for p in (small_tmpfs / "data.partial").iterdir() if p.name.startswith(".")]  # no temporary file


HUGE = """
import resource, sys
from grandmother.commands import main
from grandmother.data import ingest
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rc = main(sys.argv[1:])
print("PEAK_GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
sys.exit(rc)
"""


def test_huge_images_are_decoded_reduced_without_pils_warning(tmp_path):
    """95 megapixels, above PIL's 89-megapixel warning: the JPEG is decoded at 1/8 scale (a few MB, where a
    whole decode takes 95 MB even in gray), the PNG (which cannot be decoded reduced) is skipped with a
    one-line reason, and PIL's DecompressionBombWarning is never printed."""
    src = make_images(tmp_path / "src", n=3, size=40)
    Image.new("L", (10000, 9500), 128).save(src / "huge.jpg", quality=50)
    Image.new("L", (10000, 9500), 128).save(src / "huge.png")
    r = subprocess.run([sys.executable, "-c", HUGE, "ingest", str(src), "--size", "32", "--workers", "1",
                        "--out", str(tmp_path / "d"), "--quiet"], env=ENV, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DecompressionBomb" not in r.stderr + r.stdout, r.stderr
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert index["images"] == 4 and [Path(s["path"]).name for s in index["skipped"]] == ["huge.png"]
    reason = index["skipped"][0]["reason"]
    assert "10000x9500 = 95 megapixels, over the 89-megapixel limit" in reason and "\n" not in reason
    growth_kb = int(r.stdout.split("PEAK_GROWTH_KB")[1].split()[0])
    assert growth_kb < 50_000, growth_kb


def test_testset_counts_no_identity_for_a_skipped_file(tmp_path, capsys):
    pos, neg = tmp_path / "pos", make_images(tmp_path / "neg", n=6, seed=1)
    make_images(pos / "alice", n=2)
    (pos / "bob").mkdir()
    (pos / "bob" / "b0.png").write_bytes(b"not an image")
    out = tmp_path / "ts"
    assert cli(["testset", "--positive", str(pos), "--negative", str(neg), "--size", "16", "--color", "gray",
                "--out", str(out), "--quiet"]) == 0
    assert "2 positive from 1 identities" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert index["test_identities"] == ["0:alice"] and [Path(s["path"]).name for s in index["skipped"]] == ["b0.png"]
    assert str(pos / "bob" / "b0.png") in (out / "excluded.txt").read_text()  # still kept out of training


def test_object_array_labels_are_one_line_and_never_unpickled(world, tmp_path, capsys):
    ts = tmp_path / "ts"
    shutil.copytree(world["testset"], ts)
    marker = tmp_path / "EXECUTED"
    labels = np.empty(len(np.load(ts / "labels.npy")), dtype=object)
    labels[:] = [CreatesFile(marker)] * len(labels)
    np.save(ts / "labels.npy", labels, allow_pickle=True)
    err = one_line_error(capsys, ["probe", world["run"], "--testset", ts, "--out", tmp_path / "p",
                                  "--linear-filters", "0"])
    assert "labels.npy: not a label array" in err and "allow_pickle" in err, err
    assert not marker.exists()


def test_a_test_file_named_with_a_newline_stays_out_of_training(tmp_path, capsys):
    from grandmother.data.testset import read_excluded
    pos, neg = tmp_path / "pos", make_images(tmp_path / "neg", n=6, seed=1)
    person = make_images(pos / "person", n=3)
    evil = person / "img_000.png\nimg_001.png"  # one file; a plain line list would read two names
    (person / "img_000.png").rename(evil)
    out = tmp_path / "ts"
    assert cli(["testset", "--positive", str(pos), "--negative", str(neg), "--size", "16", "--color", "gray",
                "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert str(evil) in read_excluded(out / "excluded.txt")
    assert json.dumps(str(evil)).encode() + b"\n" in (out / "excluded.txt").read_bytes()
    assert cli(["ingest", str(pos), str(neg), "--size", "32", "--out", str(tmp_path / "d"), "--workers", "1",
                "--quiet", "--exclude", str(out / "excluded.txt")]) == 0, capsys.readouterr().err
    assert not any("\n" in it["path"] for it in open_dataset(tmp_path / "d").items())
    excluded = json.loads((out / "index.json").read_text())["excluded_count"]
    assert json.loads((tmp_path / "d" / "index.json").read_text())["excluded"] == excluded == 8  # 3 + 5 negatives
    # a list in the older format (one plain line a name) is still read
    (tmp_path / "old.txt").write_bytes(b"/a/b.png\n\n# a comment\n/c/d e.png \n")
    assert read_excluded(tmp_path / "old.txt") == ["/a/b.png", "/c/d e.png"]


# ================================================================ a step is atomic with respect to signals

STEP_POINTS = ["batch", "gradients", "update", "projected", "counted", "logged", "checkpointed", "end"]
DROPPED = {"batch", "gradients"}  # before the update: the step is not done, nothing of it is kept


def _state_equal(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


@pytest.fixture(scope="module")
def every_step(world):
    """A 6-step run that kept a checkpoint after every step: what an interrupted run must equal."""
    run = world["tmp"] / "every_step"
    train(load_config("small", TINY + ["train.steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=0"]),
          world["images"], run, progress=False)
    return run


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_at_any_point_of_a_step_keeps_one_whole_step(world, every_step, tmp_path, monkeypatch, signum):
    """SIGTERM or Ctrl-C at each point of step 3 (an injected hook sends it there): the checkpoint holds the
    weights, optimizer state, RNG state, step and metrics lines of one completed step (2 when the signal came
    before the update, else 3), each equal bit for bit to those of an uninterrupted run; resuming then ends
    with the uninterrupted run's weights."""
    import grandmother.training.loop as loop
    from grandmother.training.runtime import Terminated
    cfg = load_config("small", TINY + ["train.steps=6", "train.checkpoint_every=3"])
    for point in STEP_POINTS:
        run = tmp_path / point
        sent = []

        def hook(where, step, point=point):
            if where == point and step == 2 and not sent:
                sent.append(where)
                os.kill(os.getpid(), signum)
        monkeypatch.setattr(loop, "step_points", hook)
        with pytest.raises(Terminated if signum == signal.SIGTERM else KeyboardInterrupt) as raised:
            train(cfg, world["images"], run, progress=False)
        monkeypatch.setattr(loop, "step_points", None)
        assert sent and (signum != signal.SIGINT or not isinstance(raised.value, Terminated)), point
        at = 2 if point in DROPPED else 3
        ckpt = latest_checkpoint(run)
        tensors, state, meta = load_checkpoint(ckpt)
        want_tensors, want_state, want_meta = load_checkpoint(every_step / CKPT_DIR / f"step_{at:08d}")
        assert meta["step"] == at and meta["images_seen"] == want_meta["images_seen"], point
        assert _state_equal(tensors, want_tensors), f"{point}: the weights are not those of step {at}"
        assert _state_equal(state["optimizer"], want_state["optimizer"]), f"{point}: optimizer state"
        assert _state_equal(state["rng"]["torch"], want_state["rng"]["torch"]), f"{point}: RNG state"
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, at + 1)), (point, steps)
        train(cfg, world["images"], run, resume=True, progress=False)
        assert same_weights(run, every_step), f"{point}: resume differs from the uninterrupted run"


# ================================================================ one writer per folder

HOLD = """import sys, time
from pathlib import Path
from grandmother.io import folder_lock
with folder_lock(Path(sys.argv[1]), sys.argv[2], beside=sys.argv[3] == "beside"):
    print("HELD", flush=True)
    time.sleep(120)
"""


def hold_lock(folder: Path, what: str, beside: bool = False) -> subprocess.Popen:
    """Another process holding the lock of `folder` (as `grandmother WHAT` would)."""
    job = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), what, "beside" if beside else "inside"],
                           env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert job.stdout.readline().strip() == "HELD", job.stderr.read()[-2000:]
    return job


def refused_by_lock(r: subprocess.CompletedProcess, holder: int, what: str) -> None:
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, err[-2000:])
    assert err.startswith("grandmother: error:") and "\n" not in err and "Traceback" not in err, err
    assert f"grandmother {what} (PID {holder})" in err and "in use" in err, err


def test_a_second_train_in_a_run_folder_is_refused_in_every_engine(world, tmp_path):
    from grandmother.distributed.parallel.engine import train_model_parallel
    run = tmp_path / "run"
    job = start_patched(SLOW_STEPS, *_train_argv(world, run, 100000))
    wait_for(lambda: _metrics_steps(run) >= 2, job, what="2 training steps")
    refused_by_lock(grandmother(*_train_argv(world, run, 100000, "--resume")), job.pid, "train")
    engines = [(train, TINY), (train_model_parallel, TINY + ["train.partition=2x1", "train.device=cpu"])]
    if importlib.util.find_spec("ray") is not None:
        from grandmother.distributed.downpour import train_downpour
        engines.append((train_downpour, TINY + ["engine=downpour", "train.norm_control=none"]))
    for engine, sets in engines:  # before anything else: no Ray, no workers started
        with pytest.raises(GrandmotherError, match=rf"in use: grandmother train \(PID {job.pid}\)"):
            engine(load_config("small", sets + ["train.steps=100000"]), world["images"], run, resume=True,
                   progress=False)
    assert job.poll() is None, "the first writer went on"
    sigterm_stops_at_a_checkpoint(job, run, timeout=60)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), "one writer: metrics.jsonl describes one run"
    assert not (run / ".lock").exists(), "the lock file goes with its holder"


@pytest.mark.parametrize("command", ["ingest", "run", "probe"])
def test_ingest_run_and_probe_take_the_lock_of_their_output(world, tmp_path, command):
    out = tmp_path / "out"
    argv = {"ingest": ["ingest", world["images"], "--size", "32", "--out", out, "--quiet"],
            "run": ["run", world["images"], "--out", out, "--steps", "1", "--set", "train.batch_size=8"],
            "probe": ["probe", world["run"], "--testset", world["testset"], "--linear-filters", "0",
                      "--no-random-weights", "--out", out]}[command]
    holder = hold_lock(out, command, beside=command in ("ingest", "run"))
    try:
        refused_by_lock(grandmother(*argv), holder.pid, command)
        assert not (out / "index.json").exists() and not (out / "run.json").exists()
        assert not (out / "probe.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(world, tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run, "train")
    holder.kill()  # SIGKILL: no chance to release it; the lock file stays, with the dead holder's PID
    holder.wait()
    assert (run / ".lock").read_text().split()[0] == str(holder.pid)
    r = grandmother(*_train_argv(world, run, 2))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"taking over the lock of grandmother train (PID {holder.pid})" in r.stderr
    assert read_meta(latest_checkpoint(run))["step"] == 2 and not (run / ".lock").exists()
    # a command that fails before writing anything leaves no folder behind for its lock
    empty = tmp_path / "empty"
    empty.mkdir()
    r = grandmother(*_train_argv({"images": empty}, tmp_path / "new" / "run", 2))
    assert r.returncode == 2 and "no images" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "new").exists()


def test_experiments_run_never_clears_a_run_another_process_holds(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import importlib
    exp = importlib.import_module("run")
    monkeypatch.setattr(exp, "RUNS", tmp_path / "exp")
    name = next(iter(exp.RECIPES))
    run = tmp_path / "exp" / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # a run in progress: no timing.json yet
    holder = hold_lock(run, f"experiments/run.py {name}")
    try:
        with pytest.raises(SystemExit) as stop:
            exp.main([name, "--train-only"])
        assert f"PID {holder.pid}" in str(stop.value) and "in use" in str(stop.value)
        assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n', "a run still training was cleared"
    finally:
        holder.kill()
        holder.wait()


# ================================================================ bad files

def test_npy_files_are_read_without_pickles_and_named_when_bad(world, tmp_path, capsys):
    from grandmother.io import load_npy
    marker = tmp_path / "EXECUTED"
    evil = tmp_path / "evil.npy"
    np.save(evil, np.array([CreatesFile(marker)], dtype=object), allow_pickle=True)
    np.load(evil, allow_pickle=True)  # the control: loading it with pickles allowed runs the code
    assert marker.exists()
    marker.unlink()
    truncated = tmp_path / "truncated.npy"
    np.save(truncated, np.zeros((4, 4), np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:70])
    for path in (evil, truncated):
        for mmap in (False, True):
            with pytest.raises(GrandmotherError, match=str(path)):
                load_npy(path, mmap=mmap)
    assert not marker.exists()
    # a dataset whose shard is that object array: `train` names the shard in one line
    data = tmp_path / "data"
    assert cli(["ingest", str(world["images"]), "--size", "32", "--out", str(data), "--quiet"]) == 0
    shard = next(data.glob("shard_*.npy"))
    shutil.copy(evil, shard)
    err = one_line_error(capsys, ["train", "--preset", "small", *TINY_FLAGS, "--steps", "1", "--data", data,
                                  "--out", tmp_path / "run"])
    assert str(shard) in err and "object array" in err
    assert not marker.exists()
    loads = [line for p in ROOT.joinpath("grandmother").rglob("*.py") for line in p.read_text().splitlines()
             if "np.load(" in line and "labels.npy" not in line]  # test-set labels: issue 23's testset part
    assert loads and all("allow_pickle=False" in line for line in loads), loads


@pytest.mark.parametrize("model", ["5", "[1, 2]", "'text'"])
def test_a_preset_file_of_the_wrong_shape_is_one_line(tmp_path, capsys, model):
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"model: {model}\n")
    for argv in (["model-info", "--preset", preset],
                 ["model-info", "--preset", preset, "--set", "model.stages.*.maps=2"]):
        err = one_line_error(capsys, argv)
        assert str(preset) in err and "model" in err and "expected a mapping" in err


# ================================================================ smaller ones

def test_nothing_to_train_says_so_instead_of_a_nan_loss(world, tmp_path, capsys):
    run = copy_run(world, tmp_path / "run")  # trained to step 2
    for steps, want in ((2, "the run is at step 2 of 2"), (1, "the run is at step 2, past --steps 1")):
        assert cli(["train", "--preset", "small", *TINY_FLAGS, "--steps", str(steps), "--data",
                    str(world["images"]), "--out", str(run), "--resume"]) == 0
        out = capsys.readouterr().out
        assert f"nothing to train: {want}" in out and "nan" not in out, out
    assert cli(["train", "--preset", "small", *TINY_FLAGS, "--steps", "0", "--data", str(world["images"]),
                "--out", str(tmp_path / "zero")]) == 0
    out = capsys.readouterr().out
    assert "nothing to train: the run is at step 0 of 0" in out and "nan" not in out, out


# ================================================================ distributed faults end in one line

def _spawned_workers(pid: int) -> list[int]:
    """The model-parallel worker processes of a `train --model-parallel` process, lowest PID first."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid and b"spawn_main" in cmd:
                out.append(int(p))
    return sorted(out)


def _start_model_parallel(world, run: Path) -> tuple[subprocess.Popen, list[int]]:
    job = start(*_train_argv(world, run, 100000, "--model-parallel", "2", "--device", "cpu"))
    wait_for(lambda: latest_checkpoint(run) is not None and _metrics_steps(run) >= 3, job, timeout=120,
             what="a model-parallel checkpoint")
    workers = _spawned_workers(job.pid)
    assert len(workers) == 2, workers
    return job, workers


@pytest.mark.slow
def test_a_killed_model_parallel_worker_is_one_line(world, tmp_path):
    run = tmp_path / "mp"
    job, workers = _start_model_parallel(world, run)
    os.kill(workers[0], signal.SIGKILL)  # worker 0 writes the checkpoints and holds the progress bar
    out, err = job.communicate(timeout=120)
    assert job.returncode == 1, err[-2000:]
    line = err.strip()
    assert line.startswith("grandmother: error:") and "\n" not in line, err[-2000:]  # no traceback, no warning
    assert f"(PID {workers[0]}) was killed by SIGKILL" in line and "--resume" in line
    assert latest_checkpoint(run).name in line
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
        time.sleep(0.2)
    assert not any(Path(f"/proc/{p}").exists() for p in workers), "a worker outlived the run"


@pytest.mark.slow
def test_sigterm_to_one_model_parallel_worker_stops_the_run_with_exit_143(world, tmp_path):
    run = tmp_path / "mp"
    job, workers = _start_model_parallel(world, run)
    meta = sigterm_stops_at_a_checkpoint(job, run, timeout=90, pid=workers[-1])  # not the parent: one worker
    assert meta["step"] >= 3 and meta["model_parallel"] == "2x1"


# the driver's first checkpoint: parameter shard 1 is killed just before the driver collects the shards' state
KILL_SHARD_IN_CHECKPOINT = """
import ray
import grandmother.distributed.downpour as dp
real = dp.DownpourJob.checkpoint
def checkpoint(self):
    ray.kill(self.shards[1])
    time.sleep(1)
    return real(self)
dp.DownpourJob.checkpoint = checkpoint
"""

DOWNPOUR_FLAGS = ["--set", "train.norm_control=none", "--engine", "downpour", "--replicas", "1", "--replica-cpus",
                  "0.5", "--ps-shards", "2"]


@pytest.mark.ray
def test_a_shard_lost_while_the_driver_collects_a_checkpoint_is_one_line(world, tmp_path):
    pytest.importorskip("ray")
    run = tmp_path / "dp"
    job = start_patched(KILL_SHARD_IN_CHECKPOINT, "train", "--preset", "small", *TINY_FLAGS, *DOWNPOUR_FLAGS,
                        "--set", "downpour.ps_checkpoint_every=3", "--steps", "100000", "--data", world["images"],
                        "--out", run)
    out, err = job.communicate(timeout=180)
    assert job.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "ActorDiedError:" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("grandmother: error: parameter shard 1 was lost (") and "--resume" in last, last
    assert "while the driver collected a checkpoint" in last


def test_ray_sessions_of_dead_drivers_are_cleaned_and_no_others(tmp_path):
    """clean_dead_sessions on a Ray temp folder holding: the recorded session of a driver that is gone, with a
    Ray process still working in it (named ray::..., as Ray's agents name themselves) and another program
    reading a file there; the recorded session of a driver that still runs; a session no driver recorded."""
    pytest.importorskip("ray")
    from grandmother.distributed.ray_local import MARKS, _started, clean_dead_sessions
    root = tmp_path / "ray"
    sessions = {k: root / f"session_2026-01-01_00-00-00_00000{i}_{i}" for i, k in enumerate(["dead", "live", "other"])}
    for folder in sessions.values():
        (folder / "logs").mkdir(parents=True)
        (folder / "logs" / "agent.out").write_text("log\n")
    log = sessions["dead"] / "logs" / "agent.out"
    agent = subprocess.Popen(["bash", "-c", f'exec -a "ray::FakeAgent" sleep 120 < "{log}"'])
    reader = subprocess.Popen(["bash", "-c", f'exec sleep 120 < "{log}"'])  # not Ray's: left alone
    live = subprocess.Popen(["sleep", "120"])  # a driver that still runs
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    try:
        wait_for(lambda: Path(f"/proc/{agent.pid}/cmdline").read_bytes().startswith(b"ray::"), what="the agent")
        (root / MARKS).mkdir()
        for pid, session in ((int(dead), sessions["dead"]), (live.pid, sessions["live"])):
            (root / MARKS / f"{pid}.json").write_text(json.dumps({"pid": pid, "started": _started(pid) or 1,
                                                                 "session": str(session)}))
        clean_dead_sessions(root)
        assert not sessions["dead"].exists() and agent.wait(timeout=10) == -signal.SIGKILL
        assert reader.poll() is None and live.poll() is None
        assert sessions["live"].is_dir() and sessions["other"].is_dir()
        assert sorted(p.name for p in (root / MARKS).iterdir()) == [f"{live.pid}.json"]
    finally:
        for p in (agent, reader, live):
            p.kill()
            p.wait()


def _processes_in(session: Path) -> list[str]:
    """Live processes whose command line names `session` or that hold a file in it."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
            links = [os.readlink(f"/proc/{p}/fd/{fd}") for fd in os.listdir(f"/proc/{p}/fd")]
        except OSError:
            continue
        if str(session) in cmd or any(link.startswith(str(session) + "/") for link in links):
            found.append(f"{p}: {cmd[:80]}")
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_after_a_driver_sigkill_the_next_start_cleans_up_its_ray_session(world, tmp_path):
    pytest.importorskip("ray")
    from grandmother.distributed.ray_local import MARKS, temp_root
    run = tmp_path / "dp"
    argv = ["train", "--preset", "small", *TINY_FLAGS, *DOWNPOUR_FLAGS, "--data", world["images"], "--out", run]
    job = start(*argv, "--steps", "100000")
    wait_for(lambda: _metrics_steps(run) >= 3, job, timeout=120, what="3 Downpour steps")
    mark = temp_root({}) / MARKS / f"{job.pid}.json"
    session = Path(json.loads(mark.read_text())["session"])
    assert session.is_dir() and _processes_in(session)
    job.kill()  # SIGKILL: the driver cannot stop its embedded Ray
    job.wait()
    again = grandmother(*argv, "--steps", "2", "--resume", timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not session.exists() and not mark.exists(), "the dead driver's session folder is still there"
    assert not _processes_in(session), _processes_in(session)


def test_every_fault_test_is_listed_in_docs_safety():
    """docs/safety.md lists every case these tests cover, with the command that shows it."""
    import ast
    names = [n.name for n in ast.parse(Path(__file__).read_text()).body
             if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    page = (ROOT / "docs" / "safety.md").read_text()
    missing = [n for n in names if f"`{n}`" not in page and n != "test_every_fault_test_is_listed_in_docs_safety"]
    assert not missing, f"add a row to docs/safety.md for: {missing}"


# ---------------------------------------------------------------- the native kernel's cache heals (issue 23)

NATIVE_PROBE = ("from grandmother.nn.kernels import native; import torch\n"
                "print('loaded' if native.library() is not None else 'fell back')\n")


def _native_cache(tmp_path):
    """A fresh kernel cache with the library built into it by one process; returns (probe, library path)."""
    if shutil.which(os.environ.get("CXX") or "g++") is None:
        pytest.skip("no C++ compiler: the native kernel is not built here")
    env = {**ENV, "GRANDMOTHER_CACHE": str(tmp_path / "cache")}

    def probe():
        return subprocess.run([sys.executable, "-c", NATIVE_PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
    r = probe()
    assert r.returncode == 0 and r.stdout.strip() == "loaded", r.stderr
    return probe, next((tmp_path / "cache" / "native").glob("native_lc_*.so"))


def test_a_damaged_native_kernel_cache_is_rebuilt(tmp_path):
    """A truncated library (a full disk, a kill during a copy) used to crash every command with SIGBUS; a
    foreign library under the cached name gave an AttributeError; neither was ever rebuilt."""
    from grandmother.nn.kernels import native
    probe, lib = _native_cache(tmp_path)
    assert native._intact(lib)
    lib.write_bytes(lib.read_bytes()[:20000])  # truncated: its digest no longer matches
    r = probe()
    assert r.returncode == 0 and r.stdout.strip() == "loaded", r.stderr
    assert f"the cached {lib} is damaged" in r.stderr and "rebuilding" in r.stderr and native._intact(lib)
    assert "Traceback" not in r.stderr

    # a foreign library, its digest written beside it as if it were ours: it lacks the kernel's symbols
    subprocess.run(["gcc", "-shared", "-fPIC", "-x", "c", "-", "-o", str(lib)], input="int other(void) { return 1; }\n",
                   text=True, check=True)
    native._digest_file(lib).write_text(native._digest(lib) + "\n")
    r = probe()
    assert r.returncode == 0 and r.stdout.strip() == "loaded", r.stderr
    assert "is not this kernel's library (no symbol gm_forward); rebuilding" in r.stderr and native._intact(lib)


def test_a_killed_native_build_leaves_nothing_behind_for_good(tmp_path):
    probe, lib = _native_cache(tmp_path)
    dead = lib.parent / ".build-999999999-abcd.so"  # a build whose process is gone
    legacy = lib.parent / "tmpk3j2.so"  # what builds before the PID was in the name left
    live = lib.parent / f".build-{os.getpid()}-efgh.so"  # a build still running (this process)
    for f in (dead, legacy, live):
        f.write_bytes(b"partial")
    lib.unlink()  # the next use builds again, and clears what dead builds left
    r = probe()
    assert r.returncode == 0 and r.stdout.strip() == "loaded", r.stderr
    assert not dead.exists() and not legacy.exists() and live.exists()


def test_native_kernel_without_a_compiler_is_one_line_and_leaves_no_run_folder(tmp_path):
    data = tmp_path / "data"
    assert cli(["ingest", str(make_images(tmp_path / "src", 12)), "--out", str(data), "--size", "32",
                "--color", "gray", "--quiet", "--workers", "1"]) == 0
    env = {**ENV, "CXX": str(tmp_path / "no-such-compiler"), "GRANDMOTHER_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "grandmother", "train", "--preset", "small", "--data", str(data),
                        "--out", str(tmp_path / "run"), "--kernel", "native", "--steps", "1"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("grandmother: error: model.kernel='native' (--kernel native) cannot run here: no C++ compiler")
    assert not (tmp_path / "run" / "config.yaml").exists()
