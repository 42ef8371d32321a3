// Native CPU kernels for element-sparse (CSR) weights: the linear passes of a layout whose blocks are
// mostly mixed (an element mask, such as torch.nn.utils.prune.l1_unstructured leaves), where the block
// kernels of bsmm.cpp would compute every block in full. Loaded by kernels/native.py (kernels/csr_cpu.py
// builds the CSR arrays and routes the calls).
//
// Both kernels pack their activations token-tiled and transposed first:
//   P[tile][c][0:TT] = A[tile*TT + 0:TT, c]    (zero past the last token)
// so the TT tokens of one feature are one contiguous run of TT floats (8 vectors of 8 for TT = 64).
//
// * sk_csr_mm, the forward (A = x, rows = output features, the weight's CSR) and the input gradient
//   (A = dy, rows = input features, the weight's CSC: the same product over the transposed walk):
//     out[t, r] = bias[r] + sum_{p in row r} vals[p] * A[t, idx[p]]
//   A row's sums for a token tile (8 vectors of 8 floats) live in registers over its nonzeros: one
//   broadcast of the value and 8 vector FMAs per nonzero, reading the packed tile where idx points.
//   Each tile is walked in column panels that stay in L2 (see KC); a work item's rows keep their
//   partial sums in a small buffer between panels, which is then stored transposed, so the row-major
//   output is written in runs of 16 contiguous features, never one float per cache line.
// * sk_csr_sampled, the weight gradient at the trainable nonzeros only (an SDDMM):
//     dw[dst[q]] = sum_t DY[t, row(q)] * X[t, idx[q]]
//   per token tile, a row's DY run stays in registers while each of its nonzeros takes a dot product
//   with X's packed run (four nonzeros reduced together); the tiles' partial sums add up in fp32 per
//   nonzero, in tile order, and are then scattered into the zeroed block store dw (the format
//   bsmm_cpu.weight_grad returns). No sum depends on the thread count: results are bitwise the same.
//
// Activations are fp32, or bf16 widened while packing (outputs rounded once, from fp32 sums); values,
// bias and dw are fp32. All sums are fp32. A nonzero's value is read only through idx, so pruned
// columns of A, even NaN ones, never reach a result.
#include <omp.h>

#include "common.h"

namespace {
using namespace sk;

constexpr int64_t TT = 64;  // tokens per tile: 8 accumulators of 8 floats (8 of AVX2's 16 ymm registers)

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16)));

static inline v8 ld8(const float* p) { return *(const v8u*)p; }
static inline void st8(float* p, v8 v) { *(v8u*)p = v; }

// P[tile][c][t] = A[tile*TT + t, c], zero for tokens past M. Work items are (tile, 16 columns): a
// token's 16 columns are one contiguous read, written to 16 runs that stay in L1 for the whole tile.
template <typename T>
void pack_tokens(const T* A, int64_t lda, int64_t M, int64_t cols, float* P, int nthreads) {
    const int64_t tiles = (M + TT - 1) / TT;
    const int64_t CB = 16, cblocks = (cols + CB - 1) / CB;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t it = 0; it < tiles * cblocks; ++it) {
        const int64_t tile = it / cblocks, c0 = (it % cblocks) * CB, c1 = std::min(cols, c0 + CB);
        const int64_t t0 = tile * TT, nt = std::min(TT, M - t0);
        float* d = P + tile * cols * TT;
        for (int64_t t = 0; t < nt; ++t) {
            const T* s = A + (t0 + t) * lda;
            for (int64_t c = c0; c < c1; ++c) d[c * TT + t] = widen(s[c]);
        }
        if (nt < TT)
            for (int64_t c = c0; c < c1; ++c) std::memset(d + c * TT + nt, 0, sizeof(float) * (TT - nt));
    }
}

// A token tile's packed activations (cols x TT floats, 1 MB for 4096 features) do not fit the 512 KB
// L2 of this project's CPU, and a nonzero reads its TT floats wherever idx points: from L3 that took
// the forward at density 0.1 (4096^2, 2048 tokens) to 1.9 s. So each tile is walked in column panels
// of KC features: 0.17 s with KC = 1024 (the weight gradient 0.64 s -> 0.17 s, beside a 0.4 s dense
// GEMM). Measured in thread CPU time, one thread, 1024 tokens, density 0.1 (0.05): forward 130 (65)
// ms with KC = 1024, 111 (60) with 512, 105 (62) with 256, 138 (73) with 128; weight gradient 165
// (91), 134 (80), 143 (90), 149 (105). 512 (128 KB a panel) is best or near it for both.
constexpr int64_t KC = 512;

