// Shared by the native CPU kernels (bsmm.cpp, bsconv.cpp, ...): vectors, the per-thread workspace, bf16
// conversion, the block-major packing and the register-tile row dispatch. Every .cpp in this folder is
// compiled into one library (kernels/native.py), so the workspaces are shared across files (inline
// thread_local: one instance per thread for the whole library).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <sys/mman.h>

// One vector of VL floats, the target's widest register: 16 (zmm) with AVX-512, else 8 (ymm with AVX2;
// NEON splits it into two q registers). A wider generic vector than the target has is lowered through
// the stack: 16-float vectors on a 2-core AVX2 EPYC ran the 4096x4096 forward at 6 GFLOP/s.
#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4)));  // unaligned loads and stores

static inline vf ld(const float* p) { return *(const vfu*)p; }
static inline void st(float* p, vf v) { *(vfu*)p = v; }
// A compound literal (not `(vf){} + x`, which keeps an add for -0.0) lowers to one vbroadcastss.
#if defined(__AVX512F__)
static inline vf bc(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
#else
static inline vf bc(float x) { return (vf){x, x, x, x, x, x, x, x}; }
#endif

namespace sk {

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
inline thread_local Workspace ws_a, ws_b, ws_c;

#if defined(__linux__) && !defined(MADV_POPULATE_WRITE)
#define MADV_POPULATE_WRITE 23  // Linux >= 5.14; older kernels answer EINVAL, which is ignored
#endif

// Faults a kernel's fresh output [p, p + bytes) in before the kernel writes it: torch allocates outputs
// untouched, and glibc maps blocks above its mmap threshold (which grows to at most 32 MiB) anew each
// call, so every 4 KiB page would fault on first write, under KVM at about 2 us each, with the
// kernel's threads contending for the same page tables. MADV_POPULATE_WRITE maps them in one call per
// 2 MiB piece, the pieces shared among the threads. Measured on a 2-core AVX-512 EPYC, 2 threads,
// 4096x4096 linear layer over 2048 tokens at density 0.1, 64x64 blocks, the sparse step taken after
// a dense and a masked one (as the bench suites do), forward / backward p50 ms, two runs each:
//   faults in the kernels                  65 / 120   62 / 108
//   populate on the calling thread         58 / 109   66 / 123
//   populate shared among the threads      53 / 100   54 / 107   (this)
//   MADV_HUGEPAGE, then populate           63 / 212   98 / 229
// Huge pages win when the step runs alone (47 / 100, this 49 / 98) but lose after other large
// allocations: with THP defrag set to "madvise", a fault on advised memory compacts memory first
// (21 ms a madvise call, strace -c), so outputs get no huge-page advice. Populating writes no data
// (pages already there are left as they are, including the partial pages at the range's ends,
// which other allocations may share); the kernel writes every byte of the range anyway, so nothing
// is committed that would not be. Advice only: failures (EINVAL before Linux 5.14) are ignored.
inline void prepare_output(void* p, size_t bytes, int nthreads) {
    if (bytes == 0) return;
    const uintptr_t page = 4096, piece = uintptr_t(1) << 21;
    const uintptr_t ps = (uintptr_t)p & ~(page - 1), pe = ((uintptr_t)p + bytes + page - 1) & ~(page - 1);
    const int64_t pieces = (int64_t)((pe - ps + piece - 1) / piece);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < pieces; ++i) {
        const uintptr_t s = ps + (uintptr_t)i * piece, e = std::min<uintptr_t>(pe, s + piece);
        madvise((void*)s, e - s, MADV_POPULATE_WRITE);
    }
}
// Per-thread scratch inside a parallel region (a work item's partial sums); kept for the thread's life.
inline thread_local Workspace ws_tile;

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

// dst[c][s][t][0:SW] = src[t, c*L + s*SW + 0:SW] for the column blocks c with used[c]; zero past
// `cols`. SW (a divisor of L; L when 0) cuts each block into column slabs of its own contiguous rows.
template <typename T>
inline void pack(const T* src, int64_t ld, int64_t M, int64_t cols, int64_t L, const uint8_t* used, float* dst,
                 int nthreads, int64_t SW = 0) {
    if (SW <= 0) SW = L;
    const int64_t cb = (cols + L - 1) / L, slabs = L / SW;
    const int64_t TC = 256;  // tokens per work item: enough work to amortise scheduling
    const int64_t chunks = (M + TC - 1) / TC;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t it = 0; it < cb * chunks; ++it) {
        const int64_t c = it / chunks, t0 = (it % chunks) * TC, t1 = std::min(M, t0 + TC);
        if (!used[c]) continue;
        for (int64_t sl = 0; sl < slabs; ++sl) {
            const int64_t c0 = c * L + sl * SW, w = std::max<int64_t>(0, std::min(SW, cols - c0));
            float* d = dst + ((c * slabs + sl) * M + t0) * SW;
            const T* s = src + t0 * ld + c0;
            for (int64_t t = t0; t < t1; ++t, d += SW, s += ld) {
                if constexpr (std::is_same_v<T, float>)
                    std::memcpy(d, s, sizeof(float) * w);
                else
                    for (int64_t q = 0; q < w; ++q) d[q] = widen(s[q]);
                if (w < SW) std::memset(d + w, 0, sizeof(float) * (SW - w));
            }
        }
    }
}

