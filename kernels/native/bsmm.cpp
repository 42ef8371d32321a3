// Native CPU kernels for the block-sparse matmul (fp32), loaded by kernels/native.py through ctypes.
//
// Why native: the torch-level CPU path (bsmm_cpu.py) gathers activation slices and calls MKL once per
// block row; the gathers, transposes and short GEMMs cost about 2/3 of its time. These kernels read
// the computed blocks only, in place, and keep the accumulators in registers across a whole block row.
//
// Both kernels first pack their activation operands block-major: P[c][t][0:L] = A[t, c*L : c*L + L]
// (zero past the last column). A block's slice is then one contiguous (M, L) panel, so the inner
// loops walk memory linearly instead of striding a full row (4 pages per token at 4096 features),
// which is what made the unpacked version TLB-bound. The packed buffers are a per-thread grow-only
// workspace on 2 MiB-aligned, huge-page-advised memory; sk_release frees the calling thread's.
//
// bf16 activations and outputs are converted on the way in (packing) and out (the tile store); all
// arithmetic is fp32. The weight blocks and bias arrive as fp32 (the caller converts those few bytes).
//
// Vectors are GCC vector extensions (16 floats), so the same source builds for AVX-512, AVX2 or NEON
// with -march=native. No source here depends on torch: it builds in about a second.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <sys/mman.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned loads and stores