// seg[r * (np + 1) + j] = the first nonzero of row r whose column is >= j * KC (rows' columns ascend),
// so the nonzeros of row r in panel j are [seg[.. j], seg[.. j + 1]).
int32_t* panel_segments(const int32_t* ptr, int64_t R, const int32_t* idx, int64_t np, int nthreads) {
    int32_t* seg = (int32_t*)std::malloc(sizeof(int32_t) * (R * (np + 1) + 1));
    if (!seg) return nullptr;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < R; ++r) {
        int32_t* s = seg + r * (np + 1);
        int32_t p = ptr[r];
        const int32_t e = ptr[r + 1];
        for (int64_t j = 0; j < np; ++j) {
            s[j] = p;
            while (p < e && idx[p] < (j + 1) * KC) ++p;
        }
        s[np] = e;
    }
    return seg;
}

// y[0:TT] += sum_{p in [s, e)} vals[p] * Pt[idx[p]][0:TT], the sums in registers across the nonzeros.
// Eight 8-float vectors, not four 16-float vectors: GCC keeps loop-carried 16-float values on the stack when the target
// has no 512-bit registers (AVX2 here), and the loop then ran 3x slower.
inline void row_panel(const float* Pt, const int32_t* idx, const float* vals, int32_t s, int32_t e, float* y) {
    v8 a[8];
    for (int v = 0; v < 8; ++v) a[v] = ld8(y + 8 * v);
    for (int32_t p = s; p < e; ++p) {
        const float* xr = Pt + (int64_t)idx[p] * TT;
        const float w = vals[p];
        const v8 wv = {w, w, w, w, w, w, w, w};
        for (int v = 0; v < 8; ++v) a[v] += wv * ld8(xr + 8 * v);
    }
    for (int v = 0; v < 8; ++v) st8(y + 8 * v, a[v]);
}

// Work items are (token tile, RB rows), tile-major, with no barrier between them (a barrier per panel
// stalled both threads whenever the machine's other load descheduled one). An item walks its rows
// panel by panel: RB = 256 rows reuse each 128 KB panel about 13K times at density 0.1 before the
// next panel comes in, and their partial sums (RB x TT floats, 64 KB) stay in L2.
constexpr int64_t CSR_RB = 256;

template <typename OT>
void csr_mm(const float* P, int64_t M, int64_t cols, const int32_t* seg, int64_t np, int64_t R,
            const int32_t* idx, const float* vals, const float* bias, float* Ys, OT* out, int64_t ldo,
            int nthreads) {
    constexpr int64_t RB = CSR_RB, RC = 16;
    const int64_t tiles = (M + TT - 1) / TT, blocks = (R + RB - 1) / RB;
#pragma omp parallel num_threads(nthreads)
    {
        float* Y = Ys + (int64_t)omp_get_thread_num() * RB * TT;  // this thread's partial sums
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < tiles * blocks; ++it) {
            const int64_t tile = it / blocks, r0 = (it % blocks) * RB, r1 = std::min(R, r0 + RB);
            const int64_t t0 = tile * TT, nt = std::min(TT, M - t0);
            const float* Pt = P + tile * cols * TT;
            for (int64_t r = r0; r < r1; ++r) {
                const vf b = bc(bias ? bias[r] : 0.f);
                for (int v = 0; v < TT / VL; ++v) st(Y + (r - r0) * TT + VL * v, b);
            }
            for (int64_t j = 0; j < np; ++j)
                for (int64_t r = r0; r < r1; ++r) {
                    const int32_t* sg = seg + r * (np + 1) + j;
                    if (sg[0] < sg[1]) row_panel(Pt, idx, vals, sg[0], sg[1], Y + (r - r0) * TT);
                }
            // Stored transposed, RC features per token: runs of RC contiguous outputs, not one float per line.
            for (int64_t c0 = r0; c0 < r1; c0 += RC) {
                const int64_t c1 = std::min(r1, c0 + RC);
                for (int64_t t = 0; t < nt; ++t) {
                    OT* o = out + (t0 + t) * ldo;
                    for (int64_t r = c0; r < c1; ++r) narrow(Y[(r - r0) * TT + t], o + r);
                }
            }
        }
    }
}

