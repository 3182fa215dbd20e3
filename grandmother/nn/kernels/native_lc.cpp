// Native CPU locally connected kernel: forward, input gradient (a gather) and weight gradient.
//
// Built on first use by grandmother/nn/kernels/native.py (g++ -O3 -march=native -fopenmp), called through
// ctypes with raw pointers; no PyTorch headers, so it builds in seconds. The entry points take and
// return PyTorch's layouts (x (B, C, H, W), w (Ho, Wo, M, C, k, k), y (B, M, Ho, Wo), all contiguous)
// and lay them out inside, in scratch memory kept per calling thread:
//
//   xb, yb (H, W, C, Bp), (Ho, Wo, M, Bp)  batch last, the batch padded with zeros to whole vectors
//                                          (register tile transposes: 8 x 8 float, 4 x 4 double)
//   wt     (Ho, Wo, k, k + 2 pad, C, M)    weights by field row and column, maps innermost
//   xr     (H, B, W, C)                    a field row's k*C entries contiguous per image
//
// Every product is one register-tiled loop (micro below): a block of MR rows x NV vectors of results
// stays in registers while a run of "steps" streams by; each step multiplies MR broadcast scalars by NV
// vectors read from one row. A location's weights are read in the order the loop runs and stay in L1
// while every batch tile goes by.
//
//   forward          per location: rows m, vectors over the batch, steps: the k field rows x the k*C
//                    entries of each (the k row shifts fused: a field row is k*C consecutive rows of xb)
//   backward_input   per input pixel (4 neighbours when C < 4): rows (pixel, c), vectors over the batch,
//                    steps: every (location, m) whose field covers it: a gather, each result written
//                    once, no scattered adds
//   backward_weight  per location: rows m, vectors over a field row's k*C entries (xr), steps: the batch
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#if defined(__AVX512F__)
#define GM_VBYTES 64
#else
#define GM_VBYTES 32
#endif

namespace {

typedef float vf __attribute__((vector_size(GM_VBYTES)));
typedef double vd __attribute__((vector_size(GM_VBYTES)));

template <class T> struct Vec;
template <> struct Vec<float> { typedef vf type; static constexpr int L = GM_VBYTES / sizeof(float); };
template <> struct Vec<double> { typedef vd type; static constexpr int L = GM_VBYTES / sizeof(double); };

template <class VT, class T> inline VT loadu(const T* p) { VT v; std::memcpy(&v, p, sizeof(VT)); return v; }
template <class VT, class T> inline void storeu(T* p, VT v) { std::memcpy(p, &v, sizeof(VT)); }

typedef std::ptrdiff_t idx;

// One register tile: out[mr * ldo + v*L + l] = sum over segments s, steps r of
//     a[aseg[s] + r*astep + aoff[mr]] * x[xseg[s] + r*ld + voff[v] + l]
// MR rows of broadcast scalars times NV vectors; the MR x NV accumulators stay in registers.
template <class T> struct Run {
    const T* x; const idx* xseg; idx ld; const idx* voff;
    const T* a; const idx* aseg; idx astep; const idx* aoff;
    int nseg, seglen;
    T* out; idx ldo;
};

template <class T, int MR, int NV>
void micro(const Run<T>& run) {
    typedef typename Vec<T>::type VT;
    constexpr int L = Vec<T>::L;
    VT acc[MR][NV];
#pragma GCC unroll 16
    for (int mr = 0; mr < MR; ++mr)
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[mr][v] = VT{};
    idx vo[NV], ao[MR];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) vo[v] = run.voff[v];
#pragma GCC unroll 16
    for (int mr = 0; mr < MR; ++mr) ao[mr] = run.aoff[mr];
    const idx ld = run.ld, astep = run.astep;
    for (int s = 0; s < run.nseg; ++s) {
        const T* row = run.x + run.xseg[s];
        const T* ap = run.a + run.aseg[s];
        for (int r = 0; r < run.seglen; ++r, row += ld, ap += astep) {
            VT xv[NV];
#pragma GCC unroll 16
            for (int v = 0; v < NV; ++v) xv[v] = loadu<VT>(row + vo[v]);
#pragma GCC unroll 16
            for (int mr = 0; mr < MR; ++mr) {
                const T av = ap[ao[mr]];
#pragma GCC unroll 16
                for (int v = 0; v < NV; ++v) acc[mr][v] += xv[v] * av;
            }
        }
    }
#pragma GCC unroll 16
    for (int mr = 0; mr < MR; ++mr)
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) storeu(run.out + mr * run.ldo + v * L, acc[mr][v]);
}