static inline v16 ld(const float* p) { return *(const v16u*)p; }
static inline void st(float* p, v16 v) { *(v16u*)p = v; }
// A compound literal (not `(v16){} + x`, which keeps an add for -0.0) lowers to one vbroadcastss.
static inline v16 bc(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

namespace {

struct Workspace {
    float* p = nullptr;
    size_t n = 0;
    ~Workspace() { std::free(p); }
    float* get(size_t want) {
        // Never answer nullptr for an empty request (M == 0): callers read nullptr as out of memory.
        if (want == 0) want = 1;
        if (want <= n) return p;
        std::free(p);
        const size_t huge = size_t(1) << 21;
        size_t bytes = (want * sizeof(float) + huge - 1) / huge * huge;
        p = (float*)std::aligned_alloc(huge, bytes);
        if (p) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: fewer TLB misses where THP is on
        n = p ? bytes / sizeof(float) : 0;
        return p;
    }
    void release() {
        std::free(p);
        p = nullptr;
        n = 0;
    }
};
thread_local Workspace ws_a, ws_b;

// bf16 is the top half of an fp32: widening is a shift; narrowing rounds to nearest even, and keeps
// NaN a (quiet) NaN instead of letting the rounding carry run into the exponent.
typedef uint16_t bf16;
inline float widen(float x) { return x; }
inline float widen(bf16 h) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline void narrow(float x, float* out) { *out = x; }
inline void narrow(float x, bf16* out) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        *out = bf16((u >> 16) | 0x40u);
    else
        *out = bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// dst[c][t][0:L] = src[t, c*L + 0:L] for the column blocks c with used[c]; zero past `cols`.
template <typename T>
void pack(const T* src, int64_t ld, int64_t M, int64_t cols, int64_t L, const uint8_t* used, float* dst,
          int nthreads) {
    const int64_t cb = (cols + L - 1) / L;
    const int64_t TC = 256;  // tokens per work item: enough work to amortise scheduling
    const int64_t chunks = (M + TC - 1) / TC;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t it = 0; it < cb * chunks; ++it) {
        const int64_t c = it / chunks, t0 = (it % chunks) * TC, t1 = std::min(M, t0 + TC);
        if (!used[c]) continue;
        const int64_t w = std::min(L, cols - c * L);
        float* d = dst + (c * M + t0) * L;
        const T* s = src + t0 * ld + c * L;
        for (int64_t t = t0; t < t1; ++t, d += L, s += ld) {
            if constexpr (std::is_same_v<T, float>)
                std::memcpy(d, s, sizeof(float) * w);
            else
                for (int64_t q = 0; q < w; ++q) d[q] = widen(s[q]);
            if (w < L) std::memset(d + w, 0, sizeof(float) * (L - w));
        }
    }
}

// Calls f(std::integral_constant<int, r>) for a runtime r in [1, R]: a tile's remainder rows then run
// as one register tile of exactly r rows, not r one-row passes (which are load-bound: for 32x32 blocks
// the weight gradient's 8 leftover rows of each block cost a third of its main tiles' time that way).
template <int R, typename F>
inline void with_rows(int64_t r, F&& f) {
    if constexpr (R > 0) {
        if (r == R)
            f(std::integral_constant<int, R>{});
        else
            with_rows<R - 1>(r, f);
    }
}

// One MR-token by 16*NV-column output tile of a group (a block row in the forward pass, a block
// column in the input gradient), accumulated in registers over all of the group's blocks:
//   out[t, col0 + w] = bias + sum_{p in [s, e)} sum_l P[idx[p]][t][l] * B[sel[p]][l][slab*16NV + w]
template <int NV, int MR, typename OT>
inline void group_tile(const float* P, int64_t M, int64_t L, const float* B, int64_t W, int64_t woff,
                       const int32_t* idx, const int32_t* sel, int32_t s, int32_t e, const float* bias, OT* out,
                       int64_t ldo, int64_t col0, int64_t out_cols) {
    v16 acc[MR][NV];
    for (int v = 0; v < NV; ++v) {
        float b0[16];
        for (int q = 0; q < 16; ++q) {
            const int64_t c = col0 + 16 * v + q;
            b0[q] = bias && c < out_cols ? bias[c] : 0.f;
        }
        for (int i = 0; i < MR; ++i) acc[i][v] = ld(b0);
    }
    for (int32_t p = s; p < e; ++p) {
        const float* a = P + (int64_t)idx[p] * M * L;
        const float* b = B + (int64_t)(sel ? sel[p] : p) * L * W + woff;
        for (int64_t l = 0; l < L; ++l) {
            v16 bv[NV];
            for (int v = 0; v < NV; ++v) bv[v] = ld(b + l * W + 16 * v);
            for (int i = 0; i < MR; ++i) {
                const v16 av = bc(a[i * L + l]);
                for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
            }
        }
    }
    const int64_t valid = std::min<int64_t>(out_cols - col0, NV * 16);  // the last block may be partial
    for (int i = 0; i < MR; ++i) {
        OT* o = out + i * ldo + col0;
        if (std::is_same_v<OT, float> && valid == NV * 16) {
            for (int v = 0; v < NV; ++v) st(reinterpret_cast<float*>(o) + 16 * v, acc[i][v]);
        } else {
            float tmp[NV * 16];
            for (int v = 0; v < NV; ++v) st(tmp + 16 * v, acc[i][v]);
            for (int64_t q = 0; q < valid; ++q) narrow(tmp[q], o + q);
        }
    }
}

// Work items are (token tile, group) pairs, token-tile major: a tile's packed activations stay in L2
// while the groups' weights stream through it. TM balances that reuse against the weights' traffic:
// for 64-wide groups (4096x4096 fp32, 2048 tokens, density 0.1 and 0.5) TM = 96 measured 7-13%
// faster than 48, 24 slower still, and 144 the same as 96.
template <int NV, int MR, int TM, typename OT>
void group_mm(const float* P, int64_t M, const float* B, const int32_t* offsets, int64_t G, const int32_t* idx,
              const int32_t* sel, int64_t L, int64_t W, const float* bias, OT* out, int64_t ldo,
              int64_t out_cols, int nthreads) {
    const int64_t tiles = (M + TM - 1) / TM;
    const int64_t slabs = W / (16 * NV);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < tiles * G; ++it) {
        const int64_t t0 = (it / G) * TM, t1 = std::min(M, t0 + TM), g = it % G;
        for (int64_t slab = 0; slab < slabs; ++slab) {
            const int64_t col0 = g * W + slab * NV * 16;
            if (col0 >= out_cols) break;
            const int64_t woff = slab * NV * 16;
            int64_t t = t0;
            for (; t + MR <= t1; t += MR)
                group_tile<NV, MR, OT>(P + t * L, M, L, B, W, woff, idx, sel, offsets[g], offsets[g + 1], bias,
                                   out + t * ldo, ldo, col0, out_cols);
            with_rows<MR - 1>(t1 - t, [&](auto rows) {
                group_tile<NV, decltype(rows)::value, OT>(P + t * L, M, L, B, W, woff, idx, sel, offsets[g],
                                                      offsets[g + 1], bias, out + t * ldo, ldo, col0, out_cols);
            });
        }
    }
}

