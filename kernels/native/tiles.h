// The register tiles the linear (bsmm.cpp) and conv (bsconv.cpp) kernels share. They differ only in
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
