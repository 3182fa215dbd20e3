"""Downpour SGD on Ray: exactness with one replica, learning with two, replica death, job kill + resume,
bad input. One Ray instance serves the module (starting Ray costs seconds); it is shut down at the end
and the test checks that none of its processes remain. Every run must give its actors back."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grandmother.training.checkpoint import latest_checkpoint, load_checkpoint, read_meta
from grandmother.training.runs import load_run
from grandmother.commands import main as cli
from grandmother.config import load_config
from grandmother.distributed.shards import FlatLayout, ShardState, shard_bounds

from conftest import TINY, make_images, write_run

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
RAY_CPUS = 2  # the CI machine's cores
# Downpour does not project norms (the small preset's default does). The recipe is pinned to the one these
# tests' tolerances were measured with (tied weights, lambda 0.3, Adam), whatever the preset's default.
DP = TINY + ["train.norm_control=none", "model.tied=true", "model.sparsity=0.3", "train.optimizer=adam"]
FAST = DP + ["downpour.replica_cpus=0.5", "downpour.ps_shards=3"]


def ray_processes(session: str) -> list[str]:
    """Command lines of live processes belonging to one Ray session (raylet, gcs_server, workers)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session in cmd:
            out.append(f"{pid}: {cmd[:120]}")
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    from grandmother.distributed.downpour import start_local_ray
    ctx = start_local_ray(num_cpus=RAY_CPUS, object_store_memory=100 * 1024 * 1024, log_to_driver=False)
    session = Path(ctx.address_info["session_dir"]).name
    yield ctx
    ray.shutdown()
    deadline = time.time() + 20
    while ray_processes(session) and time.time() < deadline:
        time.sleep(0.5)
    assert not ray_processes(session), f"Ray processes left behind: {ray_processes(session)}"


@pytest.fixture
def ray_run(ray_cluster):
    """A test's runs must give back every CPU they took (actors killed), or the next test would starve."""
    yield ray_cluster
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < RAY_CPUS and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == RAY_CPUS, "a run left actors holding CPUs"


