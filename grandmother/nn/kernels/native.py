"""Native locally connected kernel (CPU): the three primitives in C++ with OpenMP, built on first use.

The structure of the problem (see native_lc.cpp): every output location has its own (M x k*k*C) weight
block, used by all B images. So the batch is laid innermost (vectors run over images), a location's
weights are packed once into the order the loop reads them and stay in L1 while every batch tile goes
by, and an (up to) 4-row x 3-vector block of results stays in registers while the k field rows stream
past (the k row shifts of the rowshift kernel fused into one loop). The input gradient is a gather:
each input pixel sums, over the locations whose field covers it, their weights times their output
gradients, so every result is written once (no k^2 scattered adds). The weight gradient runs over the
batch with the input channels last, so a field row's k*C entries are vectors.

Build: `g++ -O3 -march=native -fopenmp` into a shared library, loaded with ctypes (no PyTorch headers:
`torch/extension.h` alone took 40 CPU-seconds to compile on the 2-core CI machine; this builds in a
few seconds). Cached under $GRANDMOTHER_CACHE (default ~/.cache/grandmother)/native/, keyed by the
source, the compiler and the CPU's flags; written to a temporary name and renamed, so concurrent first
uses are safe. The cache heals itself: beside each library lies its SHA-256, checked before the library
is mapped (a truncated file would crash the process with SIGBUS inside dlopen), and a library whose
digest does not match, that does not load, or that lacks one of the kernel's symbols is rebuilt, with one
line. Temporary files of builds whose process has died are removed by the next build. The OpenMP
runtime is the one PyTorch already loaded (same libgomp.so.1), so the two share threads instead of
spinning against each other. When the build fails (no compiler, an error),
one line says why and `auto` falls back to the next kernel (rowshift).

float32 and float64 on CPU; any other dtype or device goes to the rowshift kernel (its parent).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from grandmother.io import pid_alive
from grandmother.nn.kernels.base import register_kernel
from grandmother.nn.kernels.rowshift import RowShiftKernel

SOURCE = Path(__file__).with_name("native_lc.cpp")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-std=gnu++17", "-shared", "-fPIC"]

_lock = threading.Lock()
_state: dict = {}  # "lib" (ctypes.CDLL) or "error" (str), once tried


def cache_dir() -> Path:
    return Path(os.environ.get("GRANDMOTHER_CACHE") or Path.home() / ".cache" / "grandmother") / "native"


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.machine()


def _build_key(cxx_path: str) -> str:
    version = subprocess.run([cxx_path, "--version"], capture_output=True, text=True, timeout=60).stdout
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


SYMBOLS = ("gm_forward", "gm_backward_input", "gm_backward_weight", "gm_lanes")
TEMP_PREFIX = ".build-"  # .build-PID-XXXX.so while a build runs; PID tells a dead build's leftovers


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_file(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _intact(lib: Path) -> bool:
    """The cached library is the file its build wrote: its SHA-256 matches the one written beside it."""
    try:
        return _digest_file(lib).read_text().strip() == _digest(lib)
    except OSError:
        return False


def _remove_dead_builds(folder: Path) -> None:
    """Temporary files left by builds that were killed (their PID is gone), and the `tmp*.so` of older
    versions of this module, which carried no PID."""
    for f in folder.iterdir():
        pid = None
        if f.name.startswith(TEMP_PREFIX):
            try:
                pid = int(f.name[len(TEMP_PREFIX):].split("-", 1)[0])
            except ValueError:
                pid = None
        elif not (f.name.startswith("tmp") and f.name.endswith(".so")):
            continue
        if pid is None or not pid_alive(pid):
            try:
                f.unlink()
            except OSError:
                pass


def build(force: bool = False) -> Path:
    """Compile (or find cached) the shared library; returns its path. Raises RuntimeError with one line.
    A cached library whose digest does not match is rebuilt (with one line on stderr)."""
    cxx = shutil.which(_compiler())
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({_compiler()!r} not found on PATH)")
    out = cache_dir() / f"native_lc_{_build_key(cxx)}.so"
    if out.exists() and not force:
        if _intact(out):
            return out
        print(f"grandmother: native kernel: the cached {out} is damaged (its SHA-256 does not match); rebuilding",
              file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(out.parent)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".so", dir=out.parent)
    os.close(fd)
    side_fd, side_tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".sha256", dir=out.parent)
    os.close(side_fd)
    try:
        r = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            lines = [ln for ln in (r.stderr or r.stdout).splitlines() if "error" in ln] or (r.stderr or "").splitlines()
            raise RuntimeError(f"{Path(cxx).name} failed: {lines[0].strip() if lines else f'exit {r.returncode}'}")
        Path(side_tmp).write_text(_digest(Path(tmp)) + "\n")
        os.replace(tmp, out)
        os.replace(side_tmp, _digest_file(out))
    finally:
        for t in (tmp, side_tmp):
            if os.path.exists(t):
                os.unlink(t)
    return out


def _load(path: Path) -> ctypes.CDLL:
    """The library with its argument types set. RuntimeError naming the file when it does not load or
    lacks one of the kernel's symbols (a foreign library under the cached name)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise RuntimeError(f"{path} does not load ({str(e).splitlines()[0] if str(e) else 'OSError'})") from None
    missing = [name for name in SYMBOLS if not hasattr(lib, name)]
    if missing:
        import _ctypes
        _ctypes.dlclose(lib._handle)  # else the loader hands back this same library for the rebuilt file
        raise RuntimeError(f"{path} is not this kernel's library (no symbol {missing[0]})")
    p, i64p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    for name in SYMBOLS[:3]:
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_int, p, p, p, i64p, ctypes.c_int]
        fn.restype = ctypes.c_int
    lib.gm_lanes.argtypes, lib.gm_lanes.restype = [ctypes.c_int], ctypes.c_int
    return lib