// Widest tile of vectors for MR rows that fits 16 vector registers (accumulators + operands).
constexpr int max_nv(int mr) { return mr >= 4 ? 3 : mr == 3 ? 4 : mr == 2 ? 6 : 12; }

template <class T> using MicroFn = void (*)(const Run<T>&);

template <class T, int MR, int... NVs>
MicroFn<T> pick_nv(int nv, std::integer_sequence<int, NVs...>) {
    MicroFn<T> table[] = {micro<T, MR, NVs + 1>...};
    return table[nv - 1];
}

// The micro kernel for mr rows (1..4) and nv vectors (1..max_nv(mr)).
template <class T> MicroFn<T> pick(int mr, int nv) {
    switch (mr) {
        case 1: return pick_nv<T, 1>(nv, std::make_integer_sequence<int, max_nv(1)>{});
        case 2: return pick_nv<T, 2>(nv, std::make_integer_sequence<int, max_nv(2)>{});
        case 3: return pick_nv<T, 3>(nv, std::make_integer_sequence<int, max_nv(3)>{});
        default: return pick_nv<T, 4>(nv, std::make_integer_sequence<int, max_nv(4)>{});
    }
}

// Split n vectors into tiles of at most cap, as even as possible (no thin last tile).
std::vector<int> split(int n, int cap) {
    std::vector<int> sizes;
    int tiles = (n + cap - 1) / cap;
    for (int t = 0; t < tiles; ++t) sizes.push_back(n / tiles + (t < n % tiles ? 1 : 0));
    return sizes;
}

// tilings(n)[mr]: the tiles of n vectors for a block of mr rows (1..4).
std::vector<std::vector<int>> tilings(int n) {
    std::vector<std::vector<int>> tiles(5);
    for (int r = 1; r <= 4; ++r) tiles[r] = split(n, max_nv(r));
    return tiles;
}

// One run's register tiles: its rows in blocks of up to 4 (row_off(row): the row's offset in run.a), each
// block's vectors in the tiles of tiles[rows in the block] (vec_off(vector): its offset in run.x), the
// results of a tile written at out_at(first row, first vector).
template <class T, class RowOff, class VecOff, class OutAt>
inline void sweep(Run<T>& run, idx rows, const std::vector<std::vector<int>>& tiles, RowOff row_off,
                  VecOff vec_off, OutAt out_at) {
    for (idx r0 = 0; r0 < rows; r0 += 4) {
        const int mr = int(std::min<idx>(4, rows - r0));
        idx aoff[4];
        for (int r = 0; r < mr; ++r) aoff[r] = row_off(r0 + r);
        run.aoff = aoff;
        int v0 = 0;
        for (int nv : tiles[mr]) {
            idx voff[12];
            for (int v = 0; v < nv; ++v) voff[v] = vec_off(v0 + v);
            run.voff = voff;
            run.out = out_at(r0, v0);
            pick<T>(mr, nv)(run);
            v0 += nv;
        }
    }
}

struct Shape {
    idx Bp, B, C, H, W, M, k, s, Ho, Wo;
};

// Scratch memory reused across calls (per calling thread, grow-only): fresh multi-megabyte blocks
// would be page-faulted in on every call, which measured as slow as the transposes themselves.
template <class T> struct Buffer {
    T* p;
    Buffer(int slot, std::size_t n) {
        static thread_local std::vector<char> store[4];
        std::vector<char>& v = store[slot];
        const std::size_t bytes = sizeof(T) * (n + 64);
        if (v.size() < bytes) {
            std::vector<char>().swap(v);
            v.resize(bytes);
        }
        p = reinterpret_cast<T*>(v.data());
    }
};

