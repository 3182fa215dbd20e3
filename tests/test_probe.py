"""`grandmother probe`: the threshold protocol, a planted detector, resuming from the cache, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from grandmother.config import config_from_dict, save_config
from grandmother.data.dataset import ImageArrayDataset
from grandmother.errors import GrandmotherError
from grandmother.nn.model import Network
from grandmother.analysis.probe import probe_network, run_probe, summarize
from grandmother.analysis.protocol import run_protocol

from conftest import write_run

TINY = {"model": {"image_size": 12, "channels": 1, "stages": [
    {"receptive_field": 5, "stride": 1, "maps": 2, "pool_size": 3, "pool_stride": 1, "lcn_size": 3, "lcn_sigma": 1.0},
    {"receptive_field": 3, "stride": 1, "maps": 2, "pool_size": 3, "pool_stride": 1, "lcn_size": 3, "lcn_sigma": 1.0}]},
    "train": {"seed": 3, "batch_size": 10}}
PLANT = (1, 2, 3)  # map, y, x of the planted stage-0 filter unit


def naive_protocol(acts: np.ndarray, labels: np.ndarray):
    """Per unit (best accuracy, threshold), by plain loops in float64."""
    n, units = acts.shape
    out = []
    for u in range(units):
        col = [float(a) for a in acts[:, u]]
        lo, hi = min(col), max(col)
        best = (-1.0, None)
        for k in range(20):
            t = lo + (hi - lo) * k / 19 if k < 19 else hi
            correct = sum(1 for a, y in zip(col, labels) if (a > t) == bool(y))
            if correct / n > best[0]:
                best = (correct / n, t)
        out.append(best)
    return out


def test_protocol_matches_naive_loop_with_ties_and_constant_units():
    rng = np.random.default_rng(0)
    n = 53
    labels = rng.random(n) < 0.4
    acts = rng.normal(size=(n, 7)).astype(np.float32)
    acts[:, 1] = 2.5  # constant unit: all thresholds equal, predicts all negative
    acts[:, 2] = rng.integers(0, 3, n)  # heavy ties, values landing exactly on thresholds
    acts[:, 3] = labels * 1.0 + rng.normal(0, 0.3, n)  # an informative unit
    acts[:, 4] = -acts[:, 3]  # anti-informative
    acts[:, 5] = np.where(labels, 1.0, 0.0)  # perfectly separating at a threshold inside (0, 1)
    acts[:, 6] = rng.integers(-4, 5, n) / 2  # ties on a coarse grid
    res = run_protocol(lambda idx: torch.from_numpy(acts[idx]), labels, 7, batch_size=8)
    want = naive_protocol(acts, labels)
    for u, (acc, t) in enumerate(want):
        assert res["best_accuracy"][u] == pytest.approx(acc, abs=1e-12), u
        assert res["best_threshold"][u] == pytest.approx(t, abs=1e-9), u
    assert res["best_accuracy"][1] == pytest.approx(1 - labels.mean())
    assert res["best_accuracy"][5] == 1.0


def planted_testset(seed=0):
    """Positives: a cross pattern at PLANT's 5x5 field (45) or plain noise (5); negatives: noise (35) or
    the negated pattern (35), so only the sign of the planted filter separates, not |filter| (pooling)."""
    rng = np.random.default_rng(seed)
    pattern = np.zeros((5, 5))
    pattern[2, :] = pattern[:, 2] = 1.0
    _, y, x = PLANT
    kinds = [1] * 45 + [0] * 5 + [0] * 35 + [-1] * 35
    labels = np.array([1] * 50 + [0] * 70, np.uint8)
    images = []
    for k in kinds:
        img = 100 + rng.normal(0, 12, (12, 12))
        img[y:y + 5, x:x + 5] += 90 * k * pattern
        images.append(np.clip(img, 0, 255).astype(np.uint8)[:, :, None])
    return ImageArrayDataset(np.stack(images)), labels, pattern


def planted_network(pattern):
    cfg = config_from_dict(TINY)
    net = Network(cfg.model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for st in net.stages:
            st.filter.encoder.zero_()
        m, y, x = PLANT
        net.stages[0].filter.encoder[y, x, m, 0] = torch.tensor(pattern, dtype=torch.float32)
    return cfg, net.eval()


def test_planted_detector_is_found(tmp_path):
    ds, labels, pattern = planted_testset()
    _, net = planted_network(pattern)
    res = probe_network(net, ds, labels, "cpu", tmp_path / "c.npz", "fp", batch_size=32)
    best = summarize(res)["best"]
    m, y, x = PLANT
    assert best["unit"] == f"s0.filter.m{m}.y{y}.x{x}"
    # Independent reference: the response by hand in float64, then the naive protocol.
    imgs = ds.array[:, :, :, 0].astype(np.float64) / 255
    flat = imgs.reshape(len(imgs), -1)
    std = (imgs - flat.mean(1)[:, None, None]) / (flat.std(1, ddof=1)[:, None, None] + 1e-3)
    response = (std[:, y:y + 5, x:x + 5] * pattern).sum((1, 2))
    (acc, thr), = naive_protocol(response[:, None], labels)
    assert best["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert acc == pytest.approx((45 + 70) / 120)  # the 5 pattern-less positives are the only errors
    assert best["threshold"] == pytest.approx(thr, rel=1e-4)


def make_run(root, cfg, net, data_dir=None):
    return write_run(root, cfg, net, step=1, metrics=False, meta={"images_seen": 0, "data": str(data_dir)})


def test_run_probe_writes_json_and_resumes_from_cache(tmp_path, monkeypatch):
    ds, labels, pattern = planted_testset()
    cfg, net = planted_network(pattern)
    run = make_run(tmp_path / "run", cfg, net)
    monkeypatch.setattr("grandmother.analysis.probe._open_testset", lambda p: (ds, labels, {}))
    train = ImageArrayDataset(ds.array[::3])
    monkeypatch.setattr("grandmother.data.dataset.open_training_data", lambda p, size, c, progress=False: (train, None))
    seen, stop_after = [], [13]

    def interrupt(phase, batch):
        seen.append((phase, batch))
        if len(seen) == stop_after[0]:
            raise KeyboardInterrupt

    opts = dict(linear_filters=20, train_data=tmp_path, batch_size=8, on_batch=interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_probe(run, tmp_path / "test", tmp_path / "probe", **opts)
    first = list(seen)
    seen.clear()
    stop_after[0] = None
    res = run_probe(run, tmp_path / "test", tmp_path / "probe", **opts)
    n_batches = 120 // 8
    # Saved every 10 batches: batches 0-9 of pass 1 were cached, so the rerun starts at batch 10.
    assert first[-1] == (1, 12) and seen[0] == (1, 10)
    assert len(seen) == 2 * n_batches - 10
    out = json.loads((tmp_path / "probe" / "probe.json").read_text())
    m, y, x = PLANT
    assert out["best"]["unit"] == res["best"]["unit"] == f"s0.filter.m{m}.y{y}.x{x}"
    assert out["best"]["accuracy"] == pytest.approx(115 / 120)
    assert set(out["baselines"]) >= {"random_guess", "random_weights", "linear_filter", "first_stage"}
    assert out["baselines"]["random_guess"] == pytest.approx(70 / 120)
    assert out["baselines"]["first_stage"] == out["best"]["accuracy"]
    assert len(out["top"]) == 20 and out["top"][0] == out["best"]
    acts = np.load(tmp_path / "probe" / "best_unit_activations.npy")
    assert acts.shape == (120,)
    # probe.json carries the held-out entry: split protocol, intervals, random seeds, cues, per-stage table
    ho = out["heldout"]
    assert ho["protocol"]["selection"]["images"] + ho["protocol"]["evaluation"]["images"] == 120
    assert ho["protocol"]["direction"] == "either" and ho["protocol"]["bootstrap"]["resamples"] == 1000
    assert ho["best"]["unit"] == out["best"]["unit"]
    rw = ho["baselines"]["random_weights"]
    assert rw["seeds"] == [3, 4, 5, 6, 7] and len(rw["per_seed"]) == 5
    assert rw["best"] == max(r["evaluation_accuracy"] for r in rw["per_seed"])
    assert rw["mean"] == pytest.approx(np.mean([r["evaluation_accuracy"] for r in rw["per_seed"]]))
    assert set(ho["baselines"]["trivial_cues"]) == {"mean", "contrast", "centre_minus_surround", "gradient_energy"}
    assert ho["baselines"]["linear_filter"]["templates"] == 20
    for rec in (ho["best"], rw, ho["baselines"]["linear_filter"], *ho["baselines"]["trivial_cues"].values()):
        lo, hi = rec.get("ci95") or rec["ci95_best"]
        assert 0 <= lo <= hi <= 1
    rows = {(r["stage"], r["sublayer"]) for r in ho["per_stage"]}
    assert rows == {(0, None), (1, None)} | {(s, n) for s in (0, 1) for n in ("filter", "pool", "lcn")}
    assert all("random" in r and r["random"]["best"] >= r["random"]["mean"] for r in ho["per_stage"])
    assert set(ho["differences"]["best_minus"]) >= {"random_weights_best", "random_weights_mean", "linear_filter",
                                                    "best_trivial_cue", "random_guess"}
    # A third run uses the finished cache for everything: no batch of the network is recomputed.
    seen.clear()
    opts["heldout"] = None  # the held-out entry is recomputed each time; not needed again here
    again = run_probe(run, tmp_path / "test", tmp_path / "probe", **opts)
    assert seen == [] and again["best"] == res["best"]


def test_bad_input_is_one_line(tmp_path, monkeypatch):
    ds, labels, pattern = planted_testset()
    cfg, net = planted_network(pattern)
    run = make_run(tmp_path / "run", cfg, net)
    opts = dict(linear_filters=0, random_weights=False)
    one_class = np.ones_like(labels)
    with pytest.raises(GrandmotherError, match="one class") as e:
        run_probe(run, "T", tmp_path / "p", dataset=ds, labels=one_class, **opts)
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    save_config(cfg, tmp_path / "empty" / "config.yaml")
    with pytest.raises(GrandmotherError, match="no checkpoint"):
        run_probe(tmp_path / "empty", "T", tmp_path / "p", dataset=ds, labels=labels, **opts)
    big = ImageArrayDataset(np.zeros((4, 16, 16, 1), np.uint8))
    with pytest.raises(GrandmotherError, match="1x16x16 images .* network takes 1x12x12") as e:
        run_probe(run, "T", tmp_path / "p", dataset=big, labels=np.array([0, 1, 0, 1]), **opts)
    assert "\n" not in str(e.value)


def test_heldout_probe_chooses_on_selection_and_scores_on_evaluation():
    from grandmother.analysis import heldout as H
    from grandmother.analysis.probe_heldout import HeldoutSettings, heldout_probe
    ds, labels, pattern = planted_testset()
    cfg, net = planted_network(pattern)
    # Identities: positives in pairs (as LFW persons), negatives without one. No pair may be divided.
    ids = [f"person{i // 2}" if lab else None for i, lab in enumerate(labels)]
    ds.items = lambda: [{"identity": g} for g in ids]
    st = HeldoutSettings(random_seeds=2, bootstrap=200)
    ho = heldout_probe(net, ds, labels, "cpu", cfg=cfg, st=st, batch_size=32)
    split = H.split_halves(labels, ids, st.split_seed)
    sel, ev = set(split.selection.tolist()), set(split.evaluation.tolist())
    assert not {ids[i] for i in sel if ids[i]} & {ids[i] for i in ev if ids[i]}
    assert ho["protocol"]["groups"] == 25 + 70
    # Independent reference for the planted unit: its response by hand, the naive 20-threshold protocol on the
    # selection half only, then the accuracy of that threshold on the evaluation half.
    m, y, x = PLANT
    assert ho["best"]["unit"] == f"s0.filter.m{m}.y{y}.x{x}" and ho["best"]["direction"] == "positive"
    imgs = ds.array[:, :, :, 0].astype(np.float64) / 255
    flat = imgs.reshape(len(imgs), -1)
    std = (imgs - flat.mean(1)[:, None, None]) / (flat.std(1, ddof=1)[:, None, None] + 1e-3)
    response = (std[:, y:y + 5, x:x + 5] * pattern).sum((1, 2))
    s_idx, e_idx = split.selection, split.evaluation
    (acc_sel, thr), = naive_protocol(response[s_idx, None], labels[s_idx])
    acc_ev = np.mean([(response[i] > thr) == bool(labels[i]) for i in e_idx])
    assert ho["best"]["selection_accuracy"] == pytest.approx(acc_sel)
    assert ho["best"]["threshold"] == pytest.approx(thr, rel=1e-4)
    assert ho["best"]["evaluation_accuracy"] == pytest.approx(acc_ev)
    # the same-set number is the paper's protocol on all 120 images
    assert ho["best"]["same_set_accuracy"] == pytest.approx(115 / 120)
    assert ho["baselines"]["random_weights"]["seeds"] == [3, 4]
    assert "linear_filter" not in ho["baselines"]
    # every positive one person: no honest split exists; the entry says so instead of failing the probe
    ds.items = lambda: [{"identity": "someone" if lab else None} for lab in labels]
    assert "too few identities" in heldout_probe(net, ds, labels, "cpu", cfg=cfg, st=st)["skipped"]
