// The register tiles the linear (bsmm.cpp) and conv (bsconv.cpp) kernels share, and the grouped
// product (group_mm) both run their forward passes on. They differ only in
// where an operand row lives (a packed panel row for the linear kernels, a row shifted by a filter
// tap for the conv kernels) and where the sums go, so those arrive as small inlined callables.
#pragma once
#include "common.h"

namespace sk {

// acc[i][v] = bias[col0 + VL*v + q] (zero past out_cols or without a bias).
template <int NV, int MR>
inline void init_bias(vf (&acc)[MR][NV], const float* bias, int64_t col0, int64_t out_cols) {
    for (int v = 0; v < NV; ++v) {
        float b0[VL];
        for (int q = 0; q < VL; ++q) {
            const int64_t c = col0 + VL * v + q;
            b0[q] = bias && c < out_cols ? bias[c] : 0.f;
        }
        for (int i = 0; i < MR; ++i) acc[i][v] = ld(b0);
    }
}

// acc[i][v] += sum_{p in [s, e)} sum_l a_block(p)[row(i) + l] * b_block(p)[l*W + woff + VL*v]: tile row i
// of block p reads its L operand values at a_block(p) + row(i); the block's weights are L rows of W
// floats. One base per block plus a row offset (not a pointer per row): the linear kernels' rows are
// then i*L, immediates in the loads, which kept 3-5% fewer instructions per step than MR pointers
// (python -m sparsekern.bench.instructions).
template <int NV, int MR, typename ABlock, typename Row, typename BBlock>
inline void accumulate(vf (&acc)[MR][NV], int32_t s, int32_t e, int64_t L, int64_t W, int64_t woff, ABlock&& a_block,
                       Row&& row, BBlock&& b_block) {
    int64_t r[MR];
    for (int i = 0; i < MR; ++i) r[i] = row(i);
    for (int32_t p = s; p < e; ++p) {
        const float* a = a_block(p);
        const float* b = b_block(p) + woff;
#pragma GCC unroll 4
        for (int64_t l = 0; l < L; ++l) {
            vf bv[NV];
            for (int v = 0; v < NV; ++v) bv[v] = ld(b + l * W + VL * v);
            for (int i = 0; i < MR; ++i) {
                const vf av = bc(a[r[i] + l]);
                for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
            }
        }
    }
}

// out[i*ldo + col0 + w] = acc (rounded to OT), for the columns before out_cols (the last block may be partial).
template <int NV, int MR, typename OT>
inline void store_tile(const vf (&acc)[MR][NV], OT* out, int64_t ldo, int64_t col0, int64_t out_cols) {
    const int64_t valid = std::min<int64_t>(out_cols - col0, NV * VL);
    for (int i = 0; i < MR; ++i) {
        OT* o = out + i * ldo + col0;
        if (std::is_same_v<OT, float> && valid == NV * VL) {
            for (int v = 0; v < NV; ++v) st(reinterpret_cast<float*>(o) + VL * v, acc[i][v]);
        } else {
            float tmp[NV * VL];
            for (int v = 0; v < NV; ++v) st(tmp + VL * v, acc[i][v]);
            for (int64_t q = 0; q < valid; ++q) narrow(tmp[q], o + q);
        }
    }
}

// One MR-token by VL*NV-column output tile of a group (a block row in the forward pass, a block
// column in the input gradient), accumulated in registers over the group's blocks [s, e):
//   out[t, col0 + w] = start + sum_{p in [s, e)} sum_l a_block(p)[row(i) + l] * B[sel[p]][l][woff + w]
// for tile row i (token t). Bslab is the slab's panel of block 0 in pack_slabs' slab-major blocks (a
// block's panel rows are VL*NV floats, its panels L*W floats apart). start is the bias, or (acc_in)
// the previous chunk's fp32 partial sums; the sums go to out, or (acc_out) back to fp32 partial sums.
// acc_in/acc_out rows are W floats apart, at column woff.
template <int NV, int MR, typename OT, typename ABlock, typename Row>
inline void group_tile(ABlock&& a_block, Row&& row, int64_t L, const float* Bslab, int64_t W, int64_t woff,
                       const int32_t* sel, int32_t s, int32_t e, const float* bias, const float* acc_in,
                       float* acc_out, OT* out, int64_t ldo, int64_t col0, int64_t out_cols) {
    vf acc[MR][NV];
    if (acc_in) {
        for (int i = 0; i < MR; ++i)
            for (int v = 0; v < NV; ++v) acc[i][v] = ld(acc_in + i * W + woff + VL * v);
    } else {
        init_bias(acc, bias, col0, out_cols);
    }
    accumulate(acc, s, e, L, NV * VL, 0, a_block, row,
               [&](int32_t p) { return Bslab + (int64_t)(sel ? sel[p] : p) * L * W; });
    if (acc_out) {
        for (int i = 0; i < MR; ++i)
            for (int v = 0; v < NV; ++v) st(acc_out + i * W + woff + VL * v, acc[i][v]);
        return;
    }
    store_tile(acc, out, ldo, col0, out_cols);
}

// Blocks per chunk of a group: a token tile's packed rows for the chunk (TM*KC*L floats) and the
// chunk's weights (KC*L*W) should stay near the core while every column slab and row tile passes over
// them. Unchunked, a 64x64 block row at density 0.5 (32 blocks: 768 KiB of rows for 96 tokens, 512
// KiB of weights, L2 is 512 KiB a core) streamed from L3 once per slab: 51 GFLOP/s on one core of a
// 2-core AVX2 EPYC against MKL's 87. Budgets of 64, 96, 160 and 384 KiB (1, 2, 4 and 10 blocks)
// measured 67, 68, 63 and 64; with slab-packed blocks 48, 96 and 192 KiB measured 75.6, 79.2 and 77.5
// at density 0.5. A chunk costs one fp32 round trip of the tile's partial sums.
inline int64_t chunk_blocks(int64_t TM, int64_t L, int64_t W) {
    const int64_t budget = 24 * 1024;  // floats: 96 KiB
    return std::max<int64_t>(1, budget / (TM * L + L * W));
}

// The grouped product of the linear forward and input gradient (bsmm.cpp) and the conv forward
// (bsconv.cpp): out[t, g*W + w] = bias + sum_{p in group g} sum_l a_block(p)[row_of(t) + l] * B[p][l][w],
// where a_block(p) is block p's operand panel and row_of(t) token t's row in every panel (t*L for a
// packed matrix; a padded-plane position for the conv's implicit im2col). Bs is pack_slabs' output.
// Work items are (token tile, group) pairs, token-tile major: a tile's packed activations stay in L2
// while the groups' weights stream through it. TM balances that reuse against the weights' traffic:
// for 64-wide groups (4096x4096 fp32, 2048 tokens, density 0.1 and 0.5) TM = 96 measured 7-13%
// faster than 48, 24 slower still, and 144 the same as 96.
template <int NV, int MR, int TM, typename OT, typename ABlock, typename RowOf>
void group_mm(ABlock&& a_block, RowOf&& row_of, int64_t M, int64_t L, const float* Bs, int64_t W,
              const int32_t* offsets, int64_t G, const int32_t* sel, const float* bias, OT* out, int64_t ldo,
              int64_t out_cols, int nthreads) {
    const int64_t tiles = (M + TM - 1) / TM;
    const int64_t slabs = W / (VL * NV), kc = chunk_blocks(TM, L, W);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < tiles * G; ++it) {
        const int64_t t0 = (it / G) * TM, t1 = std::min(M, t0 + TM), g = it % G;
        const int32_t s = offsets[g], e = offsets[g + 1];
        float* part = e - s > kc ? ws_tile.get((size_t)TM * W) : nullptr;  // partial sums across chunks
        for (int32_t c0 = s; c0 < e || c0 == s; c0 += kc) {
            const int32_t c1 = std::min<int32_t>(e, c0 + kc);
            const float* in = c0 > s ? part : nullptr;
            float* keep = c1 < e ? part : nullptr;
            for (int64_t slab = 0; slab < slabs; ++slab) {
                const int64_t col0 = g * W + slab * NV * VL;
                if (col0 >= out_cols) break;
                const int64_t woff = slab * NV * VL;
                const float* Bslab = Bs + slab * L * NV * VL;
                int64_t t = t0;
                const auto tile = [&](auto rows) {
                    group_tile<NV, decltype(rows)::value, OT>(
                        a_block, [&](int i) { return row_of(t + i); }, L, Bslab, W, woff, sel, c0, c1, bias,
                        in ? in + (t - t0) * W : nullptr, keep ? keep + (t - t0) * W : nullptr, out + t * ldo, ldo,
                        col0, out_cols);
                };
                for (; t + MR <= t1; t += MR) tile(std::integral_constant<int, MR>{});
                with_rows<MR - 1>(t1 - t, tile);
            }
            if (c1 >= e) break;
        }
    }
}

// A weight-gradient tile: dw[i][VL*v + w] (+)= sum_{t in [t0, t1)} D[t*bm + i] * x_row(t)[VL*v + w], on top
// of what the previous token chunk stored unless first. D points at the tile's first row of dy's panel.
template <int NV, int MR, typename XRow>
inline void dw_tile(const float* D, int64_t bm, XRow&& x_row, int64_t t0, int64_t t1, float* dw, int64_t bk,
                    bool first) {
    vf acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = first ? bc(0.f) : ld(dw + i * bk + VL * v);
    for (int64_t t = t0; t < t1; ++t) {
        const float* x = x_row(t);
        vf xv[NV];
        for (int v = 0; v < NV; ++v) xv[v] = ld(x + VL * v);
        for (int i = 0; i < MR; ++i) {
            const vf dv = bc(D[t * bm + i]);
            for (int v = 0; v < NV; ++v) acc[i][v] += dv * xv[v];
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) st(dw + i * bk + VL * v, acc[i][v]);
}

}  // namespace sk
