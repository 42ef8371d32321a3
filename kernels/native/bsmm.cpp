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
// Vectors are GCC vector extensions (common.h's VL floats), so the same source builds for AVX-512, AVX2 or NEON
// with -march=native. No source here depends on torch: it builds in about a second.
#include "tiles.h"

namespace {
using namespace sk;

// One work item per (trainable block, column slab). Tokens run in chunks of TC so that a chunk of
// both packed panels stays in L1 while every row tile of the block passes over it: with 64x64 blocks
// a token's rows are 4 cache lines, and TC = 256 (128 KiB of both) streamed them from L2 at 41
// GFLOP/s (one core, density 0.1); TC = 64 and 32 ran at 49 and 48 with a 4x2 tile, 63 with 6x2.
template <int NV, int MR, int TC>
void sampled_mm(const float* Dp, const float* Xp, int64_t M, const int32_t* brow, const int32_t* bcol, int64_t nb,
                int64_t bm, int64_t bk, float* dw, int nthreads) {
    const int64_t slabs = bk / (VL * NV);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < nb * slabs; ++it) {
        const int64_t b = it / slabs, woff = (it % slabs) * NV * VL;
        const float* D = Dp + (int64_t)brow[b] * M * bm;
        const float* X = Xp + (int64_t)bcol[b] * M * bk + woff * M;  // the slab's own (M, NV*VL) panel
        const auto x_row = [X](int64_t t) { return X + t * (NV * VL); };
        float* out = dw + b * bm * bk + woff;
        if (M == 0) {
            for (int64_t j = 0; j < bm; ++j) std::memset(out + j * bk, 0, sizeof(float) * NV * VL);
            continue;
        }
        for (int64_t t0 = 0; t0 < M; t0 += TC) {
            const int64_t t1 = std::min(M, t0 + TC);
            int64_t j = 0;
            for (; j + MR <= bm; j += MR) dw_tile<NV, MR>(D + j, bm, x_row, t0, t1, out + j * bk, bk, t0 == 0);
            with_rows<MR - 1>(bm - j, [&](auto rows) {
                dw_tile<NV, decltype(rows)::value>(D + j, bm, x_row, t0, t1, out + j * bk, bk, t0 == 0);
            });
        }
    }
}

}  // namespace

extern "C" {

// Forward (A = x, groups = block rows, idx = block columns, B = the nb blocks as stored (bm, bk) with
// b_transposed, read as their transposes (bk, bm), L = bk, W = bm) and input gradient (A = dy, groups = block columns, idx = their blocks' rows, sel = the
// blocks' storage index, B = blocks as stored (bm, bk), b_transposed = 0, L = bm, W = bk):
//   out[t, g*W + w] = bias[g*W + w] + sum_{p in group g} sum_l A[t, idx[p]*L + l] * B[sel[p]][l][w]
// A is (M, a_cols) with row stride lda and unit column stride; out is (M, out_cols) with row stride
// ldo; both are fp32, or both bf16 when is_bf16. Returns 0, or non-zero when W is not a multiple of
// 16 or memory ran out (nothing written).
int sk_group_mm(const void* A, int64_t lda, int64_t M, int64_t a_cols, const float* B, int64_t nb, int b_transposed,
                const int32_t* offsets, int64_t G, const int32_t* idx, const int32_t* sel, int64_t L, int64_t W,
                const float* bias, void* out, int64_t ldo, int64_t out_cols, int is_bf16, int nthreads) {
    if (W % 16 != 0 || L <= 0) return 1;
    const int64_t cb = (a_cols + L - 1) / L;
    uint8_t* used = mark_used(cb, idx, offsets[G]);
    float* P = used ? ws_a.get((size_t)cb * M * L) : nullptr;
    float* Bs = P ? ws_c.get((size_t)nb * L * W) : nullptr;
    if (!Bs) {
        std::free(used);
        return 2;
    }
    if (is_bf16)
        pack(static_cast<const bf16*>(A), lda, M, a_cols, L, used, P, nthreads);
    else
        pack(static_cast<const float*>(A), lda, M, a_cols, L, used, P, nthreads);
    std::free(used);
    if (ldo == out_cols) prepare_output(out, (size_t)M * ldo * (is_bf16 ? 2 : 4), nthreads);  // gap-free: all of it is written
    auto run = [&](auto* o) {
        return by_width(W, [&](auto nv, auto mr) {
            pack_slabs(B, nb, L, W, decltype(nv)::value * VL, b_transposed, Bs, nthreads);
            group_mm<decltype(nv)::value, decltype(mr)::value, 96>(
                [&](int32_t p) { return P + (int64_t)idx[p] * M * L; }, [L](int64_t t) { return t * L; }, M, L, Bs,
                W, offsets, G, sel, bias, o, ldo, out_cols, nthreads);
        });
    };
    return is_bf16 ? run(static_cast<bf16*>(out)) : run(static_cast<float*>(out));
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
    return by_width(bk, [&](auto nv, auto mr) {
        constexpr int SW = decltype(nv)::value * VL;  // x in column slabs: a token's slab is one cache line
        if (is_bf16) {
            pack(static_cast<const bf16*>(DY), lddy, M, N, bm, urow, Dp, nthreads);
            pack(static_cast<const bf16*>(X), ldx, M, K, bk, ucol, Xp, nthreads, SW);
        } else {
            pack(static_cast<const float*>(DY), lddy, M, N, bm, urow, Dp, nthreads);
            pack(static_cast<const float*>(X), ldx, M, K, bk, ucol, Xp, nthreads, SW);
        }
        std::free(urow);
        std::free(ucol);
        prepare_output(dw, (size_t)nb * bm * bk * 4, nthreads);
        sampled_mm<decltype(nv)::value, decltype(mr)::value, 64>(Dp, Xp, M, brow, bcol, nb, bm, bk, dw, nthreads);
    });
}

// Frees the calling thread's packing workspace (it otherwise lives until the thread exits).
void sk_release() {
    ws_a.release();
    ws_b.release();
    ws_c.release();
}

}  // extern "C"
