"""Model correctness against references written here, independently of grandmother/model.py:

- the locally connected encoder/decoder against a dense matrix with the connectivity mask, built with
  explicit loops (float64), for the reference kernel and whatever "auto" resolves to;
- gradcheck (float64) of every sublayer, a stage's objective and the whole network's objective;
- L2 pooling and local contrast normalization against naive loops written from the paper's formulas;
- analytic shapes and parameter counts (grandmother/shapes.py) against built networks, `paper` on meta;
- the objective's value against a manual computation with the dense matrices.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from grandmother.config import config_from_dict, load_config
from grandmother.nn.kernels import get_kernel, kernel_names
from grandmother.nn.model import LocalContrastNorm, Network, l2_pool
from grandmother.nn.shapes import model_info, stage_shapes

F64 = torch.float64
# every kernel registered for the CPU (reference, tiled, ...) plus "auto"
KERNELS = kernel_names("cpu") + ["auto"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every tensor here is tiny: extra intra-op threads only spin, and on a shared 2-core machine that
    # made this file 100x slower. Restored afterwards for the other test files.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- independent references

def dense_locally_connected(w: torch.Tensor, in_hw, stride):
    """(D, mask): D of shape (M*Ho*Wo, C*H*W) with D[(m,i,j), (c, i*s+u, j*s+v)] = w[i,j,m,c,u,v]."""
    Ho, Wo, M, C, k, _ = w.shape
    H, W = in_hw
    wn = w.detach().cpu().double().numpy()
    D = np.zeros((M * Ho * Wo, C * H * W))
    mask = np.zeros(D.shape, dtype=bool)
    for m in range(M):
        for i in range(Ho):
            for j in range(Wo):
                row = (m * Ho + i) * Wo + j
                for c in range(C):
                    for u in range(k):
                        for v in range(k):
                            col = (c * H + i * stride + u) * W + (j * stride + v)
                            assert not mask[row, col]  # each weight has its own connection
                            D[row, col] = wn[i, j, m, c, u, v]
                            mask[row, col] = True
    return torch.from_numpy(D), torch.from_numpy(mask)


def naive_l2_pool(y: np.ndarray, size, stride, eps):
    B, M, H, W = y.shape
    Ho, Wo = (H - size) // stride + 1, (W - size) // stride + 1
    out = np.zeros((B, M, Ho, Wo))
    for b in range(B):
        for m in range(M):
            for i in range(Ho):
                for j in range(Wo):
                    s = eps
                    for u in range(size):
                        for v in range(size):
                            s += y[b, m, i * stride + u, j * stride + v] ** 2
                    out[b, m, i, j] = math.sqrt(s)
    return out


def naive_lcn(x: np.ndarray, size, sigma, c):
    """Subtractive then divisive normalization; weighted averages over the window positions inside the
    map and over all maps, Gaussian weights exp(-(p^2+q^2)/(2 sigma^2)) divided by their sum there.
    Returns (z, local std) so tests can see which branch of max(c, std) each location took."""
    B, M, H, W = x.shape
    r = size // 2

    def local_average(a, b, i, j):
        num = den = 0.0
        for p in range(-r, r + 1):
            for q in range(-r, r + 1):
                if 0 <= i + p < H and 0 <= j + q < W:
                    g = math.exp(-(p * p + q * q) / (2 * sigma * sigma))
                    for m in range(M):
                        num += g * a[b, m, i + p, j + q]
                        den += g
        return num / den

    v = np.zeros_like(x)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                mean = local_average(x, b, i, j)
                v[b, :, i, j] = x[b, :, i, j] - mean
    z = np.zeros_like(x)
    std = np.zeros((B, H, W))
    for b in range(B):
        for i in range(H):
            for j in range(W):
                std[b, i, j] = math.sqrt(local_average(v * v, b, i, j))
                z[b, :, i, j] = v[b, :, i, j] / max(c, std[b, i, j])
    return z, std


# ---------------------------------------------------------------- 1. locally connected = dense masked matrix

# (field, stride, H, W): non-square inputs; the last two leave rows/cols that no field covers.
LC_CASES = [(3, 1, 6, 8), (3, 2, 7, 9), (3, 3, 9, 12), (4, 3, 11, 9), (2, 2, 6, 5)]


def _weights(in_hw, field, stride, maps, channels):
    Ho, Wo = (in_hw[0] - field) // stride + 1, (in_hw[1] - field) // stride + 1
    return torch.randn(Ho, Wo, maps, channels, field, field, dtype=F64)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("maps", [1, 4])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("field,stride,H,W", LC_CASES)
def test_locally_connected_equals_dense_masked_matrix(kernel, maps, channels, field, stride, H, W):
    kern = get_kernel(kernel, "cpu")
    w1 = _weights((H, W), field, stride, maps, channels)
    w2 = _weights((H, W), field, stride, maps, channels)
    Ho, Wo = w1.shape[:2]
    D1, mask = dense_locally_connected(w1, (H, W), stride)
    D2, _ = dense_locally_connected(w2, (H, W), stride)
    n_in, n_out = channels * H * W, maps * Ho * Wo
    assert int((D1 != 0).sum()) == w1.numel() and not D1[~mask].any()

    # The kernel's own Jacobian (encode of the unit basis): zero outside the receptive fields, one nonzero
    # per weight, equal to D.
    J = kern.encode(torch.eye(n_in, dtype=F64).view(n_in, channels, H, W), w1, stride).reshape(n_in, n_out).T
    assert not J[~mask].any()
    assert int((J != 0).sum()) == w1.numel()
    torch.testing.assert_close(J, D1, rtol=1e-12, atol=1e-12)

    x = torch.randn(5, channels, H, W, dtype=F64)
    y = kern.encode(x, w1, stride)
    assert y.shape == (5, maps, Ho, Wo)
    torch.testing.assert_close(y.reshape(5, n_out), x.reshape(5, n_in) @ D1.T, rtol=1e-12, atol=1e-12)

    # Decoder: the transpose of the dense matrix of its own weights.
    g = torch.randn(5, maps, Ho, Wo, dtype=F64)
    xr = kern.decode(g, w2, stride, (H, W))
    assert xr.shape == (5, channels, H, W)
    torch.testing.assert_close(xr.reshape(5, n_in), g.reshape(5, n_out) @ D2, rtol=1e-12, atol=1e-12)
    Jd = kern.decode(torch.eye(n_out, dtype=F64).view(n_out, maps, Ho, Wo), w2, stride, (H, W)).reshape(n_out, n_in)
    assert not Jd[~mask].any()
    torch.testing.assert_close(Jd, D2, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("field,stride,H,W", LC_CASES)
def test_auto_kernel_on_cuda_equals_dense_matrix(field, stride, H, W):
    kern = get_kernel("auto", "cuda")
    w1, w2 = (_weights((H, W), field, stride, 4, 3) for _ in range(2))
    D1, _ = dense_locally_connected(w1, (H, W), stride)
    D2, _ = dense_locally_connected(w2, (H, W), stride)
    Ho, Wo = w1.shape[:2]
    x = torch.randn(4, 3, H, W, dtype=F64)
    g = torch.randn(4, 4, Ho, Wo, dtype=F64)
    y = kern.encode(x.float().cuda(), w1.float().cuda(), stride).double().cpu()
    xr = kern.decode(g.float().cuda(), w2.float().cuda(), stride, (H, W)).double().cpu()
    torch.testing.assert_close(y.reshape(4, -1), x.reshape(4, -1) @ D1.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xr.reshape(4, -1), g.reshape(4, -1) @ D2, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- 2. gradients

@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("field,stride,H,W", [(3, 1, 5, 6), (3, 2, 7, 5), (2, 3, 8, 5)])
def test_gradcheck_encode_decode(kernel, field, stride, H, W):
    kern = get_kernel(kernel, "cpu")
    w = _weights((H, W), field, stride, 2, 2).requires_grad_()
    x = torch.randn(2, 2, H, W, dtype=F64, requires_grad=True)
    y = torch.randn(2, 2, *w.shape[:2], dtype=F64, requires_grad=True)
    assert gradcheck(lambda x, w: kern.encode(x, w, stride), (x, w))
    assert gradcheck(lambda y, w: kern.decode(y, w, stride, (H, W)), (y, w))


@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("size,stride", [(2, 1), (3, 2)])
def test_gradcheck_l2_pool(size, stride, separable):
    y = torch.randn(2, 3, 6, 7, dtype=F64, requires_grad=True)
    with torch.no_grad():
        y[0, 0, :3, :3] = 0.0  # an all-zero window: the sqrt is kept off zero by eps
    assert gradcheck(lambda y: l2_pool(y, size, stride, 0.01, separable), (y,))


@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("c,branch", [(1e-4, "std"), (1e3, "c")])
def test_gradcheck_lcn_both_branches(c, branch, separable):
    x = torch.randn(2, 3, 5, 6, dtype=F64, requires_grad=True)
    _, std = naive_lcn(x.detach().numpy(), 3, 1.0, c)
    # Away from the kink of max(c, std): every location on the stated side.
    assert (std > 10 * c).all() if branch == "std" else (std < c / 10).all()
    lcn = LocalContrastNorm(3, (5, 6), 3, 1.0, c, separable).double()
    assert gradcheck(lcn, (x,))


def tiny_config(stage_gradients="local", stages=3, image_size=12, **model):
    fields = [3, 4, 3][:stages]
    return config_from_dict({"preset": "tiny", "model": {
        "image_size": image_size, "channels": 1, "stage_gradients": stage_gradients, **model,
        "stages": [{"receptive_field": f, "stride": 1, "maps": 2, "pool_size": 2, "pool_stride": 1,
                    "lcn_size": 3, "lcn_sigma": 1.0} for f in fields]}})


def tiny_net(stage_gradients="local", stages=3, image_size=12, **model):
    cfg = tiny_config(stage_gradients, stages, image_size, **model)
    return cfg, Network(cfg.model, generator=torch.Generator().manual_seed(1)).double()


def _stage_objective(stage, x, enc, dec):
    _, _, terms = functional_call(stage, {"filter.encoder": enc, "filter.decoder": dec}, (x,))
    return terms["reconstruction"] + terms["sparsity"]


def test_gradcheck_stage_objective():
    _, net = tiny_net(stages=1, image_size=7)
    stage = net.stages[0]
    x = torch.randn(2, 1, 7, 7, dtype=F64, requires_grad=True)
    enc = stage.filter.encoder.detach().clone().requires_grad_()
    dec = stage.filter.decoder.detach().clone().requires_grad_()
    assert gradcheck(lambda x, e, d: _stage_objective(stage, x, e, d), (x, enc, dec))


def test_gradcheck_network_objective_joint():
    _, net = tiny_net("joint")
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]
    x = torch.randn(2, 1, 12, 12, dtype=F64, requires_grad=True)

    def loss(x, *ps):
        return functional_call(net, dict(zip(names, ps)), (x,)).loss

    # Full (element-by-element) Jacobian check wrt the input and the last stage; random projections for
    # all parameters together (every element perturbed, far cheaper than ~9k single-element checks).
    last = [i for i, n in enumerate(names) if n.startswith("stages.2.")]
    assert gradcheck(lambda x, *pl: loss(x, *[pl[last.index(i)] if i in last else params[i].detach()
                                              for i in range(len(params))]),
                     (x, *[params[i] for i in last]))
    assert gradcheck(loss, (x, *params), fast_mode=True)


def test_local_gradients_are_each_stage_objective_on_its_own_input():
    _, net = tiny_net("local")
    x = torch.randn(2, 1, 12, 12, dtype=F64)
    out = net(x)
    out.loss.backward()
    inputs = [x] + [out.stages[s]["lcn"].detach() for s in range(len(net.stages) - 1)]
    for s, stage in enumerate(net.stages):
        enc = stage.filter.encoder.detach().clone().requires_grad_()
        dec = stage.filter.decoder.detach().clone().requires_grad_()
        # element-wise checks of a stage objective: test_gradcheck_stage_objective; here projections
        assert gradcheck(lambda e, d: _stage_objective(stage, inputs[s], e, d), (enc, dec), fast_mode=True)
        g_enc, g_dec = torch.autograd.grad(_stage_objective(stage, inputs[s], enc, dec), (enc, dec))
        torch.testing.assert_close(stage.filter.encoder.grad, g_enc, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stage.filter.decoder.grad, g_dec, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["local", "joint"])
def test_later_objectives_reach_earlier_stages_only_when_joint(mode):
    _, net = tiny_net(mode)
    out = net(torch.randn(2, 1, 12, 12, dtype=F64))
    stage1_objective = out.terms[1]["reconstruction"] + out.terms[1]["sparsity"]
    g = torch.autograd.grad(stage1_objective, net.stages[0].filter.encoder, allow_unused=True,
                            retain_graph=True)[0]
    if mode == "local":
        assert g is None or not g.any()
    else:
        assert g is not None and g.abs().sum() > 0
    # The stage's own weights get a gradient either way.
    g1 = torch.autograd.grad(stage1_objective, net.stages[1].filter.encoder)[0]
    assert g1.abs().sum() > 0


# ---------------------------------------------------------------- 3. pooling and LCN against naive loops

@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("size,stride,H,W", [(3, 1, 6, 7), (3, 2, 7, 8), (2, 2, 6, 6), (5, 1, 5, 9)])
def test_l2_pool_matches_naive_loops(size, stride, H, W, separable):
    y = torch.randn(2, 3, H, W, dtype=F64)
    expected = naive_l2_pool(y.numpy(), size, stride, 0.01)
    got = l2_pool(y, size, stride, 0.01, separable)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("maps,H,W,size,sigma", [(3, 6, 7, 5, 1.5), (1, 5, 4, 3, 1.0), (2, 4, 5, 9, 2.0)])
def test_lcn_matches_naive_loops(maps, H, W, size, sigma, separable):
    x = torch.randn(2, maps, H, W, dtype=F64) * 2 + 1
    _, std = naive_lcn(x.numpy(), size, sigma, 0.0)
    c = float(np.median(std))  # half the locations divide by c, half by their local std
    expected, std = naive_lcn(x.numpy(), size, sigma, c)
    assert (std > c).any() and (std < c).any()
    got = LocalContrastNorm(maps, (H, W), size, sigma, c, separable).double()(x)
    # The module keeps its window in float32 buffers (then casts), hence 1e-6, not 1e-12; a wrong
    # window, border renormalisation or order of operations is off by far more.
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- 4. shapes and parameter counts

def test_small_parameter_counts_match_built_network():
    cfg = load_config("small")
    net = Network(cfg.model)
    info = model_info(cfg)
    assert info["parameters"]["total"] == sum(p.numel() for p in net.parameters()) == net.num_parameters()
    assert info["parameters"]["encoder"] == sum(s.filter.encoder.numel() for s in net.stages)
    assert info["parameters"]["decoder"] == sum(s.filter.decoder.numel() for s in net.stages)
    assert len(info["stages"]) == len(net.stages) == 3
    for sh, stage in zip(info["stages"], net.stages):
        assert sh["encoder_params"] == stage.filter.encoder.numel()
        assert sh["decoder_params"] == stage.filter.decoder.numel()


def test_paper_parameter_counts_on_meta_device():
    cfg = load_config("paper")
    net = Network(cfg.model, device="meta")
    assert all(p.is_meta for p in net.parameters())  # nothing allocated for 2.4B weights
    enc = [s.filter.encoder.numel() for s in net.stages]
    assert enc == [260_410_464, 544_195_584, 412_252_416]  # docs/paper-notes.md: 183^2, 162^2, 141^2 outputs x 8 maps
    # the same from the formula (filter output^2 * maps * input channels * field^2)
    assert enc == [183 ** 2 * 8 * 3 * 18 ** 2, 162 ** 2 * 8 * 8 * 18 ** 2, 141 ** 2 * 8 * 8 * 18 ** 2]
    assert [s.filter.decoder.numel() for s in net.stages] == enc
    info = model_info(cfg)
    assert info["parameters"] == {"encoder": 1_216_858_464, "decoder": 1_216_858_464, "total": 2_433_716_928}
    assert [s["encoder_params"] for s in info["stages"]] == enc
    assert [s["filter"] for s in info["stages"]] == [(8, 183, 183), (8, 162, 162), (8, 141, 141)]


@pytest.mark.parametrize("variant", [{}, {"model.lcn": False}, {"model.kind": "sigmoid_ae"},
                                     {"model.stages.0.stride": 2, "model.stages.1.pool_stride": 2,
                                      "model.stages.2.receptive_field": 2, "model.stages.2.pool_size": 1}])
def test_forward_shapes_equal_stage_shapes(variant):
    cfg = load_config("small", dict(variant))
    net = Network(cfg.model)
    out = net(torch.randn(2, 1, 32, 32), objective=False)
    shapes = stage_shapes(cfg.model)
    assert len(out.stages) == len(shapes)
    for sh, acts in zip(shapes, out.stages):
        assert tuple(acts["filter"].shape) == (2, *sh.filter)
        if "pool" in acts:
            assert tuple(acts["pool"].shape) == (2, *sh.pool)
        if "lcn" in acts:
            assert tuple(acts["lcn"].shape) == (2, *sh.output)
    assert [(s, name) for s, name, _ in net.sublayers()] == [(s, n) for s, a in enumerate(out.stages) for n in a]
    assert [shape for _, _, shape in net.sublayers()] == [tuple(a.shape[1:]) for acts in out.stages
                                                          for a in acts.values()]


# ---------------------------------------------------------------- 6. objective values

def test_objective_equals_manual_computation():
    cfg, net = tiny_net("local")
    lam, eps = cfg.model.sparsity, cfg.model.pool_eps
    B = 3
    x = torch.randn(B, 1, 12, 12, dtype=F64)
    with torch.no_grad():
        out = net(x)
    stage_in = x
    total = 0.0
    for s, (stage, sc) in enumerate(zip(net.stages, cfg.model.stages)):
        hw = stage_in.shape[-2:]
        D1, _ = dense_locally_connected(stage.filter.encoder, hw, sc.stride)
        D2, _ = dense_locally_connected(stage.filter.decoder, hw, sc.stride)
        flat = stage_in.reshape(B, -1)
        y = flat @ D1.T
        rec = y @ D2  # decoder = D(W2)^T applied to y
        reconstruction = ((rec - flat) ** 2).sum() / B
        sh = net.shapes[s]
        pool = naive_l2_pool(y.reshape(B, *sh.filter).numpy(), sc.pool_size, sc.pool_stride, eps)
        sparsity = lam * pool.sum() / B
        assert float(out.terms[s]["reconstruction"]) == pytest.approx(float(reconstruction), rel=1e-10)
        assert float(out.terms[s]["sparsity"]) == pytest.approx(sparsity, rel=1e-10)
        np.testing.assert_allclose(out.stages[s]["pool"].numpy(), pool, rtol=1e-10)
        total += float(reconstruction) + sparsity
        stage_in = out.stages[s]["lcn"].detach()
    assert float(out.loss) == pytest.approx(total, rel=1e-10)


def test_sigmoid_autoencoder_objective():
    cfg, net = tiny_net("local", stages=2, kind="sigmoid_ae")
    x = torch.randn(2, 1, 12, 12, dtype=F64)
    with torch.no_grad():
        out = net(x)
    stage_in = x
    for s, stage in enumerate(net.stages):
        D1, _ = dense_locally_connected(stage.filter.encoder, stage_in.shape[-2:], 1)
        D2, _ = dense_locally_connected(stage.filter.decoder, stage_in.shape[-2:], 1)
        flat = stage_in.reshape(2, -1)
        h = torch.sigmoid(flat @ D1.T)
        expected = (((h @ D2) - flat) ** 2).sum() / 2
        assert float(out.terms[s]["reconstruction"]) == pytest.approx(float(expected), rel=1e-10)
        assert float(out.terms[s]["sparsity"]) == 0.0
        stage_in = out.stages[s]["filter"].detach()


def test_tied_weights_decode_with_the_encoder_and_input_lcn_whitens_locally():
    x = torch.randn(3, 1, 12, 12, dtype=torch.float64)
    (_, tied), (_, untied) = tiny_net(tied=True), tiny_net()
    untied.load_state_dict(tied.state_dict())
    loss = tied(x).loss
    with torch.no_grad():
        for net in (tied, untied):
            for st in net.stages:
                st.filter.decoder.mul_(3.0)  # the tied network never reads its decoder tensor
    assert torch.equal(tied(x).loss, loss) and not torch.allclose(untied(x).loss, loss)
    f = tied.stages[0].filter
    y = f.encode(x)
    torch.testing.assert_close(f.decode(y), get_kernel("reference", x.device).decode(y, f.encoder, f.stride, f.in_hw))
    cfg, lcn = tiny_net(input_norm="lcn")
    (_, plain), s0 = tiny_net(), cfg.model.stages[0]
    img = torch.randint(0, 255, (2, 1, 12, 12), dtype=torch.uint8)
    ref = LocalContrastNorm(1, (12, 12), s0.lcn_size, s0.lcn_sigma, cfg.model.lcn_c).double()
    torch.testing.assert_close(lcn.prepare(img), ref(plain.prepare(img)))
