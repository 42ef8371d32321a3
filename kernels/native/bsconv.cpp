// Native CPU kernels for the block-sparse 2-D convolution (fp32 sums; fp32 or bf16 activations), loaded
// by kernels/native.py through ctypes. Same machinery as bsmm.cpp (packed operands, register tiles that
// sum a whole block row, OpenMP), with the implicit im2col folded into the packing:
//
// * x is packed once per call, channel-block-major and zero-padded: Xp[cb][n][hh][ww][0:bk], with
//   (hh, ww) over the padded plane (Hp, Wp). Output position t = (n, ho, wo) then reads tap (r, s) of
//   channel block cb at row  base(t) + off(r, s)  of panel cb, where
//       base(t) = (n*Hp + ho*sh)*Wp + wo*sw,   off(r, s) = r*dh*Wp + s*dw,
//   so every stride, padding and dilation is one row index per token plus one offset per block: no
//   gathered slabs, no padded-plane waste, and a block's operand rows stay 4*bk contiguous bytes.
// * dy is packed block-major over output positions: Dp[g][t][0:bm] (as bsmm.cpp packs activations).
//
// A block of the weight's matrix view (sparsekern/convview.py) is bm output channels by bk input
// channels at one tap; the matrix column is tap*per_tap + cb. The three passes:
//   forward      y[t, g*bm + j]      = bias + sum_{b in row g} sum_k Xp[cb_b][base(t)+off_b][k] W_b[j][k]
//   input grad   dxp[cb][base(t)+off][k] += sum_{b in column (tap, cb)} sum_j Dp[g_b][t][j] W_b[j][k]
//   weight grad  dW_b[j][k]          = sum_t Dp[g_b][t][j] Xp[cb_b][base(t)+off_b][k]
// The input gradient is a scatter (a token's sums land on the input rows its taps read). Work items are
// (channel block, image) pairs: distinct items never write the same row of dxp, so no atomics, and an
// item's rows of dxp (Hp*Wp*bk floats, 25 KiB at 14x14x32) stay in L1/L2 while its taps add into them.
// dx is then unpacked from dxp in one pass into the caller's strides (the padding ring is dropped).
//
// Activations arrive as 4-D (N, C, H, W) with any element strides; the packing reads unit-stride
// channels (channels_last) with memcpy and other layouts element by element.
#include "tiles.h"

namespace {
using namespace sk;

// The geometry, in sparsekern.kernels.meta.ConvGeom's field order.
struct Geom {
    int64_t n, c_in, h, w, c_out, h_out, w_out, kh, kw, sh, sw, ph, pw, dh, dw, c_pad;
    explicit Geom(const int64_t* g)
        : n(g[0]), c_in(g[1]), h(g[2]), w(g[3]), c_out(g[4]), h_out(g[5]), w_out(g[6]), kh(g[7]), kw(g[8]),
          sh(g[9]), sw(g[10]), ph(g[11]), pw(g[12]), dh(g[13]), dw(g[14]), c_pad(g[15]) {}
    int64_t tokens() const { return n * h_out * w_out; }
    // The padded plane: every row and column a tap reads, and every input position (for dx).
    int64_t hp() const { return std::max((h_out - 1) * sh + dh * (kh - 1) + 1, ph + h); }
    int64_t wp() const { return std::max((w_out - 1) * sw + dw * (kw - 1) + 1, pw + w); }
};

// dst[c][s][n][hh][ww][0:SW] = src[n, c*L + s*SW + q, hh - top, ww - left] (zero outside the source or
// past C) for the channel blocks c with used[c]. src has element strides st[0..3] over (N, C, H, W). SW
// (a divisor of L; L when 0) cuts a channel block into slabs of their own planes, as common.h's pack.
template <typename T>
void pack_planes(const T* src, const int64_t* st, int64_t N, int64_t C, int64_t H, int64_t W, int64_t Hp,
                 int64_t Wp, int64_t top, int64_t left, int64_t L, const uint8_t* used, float* dst, int nthreads,
                 int64_t SW = 0) {
    if (SW <= 0) SW = L;
    const int64_t cb = (C + L - 1) / L, slabs = L / SW;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < cb * N * Hp; ++it) {
        const int64_t c = it / (N * Hp), n = (it / Hp) % N, hh = it % Hp;
        if (!used[c]) continue;
        const int64_t h = hh - top;
        for (int64_t sl = 0; sl < slabs; ++sl) {
            const int64_t c0 = c * L + sl * SW, width = std::max<int64_t>(0, std::min(SW, C - c0));
            float* d = dst + (((c * slabs + sl) * N + n) * Hp + hh) * Wp * SW;
            if (h < 0 || h >= H) {
                std::memset(d, 0, sizeof(float) * Wp * SW);
                continue;
            }
            const T* row = src + n * st[0] + c0 * st[1] + h * st[2];
            for (int64_t ww = 0; ww < Wp; ++ww, d += SW) {
                const int64_t w = ww - left;
                if (w < 0 || w >= W) {
                    std::memset(d, 0, sizeof(float) * SW);
                    continue;
                }
                const T* p = row + w * st[3];
                if (std::is_same_v<T, float> && st[1] == 1)
                    std::memcpy(d, p, sizeof(float) * width);
                else
                    for (int64_t q = 0; q < width; ++q) d[q] = widen(p[q * st[1]]);
                if (width < SW) std::memset(d + width, 0, sizeof(float) * (SW - width));
            }
        }
    }
}