// Transposes. An L x L tile (8 x 8 float, 4 x 4 double) goes through vector registers with the
// unpack / shuffle / lane-swap pattern of AVX; edges and other targets go element by element.
#if defined(__clang__)
#define GM_SHUFFLE(a, b, MT, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define GM_SHUFFLE(a, b, MT, ...) __builtin_shuffle(a, b, MT{__VA_ARGS__})
#endif
typedef float tf8 __attribute__((vector_size(32)));
typedef int ti8 __attribute__((vector_size(32)));
typedef double td4 __attribute__((vector_size(32)));
typedef long long tl4 __attribute__((vector_size(32)));

inline void tile_transpose(const float* src, idx ss, float* dst, idx ds) {
    tf8 r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = loadu<tf8>(src + i * ss);
    for (int i = 0; i < 8; i += 2) {
        t[i] = GM_SHUFFLE(r[i], r[i + 1], ti8, 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = GM_SHUFFLE(r[i], r[i + 1], ti8, 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = GM_SHUFFLE(t[i], t[i + 2], ti8, 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 1] = GM_SHUFFLE(t[i], t[i + 2], ti8, 2, 3, 10, 11, 6, 7, 14, 15);
        u[i + 2] = GM_SHUFFLE(t[i + 1], t[i + 3], ti8, 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 3] = GM_SHUFFLE(t[i + 1], t[i + 3], ti8, 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int i = 0; i < 4; ++i) {
        storeu(dst + i * ds, GM_SHUFFLE(u[i], u[i + 4], ti8, 0, 1, 2, 3, 8, 9, 10, 11));
        storeu(dst + (i + 4) * ds, GM_SHUFFLE(u[i], u[i + 4], ti8, 4, 5, 6, 7, 12, 13, 14, 15));
    }
}

inline void tile_transpose(const double* src, idx ss, double* dst, idx ds) {
    td4 r[4], t[4];
    for (int i = 0; i < 4; ++i) r[i] = loadu<td4>(src + i * ss);
    for (int i = 0; i < 4; i += 2) {
        t[i] = GM_SHUFFLE(r[i], r[i + 1], tl4, 0, 4, 2, 6);
        t[i + 1] = GM_SHUFFLE(r[i], r[i + 1], tl4, 1, 5, 3, 7);
    }
    for (int i = 0; i < 2; ++i) {
        storeu(dst + i * ds, GM_SHUFFLE(t[i], t[i + 2], tl4, 0, 1, 4, 5));
        storeu(dst + (i + 2) * ds, GM_SHUFFLE(t[i], t[i + 2], tl4, 2, 3, 6, 7));
    }
}

// dst[c * ds + r] = src[r * ss + c] for r < R, c < Cn.
template <class T> void transpose2d(const T* src, idx ss, T* dst, idx ds, idx R, idx Cn) {
    constexpr idx TL = 32 / sizeof(T);
    const idx R8 = R - R % TL, C8 = Cn - Cn % TL;
    for (idx r0 = 0; r0 < R8; r0 += TL) {
        for (idx c0 = 0; c0 < C8; c0 += TL) tile_transpose(src + r0 * ss + c0, ss, dst + c0 * ds + r0, ds);
        for (idx c = C8; c < Cn; ++c)
            for (idx r = r0; r < r0 + TL; ++r) dst[c * ds + r] = src[r * ss + c];
    }
    for (idx r = R8; r < R; ++r)
        for (idx c = 0; c < Cn; ++c) dst[c * ds + r] = src[r * ss + c];
}

constexpr idx CHUNK = 64;  // columns per parallel piece of a transpose

// src[b][m][n] (B, mid, N) -> dst[n][m][b] (N, mid, Bp), the batch padded with zeros to Bp.
template <class T> void to_batch_last(const T* src, T* dst, idx B, idx Bp, idx mid, idx N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (idx m = 0; m < mid; ++m)
        for (idx n0 = 0; n0 < N; n0 += CHUNK) {
            const idx n1 = std::min(N, n0 + CHUNK);
            transpose2d(src + m * N + n0, mid * N, dst + (n0 * mid + m) * Bp, mid * Bp, B, n1 - n0);
            for (idx n = n0; n < n1; ++n)
                for (idx b = B; b < Bp; ++b) dst[(n * mid + m) * Bp + b] = T(0);
        }
}

// src[n][m][b] (N, mid, Bp) -> dst[b][m][n] (B, mid, N).
template <class T> void from_batch_last(const T* src, T* dst, idx B, idx Bp, idx mid, idx N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (idx m = 0; m < mid; ++m)
        for (idx n0 = 0; n0 < N; n0 += CHUNK) {
            const idx n1 = std::min(N, n0 + CHUNK);
            transpose2d(src + (n0 * mid + m) * Bp, mid * Bp, dst + m * N + n0, mid * N, n1 - n0, B);
        }
}

// x[b][c][h][w] (B, C, H, W) -> xr[h][b][w][c] (H, B, W, C): a field row's k*C entries contiguous per image.
template <class T> void to_rows_channels_last(const T* x, T* xr, idx B, idx C, idx H, idx W, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (idx h = 0; h < H; ++h)
        for (idx b = 0; b < B; ++b) transpose2d(x + (b * C * H + h) * W, H * W, xr + (h * B + b) * W * C, C, C, W);
}

// w (Ho, Wo, M, C, k, k) -> wt (Ho, Wo, k, k + 2*pad, C, M): per location and field row p, the field
// column q at q + pad, the maps innermost; the 2*pad extra columns are zero (pad = pixels per gather tile - 1).
template <class T> void weights_by_field(const T* w, T* wt, const Shape& sh, idx pad, int threads) {
    const idx C = sh.C, M = sh.M, k = sh.k, kk = k * k, kq = k + 2 * pad, nloc = sh.Ho * sh.Wo;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (idx loc = 0; loc < nloc; ++loc)
        for (idx p = 0; p < k; ++p) {
            T* dst = wt + (loc * k + p) * kq * C * M;
            if (pad) {
                std::memset(dst, 0, sizeof(T) * pad * C * M);
                std::memset(dst + (pad + k) * C * M, 0, sizeof(T) * pad * C * M);
            }
            for (idx c = 0; c < C; ++c)
                transpose2d(w + (loc * M * C + c) * kk + p * k, C * kk, dst + pad * C * M + c * M, C * M, M, k);
        }
}

template <class T> void forward(const T* x, const T* w, T* y, const Shape& sh, int threads) {
    constexpr int L = Vec<T>::L;
    const idx C = sh.C, H = sh.H, W = sh.W, M = sh.M, k = sh.k, s = sh.s, B = sh.B, Bp = sh.Bp, kC = k * C;
    const idx nloc = sh.Ho * sh.Wo;
    const int nvec = int(Bp / L);
    Buffer<T> xb(0, std::size_t(H) * W * C * Bp), yb(1, std::size_t(nloc) * M * Bp);
    Buffer<T> wt(2, std::size_t(nloc) * k * kC * M);
    to_batch_last(x, xb.p, B, Bp, C, H * W, threads);
    weights_by_field(w, wt.p, sh, 0, threads);
    const std::vector<std::vector<int>> btiles = tilings(nvec);
    std::vector<idx> xseg(k), aseg(k);
    for (idx p = 0; p < k; ++p) xseg[p] = p * W * C * Bp, aseg[p] = p * kC * M;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (idx loc = 0; loc < nloc; ++loc) {
        const idx i = loc / sh.Wo, j = loc % sh.Wo;
        // rows: maps m; steps: field row p, then its k*C entries (q, c), each a row of the batch-last input
        Run<T> run{xb.p + ((i * s) * W + j * s) * C * Bp, xseg.data(), Bp, nullptr,
                   wt.p + loc * k * kC * M, aseg.data(), M, nullptr, int(k), int(kC), nullptr, Bp};
        sweep(run, M, btiles, [](idx m) { return m; }, [](int v) { return idx(v) * L; },
              [&](idx m0, int v0) { return yb.p + (loc * M + m0) * Bp + v0 * L; });
    }
    from_batch_last(yb.p, y, B, Bp, M, nloc, threads);
}

template <class T> void backward_input(const T* gy, const T* w, T* gx, const Shape& sh, int threads) {
    constexpr int L = Vec<T>::L;
    const idx C = sh.C, H = sh.H, W = sh.W, M = sh.M, k = sh.k, s = sh.s, B = sh.B, Bp = sh.Bp;
    const idx Ho = sh.Ho, Wo = sh.Wo, nloc = Ho * Wo;
    const int nvec = int(Bp / L);
    // Rows of a result tile: (pixel, channel) pairs of PX neighbouring pixels of one image row, so that
    // with few channels each output-gradient vector read still feeds up to 4 rows.
    const idx PX = std::max<idx>(1, 4 / C), pad = PX - 1, kq = k + 2 * pad;
    const idx span = ((k + s - 1) / s) * ((k + PX - 1 + s - 1) / s + 1);
    Buffer<T> yb(0, std::size_t(nloc) * M * Bp), xb(1, std::size_t(H) * W * C * Bp);
    Buffer<T> wt(2, std::size_t(nloc) * k * kq * C * M);
    to_batch_last(gy, yb.p, B, Bp, M, nloc, threads);
    weights_by_field(w, wt.p, sh, pad, threads);
    const std::vector<std::vector<int>> btiles = tilings(nvec);
    const idx nblk = (W + PX - 1) / PX;
#pragma omp parallel num_threads(threads)
    {
        std::vector<idx> xseg(span), aseg(span);
#pragma omp for schedule(dynamic, 4)
        for (idx blk = 0; blk < H * nblk; ++blk) {
            const idx h = blk / nblk, x0 = (blk % nblk) * PX, px = std::min(PX, W - x0), nrow = px * C;
            // Locations (i, j) whose field (p = h - i*s, q = x - j*s in [0, k)) covers a pixel of the block.
            const idx i0 = std::max<idx>(0, (h - k + s) / s), i1 = std::min<idx>(Ho - 1, h / s);
            const idx j0 = std::max<idx>(0, (x0 - k + s) / s), j1 = std::min<idx>(Wo - 1, (x0 + px - 1) / s);
            int n = 0;
            for (idx i = i0; i <= i1; ++i)
                for (idx j = j0; j <= j1; ++j) {
                    const idx p = h - i * s, q0 = x0 - j * s;  // q of the block's first pixel, >= -pad
                    if (p >= k || q0 >= k || q0 + px <= 0) continue;
                    xseg[n] = (i * Wo + j) * M * Bp;
                    aseg[n] = ((i * Wo + j) * k + p) * kq * C * M + (q0 + pad) * C * M;
                    ++n;
                }
            T* dst = xb.p + (h * W + x0) * C * Bp;
            if (n == 0) {
                std::memset(dst, 0, sizeof(T) * nrow * Bp);
                continue;
            }
            // rows: (pixel d, channel c); steps: covering location, then its maps m
            Run<T> run{yb.p, xseg.data(), Bp, nullptr, wt.p, aseg.data(), 1, nullptr, n, int(M), nullptr, Bp};
            sweep(run, nrow, btiles, [&](idx r) { return (r / C) * C * M + (r % C) * M; },
                  [](int v) { return idx(v) * L; }, [&](idx r0, int v0) { return dst + r0 * Bp + v0 * L; });
        }
    }
    from_batch_last(xb.p, gx, B, Bp, C, H * W, threads);
}

template <class T> void backward_weight(const T* x, const T* gy, T* gw, const Shape& sh, int threads) {
    constexpr int L = Vec<T>::L;
    const idx B = sh.B, C = sh.C, H = sh.H, W = sh.W, M = sh.M, k = sh.k, s = sh.s, kC = k * C, kk = k * k;
    const idx Ho = sh.Ho, Wo = sh.Wo, nloc = Ho * Wo;
    const int rvec = int((kC + L - 1) / L);  // vectors per field row (the last may run past it: ignored)
    const int ncol = int(k) * rvec;          // column vectors per location: (p, rv) pairs
    Buffer<T> xr(0, std::size_t(H) * B * W * C + L), gt(1, std::size_t(nloc) * B * M);
    to_rows_channels_last(x, xr.p, B, C, H, W, threads);  // (H, B, W, C) and one vector read past the end
    std::memset(xr.p + H * B * W * C, 0, sizeof(T) * L);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (idx b = 0; b < B; ++b) transpose2d(gy + b * M * nloc, nloc, gt.p + b * M, B * M, M, nloc);  // (loc, B, M)
    const std::vector<std::vector<int>> ctiles = tilings(ncol);
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> tmp(std::size_t(M) * ncol * L);  // (m, p, q*C + c) of one location
        const idx zero = 0;
#pragma omp for schedule(static)
        for (idx loc = 0; loc < nloc; ++loc) {
            const idx i = loc / Wo, j = loc % Wo;
            // rows: maps m; vectors: field row p's k*C entries (channels-last input); steps: the batch
            Run<T> run{xr.p + ((i * s) * B * W + j * s) * C, &zero, W * C, nullptr,
                       gt.p + loc * B * M, &zero, M, nullptr, 1, int(B), nullptr, ncol * L};
            sweep(run, M, ctiles, [](idx m) { return m; },
                  [&](int c) { return idx(c / rvec) * B * W * C + idx(c % rvec) * L; },
                  [&](idx m0, int c0) { return tmp.data() + m0 * ncol * L + c0 * L; });
            T* gl = gw + loc * M * C * kk;
            for (idx m = 0; m < M; ++m)
                for (idx p = 0; p < k; ++p)  // entries q*C + c -> (c, q) of row p
                    transpose2d(tmp.data() + (m * ncol + p * rvec) * L, C, gl + m * C * kk + p * k, kk, k, C);
        }
    }
}

template <class T> using Op = void (*)(const T*, const T*, T*, const Shape&, int);

// dims: Bp, B, C, H, W, M, k, stride, Ho, Wo.  element_size 4 (float32) or 8 (float64); 1 for any other.
template <Op<float> F32, Op<double> F64>
int dispatch(int element_size, const void* a, const void* b, void* out, const std::int64_t* d, int threads) {
    const Shape sh{d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9]};
    if (element_size == 4)
        F32(static_cast<const float*>(a), static_cast<const float*>(b), static_cast<float*>(out), sh, threads);
    else if (element_size == 8)
        F64(static_cast<const double*>(a), static_cast<const double*>(b), static_cast<double*>(out), sh, threads);
    else
        return 1;
    return 0;
}

}  // namespace

extern "C" {

int gm_lanes(int element_size) { return GM_VBYTES / element_size; }

// x (B, C, H, W), w (Ho, Wo, M, C, k, k) -> y (B, M, Ho, Wo)
int gm_forward(int es, const void* x, const void* w, void* y, const std::int64_t* d, int threads) {
    return dispatch<forward<float>, forward<double>>(es, x, w, y, d, threads);
}

// gy (B, M, Ho, Wo), w -> gx (B, C, H, W)
int gm_backward_input(int es, const void* gy, const void* w, void* gx, const std::int64_t* d, int threads) {
    return dispatch<backward_input<float>, backward_input<double>>(es, gy, w, gx, d, threads);
}

// x (B, C, H, W), gy (B, M, Ho, Wo) -> gw (Ho, Wo, M, C, k, k)
int gm_backward_weight(int es, const void* x, const void* gy, void* gw, const std::int64_t* d, int threads) {
    return dispatch<backward_weight<float>, backward_weight<double>>(es, x, gy, gw, d, threads);
}

}  // extern "C"
