"""Spatial partitioning of one model replica: which worker owns which block of every layer, and the halos.

The paper's model parallelism ("a single instance of the model partitions the neurons and weights out
across 169 machines") works because every unit sees only a local window of the layer below. Here a
replica is cut by a grid of R x C blocks (`Partition`, P = R * C workers, rank = i * C + j). Every
sublayer of every stage is split by the same row and column weights, so worker (i, j) owns

    - a block of the stage's input (for stage 0, a block of image pixels; later, the previous stage's
      output block): the pixels whose reconstruction error it sums, each pixel exactly once;
    - a block of the locally connected output locations: their W1 and W2 slices and y = W1 x there;
    - a block of the pooling (and LCN) output locations: p and z there.

What a worker needs from its neighbours (its "need" rectangles, in the global coordinates of a layer):

    encoder   locations [f0, f1) read input rows [f0*s, (f1-1)*s + k)        receptive field k, stride s
    decoder   writes its partial reconstruction over the same rows: the parts that fall in a neighbour's
              input block are sent to that neighbour and summed there (the adjoint of the encoder halo)
    pooling   outputs [p0, p1) read filter rows [p0*ps, (p1-1)*ps + q)          pool size q, stride ps
    LCN       outputs [p0, p1) read pooled rows [p0 - 2r, p1 + 2r), r = lcn_size // 2, clipped to the
              layer: the subtractive step is computed on [p0 - r, p1 + r), the divisive one on [p0, p1)

(the same for columns). Blocks may be unequal (`weights`); a block may be smaller than a halo, in
which case it is read from more than one neighbour: every exchange below is computed as the
intersection of one worker's owned block with another's needed rectangle, nothing assumes neighbours.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from grandmother.errors import ConfigError


@dataclass(frozen=True)
class Rect:
    """Rows [r0, r1) x columns [c0, c1) of a layer (global coordinates)."""
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def h(self) -> int:
        return self.r1 - self.r0

    @property
    def w(self) -> int:
        return self.c1 - self.c0

    @property
    def area(self) -> int:
        return self.h * self.w

    def intersect(self, other: "Rect") -> "Rect | None":
        r0, r1 = max(self.r0, other.r0), min(self.r1, other.r1)
        c0, c1 = max(self.c0, other.c0), min(self.c1, other.c1)
        return Rect(r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None

    def within(self, origin: "Rect") -> tuple[slice, slice]:
        """This rectangle as (row, column) slices of a tensor that holds `origin`."""
        return (slice(self.r0 - origin.r0, self.r1 - origin.r0), slice(self.c0 - origin.c0, self.c1 - origin.c0))

    def grow(self, before: int, after: int, size: tuple[int, int] | None = None) -> "Rect":
        """Widen by `before` rows/columns above/left and `after` below/right, clipped to `size` if given."""
        r = Rect(self.r0 - before, self.r1 + after, self.c0 - before, self.c1 + after)
        if size is not None:
            r = Rect(max(0, r.r0), min(size[0], r.r1), max(0, r.c0), min(size[1], r.c1))
        return r

    def window(self, field: int, stride: int) -> "Rect":
        """Input rectangle read by output locations `self` of a window `field` at `stride`."""
        return Rect(self.r0 * stride, (self.r1 - 1) * stride + field, self.c0 * stride, (self.c1 - 1) * stride + field)


def split(n: int, weights: tuple[float, ...], what: str) -> list[int]:
    """Boundaries of len(weights) consecutive blocks of [0, n), sizes proportional to the weights."""
    total = float(sum(weights))
    cum, bounds = 0.0, [0]
    for wgt in weights:
        cum += wgt
        bounds.append(int(n * cum / total + 0.5))
    bounds[-1] = n
    if any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:])):
        raise ConfigError(f"--partition: {what} has {n} rows/columns, too few for {len(weights)} blocks of "
                          f"weights {list(weights)} (every worker needs at least one); use fewer workers")
    return bounds


@dataclass(frozen=True)
class Partition:
    """An R x C grid of workers; optional relative block sizes along rows and columns."""
    rows: int
    cols: int
    row_weights: tuple[float, ...] = ()
    col_weights: tuple[float, ...] = ()

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise ConfigError(f"--partition {self.rows}x{self.cols}: both sides must be >= 1")
        for name, wts, n in (("row", self.row_weights, self.rows), ("column", self.col_weights, self.cols)):
            if wts and (len(wts) != n or any(w <= 0 for w in wts)):
                raise ConfigError(f"--partition: {len(wts)} {name} weights {list(wts)} for {n} {name}s "
                                  f"(need {n} positive numbers)")

    @property
    def size(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        s = f"{self.rows}x{self.cols}"
        if self.row_weights or self.col_weights:
            fmt = lambda w: ",".join(f"{x:g}" for x in w)
            s += f":{fmt(self.row_weights or (1,) * self.rows)}:{fmt(self.col_weights or (1,) * self.cols)}"
        return s

    @classmethod
    def parse(cls, text: str) -> "Partition":
        """"RxC", optionally ":w1,w2,...:v1,v2,..." (relative row and column block sizes), or "P" (P x 1)."""
        m = re.fullmatch(r"\s*(\d+)(?:x(\d+))?(?::([\d.,]+):([\d.,]+))?\s*", str(text))
        if not m:
            raise ConfigError(f"--partition {text!r}: expected RxC (e.g. 2x2), or RxC:ROW_WEIGHTS:COL_WEIGHTS "
                              f"(e.g. 2x1:1,3:1)")
        rows, cols = int(m.group(1)), int(m.group(2) or 1)
        try:
            rw = tuple(float(x) for x in m.group(3).split(",")) if m.group(3) else ()
            cw = tuple(float(x) for x in m.group(4).split(",")) if m.group(4) else ()
        except ValueError:
            raise ConfigError(f"--partition {text!r}: block weights must be numbers") from None
        cls(rows, cols, rw, cw)  # validates the weights
        even = lambda w: () if all(x == w[0] for x in w) else w  # equal weights: the plain grid
        return cls(rows, cols, even(rw) if rw else (), even(cw) if cw else ())

    @classmethod
    def for_workers(cls, p: int) -> "Partition":
        """`--model-parallel P`: P row blocks (images are square, rows are contiguous in memory)."""
        return cls(p, 1)

    def blocks(self, h: int, w: int, what: str) -> list[Rect]:
        rb = split(h, self.row_weights or (1.0,) * self.rows, what)
        cb = split(w, self.col_weights or (1.0,) * self.cols, what)
        return [Rect(rb[i], rb[i + 1], cb[j], cb[j + 1]) for i in range(self.rows) for j in range(self.cols)]


@dataclass(frozen=True)
class StagePlan:
    """Owned and needed rectangles of one stage, one entry per worker (rank)."""
    index: int
    field: int
    stride: int
    pool_size: int
    pool_stride: int
    lcn_radius: int  # lcn_size // 2 (0 without LCN)
    lcn: bool
    pooled: bool  # False for the sigmoid autoencoder baseline (no pooling, no LCN)
    input_hw: tuple[int, int]
    filter_hw: tuple[int, int]
    output_hw: tuple[int, int]
    input_own: tuple[Rect, ...]  # pixels whose reconstruction error this worker sums
    filter_own: tuple[Rect, ...]  # locally connected locations: W1/W2 slices
    output_own: tuple[Rect, ...]  # pooling/LCN locations (the filter block without pooling)
    input_need: tuple[Rect, ...]  # encoder input = decoder footprint
    filter_need: tuple[Rect, ...]  # pooling input
    pool_need: tuple[Rect, ...]  # LCN input (pooled values), clipped to the layer

    @property
    def workers(self) -> int:
        return len(self.filter_own)


def plan_stages(model_cfg, partition: Partition) -> list[StagePlan]:
    """The partition of every stage of `model_cfg` (ConfigError if a block would be empty)."""
    from grandmother.nn.shapes import stage_shapes

    pooled = model_cfg.kind != "sigmoid_ae"
    plans, prev_own = [], None
    for sh, sc in zip(stage_shapes(model_cfg), model_cfg.stages):
        i = sh.index
        _, h, w = sh.input
        _, fh, fw = sh.filter
        _, oh, ow = sh.output
        input_own = prev_own or partition.blocks(h, w, f"the {h}x{w} input image")
        filter_own = partition.blocks(fh, fw, f"stage {i}'s {fh}x{fw} filter output")
        input_need = [f.window(sh.receptive_field, sh.stride) for f in filter_own]
        if pooled:
            output_own = partition.blocks(oh, ow, f"stage {i}'s {oh}x{ow} pooled output")
            filter_need = [o.window(sc.pool_size, sc.pool_stride) for o in output_own]
            radius = sc.lcn_size // 2 if model_cfg.lcn else 0
            pool_need = [o.grow(2 * radius, 2 * radius, (oh, ow)) for o in output_own]
        else:
            output_own, filter_need, pool_need, radius = filter_own, filter_own, filter_own, 0
        lcn = pooled and model_cfg.lcn
        plans.append(StagePlan(i, sh.receptive_field, sh.stride, sc.pool_size, sc.pool_stride, radius, lcn, pooled,
                               (h, w), (fh, fw), (oh, ow), tuple(input_own), tuple(filter_own), tuple(output_own),
                               tuple(input_need), tuple(filter_need), tuple(pool_need)))
        prev_own = output_own
    return plans


@dataclass(frozen=True)
class Exchange:
    """One halo exchange as seen by worker `rank`: it owns `own` of a layer and needs `need` of it.

    sends: (peer, rect of my owned block that peer needs); recvs: (peer, rect of my need that peer owns).
    Used forwards as a gather (owners -> needers) and, for reconstructions, as its adjoint (partial sums
    of needers -> owners, added there).
    """
    rank: int
    own: Rect
    need: Rect
    sends: tuple[tuple[int, Rect], ...]
    recvs: tuple[tuple[int, Rect], ...]
    label: str

    @property
    def local(self) -> Rect | None:
        return self.own.intersect(self.need)


def exchange(owns, needs, rank: int, label: str) -> Exchange:
    sends, recvs = [], []
    for peer in range(len(owns)):
        if peer == rank:
            continue
        out = owns[rank].intersect(needs[peer])
        if out is not None:
            sends.append((peer, out))
        inc = owns[peer].intersect(needs[rank])
        if inc is not None:
            recvs.append((peer, inc))
    return Exchange(rank, owns[rank], needs[rank], tuple(sends), tuple(recvs), label)


def halo_elements(owns, needs) -> list[int]:
    """Per worker: locations (rows x columns) it sends in one gather of this layer."""
    return [sum(r.area for _, r in exchange(owns, needs, k, "").sends) for k in range(len(owns))]


def check_partition(cfg) -> None:
    """One-line ConfigError when train.partition cannot split this network (a no-op without one)."""
    if cfg.train.partition:
        plan_stages(cfg.model, Partition.parse(cfg.train.partition))