template <typename... A>
void pack_any(bool is_bf16, const void* src, A... args) {
    if (is_bf16)
        pack_planes(static_cast<const bf16*>(src), args...);
    else
        pack_planes(static_cast<const float*>(src), args...);
}

// base(t) for every output position, in rows of a panel (see the top of the file).
int64_t* token_rows(const Geom& g, int64_t Hp, int64_t Wp) {
    const int64_t M = g.tokens();
    int64_t* r = (int64_t*)std::malloc(sizeof(int64_t) * (M > 0 ? M : 1));
    if (r)
        for (int64_t t = 0; t < M; ++t) {
            const int64_t wo = t % g.w_out, ho = (t / g.w_out) % g.h_out, n = t / (g.w_out * g.h_out);
            r[t] = (n * Hp + ho * g.sh) * Wp + wo * g.sw;
        }
    return r;
}

// Per block: where its operand rows start, in floats from the packed buffer's start (panel + tap shift).
// A row is R floats (L, or a slab's width in the weight gradient's slab-major packing).
int64_t* block_offsets(const Geom& g, const int32_t* cols, int64_t nb, int64_t L, int64_t Hp, int64_t Wp,
                       int64_t R = 0) {
    if (R <= 0) R = L;
    const int64_t per_tap = g.c_pad / L, panel = g.n * Hp * Wp * L;
    int64_t* o = (int64_t*)std::malloc(sizeof(int64_t) * (nb > 0 ? nb : 1));
    if (o)
        for (int64_t p = 0; p < nb; ++p) {
            const int64_t tap = cols[p] / per_tap, cb = cols[p] % per_tap;
            o[p] = cb * panel + ((tap / g.kw) * g.dh * Wp + (tap % g.kw) * g.dw) * R;
        }
    return o;
}

// One MR-token by VL*NV-channel input-gradient tile of one matrix column (one tap of one channel block),
// summed in registers over the column's blocks, then added into the rows of dxp the tap read. Bslab as
// in fwd_tile; woff is the slab's first channel.
template <int NV, int MR>
inline void dgrad_tile(const float* Dp, int64_t M, int64_t L, const float* Bslab, int64_t W, int64_t woff,
                       const int32_t* grow, const int32_t* sel, int32_t s, int32_t e, int64_t t, const int64_t* trow,
                       float* dst) {
    vf acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = bc(0.f);
    accumulate(
        acc, s, e, L, NV * VL, 0, [&](int32_t p) { return Dp + ((int64_t)grow[p] * M + t) * L; },
        [&](int i) { return i * L; }, [&](int32_t p) { return Bslab + (int64_t)sel[p] * L * W; });
    for (int i = 0; i < MR; ++i) {
        float* d = dst + trow[t + i] * W + woff;
        for (int v = 0; v < NV; ++v) st(d + VL * v, ld(d + VL * v) + acc[i][v]);
    }
}