def _build_and_load() -> ctypes.CDLL:
    path = build()
    try:
        return _load(path)
    except RuntimeError as e:  # intact by its digest, yet unusable: rebuild once, then give up
        print(f"grandmother: native kernel: {e}; rebuilding", file=sys.stderr)
        return _load(build(force=True))


def library() -> ctypes.CDLL | None:
    """The loaded library, building it on first call; None (after one line on stderr) when that fails."""
    with _lock:
        if not _state:
            try:
                _state["lib"] = _build_and_load()
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                _state["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"grandmother: native kernel unavailable ({_state['error']}); using rowshift", file=sys.stderr)
        return _state.get("lib")


def build_error() -> str | None:
    library()
    return _state.get("error")


def available() -> bool:
    return library() is not None


def _supported(*tensors) -> bool:
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors) \
        and len({t.dtype for t in tensors}) == 1


class NativeKernel(RowShiftKernel):
    name = "native"

    def workspace_bytes(self, batch, in_chw, maps, field, stride, device_type, element_size=4):
        if device_type != "cpu":
            return super().workspace_bytes(batch, in_chw, maps, field, stride, device_type, element_size)
        c, h, w = in_chw
        ho, wo = (h - field) // stride + 1, (w - field) // stride + 1
        pad = max(1, 4 // c) - 1  # the gather's zero columns (native_lc.cpp: backward_input)
        # batch-last input and output copies, and the weights laid out by field row (kept per calling
        # thread between calls, so they are not page-faulted in again every call)
        copies = (batch + 16) * (c * h * w + ho * wo * maps)
        return element_size * (copies + ho * wo * maps * c * field * (field + 2 * pad))

    def _call(self, fn, a, b, out, B, C, H, W, M, k, stride, Ho, Wo):
        L = library().gm_lanes(a.element_size())
        a, b = a.contiguous(), b.contiguous()
        dims = (ctypes.c_int64 * 10)(-(-B // L) * L, B, C, H, W, M, k, stride, Ho, Wo)
        if fn(a.element_size(), a.data_ptr(), b.data_ptr(), out.data_ptr(), dims, torch.get_num_threads()) != 0:
            raise RuntimeError(f"native kernel: unsupported element size {a.element_size()}")
        return out

    def forward(self, x, w, stride):
        if not _supported(x, w) or library() is None:
            return super().forward(x, w, stride)
        Ho, Wo, M, C, k, _ = w.shape
        B, _, H, W = x.shape
        return self._call(library().gm_forward, x, w, x.new_empty(B, M, Ho, Wo), B, C, H, W, M, k, stride, Ho, Wo)

    def backward_input(self, gy, w, stride, in_hw):
        if not _supported(gy, w) or library() is None:
            return super().backward_input(gy, w, stride, in_hw)
        Ho, Wo, M, C, k, _ = w.shape
        B = gy.shape[0]
        H, W = in_hw
        return self._call(library().gm_backward_input, gy, w, gy.new_empty(B, C, H, W), B, C, H, W, M, k, stride,
                          Ho, Wo)

    def backward_weight(self, x, gy, stride, field):
        if not _supported(x, gy) or library() is None:
            return super().backward_weight(x, gy, stride, field)
        B, C, H, W = x.shape
        _, M, Ho, Wo = gy.shape
        return self._call(library().gm_backward_weight, x, gy, x.new_empty(Ho, Wo, M, C, field, field), B, C, H, W,
                          M, field, stride, Ho, Wo)


# Above rowshift (priority 20) on CPU, but only where the library built: `auto` then falls back to rowshift.
register_kernel("native", NativeKernel, devices=("cpu",), priority=30, available=available, why_not=build_error)