// sum_v d[v] * x[8v : 8v + 8], as 8 lanes: two chains of four, so each nonzero's FMAs overlap.
static inline v8 dot8(const v8* d, const float* x) {
    v8 u = d[0] * ld8(x), v = d[1] * ld8(x + 8);
    for (int q = 2; q < 8; q += 2) {
        u += d[q] * ld8(x + 8 * q);
        v += d[q + 1] * ld8(x + 8 * q + 8);
    }
    return u + v;
}

// The lane sums of four vectors at once, {sum a, sum b, sum c, sum d}: 6 shuffles and 4 adds, where
// four separate reductions (hsum) take 12 and 12.
static inline v4 hsum4(v8 a, v8 b, v8 c, v8 d) {
    const v8 ab = __builtin_shufflevector(a, b, 0, 8, 1, 9, 2, 10, 3, 11) +
                  __builtin_shufflevector(a, b, 4, 12, 5, 13, 6, 14, 7, 15);
    const v8 cd = __builtin_shufflevector(c, d, 0, 8, 1, 9, 2, 10, 3, 11) +
                  __builtin_shufflevector(c, d, 4, 12, 5, 13, 6, 14, 7, 15);
    const v8 q = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 2, 3, 10, 11) +
                 __builtin_shufflevector(ab, cd, 4, 5, 12, 13, 6, 7, 14, 15);
    return __builtin_shufflevector(q, q, 0, 1, 2, 3) + __builtin_shufflevector(q, q, 4, 5, 6, 7);
}

static inline float hsum8(v8 a) {
    const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

// Work items are RB rows, each over every token tile and panel: an item owns its nonzeros' sums, so
// there is no barrier and no race, and each panel (128 KB) is reused by all RB rows before the next.
// A row's DY run (8 vectors) stays in registers; its nonzeros go four at a time, reduced together.
void csr_sampled(const float* Pd, const float* Px, int64_t M, int64_t N, int64_t K, const int32_t* seg,
                 int64_t np, const int32_t* idx, float* sums, int nthreads) {
    constexpr int64_t RB = 128;
    const int64_t tiles = (M + TT - 1) / TT, blocks = (N + RB - 1) / RB;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t r0 = b * RB, r1 = std::min(N, r0 + RB);
        for (int64_t j = 0; j < np; ++j)  // panel-major: the panel's sums (26 KB for 128 rows at density 0.1) stay in L2
            for (int64_t tile = 0; tile < tiles; ++tile) {
                const float* Dt = Pd + tile * N * TT;
                const float* Xt = Px + tile * K * TT;
                const bool first = tile == 0;
                for (int64_t r = r0; r < r1; ++r) {
                    const int32_t* sg = seg + r * (np + 1) + j;
                    const int32_t s = sg[0], e = sg[1];
                    if (s == e) continue;
                    v8 d[8];
                    for (int v = 0; v < 8; ++v) d[v] = ld8(Dt + r * TT + 8 * v);
                    int32_t p = s;
                    for (; p + 4 <= e; p += 4) {
                        const float* x0 = Xt + (int64_t)idx[p] * TT;
                        const float* x1 = Xt + (int64_t)idx[p + 1] * TT;
                        const float* x2 = Xt + (int64_t)idx[p + 2] * TT;
                        const float* x3 = Xt + (int64_t)idx[p + 3] * TT;
                        const v4 dots = hsum4(dot8(d, x0), dot8(d, x1), dot8(d, x2), dot8(d, x3));
                        for (int q = 0; q < 4; ++q) sums[p + q] = first ? dots[q] : sums[p + q] + dots[q];
                    }
                    for (; p < e; ++p) {
                        const float dot = hsum8(dot8(d, Xt + (int64_t)idx[p] * TT));
                        sums[p] = first ? dot : sums[p] + dot;
                    }
                }
            }
    }
}

}  // namespace