@pytest.fixture
def one_thread():
    """Local training in one thread, like each replica: on a busy 2-core machine two-thread torch mostly
    waits (docs/results.md, Downpour benchmark), and these tests compare results, not speeds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- without Ray

def test_shard_applies_each_sequence_number_once_and_slices_are_balanced():
    cfg = load_config("small", TINY + ["train.optimizer=sgd", "train.lr=0.5"])
    shard = ShardState(0, torch.zeros(4), cfg.train)
    g = torch.ones(4).numpy()
    assert shard.push(1, 1, 2, g)["applied"]
    assert not shard.push(1, 1, 2, g)["applied"]  # the same push re-sent after a lost ack
    assert shard.push(0, 1, 1, g) == {"applied": True, "version": 1}
    assert torch.allclose(shard.param.detach(), torch.full((4,), -1.0))  # two updates of -0.5, not three
    assert shard.progress(1) == (1, 2) and shard.progress(5) == (0, 0)
    counts = shard.push_counts()
    assert counts["applied"][1] == [1] and counts["received"][1] == [2]
    bounds = shard_bounds(10, 3)
    assert bounds == [0, 3, 6, 10] and max(b - a for a, b in zip(bounds, bounds[1:])) - 3 <= 1
    layout = FlatLayout.of([("a", (2, 3)), ("b", (4,))])
    flat = layout.flatten({"a": torch.arange(6.0).view(2, 3), "b": torch.arange(4.0) + 6})
    assert torch.equal(flat, torch.arange(10.0)) and layout.unflatten(flat)["b"].data_ptr() == flat[6:].data_ptr()


def _fake_downpour_checkpoint(run: Path, shards: int, replicas: int = 1):
    from grandmother.nn.model import build_network
    cfg = load_config("small", TINY)
    write_run(run, cfg, build_network(cfg, torch.device("cpu")), step=2, metrics=False,
              meta={"engine": "downpour", "images_seen": 16, "replicas": replicas, "ps_layout": {"shards": shards}})


@pytest.mark.parametrize("extra, needle", [
    (["--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1: no Ray cluster reachable"),
    (["--replicas", "64", "--replica-cpus", "1"], "--replicas 64 x --replica-cpus 1 needs 64 CPUs"),
    (["--replicas", "1", "--replica-gpus", "1"], "needs 1 GPUs"),
    (["--fetch-every", "0"], "--fetch-every and --push-every must be >= 1"),
    (["--push-every", "-1"], "--fetch-every and --push-every must be >= 1"),
    (["--replica-device", "cuda"], "--replica-device cuda needs --replica-gpus > 0"),
    (["--resume", "--ps-shards", "2", "--out", "{tmp}/ckpt3"],
     "has 3 parameter-server shards, this run asks for --ps-shards 2"),
    (["--checkpoint-every", "5"], "--checkpoint-every: only for --engine local"),
    (["--workers", "2", "--checkpoint-every", "5"], "--checkpoint-every and --workers: only for --engine local"),
])
def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path, capsys, extra, needle):
    _fake_downpour_checkpoint(tmp_path / "ckpt3", shards=3)
    args = ["train", "--preset", "small", *sum((["--set", o] for o in DP), []), "--engine", "downpour",
            "--data", str(tmp_path / "no-images-needed"), "--out", str(tmp_path / "run")]
    args += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    t = time.perf_counter()
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert time.perf_counter() - t < 10
    assert not (tmp_path / "run").exists()  # nothing written: the errors come before any work


# ---------------------------------------------------------------- with Ray

def test_one_replica_sgd_p1_g1_matches_single_device_step_for_step(tmp_path, ray_run, one_thread):
    from grandmother.distributed.downpour import train_downpour
    from grandmother.training.loop import train
    data = make_images(tmp_path / "imgs")
    cfg = load_config("small", FAST + ["train.steps=6", "train.optimizer=sgd", "train.lr=0.02",
                                       "downpour.replicas=1", "downpour.fetch_every=1", "downpour.push_every=1"])
    train(cfg, data, tmp_path / "local", progress=False)
    summary = train_downpour(cfg, data, tmp_path / "dp", progress=False)
    local, dp = metrics(tmp_path / "local"), metrics(tmp_path / "dp")
    assert [m["step"] for m in dp] == [m["step"] for m in local] == list(range(1, 7))
    for a, b in zip(local, dp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-4)
        assert b["replicas"][0]["staleness"] == 0
    a, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "local"))
    b, state, meta = load_checkpoint(latest_checkpoint(tmp_path / "dp"))
    assert meta["step"] == 6 and meta["ps_layout"]["shards"] == 3 and len(state["ps_shards"]) == 3
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert summary["images_seen"] == 48 and summary["restarts"] == {0: 0}


def test_two_replicas_reach_the_single_device_loss_at_equal_images(tmp_path, ray_run, one_thread):
    from grandmother.bench.downpour import evaluate_loss
    from grandmother.data.dataset import open_training_data
    from grandmother.distributed.downpour import train_downpour
    from grandmother.nn.model import build_network
    from grandmother.training.loop import train
    data = make_images(tmp_path / "imgs", n=48)
    cfg = load_config("small", FAST + ["train.steps=80", "train.lr=0.02", "train.log_every=10",
                                       "downpour.replicas=2", "downpour.ps_shards=2", "downpour.warmstart_steps=4"])
    train(cfg, data, tmp_path / "local", progress=False)
    summary = train_downpour(cfg, data, tmp_path / "dp", progress=False)
    assert summary["joined_at"][0] == 0 and summary["joined_at"][1] >= 4  # replica 0 warm-started alone
    dataset, _ = open_training_data(data, 16, 1)
    start = evaluate_loss(build_network(cfg, torch.device("cpu")), dataset)
    _, local_net, local_meta = load_run(tmp_path / "local")
    _, dp_net, dp_meta = load_run(tmp_path / "dp")
    assert dp_meta["images_seen"] == local_meta["images_seen"] == 80 * 8 and dp_meta["replica_steps"] == [40, 40]
    local_loss, dp_loss = evaluate_loss(local_net, dataset), evaluate_loss(dp_net, dataset)
    assert dp_loss < 0.85 * start, (start, dp_loss)
    # On this small problem, async updates with staleness ~1 match single-device at equal images up to
    # the noise of the data order (measured ratios 0.99-1.05 over 6 seeds and lengths); a replica that
    # pushed gradients of parameters many updates old, or lost pushes, would not.
    assert dp_loss <= 1.06 * local_loss, (local_loss, dp_loss)
    last = metrics(tmp_path / "dp")[-1]
    assert last["step"] == 80 and [r["replica"] for r in last["replicas"]] == [0, 1]
    assert all(r["images_per_s"] >= 0 and r["staleness"] >= 0 for r in last["replicas"])
    assert last["images_per_s"] > 0


def test_killed_replica_is_restarted_and_no_gradient_is_applied_twice(tmp_path, ray_run):
    from grandmother.distributed.downpour import train_downpour
    data = make_images(tmp_path / "imgs", n=32)
    cfg = load_config("small", FAST + ["train.steps=60", "train.log_every=5", "downpour.replicas=2",
                                       "downpour.ps_shards=2", "downpour.push_every=2", "downpour.fetch_every=3"])
    summary = train_downpour(cfg, data, tmp_path / "dp", progress=False,
                             faults={"kill": (1, 7), "lose_ack": (0, 3)})
    assert summary["restarts"] == {0: 0, 1: 1}  # replica 1 died once (SIGKILL) and came back; 0 never stopped
    # Every push of every replica reached every shard exactly once: 30 local steps / G=2 = 15 pushes each.
    for shard in summary["push_counts"]:
        for r in (0, 1):
            assert shard["applied"][r] == [1] * 15, (r, shard["applied"][r])
        assert shard["received"][0][2] == 2  # push 3 of replica 0 was re-sent after its "lost" ack ...
        assert shard["applied"][0][2] == 1  # ... and applied once
    meta = read_meta(latest_checkpoint(tmp_path / "dp"))
    assert meta["step"] == 60 and meta["replica_steps"] == [30, 30]  # the dead replica's portion was finished
    # ... continuing from its last push the shards had all applied (a push boundary, G=2), not from 0
    assert summary["started_at"][0] == [0] and summary["started_at"][1][0] == 0
    resumed = summary["started_at"][1][1]
    assert 0 < resumed < 30 and resumed % 2 == 0, summary["started_at"]
    cfg2, net, meta2 = load_run(tmp_path / "dp")
    assert meta2["step"] == 60 and net.num_parameters() > 0


def _raylets() -> set[str]:
    return {line.split(":")[0] for line in ray_processes("raylet")}


def test_killed_job_resumes_from_its_last_checkpoint(tmp_path, ray_run):
    data = make_images(tmp_path / "imgs", n=32)
    run = tmp_path / "dp"
    sets = sum((["--set", o] for o in FAST + ["train.log_every=5", "downpour.ps_checkpoint_every=10"]), [])
    base = [sys.executable, "-m", "grandmother", "train", "--preset", "small", *sets, "--engine", "downpour",
            "--replicas", "2", "--data", str(data), "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # 1. a long job on the module's cluster (joined by address), killed with SIGKILL once it checkpointed
    address = ray_run.address_info["gcs_address"]
    job = subprocess.Popen(base + ["--steps", "100000", "--ray-address", address], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline and job.poll() is None:
        ckpt = latest_checkpoint(run)
        if ckpt is not None and read_meta(ckpt)["step"] >= 20:
            break
        time.sleep(0.2)
    assert job.poll() is None, job.stderr.read().decode()[-2000:]
    job.send_signal(signal.SIGKILL)
    job.wait()
    before = read_meta(latest_checkpoint(run))
    target = 2 * max(before["replica_steps"]) + 10
    # 2. the same command with --resume (and an embedded Ray this time) finishes from there
    raylets = _raylets()
    done = subprocess.run(base + ["--steps", str(target), "--resume"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"from step {before['step']} " in done.stdout, done.stdout
    after = read_meta(latest_checkpoint(run))
    assert after["step"] == target and after["replica_steps"] == [target // 2] * 2
    new_lines = [m for m in metrics(run) if m["step"] > before["step"]]
    assert new_lines and new_lines[-1]["step"] == target
    load_run(run)
    deadline = time.time() + 20  # the embedded Ray of the resumed job is gone with it
    while _raylets() - raylets and time.time() < deadline:
        time.sleep(0.5)
    assert not _raylets() - raylets


@pytest.mark.slow
def test_model_parallel_replicas_restart_their_whole_group_and_apply_every_push_once(tmp_path, ray_run):
    """2 replicas x 2 partition processes; one process of replica 1 is SIGKILLed mid-run: the replica's
    group restarts, the run finishes, and every worker's every push reached every shard exactly once."""
    from grandmother.distributed.downpour import train_downpour
    data = make_images(tmp_path / "imgs", n=32)
    cfg = load_config("small", FAST + ["train.steps=24", "train.log_every=4", "downpour.replicas=2",
                                       "downpour.ps_shards=2", "downpour.push_every=2", "train.partition=2x1",
                                       "train.optimizer=adagrad", "train.lr=0.01"])  # partitions refuse Adam's state
    summary = train_downpour(cfg, data, tmp_path / "dp", progress=False, faults={"kill": (1, 5), "kill_part": 1})
    assert summary["restarts"] == {0: 0, 1: 1}
    for shard in summary["push_counts"]:
        assert sorted(shard["applied"]) == [0, 1, 2, 3]  # pusher = replica * 2 + partition worker
        for key in range(4):  # 12 local steps / G=2 = 6 pushes per worker
            assert shard["applied"][key] == [1] * 6, (key, shard["applied"][key])
    resumed = summary["started_at"][1][1]
    assert 0 < resumed < 12 and resumed % 2 == 0, summary["started_at"]
    meta = read_meta(latest_checkpoint(tmp_path / "dp"))
    assert meta["step"] == 24 and meta["replica_steps"] == [12, 12] and meta["model_parallel"] == "2x1"
    assert load_run(tmp_path / "dp")[1].num_parameters() > 0  # the standard layout: full parameters
