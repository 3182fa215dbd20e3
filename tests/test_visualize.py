"""visualize / invariance / report: optimal stimulus, translation curves, the HTML report, bad input."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grandmother.commands import main as cli
from grandmother.config import load_config, save_config
from grandmother.analysis.invariance import angle_of, rotation_curve, run_invariance, warp
from grandmother.nn.model import Network
from grandmother.analysis.units import Unit, unit_activation
from grandmother.analysis.stimulus import StimulusSettings, optimal_stimulus, stimulus_similarity
from grandmother.errors import GrandmotherError
from grandmother.analysis.visualize import balanced_subsample, run_visualize

PLAIN = dict(parameterization="pixel", jitter=0)  # the paper's problem, solved exactly
from conftest import make_images, write_run


def one_stage_config(size: int, channels: int, field: int, maps: int, lcn: bool = True):
    stage = (f"{{receptive_field: {field}, stride: 1, maps: {maps}, pool_size: 3, pool_stride: 1, lcn_size: 3, "
             f"lcn_sigma: 1.0}}")
    return load_config("small", [f"model.image_size={size}", f"model.channels={channels}", "model.input_norm=none",
                                 f"model.stages=[{stage}]", f"model.lcn={str(lcn).lower()}", "train.steps=1"])


def frozen(net):
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def dense_linear_map(net, unit) -> torch.Tensor:
    """a with f(x) = <a, x>, read off by evaluating f on every basis image (valid for a linear unit)."""
    c, h, w = net.input_shape
    basis = torch.eye(c * h * w).view(-1, c, h, w)
    with torch.no_grad():
        return unit_activation(net, basis, unit).view(c, h, w)


# ---------------------------------------------------------------- optimal stimulus

def test_optimal_stimulus_of_a_linear_unit_is_its_normalised_weight_vector():
    torch.manual_seed(1)
    cfg = one_stage_config(size=12, channels=3, field=5, maps=2)
    net = frozen(Network(cfg.model, generator=torch.Generator().manual_seed(3)))
    unit = Unit(0, "filter", 1, 3, 4)
    # The unit's weights placed at its receptive field (rows 3..7, cols 4..8), zeros elsewhere.
    w = torch.zeros(net.input_shape)
    w[:, 3:8, 4:9] = net.stages[0].filter.encoder[3, 4, 1]
    assert torch.allclose(dense_linear_map(net, unit), w, atol=1e-5)  # the unit really is <w, x>

    x, value, info = optimal_stimulus(net, unit, StimulusSettings(restarts=3, seed=0, **PLAIN))
    radius = math.sqrt(3 * 12 * 12)
    assert abs(float(x.norm()) - radius) < 1e-3 * radius
    cosine = float((x * w).sum() / (x.norm() * w.norm()))
    assert cosine > 0.999, cosine
    assert abs(value - radius * float(w.norm())) < 1e-3 * value  # max of <w, x> on the sphere
    assert float(x[:, :3].abs().max()) < 1e-2 * float(x.abs().max())  # nothing outside the receptive field


def test_optimal_stimulus_of_a_pooling_unit_is_the_top_eigenvector():
    # f(x) = sqrt(eps + sum_j <w_j, x>^2) over the pooling window: its maximiser on the sphere of radius
    # R is the top eigenvector of A^T A (rows of A: the window's filters), f = sqrt(eps + R^2 lambda_max).
    cfg = one_stage_config(size=10, channels=1, field=4, maps=2)
    net = frozen(Network(cfg.model, generator=torch.Generator().manual_seed(5)))
    unit = Unit(0, "pool", 0, 2, 1)
    rows = [dense_linear_map(net, Unit(0, "filter", 0, 2 + i, 1 + j)).double().flatten()
            for i in range(3) for j in range(3)]
    a = torch.stack(rows).numpy()
    evals, evecs = np.linalg.eigh(a.T @ a)
    radius = 10.0
    x, value, _ = optimal_stimulus(net, unit, StimulusSettings(restarts=4, seed=0, **PLAIN))
    expected = math.sqrt(cfg.model.pool_eps + radius ** 2 * evals[-1])
    assert abs(value - expected) < 2e-3 * expected, (value, expected)
    top = torch.from_numpy(evecs[:, -1]).float()
    assert abs(float((x.flatten() * top).sum() / x.norm())) > 0.995


def test_receptive_field_evenness_and_correlation_of_the_stimulus():
    from grandmother.analysis.stimulus import correlation, is_even, receptive_field
    cfg = one_stage_config(size=12, channels=1, field=5, maps=2)
    net = frozen(Network(cfg.model, generator=torch.Generator().manual_seed(3)))
    filt, pool = Unit(0, "filter", 1, 3, 4), Unit(0, "pool", 0, 2, 1)
    rf = receptive_field(net, filt)
    expect = np.zeros((12, 12), bool)
    expect[3:8, 4:9] = True
    np.testing.assert_array_equal(rf, expect)  # a first-stage filter sees its 5x5 field and nothing else
    assert not is_even(net, filt) and is_even(net, pool)  # L2 pooling squares: f(-x) = f(x)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1, 12, 12)), rng.normal(size=(1, 12, 12))
    assert correlation(a, b, expect) == pytest.approx(np.corrcoef(a[0][expect], b[0][expect])[0, 1])
    # the shown sign of an even unit's stimulus correlates positively with the top images; |r| reported
    x, _, _ = optimal_stimulus(net, pool, StimulusSettings(restarts=1, max_iters=20, **PLAIN))
    top_mean = -x.double().numpy()
    sim = stimulus_similarity(net, pool, x, top_mean, rng.normal(size=(1, 12, 12)))
    assert sim["sign_free"] and sim["shown_sign"] == -1.0 and sim["top_images"] == pytest.approx(1.0)
    np.testing.assert_allclose(sim["stimulus"], top_mean)


def test_fourier_parameterization_gives_a_smoother_stimulus_on_the_same_sphere():
    """The preconditioned search trades some response for low frequencies: its x* holds less high-frequency
    energy than the plain search's, on the same sphere (what keeps a face unit's x* from being noise)."""
    cfg = one_stage_config(size=16, channels=1, field=6, maps=4)
    net = frozen(Network(cfg.model, generator=torch.Generator().manual_seed(7)))
    unit = Unit(0, "pool", 2, 5, 5)

    def high_share(x):
        power = np.abs(np.fft.rfft2(x.double().numpy()[0])) ** 2
        fy, fx = np.meshgrid(np.fft.fftfreq(16) * 16, np.fft.rfftfreq(16) * 16, indexing="ij")
        return power[np.hypot(fy, fx) > 4].sum() / power.sum()

    plain, v_plain, _ = optimal_stimulus(net, unit, StimulusSettings(restarts=1, max_iters=60, **PLAIN))
    smooth, v_smooth, info = optimal_stimulus(net, unit, StimulusSettings(restarts=1, max_iters=60, jitter=0))
    assert info["parameterization"] == "fourier"
    assert abs(float(smooth.norm()) - 16.0) < 1e-3 * 16  # the paper's constraint, sqrt(C*H*W)
    assert high_share(smooth) < 0.5 * high_share(plain), (high_share(smooth), high_share(plain))
    assert 0 < v_smooth <= v_plain * 1.001  # the plain search maximises f on the sphere itself
    with pytest.raises(GrandmotherError, match="parameterization"):
        optimal_stimulus(net, unit, StimulusSettings(parameterization="wavelet"))


# ---------------------------------------------------------------- invariance

def test_translation_curve_is_the_image_shifted_under_a_known_receptive_field(tmp_path):
    # Stage-0 filter units whose weights are a delta at the centre of a 3x3 field: unit (y, x) reads
    # pixel (y + 1, x + 1). Shifting the image right by k makes that unit read pixel (y+1, x+1-k) of the
    # original (edges replicated), so the curve over k is a row of the image read backwards.
    cfg = one_stage_config(size=16, channels=1, field=3, maps=1)
    net = Network(cfg.model)
    with torch.no_grad():
        net.stages[0].filter.encoder.zero_()
        net.stages[0].filter.encoder[:, :, 0, 0, 1, 1] = 1.0
    run = write_run(tmp_path / "run", cfg, net)
    images = make_images(tmp_path / "faces", n=3, size=16, grid=4)
    shifts = list(range(-9, 10))
    res = run_invariance(run, "s0.filter.m0.y6.x6", images, tmp_path / "inv", scales=[0.5, 1.0, 1.5], shifts=shifts)
    imgs = [np.asarray(Image.open(p), np.float64) / 255.0 for p in sorted(images.glob("*.png"))]
    clamp = lambda v: min(max(v, 0), 15)
    want_h = [np.mean([im[7, clamp(7 - k)] for im in imgs]) for k in shifts]
    want_v = [np.mean([im[clamp(7 - k), 7] for im in imgs]) for k in shifts]
    assert np.allclose(res["curves"]["shift_horizontal"]["mean"], want_h, atol=1e-5)
    assert np.allclose(res["curves"]["shift_vertical"]["mean"], want_v, atol=1e-5)
    assert abs(res["curves"]["scale"]["mean"][1] - np.mean([im[7, 7] for im in imgs])) < 1e-5
    assert res["curves"]["shift_horizontal"]["x"] == [float(k) for k in shifts]
    for name in ("scale.png", "shift_horizontal.png", "shift_vertical.png", "invariance.json"):
        assert (tmp_path / "inv" / name).stat().st_size > 0


def test_scaling_is_about_the_centre_and_a_template_unit_peaks_where_the_blob_lands():
    img = np.zeros((1, 21, 21), np.float32)
    img[0, 10, 14] = 1.0  # a dot 4 px right of the centre
    big = warp(img, scale=2.0)
    assert np.unravel_index(big[0].argmax(), big[0].shape) == (10, 18)  # 8 px right after doubling
    moved = warp(img, dx=-4)
    assert np.unravel_index(moved[0].argmax(), moved[0].shape) == (10, 10)


def test_rotation_sequences_average_by_angle(tmp_path):
    cfg = one_stage_config(size=8, channels=1, field=3, maps=1)
    net = frozen(Network(cfg.model))
    with torch.no_grad():
        net.stages[0].filter.encoder.zero_()
        net.stages[0].filter.encoder[:, :, 0, 0, 1, 1] = 1.0  # reads pixel (y+1, x+1)
    root = tmp_path / "rot"
    for s, base in enumerate((40, 120)):
        (root / f"seq{s}").mkdir(parents=True)
        for angle in (0, 45, 90):
            Image.fromarray(np.full((8, 8), base + angle, np.uint8)).save(root / f"seq{s}" / f"rot_{angle:03d}.png")
    curve = rotation_curve(net, Unit(0, "filter", 0, 2, 2), root)
    assert curve["axis"] == "degrees" and curve["x"] == [0.0, 45.0, 90.0]
    assert np.allclose(curve["mean"], [((40 + a) + (120 + a)) / 2 / 255 for a in (0, 45, 90)], atol=1e-5)
    assert angle_of(Path("pose-30.png")) == 30.0 and angle_of(Path("-30.png")) == -30.0
    assert angle_of(Path("frontal.png")) is None


# ---------------------------------------------------------------- visualize end to end, and bad input

def make_testset(tmp_path: Path, size: int = 16) -> Path:
    from grandmother.data.testset import build_testset
    pos, neg = tmp_path / "pos", tmp_path / "neg"
    pos.mkdir(), neg.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        # positives: a bright centre; negatives: plain noise
        a = rng.integers(0, 80, (size, size), dtype=np.uint8)
        b = a.copy()
        b[size // 4: 3 * size // 4, size // 4: 3 * size // 4] += 150
        Image.fromarray(b).save(pos / f"p{i}.png")
        Image.fromarray(a).save(neg / f"n{i}.png")
    out = tmp_path / "testset"
    build_testset([str(pos)], [str(neg)], out, positive_fraction=0.4, size=size, color="gray", seed=0, progress=False)
    return out


def test_visualize_writes_every_figure_and_bad_input_is_one_line(tmp_path, capsys):
    cfg = one_stage_config(size=16, channels=1, field=5, maps=2)
    net = Network(cfg.model, generator=torch.Generator().manual_seed(0))
    run = write_run(tmp_path / "run", cfg, net)
    test = make_testset(tmp_path)
    res = run_visualize(run, test, "s0.pool.m1.y5.x5", tmp_path / "vis", top=12,
                        stimulus=StimulusSettings(restarts=2, max_iters=50, **PLAIN))
    for f in ("histogram.png", "top_images.png", "optimal_stimulus.png", "optimal_stimulus.npy", "visualize.json"):
        assert (tmp_path / "vis" / f).stat().st_size > 0
    x = np.load(tmp_path / "vis" / "optimal_stimulus.npy")
    assert x.shape == (1, 16, 16) and abs(np.linalg.norm(x) - 1) < 1e-4
    acts = np.load(tmp_path / "vis" / "activations.npy")
    assert res["top_images"]["indices"][0] == int(np.argmax(acts))
    assert res["optimal_stimulus"]["value"] >= res["optimal_stimulus"]["best_test_activation"] - 1e-3
    corr = res["optimal_stimulus"]["correlation"]
    assert corr["top_count"] == 12 and -1 <= corr["top_images"] <= 1 and -1 <= corr["mean_negative"] <= 1
    assert (tmp_path / "vis" / "top_mean.png").stat().st_size > 0

    def one_line_error(argv):
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("grandmother: error:") and "\n" not in err
        return err

    base = ["visualize", str(run), "--testset", str(test), "--out", str(tmp_path / "v2")]
    assert "outside" in one_line_error(base + ["--unit", "s0.pool.m7.y5.x5"])
    assert "no sublayer" in one_line_error(base + ["--unit", "s3.lcn.m0.y0.x0"])
    assert "expected" in one_line_error(base + ["--unit", "neuron42"])
    (tmp_path / "empty_run").mkdir()
    save_config(cfg, tmp_path / "empty_run" / "config.yaml")
    assert "no checkpoint" in one_line_error(["visualize", str(tmp_path / "empty_run"), "--testset", str(test),
                                              "--unit", "s0.pool.m0.y0.x0", "--out", str(tmp_path / "v3")])
    assert "no checkpoint" in one_line_error(["invariance", str(tmp_path / "empty_run"), "--unit", "s0.pool.m0.y0.x0",
                                              "--images", str(test), "--out", str(tmp_path / "v3")])
    # a test set of smaller images than the network's input
    small_cfg = one_stage_config(size=20, channels=1, field=5, maps=2)
    small_run = write_run(tmp_path / "run20", small_cfg, Network(small_cfg.model))
    assert "16x16" in one_line_error(["visualize", str(small_run), "--testset", str(test), "--unit",
                                      "s0.pool.m0.y0.x0", "--out", str(tmp_path / "v4")])
    # one class only
    np.save(test / "labels.npy", np.ones(len(np.load(test / "labels.npy")), np.uint8))
    assert "positives only" in one_line_error(base + ["--unit", "s0.pool.m0.y0.x0"])


def test_balanced_subsample_is_one_to_one():
    labels = np.array([1] * 7 + [0] * 30)
    idx = balanced_subsample(labels, seed=3)
    assert labels[idx].sum() == 7 and len(idx) == 14 and len(set(idx)) == 14


# ---------------------------------------------------------------- first-stage filters

def test_first_stage_filter_picture_shows_encoder_and_decoder_rows():
    cfg = one_stage_config(size=16, channels=1, field=5, maps=3)
    net = Network(cfg.model)
    from grandmother.report.plots import first_stage_filters
    pic = first_stage_filters(net, tile=10)
    cell = 10 + 2 * 3 + 2  # tile, border, gap of image_grid
    assert pic.shape == (10 * cell + 2, 3 * cell + 2, 3)  # 5 locations x (encoder, decoder) rows, 3 maps
    assert tuple(pic[2, 2]) == (160, 160, 160) and tuple(pic[2 + cell, 2]) == (0, 0, 0)  # frames: encoder, decoder