// dw[b][j0 + i][16v + w], accumulated over tokens [t0, t1) on top of what the previous chunk stored.
template <int NV, int MR>
inline void sampled_tile(const float* D, int64_t bm, const float* X, int64_t bk, int64_t t0, int64_t t1, float* dw,
                         bool first) {
    v16 acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = first ? bc(0.f) : ld(dw + i * bk + 16 * v);
    for (int64_t t = t0; t < t1; ++t) {
        v16 xv[NV];
        for (int v = 0; v < NV; ++v) xv[v] = ld(X + t * bk + 16 * v);
        for (int i = 0; i < MR; ++i) {
            const v16 dv = bc(D[t * bm + i]);
            for (int v = 0; v < NV; ++v) acc[i][v] += dv * xv[v];
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) st(dw + i * bk + 16 * v, acc[i][v]);
}

// One work item per (trainable block, column slab). Tokens run in chunks of TC so that a chunk of
// both packed panels stays in L1 while every row tile of the block passes over it.
template <int NV, int MR, int TC>
void sampled_mm(const float* Dp, const float* Xp, int64_t M, const int32_t* brow, const int32_t* bcol, int64_t nb,
                int64_t bm, int64_t bk, float* dw, int nthreads) {
    const int64_t slabs = bk / (16 * NV);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < nb * slabs; ++it) {
        const int64_t b = it / slabs, woff = (it % slabs) * NV * 16;
        const float* D = Dp + (int64_t)brow[b] * M * bm;
        const float* X = Xp + (int64_t)bcol[b] * M * bk + woff;
        float* out = dw + b * bm * bk + woff;
        if (M == 0) {
            for (int64_t j = 0; j < bm; ++j) std::memset(out + j * bk, 0, sizeof(float) * NV * 16);
            continue;
        }
        for (int64_t t0 = 0; t0 < M; t0 += TC) {
            const int64_t t1 = std::min(M, t0 + TC);
            int64_t j = 0;
            for (; j + MR <= bm; j += MR) sampled_tile<NV, MR>(D + j, bm, X, bk, t0, t1, out + j * bk, t0 == 0);
            with_rows<MR - 1>(bm - j, [&](auto rows) {
                sampled_tile<NV, decltype(rows)::value>(D + j, bm, X, bk, t0, t1, out + j * bk, t0 == 0);
            });
        }
    }
}

uint8_t* mark_used(int64_t n, const int32_t* idx, int64_t count) {
    uint8_t* used = (uint8_t*)std::calloc(n > 0 ? n : 1, 1);
    if (used)
        for (int64_t p = 0; p < count; ++p) used[idx[p]] = 1;
    return used;
}

}  // namespace

