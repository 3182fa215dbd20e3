"""Single-device training: it learns, it resumes exactly, checkpoints survive crashes, bad input is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from grandmother.training.checkpoint import latest_checkpoint, load_checkpoint
from grandmother.training.runs import load_run
from grandmother.commands import main as cli
from grandmother.config import load_config
from grandmother.errors import GrandmotherError
from grandmother.data.dataset import BatchOrder
from grandmother.training.loop import train

from conftest import TINY, make_images

def sample_images(tmp_path):
    from grandmother.data.samples import SAMPLE_DIR
    if (SAMPLE_DIR / "train").is_dir():
        return SAMPLE_DIR / "train"
    pytest.skip("in-package sample not built (scripts/build_sample.py)")


def test_batch_order_is_a_function_of_seed_and_step():
    a, b = BatchOrder(10, 4, seed=3), BatchOrder(10, 4, seed=3)
    seq_a = [a.indices(s) for s in range(6)]
    seq_b = [b.indices(s) for s in reversed(range(6))][::-1]  # asked in another order
    assert seq_a == seq_b
    flat = sum(seq_a[:5], [])[:10]  # the first epoch is a permutation of all items
    assert sorted(flat) == list(range(10))
    assert BatchOrder(10, 4, seed=4).indices(0) != seq_a[0] or BatchOrder(10, 4, seed=4).indices(1) != seq_a[1]


@pytest.mark.slow
def test_training_small_preset_on_real_images_lowers_every_stage_objective(tmp_path):
    data = sample_images(tmp_path)
    cfg = load_config("small", ["train.steps=150", "train.batch_size=32", "train.log_every=10",
                                "train.checkpoint_every=1000"])
    train(cfg, data, tmp_path / "run", progress=False)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 150 and lines[-1]["images"] == 150 * 32
    first, last = lines[0]["stages"], lines[-1]["stages"]
    for s, (a, b) in enumerate(zip(first, last)):
        obj_a, obj_b = a["reconstruction"] + a["sparsity"], b["reconstruction"] + b["sparsity"]
        assert obj_b < 0.8 * obj_a, f"stage {s} objective did not fall: {obj_a:.1f} -> {obj_b:.1f}"
    assert all(l["images_per_s"] > 0 for l in lines)


def test_resume_gives_identical_parameters(tmp_path):
    data = make_images(tmp_path / "imgs")
    full = load_config("small", TINY + ["train.steps=6"])
    train(full, data, tmp_path / "full", progress=False)
    half = load_config("small", TINY + ["train.steps=3"])
    train(half, data, tmp_path / "split", progress=False)
    train(full, data, tmp_path / "split", resume=True, progress=False)
    a, _, meta_a = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    b, _, meta_b = load_checkpoint(latest_checkpoint(tmp_path / "split"))
    assert meta_a["step"] == meta_b["step"] == 6 and meta_a["images_seen"] == meta_b["images_seen"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the optimizer state was really used: Adagrad from scratch at step 3 would differ
    fresh = load_config("small", TINY + ["train.steps=3"])
    train(fresh, data, tmp_path / "other", progress=False)
    c, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "other"))
    assert not torch.equal(a["stages.0.filter.encoder"], c["stages.0.filter.encoder"])


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    data = make_images(tmp_path / "imgs")
    cfg = load_config("small", TINY + ["train.steps=2"])
    train(cfg, data, tmp_path / "run", progress=False)
    before = latest_checkpoint(tmp_path / "run")
    tensors_before, _, _ = load_checkpoint(before)

    import grandmother.training.checkpoint as ck
    real_save = ck.save_file

    def crash(tensors, filename, *a, **k):
        if filename.endswith(ck.STATE_TENSORS):
            raise OSError("disk full (simulated)")
        return real_save(tensors, filename, *a, **k)
    monkeypatch.setattr(ck, "save_file", crash)  # model.safetensors is written, the resume state fails
    with pytest.raises(GrandmotherError, match="cannot write .*step_00000004: disk full"):
        train(load_config("small", TINY + ["train.steps=4"]), data, tmp_path / "run", resume=True, progress=False)
    monkeypatch.undo()
    after = latest_checkpoint(tmp_path / "run")
    assert after == before
    tensors_after, state, meta = load_checkpoint(after)
    assert meta["step"] == 2 and "optimizer" in state
    assert all(torch.equal(tensors_before[k], tensors_after[k]) for k in tensors_before)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*")), "temporary folder left behind"
    cfg2, net, _ = load_run(tmp_path / "run")
    assert net.num_parameters() > 0


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    data = make_images(tmp_path / "imgs", n=12)
    (data / "broken.jpg").write_bytes(b"not a jpeg at all")
    good = Image.new("L", (20, 20))
    good.save(data / "trunc.png")
    raw = (data / "trunc.png").read_bytes()
    (data / "trunc.png").write_bytes(raw[: len(raw) // 2])
    summary = train(load_config("small", TINY + ["train.steps=1"]), data, tmp_path / "run", progress=False)
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())["skipped"]
    assert summary["skipped"] == 2
    assert sorted(Path(s["path"]).name for s in skipped) == ["broken.jpg", "trunc.png"]


@pytest.mark.parametrize("argv, needle", [
    (["train", "--preset", "nope", "--data", "X", "--out", "Y"], "unknown preset 'nope'"),
    (["train", "--preset", "small", "--data", "/no/such/folder", "--out", "{tmp}/r"], "/no/such/folder"),
    (["train", "--preset", "small", "--data", "{tmp}/empty", "--out", "{tmp}/r"], "no images found"),
    (["train", "--preset", "small", "--set", "model.stages.0.receptive_field=40", "--data", "{tmp}", "--out",
      "{tmp}/r"], "model.stages[0].receptive_field=40 is larger than its input"),
    (["train", "--preset", "small", "--set", "model.colour=3", "--data", "{tmp}", "--out", "{tmp}/r"],
     "unknown setting model.colour"),
    (["model-info", "--preset", "small", "--set", "train.steps=abc"], "train.steps: expected int"),
])
def test_bad_input_gives_one_line_error(tmp_path, capsys, argv, needle):
    (tmp_path / "empty").mkdir()
    code = cli([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1, err


def test_unknown_flag_value_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["train", "--optimizer", "lbfgs", "--out", "x"])
    assert e.value.code == 2 and "--optimizer" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_refused(tmp_path):
    data = make_images(tmp_path / "imgs")
    train(load_config("small", TINY + ["train.steps=1"]), data, tmp_path / "run", progress=False)
    with pytest.raises(GrandmotherError, match="different model .*maps: 2 in the checkpoint, 3 in the config"):
        train(load_config("small", TINY + ["train.steps=2", "model.stages.*.maps=3"]), data, tmp_path / "run",
              resume=True, progress=False)
    with pytest.raises(GrandmotherError, match="already holds a run"):
        train(load_config("small", TINY + ["train.steps=2"]), data, tmp_path / "run", progress=False)


def test_model_info_json_counts(capsys):
    assert cli(["model-info", "--preset", "paper", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["encoder"] == 260_410_464 + 544_195_584 + 412_252_416
    assert info["parameters"]["total"] == 2 * info["parameters"]["encoder"]
    assert len(info["stages"]) == 3 and info["flops_per_image"] > 12 * info["parameters"]["encoder"]


def test_resume_after_interruption_logs_each_step_once(tmp_path):
    """An interrupted run logged steps past its last checkpoint; the resumed run redoes them, once."""
    data = make_images(tmp_path / "imgs")
    run = tmp_path / "run"
    train(load_config("small", TINY + ["train.steps=2"]), data, run, progress=False)
    with open(run / "metrics.jsonl", "a") as f:  # what the interrupted run logged after step 2, then a torn line
        f.write(json.dumps({"step": 3, "images": 24}) + "\n" + '{"step": 4, "ima')
    train(load_config("small", TINY + ["train.steps=5"]), data, run, resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_checkpoint_of_another_engine_is_refused(tmp_path):
    data = make_images(tmp_path / "imgs")
    run = tmp_path / "run"
    train(load_config("small", TINY + ["train.steps=1"]), data, run, progress=False)
    meta_path = latest_checkpoint(run) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "engine": "downpour"}))
    with pytest.raises(GrandmotherError, match="written by --engine downpour"):
        train(load_config("small", TINY + ["train.steps=2"]), data, run, resume=True, progress=False)


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """Results written through a temp file get 0o666 less the umask, like any file the user makes
    (mkstemp alone would leave them 0600, unreadable by the group)."""
    import grandmother.io as gio
    gio.atomic_write_text(tmp_path / "report.html", "<html></html>")
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o666 & ~gio._UMASK
    assert 0o666 & ~gio._UMASK != 0o600 or gio._UMASK == 0o066  # the check above is not mkstemp's default


def test_background_loader_workers_give_the_same_run(tmp_path):
    """train.num_workers decodes batches in other processes; the batches, hence the weights, are the same,
    including across a resume."""
    data = make_images(tmp_path / "imgs")
    train(load_config("small", TINY + ["train.steps=4"]), data, tmp_path / "w0", progress=False)
    train(load_config("small", TINY + ["train.steps=2", "train.num_workers=2"]), data, tmp_path / "w2",
          progress=False)
    train(load_config("small", TINY + ["train.steps=4", "train.num_workers=2"]), data, tmp_path / "w2",
          resume=True, progress=False)
    a, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "w0"))
    b, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "w2"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_norm_projection_keeps_unit_norms_through_training(tmp_path):
    data = make_images(tmp_path / "imgs", n=24, size=16)
    sets = TINY + ["train.optimizer=adam", "train.lr=0.05", "train.steps=8"]
    for which in ("none", "decoder", "encoder"):
        train(load_config("small", sets + [f"train.norm_control={which}"]), data, tmp_path / which, progress=False)
    free, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "none"))
    for which, other in (("decoder", "encoder"), ("encoder", "decoder")):
        tensors, _, _ = load_checkpoint(latest_checkpoint(tmp_path / which))
        for s in range(3):  # after 8 steps every unit's vector has norm 1 (and each step's median, below)
            norms = tensors[f"stages.{s}.filter.{which}"].flatten(3).norm(dim=-1)
            torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
            # the other side is free: it is not held at 1
            assert tensors[f"stages.{s}.filter.{other}"].flatten(3).norm(dim=-1).std() > 1e-3
        # without the projection the same vectors move away from 1 (so this test can fail)
        assert (free[f"stages.0.filter.{which}"].flatten(3).norm(dim=-1) - 1).abs().max() > 1e-2
        lines = [json.loads(l) for l in (tmp_path / which / "metrics.jsonl").read_text().splitlines()]
        assert len(lines) == 8
        for line in lines:  # per-stage diagnostics, logged each step
            for st in line["stages"]:
                assert abs(st[f"{which}_norm"] - 1) < 1e-5 and 0 <= st["dead_fraction"] <= 1
                assert {"reconstruction", "sparsity", "encoder_norm", "decoder_norm"} <= set(st)


def test_dead_fraction_counts_units_at_the_eps_floor():
    from grandmother.nn.model import Network
    cfg = load_config("small", TINY)
    net = Network(cfg.model, generator=torch.Generator().manual_seed(0))
    x = net.prepare(torch.randint(0, 255, (4, 1, 16, 16), dtype=torch.uint8))
    assert all(d["dead_fraction"] == 0 for d in net.diagnostics(net(x)))
    with torch.no_grad():
        net.stages[1].filter.encoder[:, :, 0].zero_()  # map 0 of stage 1 answers nothing
    d = net.diagnostics(net(x))
    assert d[0]["dead_fraction"] == 0 and d[1]["dead_fraction"] == 0.5 and d[1]["decoder_norm"] > 0


def test_norm_control_is_refused_with_downpour():
    with pytest.raises(GrandmotherError, match="train.norm_control=none"):
        load_config("small", ["engine=downpour", "train.norm_control=decoder"])


def test_greedy_schedule_trains_one_stage_at_a_time_bottom_up():
    # 6 steps over 3 stages: steps 0-1 move stage 0 only, 2-3 stage 1 only, 4-5 stage 2 only.
    from grandmother.nn.model import build_network
    from grandmother.training.optim import build_optimizer
    from grandmother.training.loop import active_stage, train_step
    cfg = load_config("small", TINY + ["train.steps=6", "train.schedule=greedy"])
    assert [active_stage(cfg.train, s, 3) for s in range(6)] == [0, 0, 1, 1, 2, 2]
    net = build_network(cfg, torch.device("cpu"))
    opt = build_optimizer(net.parameters(), cfg.train)
    batch = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    net.project_norms(cfg.train.norm_control)  # as train() does at the start (the small preset projects)
    snap = lambda: {k: v.clone() for k, v in net.state_dict().items() if k.startswith("stages.")}  # noqa: E731
    before = snap()
    for step in range(6):
        train_step(net, opt, batch, cfg.train, active_stage(cfg.train, step, 3))
        if step % 2 == 1:
            after = snap()
            # frozen stages are only re-projected to unit norm: rounding (1e-7), against steps of 1e-3
            moved = {int(k.split(".")[1]) for k in before if (before[k] - after[k]).abs().max() > 1e-5}
            assert moved == {step // 2}, (step, moved)
            before = after


def test_greedy_schedule_refuses_joint_stage_gradients():
    with pytest.raises(GrandmotherError, match="train.schedule=greedy"):
        load_config("small", TINY + ["train.schedule=greedy", "model.stage_gradients=joint"])