template <int NV, int MR>
void conv_dgrad(const Geom& g, const float* Dp, const int64_t* trow, int64_t L, const float* B, int64_t W,
                const int32_t* col_offsets, const int32_t* grow, const int32_t* sel, float* dxp, int64_t Hp,
                int64_t Wp, int nthreads) {
    const int64_t M = g.tokens(), per_tap = g.c_pad / W, taps = g.kh * g.kw, hw = g.h_out * g.w_out;
    const int64_t plane = Hp * Wp * W, slabs = W / (VL * NV);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < per_tap * g.n; ++it) {
        const int64_t cb = it / g.n, n = it % g.n;
        // dst + trow[t]*W is token t's row of this channel block's panel (image n's rows lie in this item).
        float* dst = dxp + cb * g.n * plane;
        std::memset(dst + n * plane, 0, sizeof(float) * plane);
        for (int64_t tap = 0; tap < taps; ++tap) {
            const int64_t col = tap * per_tap + cb;
            const int32_t s = col_offsets[col], e = col_offsets[col + 1];
            if (s == e) continue;
            float* shifted = dst + ((tap / g.kw) * g.dh * Wp + (tap % g.kw) * g.dw) * W;
            const int64_t t0 = n * hw, t1 = t0 + hw;
            for (int64_t slab = 0; slab < slabs; ++slab) {
                const int64_t woff = slab * NV * VL;
                const float* Bslab = B + slab * L * NV * VL;
                int64_t t = t0;
                for (; t + MR <= t1; t += MR)
                    dgrad_tile<NV, MR>(Dp, M, L, Bslab, W, woff, grow, sel, s, e, t, trow, shifted);
                with_rows<MR - 1>(t1 - t, [&](auto r) {
                    dgrad_tile<NV, decltype(r)::value>(Dp, M, L, Bslab, W, woff, grow, sel, s, e, t, trow, shifted);
                });
            }
        }
    }
}

// dx[n, c, h, w] = dxp[c / L][n][h + ph][w + pw][c % L], into dx's element strides s (rounded once).
// Unit channel stride (channels_last): a position's channels are one copy per block. Otherwise (NCHW):
// one work item per (image, channel block) walks each channel's rows, so the writes run along w and
// the item's plane of dxp (Hp*Wp*L floats, 25 KiB at 14x14 with L = 32) stays in L1 while its L
// channels read it.
template <typename T>
void unpack_dx(const Geom& g, const float* dxp, int64_t Hp, int64_t Wp, int64_t L, T* dx, const int64_t* s,
               int nthreads) {
    const int64_t cb = (g.c_in + L - 1) / L;
    if (s[1] != 1) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t it = 0; it < g.n * cb; ++it) {
            const int64_t n = it / cb, c = it % cb, width = std::min(L, g.c_in - c * L);
            const float* plane = dxp + (c * g.n + n) * Hp * Wp * L;
            for (int64_t q = 0; q < width; ++q) {
                T* o = dx + n * s[0] + (c * L + q) * s[1];
                for (int64_t h = 0; h < g.h; ++h) {
                    const float* p = plane + ((h + g.ph) * Wp + g.pw) * L + q;
                    T* oh = o + h * s[2];
                    for (int64_t w = 0; w < g.w; ++w) narrow(p[w * L], oh + w * s[3]);
                }
            }
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t it = 0; it < g.n * g.h; ++it) {
        const int64_t n = it / g.h, h = it % g.h;
        for (int64_t w = 0; w < g.w; ++w) {
            T* o = dx + n * s[0] + h * s[2] + w * s[3];
            for (int64_t c = 0; c < cb; ++c) {
                const float* p = dxp + (((c * g.n + n) * Hp + h + g.ph) * Wp + w + g.pw) * L;
                const int64_t width = std::min(L, g.c_in - c * L);
                if (std::is_same_v<T, float>)
                    std::memcpy(o + c * L, p, sizeof(float) * width);
                else
                    for (int64_t q = 0; q < width; ++q) narrow(p[q], o + c * L + q);
            }
        }
    }
}

// One work item per (trainable block, channel slab); tokens in chunks of TC so both operands' chunks stay
// in L1/L2 while every row tile of the block passes over them. Xp is slab-major (pack_planes with SW =
// VL*NV, so a token's slab is one cache line, not a part of every 4*bk-byte row), slab_panel floats
// per slab; rows[t] = base(t) * VL*NV.
template <int NV, int MR, int TC>
void conv_wgrad(const float* Dp, const float* Xp, int64_t M, const int64_t* rows, const int32_t* brow,
                const int64_t* boff, int64_t nb, int64_t bm, int64_t bk, int64_t slab_panel, float* dw,
                int nthreads) {
    const int64_t slabs = bk / (VL * NV);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < nb * slabs; ++it) {
        const int64_t b = it / slabs, woff = (it % slabs) * NV * VL;
        const float* D = Dp + (int64_t)brow[b] * M * bm;
        const float* X = Xp + boff[b] + (it % slabs) * slab_panel;
        const auto x_row = [X, rows](int64_t t) { return X + rows[t]; };
        float* out = dw + b * bm * bk + woff;
        for (int64_t t0 = 0; t0 < M; t0 += TC) {
            const int64_t t1 = std::min(M, t0 + TC);
            int64_t j = 0;
            for (; j + MR <= bm; j += MR) dw_tile<NV, MR>(D + j, bm, x_row, t0, t1, out + j * bk, bk, t0 == 0);
            with_rows<MR - 1>(bm - j, [&](auto r) {
                dw_tile<NV, decltype(r)::value>(D + j, bm, x_row, t0, t1, out + j * bk, bk, t0 == 0);
            });
        }
    }
}

}  // namespace