extern "C" {

// Forward (A = x, groups = block rows, idx = block columns, B = blocks transposed to (bk, bm), L = bk,
// W = bm) and input gradient (A = dy, groups = block columns, idx = their blocks' rows, sel = the
// blocks' storage index, B = blocks as stored (bm, bk), L = bm, W = bk):
//   out[t, g*W + w] = bias[g*W + w] + sum_{p in group g} sum_l A[t, idx[p]*L + l] * B[sel[p]][l][w]
// A is (M, a_cols) with row stride lda and unit column stride; out is (M, out_cols) with row stride
// ldo; both are fp32, or both bf16 when is_bf16. Returns 0, or non-zero when W is not a multiple of
// 16 or memory ran out (nothing written).
int sk_group_mm(const void* A, int64_t lda, int64_t M, int64_t a_cols, const float* B, const int32_t* offsets,
                int64_t G, const int32_t* idx, const int32_t* sel, int64_t L, int64_t W, const float* bias,
                void* out, int64_t ldo, int64_t out_cols, int is_bf16, int nthreads) {
    if (W % 16 != 0 || L <= 0) return 1;
    const int64_t cb = (a_cols + L - 1) / L;
    uint8_t* used = mark_used(cb, idx, offsets[G]);
    float* P = used ? ws_a.get((size_t)cb * M * L) : nullptr;
    if (!P) {
        std::free(used);
        return 2;
    }
    if (is_bf16)
        pack(static_cast<const bf16*>(A), lda, M, a_cols, L, used, P, nthreads);
    else
        pack(static_cast<const float*>(A), lda, M, a_cols, L, used, P, nthreads);
    std::free(used);
    auto run = [&](auto* o) {
        // Register tiles: MR tokens by NV vectors of 16 columns (24 accumulators of 32 zmm registers).
        if (W % 64 == 0)
            group_mm<4, 6, 96>(P, M, B, offsets, G, idx, sel, L, W, bias, o, ldo, out_cols, nthreads);
        else if (W % 32 == 0)
            group_mm<2, 12, 96>(P, M, B, offsets, G, idx, sel, L, W, bias, o, ldo, out_cols, nthreads);
        else
            group_mm<1, 12, 96>(P, M, B, offsets, G, idx, sel, L, W, bias, o, ldo, out_cols, nthreads);
    };
    if (is_bf16)
        run(static_cast<bf16*>(out));
    else
        run(static_cast<float*>(out));
    return 0;
}

// Weight gradient of the trainable blocks b (block row brow[b], column bcol[b]):
//   dw[b][j][k] = sum_t DY[t, brow[b]*bm + j] * X[t, bcol[b]*bk + k]
// Rows past N and columns past K come out zero (the packed panels are zero there). DY and X are both
// fp32, or both bf16 when is_bf16; dw is always fp32.
int sk_sampled_mm(const void* DY, int64_t lddy, int64_t N, const void* X, int64_t ldx, int64_t K, int64_t M,
                  const int32_t* brow, const int32_t* bcol, int64_t nb, int64_t bm, int64_t bk, float* dw,
                  int is_bf16, int nthreads) {
    if (bk % 16 != 0 || bm <= 0) return 1;
    const int64_t rb = (N + bm - 1) / bm, cb = (K + bk - 1) / bk;
    uint8_t* urow = mark_used(rb, brow, nb);
    uint8_t* ucol = mark_used(cb, bcol, nb);
    float* Dp = urow && ucol ? ws_a.get((size_t)rb * M * bm) : nullptr;
    float* Xp = Dp ? ws_b.get((size_t)cb * M * bk) : nullptr;
    if (!Xp) {
        std::free(urow);
        std::free(ucol);
        return 2;
    }
    if (is_bf16) {
        pack(static_cast<const bf16*>(DY), lddy, M, N, bm, urow, Dp, nthreads);
        pack(static_cast<const bf16*>(X), ldx, M, K, bk, ucol, Xp, nthreads);
    } else {
        pack(static_cast<const float*>(DY), lddy, M, N, bm, urow, Dp, nthreads);
        pack(static_cast<const float*>(X), ldx, M, K, bk, ucol, Xp, nthreads);
    }
    std::free(urow);
    std::free(ucol);
    if (bk % 64 == 0)
        sampled_mm<4, 6, 256>(Dp, Xp, M, brow, bcol, nb, bm, bk, dw, nthreads);
    else if (bk % 32 == 0)
        sampled_mm<2, 12, 256>(Dp, Xp, M, brow, bcol, nb, bm, bk, dw, nthreads);
    else
        sampled_mm<1, 12, 256>(Dp, Xp, M, brow, bcol, nb, bm, bk, dw, nthreads);
    return 0;
}

// Frees the calling thread's packing workspace (it otherwise lives until the thread exits).
void sk_release() {
    ws_a.release();
    ws_b.release();
}

}  // extern "C"