// Bs[b][s][l][0:SW] = B[b][l][s*SW + 0:SW] for blocks B (nb, L, W), or B[b][s*SW + 0:SW][l] when
// `transposed` (B is then (nb, W, L)): each SW-wide column slab of a block becomes one contiguous
// (L, SW) panel. A register tile reads its slab row by row; in place, those rows are 4*W bytes apart,
// so a 64-wide block's slab touches only a quarter of L1's sets and two blocks of a chunk evicted
// each other (the forward at density 0.1 ran 10% slower that way).
inline void pack_slabs(const float* B, int64_t nb, int64_t L, int64_t W, int64_t SW, bool transposed, float* Bs,
                       int nthreads) {
    const int64_t slabs = W / SW;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < nb; ++b) {
        const float* src = B + b * L * W;
        float* dst = Bs + b * L * W;
        for (int64_t s = 0; s < slabs; ++s) {
            float* d = dst + s * L * SW;
            if (transposed)
                for (int64_t w = 0; w < SW; ++w)
                    for (int64_t l = 0; l < L; ++l) d[l * SW + w] = src[(s * SW + w) * L + l];
            else
                for (int64_t l = 0; l < L; ++l) std::memcpy(d + l * SW, src + l * W + s * SW, sizeof(float) * SW);
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

// used[i] = 1 for the i in idx[0:count] (calloc'd, the caller frees; nullptr when out of memory).
inline uint8_t* mark_used(int64_t n, const int32_t* idx, int64_t count) {
    uint8_t* used = (uint8_t*)std::calloc(n > 0 ? n : 1, 1);
    if (used)
        for (int64_t p = 0; p < count; ++p) used[idx[p]] = 1;
    return used;
}

// The register tile of every kernel: f(NV, MR) for MR rows by NV vectors of VL floats, for a width
// W (a multiple of 16). Accumulators must stay in registers: AVX-512 has 32 zmm, so 24 accumulators
// fit; AVX2 has 16 ymm, so 12 (plus the weight row's NV and one broadcast). Measured on a 2-core
// AVX2 EPYC, one thread, GFLOP/s (oneDNN's conv 77-85, MKL's GEMM 87-90):
//   3x3 256->256 conv at 14x14, batch 32, 32x32 blocks, density 0.1:
//     tile (MR x NV)   forward  input grad  weight grad
//     6 x 2            53       57          46
//     3 x 4            54       49          30
//     4 x 2            45       44          47
//   4096x4096 linear, 2048 tokens, 64x64 blocks, density 0.1, weight gradient: 6 x 2 63, 3 x 4 56,
//   8 x 1 45; 32x32 blocks: 6 x 2 52, 4 x 2 43.
template <typename F>
inline int by_width(int64_t W, F&& f) {
    if (W % 16 != 0) return 1;
#if defined(__AVX512F__)
    if (W % 64 == 0)
        f(std::integral_constant<int, 4>{}, std::integral_constant<int, 6>{});
    else if (W % 32 == 0)
        f(std::integral_constant<int, 2>{}, std::integral_constant<int, 12>{});
    else
        f(std::integral_constant<int, 1>{}, std::integral_constant<int, 12>{});
#else
    f(std::integral_constant<int, 2>{}, std::integral_constant<int, 6>{});
#endif
    return 0;
}

}  // namespace sk