extern "C" {

// out[t, r] = bias[r] + sum_{p in [ptr[r], ptr[r+1])} vals[p] * A[t, idx[p]] for r < R, as (M, R) with
// row stride ldo. A is (M, a_cols) with row stride lda and unit column stride; A and out are both fp32,
// or both bf16 when is_bf16; vals and bias (or nullptr) fp32. Every idx must lie in [0, a_cols).
// Returns 0, or 2 when the packing workspace could not be allocated (nothing written).
int sk_csr_mm(const void* A, int64_t lda, int64_t M, int64_t a_cols, const int32_t* ptr, int64_t R,
              const int32_t* idx, const float* vals, const float* bias, void* out, int64_t ldo, int is_bf16,
              int nthreads) {
    const int64_t tiles = (M + TT - 1) / TT, np = std::max<int64_t>(1, (a_cols + KC - 1) / KC);
    float* P = ws_a.get((size_t)tiles * a_cols * TT);
    int32_t* seg = P ? panel_segments(ptr, R, idx, np, nthreads) : nullptr;
    if (!seg) return 2;
    float* Y = ws_b.get((size_t)std::max(1, nthreads) * CSR_RB * TT);  // every thread's partial sums
    if (!Y) {
        std::free(seg);
        return 2;
    }
    if (is_bf16)
        pack_tokens(static_cast<const bf16*>(A), lda, M, a_cols, P, nthreads);
    else
        pack_tokens(static_cast<const float*>(A), lda, M, a_cols, P, nthreads);
    if (ldo == R) prepare_output(out, (size_t)M * R * (is_bf16 ? 2 : 4), nthreads);  // gap-free: all of it is written
    if (is_bf16)
        csr_mm(P, M, a_cols, seg, np, R, idx, vals, bias, Y, static_cast<bf16*>(out), ldo, nthreads);
    else
        csr_mm(P, M, a_cols, seg, np, R, idx, vals, bias, Y, static_cast<float*>(out), ldo, nthreads);
    std::free(seg);
    return 0;
}

// Weight gradient at the nonzeros q of a CSR over the N rows (ptr, N + 1 entries; idx, the columns):
//   dw[dst[q]] = sum_t DY[t, row(q)] * X[t, idx[q]],   every other of the dw_numel entries of dw zero.
// DY is (M, N), X (M, K), both fp32 or both bf16 (is_bf16), unit column stride; dw fp32, contiguous.
// Returns 0, or 2 when the workspace could not be allocated (nothing written).
int sk_csr_sampled(const void* DY, int64_t lddy, int64_t N, const void* X, int64_t ldx, int64_t K, int64_t M,
                   const int32_t* ptr, const int32_t* idx, const int64_t* dst, float* dw, int64_t dw_numel,
                   int is_bf16, int nthreads) {
    const int64_t tiles = (M + TT - 1) / TT, nnz = ptr[N], np = std::max<int64_t>(1, (K + KC - 1) / KC);
    float* Pd = ws_a.get((size_t)tiles * N * TT);
    float* Px = Pd ? ws_b.get((size_t)tiles * K * TT) : nullptr;
    float* sums = Px ? ws_c.get((size_t)nnz) : nullptr;
    int32_t* seg = sums ? panel_segments(ptr, N, idx, np, nthreads) : nullptr;
    if (!seg) return 2;
    if (is_bf16) {
        pack_tokens(static_cast<const bf16*>(DY), lddy, M, N, Pd, nthreads);
        pack_tokens(static_cast<const bf16*>(X), ldx, M, K, Px, nthreads);
    } else {
        pack_tokens(static_cast<const float*>(DY), lddy, M, N, Pd, nthreads);
        pack_tokens(static_cast<const float*>(X), ldx, M, K, Px, nthreads);
    }
    if (tiles == 0)
        std::memset(sums, 0, sizeof(float) * nnz);
    else
        csr_sampled(Pd, Px, M, N, K, seg, np, idx, sums, nthreads);
    std::free(seg);
    prepare_output(dw, (size_t)dw_numel * 4, nthreads);
    const int64_t ZC = 1 << 16;  // zero the store in chunks, on the threads that scatter into it (first touch)
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t z = 0; z < dw_numel; z += ZC) std::memset(dw + z, 0, sizeof(float) * std::min(ZC, dw_numel - z));
#pragma omp for schedule(static)
        for (int64_t q = 0; q < nnz; ++q) dw[dst[q]] = sums[q];
    }
    return 0;
}

}  // extern "C"