extern "C" {

// Forward: y (N*Ho*Wo, Cout) with row stride ldy (channels_last y is ldy = Cout), from x with element
// strides xs over (N, C, H, W). B holds the CSR-ordered blocks as stored, (nnzb, bm, bk) fp32 (read
// transposed as they are repacked); offsets
// (rb + 1) and cols (nnzb) are the layout's row_offsets and col_indices. Returns 0; 1 for a block side
// that is not a multiple of 16; 2 when memory ran out (nothing written).
int sk_conv_fwd(const void* x, const int64_t* xs, const int64_t* geom, const float* B, const int32_t* offsets,
                int64_t rb, const int32_t* cols, int64_t bm, int64_t bk, const float* bias, void* y, int64_t ldy,
                int is_bf16, int nthreads) {
    const Geom g(geom);
    if (bm % 16 != 0 || bk % 16 != 0 || g.c_pad % bk != 0) return 1;
    const int64_t Hp = g.hp(), Wp = g.wp(), M = g.tokens(), nnzb = offsets[rb], per_tap = g.c_pad / bk;
    uint8_t* used = (uint8_t*)std::calloc(per_tap, 1);
    if (used)
        for (int64_t p = 0; p < nnzb; ++p) used[cols[p] % per_tap] = 1;
    int64_t* trow = used ? token_rows(g, Hp, Wp) : nullptr;
    int64_t* boff = trow ? block_offsets(g, cols, nnzb, bk, Hp, Wp) : nullptr;
    float* Xp = boff ? ws_a.get((size_t)per_tap * g.n * Hp * Wp * bk) : nullptr;
    float* Bs = Xp ? ws_b.get((size_t)nnzb * bm * bk) : nullptr;
    if (Bs) {
        pack_any(is_bf16, x, xs, g.n, g.c_in, g.h, g.w, Hp, Wp, g.ph, g.pw, bk, used, Xp, nthreads);
        if (ldy == g.c_out) prepare_output(y, (size_t)M * ldy * (is_bf16 ? 2 : 4), nthreads);  // gap-free: all of it is written
    }
    const int rc = !Bs ? 2 : by_width(bm, [&](auto nv, auto mr) {
        constexpr int NV = decltype(nv)::value, MR = decltype(mr)::value;
        pack_slabs(B, nnzb, bk, bm, NV * VL, true, Bs, nthreads);
        const auto a_block = [&](int32_t p) { return Xp + boff[p]; };
        const auto row_of = [&](int64_t t) { return trow[t] * bk; };
        if (is_bf16)
            group_mm<NV, MR, 96>(a_block, row_of, M, bk, Bs, bm, offsets, rb, nullptr, bias, static_cast<bf16*>(y),
                                 ldy, g.c_out, nthreads);
        else
            group_mm<NV, MR, 96>(a_block, row_of, M, bk, Bs, bm, offsets, rb, nullptr, bias, static_cast<float*>(y),
                                 ldy, g.c_out, nthreads);
    });
    std::free(used);
    std::free(trow);
    std::free(boff);
    return rc;
}

// Both gradients from one packing of dy (element strides dys over (N, Cout, Ho, Wo)):
// * dx (when not null, element strides dxs over (N, Cin, H, W)): vals are the CSR-ordered blocks as
//   stored, (nnzb, bm, bk) fp32; col_offsets (kh*kw*c_pad/bk + 1), rows_t and sel_t are the layout's
//   col_offsets, row_indices_t and block_index_t (the transposed walk).
// * dw (when not null): (nt, bm, bk) fp32 for the trainable blocks at block rows trow_b and matrix
//   columns tcol_b; x has element strides xs.
// Returns as sk_conv_fwd does.
int sk_conv_bwd(const void* dy, const int64_t* dys, const void* x, const int64_t* xs, const int64_t* geom,
                const float* vals, int64_t bm, int64_t bk, const int32_t* col_offsets, const int32_t* rows_t,
                const int32_t* sel_t, void* dx, const int64_t* dxs, const int32_t* trow_b, const int32_t* tcol_b,
                int64_t nt, float* dw, int is_bf16, int nthreads) {
    const Geom g(geom);
    if (bm % 16 != 0 || bk % 16 != 0 || g.c_pad % bk != 0) return 1;
    const int64_t Hp = g.hp(), Wp = g.wp(), M = g.tokens(), rb = (g.c_out + bm - 1) / bm, per_tap = g.c_pad / bk;
    const int64_t ncols = g.kh * g.kw * per_tap;
    uint8_t* urow = (uint8_t*)std::calloc(rb, 1);
    uint8_t* ucb = (uint8_t*)std::calloc(per_tap, 1);
    int rc = urow && ucb ? 0 : 2;
    if (!rc) {
        if (dx)
            for (int64_t p = 0; p < col_offsets[ncols]; ++p) urow[rows_t[p]] = 1;
        if (dw)
            for (int64_t b = 0; b < nt; ++b) urow[trow_b[b]] = 1, ucb[tcol_b[b] % per_tap] = 1;
    }
    // Dp: dy over output positions (no padding), block-major; rows of the output plane are tokens.
    float* Dp = rc ? nullptr : ws_a.get((size_t)rb * M * bm);
    int64_t* trow = Dp ? token_rows(g, Hp, Wp) : nullptr;
    if (!trow) rc = 2;
    if (!rc) pack_any(is_bf16, dy, dys, g.n, g.c_out, g.h_out, g.w_out, g.h_out, g.w_out, 0, 0, bm, urow, Dp, nthreads);
    if (!rc && dx) {
        float* dxp = ws_c.get((size_t)per_tap * g.n * Hp * Wp * bk);
        const int64_t nnzb = col_offsets[ncols];
        float* Bs = dxp ? ws_b.get((size_t)nnzb * bm * bk) : nullptr;
        if (!Bs) rc = 2;
        if (!rc)
            rc = by_width(bk, [&](auto nv, auto mr) {
                pack_slabs(vals, nnzb, bm, bk, decltype(nv)::value * VL, false, Bs, nthreads);
                conv_dgrad<decltype(nv)::value, decltype(mr)::value>(g, Dp, trow, bm, Bs, bk, col_offsets,
                                                                     rows_t, sel_t, dxp, Hp, Wp, nthreads);
            });
        // Only a gap-free dx (its extent is its element count): the kernel writes all of that range.
        const int64_t extent = 1 + (g.n - 1) * dxs[0] + (g.c_in - 1) * dxs[1] + (g.h - 1) * dxs[2] + (g.w - 1) * dxs[3];
        if (!rc && extent == g.n * g.c_in * g.h * g.w) prepare_output(dx, (size_t)extent * (is_bf16 ? 2 : 4), nthreads);
        if (!rc) {
            if (is_bf16)
                unpack_dx(g, dxp, Hp, Wp, bk, static_cast<bf16*>(dx), dxs, nthreads);
            else
                unpack_dx(g, dxp, Hp, Wp, bk, static_cast<float*>(dx), dxs, nthreads);
        }
    }
    if (!rc && dw && M == 0) std::memset(dw, 0, sizeof(float) * nt * bm * bk);
    if (!rc && dw && nt > 0 && M > 0) {
        float* Xp = ws_b.get((size_t)per_tap * g.n * Hp * Wp * bk);
        if (!Xp) rc = 2;
        if (!rc) {
            prepare_output(dw, (size_t)nt * bm * bk * 4, nthreads);
            int oom = 0;
            rc = by_width(bk, [&](auto nv, auto mr) {
                constexpr int64_t SW = decltype(nv)::value * VL;
                int64_t* boff = block_offsets(g, tcol_b, nt, bk, Hp, Wp, SW);
                if (!boff) {
                    oom = 2;
                    return;
                }
                pack_any(is_bf16, x, xs, g.n, g.c_in, g.h, g.w, Hp, Wp, g.ph, g.pw, bk, ucb, Xp, nthreads, SW);
                for (int64_t t = 0; t < M; ++t) trow[t] *= SW;
                conv_wgrad<decltype(nv)::value, decltype(mr)::value, 64>(Dp, Xp, M, trow, trow_b, boff, nt, bm,
                                                                          bk, g.n * Hp * Wp * SW, dw, nthreads);
                std::free(boff);
            });
            if (!rc) rc = oom;
        }
    }
    std::free(urow);
    std::free(ucb);
    std::free(trow);
    return rc;
}

}  // extern "C"
