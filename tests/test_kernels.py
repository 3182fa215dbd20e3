"""Fast locally connected kernels: each equals the reference (float64, forward and both backward
primitives, tiles of every size), and `grandmother bench` runs end to end on a tiny shape."""
from __future__ import annotations

import json

import pytest
import torch

from grandmother.commands import main as cli
from grandmother.config import load_config
from grandmother.nn.kernels import get_kernel, kernel_names

F64 = torch.float64
FAST = [k for k in kernel_names("cpu") if k != "reference"]

# (batch, channels, H, W, maps, field, stride): non-square, strides that leave uncovered rows/cols
SHAPES = [(3, 1, 9, 11, 2, 3, 1), (2, 3, 12, 10, 4, 4, 2), (4, 2, 13, 13, 3, 5, 3), (1, 3, 8, 8, 8, 8, 1),
          (5, 2, 10, 7, 1, 2, 2), (2, 2, 7, 10, 3, 3, 1)]


class ReferencePrimitives:
    """The three primitives from the reference kernel and autograd: encode, decode, d<encode(x,w), gy>/dw."""

    def __init__(self):
        self.k = get_kernel("reference", "cpu")

    def forward(self, x, w, s):
        return self.k.encode(x, w, s)

    def backward_input(self, gy, w, s, in_hw):
        return self.k.decode(gy, w, s, in_hw)

    def backward_weight(self, x, gy, s, field):
        w = torch.zeros(*gy.shape[2:], gy.shape[1], x.shape[1], field, field, dtype=x.dtype, requires_grad=True)
        return torch.autograd.grad((self.k.encode(x, w, s) * gy).sum(), w)[0]


@pytest.fixture(params=["one_tile", "row_tiles"])
def tile_budget(request, monkeypatch):
    """Run each case with the normal budget (one tile) and a budget of one output row per tile."""
    if request.param == "row_tiles":
        import grandmother.nn.kernels.base as base
        monkeypatch.setattr(base, "TILE_BYTES", {"cpu": 1, "cuda": 1})
    return request.param


def test_a_fast_cpu_kernel_is_registered_and_auto_picks_it():
    assert FAST, "no fast CPU kernel registered"
    assert get_kernel("auto", "cpu").name != "reference"


@pytest.mark.parametrize("kernel", FAST)
@pytest.mark.parametrize("B,C,H,W,M,k,s", SHAPES)
def test_primitives_equal_reference_float64(kernel, B, C, H, W, M, k, s, tile_budget):
    ref, fast = ReferencePrimitives(), get_kernel(kernel, "cpu")
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    x = torch.randn(B, C, H, W, dtype=F64)
    w = torch.randn(Ho, Wo, M, C, k, k, dtype=F64)
    gy = torch.randn(B, M, Ho, Wo, dtype=F64)
    torch.testing.assert_close(fast.forward(x, w, s), ref.forward(x, w, s), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.backward_input(gy, w, s, (H, W)), ref.backward_input(gy, w, s, (H, W)),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.backward_weight(x, gy, s, k), ref.backward_weight(x, gy, s, k),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tied", ["false", "true"])
@pytest.mark.parametrize("kernel", FAST)
def test_whole_network_gradients_equal_reference(kernel, tied):
    """The kernel inside the model: same objective and same parameter gradients as the reference, with
    untied W1/W2 (the paper) and tied weights (the small preset's default; W2 then gets no gradient)."""
    from grandmother.nn.model import Network
    cfg = load_config("small", ["model.image_size=20", "model.stages.*.receptive_field=4", "model.stages.*.maps=2",
                                "model.stages.*.pool_size=2", "model.stages.*.lcn_size=3", f"model.tied={tied}"])
    x = torch.randn(3, cfg.model.channels, 20, 20, dtype=F64)
    grads = {}
    for name in ("reference", kernel):
        cfg.model.kernel = name
        net = Network(cfg.model, generator=torch.Generator().manual_seed(0)).double()
        loss = net(x, objective=True).loss
        loss.backward()
        grads[name] = (loss.detach(), [None if p.grad is None else p.grad.clone() for p in net.parameters()])
    torch.testing.assert_close(grads[kernel][0], grads["reference"][0], rtol=1e-10, atol=1e-10)
    assert sum(g is not None for g in grads["reference"][1]) >= (3 if tied == "true" else 6)
    for a, b in zip(grads[kernel][1], grads["reference"][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bench_runs_on_a_tiny_shape(capsys, monkeypatch, tmp_path):
    """CI-sized bench (with --peers): every kernel, every step kind, sane numbers; timings are not asserted.
    Without the Keras environment (pointed at a missing one here) that peer is skipped in one line, and the
    rest runs (the Keras peer's own tests: tests/test_bench.py)."""
    monkeypatch.setenv("GRANDMOTHER_KERAS_PYTHON", str(tmp_path / "no-keras" / "python"))
    tiny = ["--set", "model.image_size=16", "--set", "model.stages.*.receptive_field=4",
            "--set", "model.stages.*.maps=2", "--set", "model.stages.*.pool_size=2",
            "--set", "model.stages.*.lcn_size=3"]
    assert cli(["bench", "--preset", "small", "--batch-size", "4", "--repeats", "1", "--json", "--peers", *tiny]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    skip = [line for line in captured.err.splitlines() if "Keras" in line]
    assert len(skip) == 1 and "no-keras" in skip[0] and "scripts/keras_peer.sh" in skip[0], captured.err
    assert "no-keras" in out["keras_peer"]["skipped"]
    # --peers: one layer per stage for every kernel, the unfold peer and conv2d
    assert {(r["stage"], r["impl"]) for r in out["peers"]} == {
        (s, i) for s in range(3) for i in [*kernel_names("cpu"), "unfold", "conv2d"]}
    for r in out["peers"]:
        assert r["seconds"] > 0 and abs(r["fraction_of_matmul"] - r["gflops"] / out["matmul_gflops"]) < 1e-9
    assert out["matmul_gflops"] > 0 and out["copy_gbs"] > 0 and out["rest_of_train_step_seconds"] > 0
    impls = {r["impl"] for r in out["rows"]}
    assert impls == set(kernel_names("cpu"))
    assert {r["step"] for r in out["rows"]} == {"lc_layers", "forward", "forward_backward", "train"}
    for r in out["rows"]:
        assert r["images_per_s"] > 0 and r["gflops"] > 0 and r["peak_memory_bytes"] > 0
        assert abs(r["fraction_of_matmul"] - r["gflops"] / out["matmul_gflops"]) < 1e-9
    assert cli(["bench", "--preset", "small", "--batch-size", "2", "--repeats", "1", "--peers", *tiny]) == 0
    table = capsys.readouterr().out
    assert "of matmul" in table and "tiled" in table and "locally connected maps skipped" in table
    assert "best/unfold" in table and "conv2d" in table
    assert [line for line in table.splitlines() if "Keras" in line and "skipped" in line] == [
        f"Keras peer skipped: {out['keras_peer']['skipped']}"]
    assert "keras-i2" not in table and "best/keras" not in table


def test_unfold_peer_computes_the_layer():
    """The benchmark's community-pattern peer is the same layer as the reference kernel (its own weight layout)."""
    from grandmother.bench.peers import unfold_lc
    x, w = torch.randn(2, 3, 9, 7, dtype=F64), torch.randn(3, 2, 4, 3, 4, 4, dtype=F64)  # Ho, Wo = 3, 2 at stride 2
    wu = w.permute(2, 3, 0, 1, 4, 5).reshape(1, 4, 3, 3, 2, 16)
    torch.testing.assert_close(unfold_lc(x, wu, 2), get_kernel("reference").encode(x, w, 2))


def test_bench_bad_flags_are_one_line(capsys):
    assert cli(["bench", "--kernel", "nosuch"]) == 2
    assert "--kernel nosuch" in capsys.readouterr().err
    assert cli(["bench", "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli(["bench", "--device", "cuda"]) == 2
        assert "--device cuda" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("B,C,H,W,M,k,s", SHAPES)
def test_cuda_kernel_equals_reference_float64(B, C, H, W, M, k, s):
    ref, fast = ReferencePrimitives(), get_kernel("auto", "cuda")
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    x, w = torch.randn(B, C, H, W, dtype=F64), torch.randn(Ho, Wo, M, C, k, k, dtype=F64)
    gy = torch.randn(B, M, Ho, Wo, dtype=F64)
    cu = lambda t: t.cuda()  # noqa: E731
    torch.testing.assert_close(fast.forward(cu(x), cu(w), s).cpu(), ref.forward(x, w, s))
    torch.testing.assert_close(fast.backward_input(cu(gy), cu(w), s, (H, W)).cpu(), ref.backward_input(gy, w, s, (H, W)))
    torch.testing.assert_close(fast.backward_weight(cu(x), cu(gy), s, k).cpu(), ref.backward_weight(x, gy, s, k))


# ---------------------------------------------------------------- the native (C++) kernel

def test_native_kernel_builds_and_loads(tmp_path, monkeypatch):
    """A fresh build (own cache directory) compiles, loads and reports its vector width."""
    import shutil
    from grandmother.nn.kernels import native
    if shutil.which(native._compiler()) is None:
        pytest.skip(f"no C++ compiler ({native._compiler()}): the native kernel is not built here")
    monkeypatch.setenv("GRANDMOTHER_CACHE", str(tmp_path))
    path = native.build()
    assert path.parent == tmp_path / "native" and path.exists()
    assert native.build() == path  # cached: same file, no rebuild
    lib = native._load(path)
    assert lib.gm_lanes(4) in (4, 8, 16) and lib.gm_lanes(8) == lib.gm_lanes(4) // 2
    assert "native" in kernel_names("cpu") and get_kernel("auto", "cpu").name == "native"


def test_native_build_failure_is_one_line_and_auto_falls_back(tmp_path, monkeypatch, capsys):
    from grandmother.nn.kernels import native
    monkeypatch.setenv("GRANDMOTHER_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-gm")
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler"):
        native.build()
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.raises(RuntimeError) as e:
        native.build(force=True)
    assert "\n" not in str(e.value) and "failed" in str(e.value)
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "native kernel unavailable" in err[0] and "using rowshift" in err[0]
    assert "native" not in kernel_names("cpu") and get_kernel("auto", "cpu").name == "rowshift"


@pytest.mark.skipif("native" not in FAST, reason="native kernel not built here (no compiler or build failed)")
@pytest.mark.parametrize("B,C,H,W,M,k,s", [(13, 1, 20, 17, 8, 8, 1), (11, 3, 15, 15, 5, 6, 1), (9, 8, 12, 13, 8, 4, 2),
                                           (17, 2, 11, 9, 3, 3, 1)])
def test_native_float32_equals_reference(B, C, H, W, M, k, s):
    """float32 takes the 8-wide paths (tile transposes, vector tails) that float64's 4-wide ones do not."""
    ref, fast = ReferencePrimitives(), get_kernel("native", "cpu")
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    x, w, gy = torch.randn(B, C, H, W), torch.randn(Ho, Wo, M, C, k, k), torch.randn(B, M, Ho, Wo)
    d = lambda t: t.double()  # noqa: E731
    tol = dict(rtol=1e-4, atol=1e-4 * (C * k * k) ** 0.5)
    torch.testing.assert_close(fast.forward(x, w, s).double(), ref.forward(d(x), d(w), s), **tol)
    torch.testing.assert_close(fast.backward_input(gy, w, s, (H, W)).double(),
                               ref.backward_input(d(gy), d(w), s, (H, W)), **tol)
    torch.testing.assert_close(fast.backward_weight(x, gy, s, k).double(), ref.backward_weight(d(x), d(gy), s, k),
                               **tol)


def test_bench_times_the_trainers_step_with_the_configs_optimizer():
    """`bench --set train.optimizer=sgd` times SGD: the bench's train step is train.train_step with the
    config's optimizer (it used to hard-code Adagrad)."""
    from grandmother.bench.kernels import _step_functions
    cfg = load_config("small", ["model.image_size=16", "model.stages.*.receptive_field=4", "model.stages.*.maps=2",
                                "model.stages.*.pool_size=2", "model.stages.*.lcn_size=3",
                                "train.optimizer=sgd", "train.momentum=0", "train.lr=0.1",
                                "train.norm_control=none", "model.tied=false"])  # plain SGD on every weight
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    net, _, _, train = _step_functions(cfg, images, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.zero_grad()
    net(net.prepare(images), objective=True).loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    train()
    for n, p in net.named_parameters():  # one plain SGD step: p - lr * grad
        assert torch.allclose(p.detach(), before[n] - 0.1 * grads[n], rtol=1e-5, atol=1e-7), n
