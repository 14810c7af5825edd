// The small-linear kernel's three paths (AVX-512F, AVX2 + FMA, portable C++) and the choice
// between them. The x86 paths are compiled through target attributes, so the build needs no
// -march flag; the CPU is probed once at run time. The kernel itself is small_linear_kernel.h.
//
// This file is compiled with -ffp-contract=off (CMakeLists.txt): the portable path's a * b + c
// must stay a multiply and an add in every tile shape, or rows would round differently
// depending on their tile (the x86 paths call their fused multiply-adds explicitly).
#include "linear/small_linear.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

// FASTDECODE_PORTABLE_ONLY builds the portable path alone, as on a non-x86 machine.
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(FASTDECODE_PORTABLE_ONLY)
#define FD_X86 1
// GCC 12's AVX-512 intrinsics read _mm512_undefined_ps(), which -Wmaybe-uninitialized flags
// wherever they are inlined (GCC bug 105593); the warning is silenced for the header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace fastdecode {
namespace linear {
namespace {

// Prefetch distance of the weight stream, in bytes ahead of the block being computed. The
// prefetches go to L2 (prefetcht1; small_linear_kernel.h): on Zen 4, one core streamed a
// 113 MB weight 1.6x faster that way than with prefetcht0 or hardware prefetch alone, and
// 16-64 KB ahead measured alike (4 KB was slower).
constexpr int64_t kPrefetchBytes = 32 * 1024;

// ---- portable path ----------------------------------------------------------------------------

// GCC/Clang vector extensions: plain lane-wise C++ arithmetic that the compiler maps to
// whatever SIMD the baseline target has (SSE2 on x86-64, NEON on AArch64), or to scalars.
struct ScalarOps {
  static constexpr int kLanes = 4;  // 16-byte vectors: SSE2 and NEON registers
  static constexpr int kMaxRows = 4;
  static constexpr int kCols(int) { return 4; }
  typedef float V __attribute__((vector_size(kLanes * sizeof(float))));
  using Tail = int64_t;
  static inline __attribute__((always_inline)) V zero() { return V{}; }
  static inline __attribute__((always_inline)) V load(const float* p) {
    V r;
    std::memcpy(&r, p, sizeof(r));
    return r;
  }
  static inline __attribute__((always_inline)) Tail tail(int64_t r) { return r; }
  static inline __attribute__((always_inline)) V load_tail(const float* p, Tail t) {
    V r{};
    for (int64_t l = 0; l < t; ++l) r[l] = p[l];
    return r;
  }
  // A multiply, then an add (never fused: the file is built with -ffp-contract=off).
  static inline __attribute__((always_inline)) V fma(V a, V b, V c) { return c + a * b; }
  // Lanes l + l+2, then + l+1.
  static inline __attribute__((always_inline)) float sum(V a) {
    return (a[0] + a[2]) + (a[1] + a[3]);
  }
};

namespace scalar {
using Ops = ScalarOps;
#define FD_TARGET_ONLY
#define FD_FN static inline __attribute__((always_inline))
#include "linear/small_linear_kernel.h"
#undef FD_FN
#undef FD_TARGET_ONLY
}  // namespace scalar

#ifdef FD_X86
// ---- AVX2 + FMA path ----------------------------------------------------------------------------

#define FD_AVX2 __attribute__((target("avx2,fma"), always_inline))

struct Avx2Ops {
  static constexpr int kLanes = 8;
  static constexpr int kMaxRows = 4;
  // 16 ymm registers: NB * MB accumulators + NB weight vectors + one x vector.
  static constexpr int kCols(int rows) { return rows <= 2 ? 4 : 2; }
  using V = __m256;
  using Tail = __m256i;
  static inline FD_AVX2 V zero() { return _mm256_setzero_ps(); }
  static inline FD_AVX2 V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline FD_AVX2 Tail tail(int64_t r) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(r)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline FD_AVX2 V load_tail(const float* p, Tail t) { return _mm256_maskload_ps(p, t); }
  static inline FD_AVX2 V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  // Lanes l + l+4, then + l+2, then + l+1: ScalarOps::sum's order.
  static inline FD_AVX2 float sum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

namespace avx2 {
using Ops = Avx2Ops;
#define FD_TARGET_ONLY __attribute__((target("avx2,fma")))
#define FD_FN static inline __attribute__((target("avx2,fma"), always_inline))
#include "linear/small_linear_kernel.h"
#undef FD_FN
#undef FD_TARGET_ONLY
}  // namespace avx2

// ---- AVX-512F path ------------------------------------------------------------------------------

#define FD_AVX512 __attribute__((target("avx512f"), always_inline))

struct Avx512Ops {
  static constexpr int kLanes = 16;
  static constexpr int kMaxRows = 8;
  // 32 zmm registers: NB * MB accumulators + NB weight vectors + one x vector.
  static constexpr int kCols(int rows) { return rows <= 6 ? 4 : 3; }
  using V = __m512;
  using Tail = __mmask16;
  static inline FD_AVX512 V zero() { return _mm512_setzero_ps(); }
  static inline FD_AVX512 V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline FD_AVX512 Tail tail(int64_t r) {
    return static_cast<__mmask16>((1u << r) - 1u);
  }
  static inline FD_AVX512 V load_tail(const float* p, Tail t) {
    return _mm512_maskz_loadu_ps(t, p);
  }
  static inline FD_AVX512 V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  // Lanes l + l+8, then + l+4, + l+2, + l+1 (in every lane; lane 0 is read).
  static inline FD_AVX512 float sum(V a) {
    a = _mm512_add_ps(a, _mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(1, 0, 3, 2)));
    a = _mm512_add_ps(a, _mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(2, 3, 0, 1)));
    a = _mm512_add_ps(a, _mm512_permute_ps(a, _MM_SHUFFLE(1, 0, 3, 2)));
    a = _mm512_add_ps(a, _mm512_permute_ps(a, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_cvtss_f32(a);
  }
};

namespace avx512 {
using Ops = Avx512Ops;
#define FD_TARGET_ONLY __attribute__((target("avx512f")))
#define FD_FN static inline __attribute__((target("avx512f"), always_inline))
#include "linear/small_linear_kernel.h"
#undef FD_FN
#undef FD_TARGET_ONLY
}  // namespace avx512
#endif  // FD_X86

// ---- choosing a path -------------------------------------------------------------------------

Isa detect() {
#ifdef FD_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::scalar;
}

void check_supported(Isa isa, const char* source) {
  if (!isa_supported(isa))
    throw std::invalid_argument(std::string("fastdecode._C: ") + source + " asks for the " +
                                isa_name(isa) + " path, which this " +
                                (isa == Isa::scalar ? "build" : "CPU or build") +
                                " does not support (best here: " + isa_name(best_isa()) + ")");
}

// The path set_isa() forced, or -1.
std::atomic<int> g_forced{-1};

// The environment's choice, else the best path; read on first use.
Isa default_isa() {
  static const Isa isa = [] {
    const char* env = std::getenv("FASTDECODE_CPU_ISA");
    if (env == nullptr || *env == '\0') return best_isa();
    const Isa chosen = parse_isa(env, "FASTDECODE_CPU_ISA");
    check_supported(chosen, "FASTDECODE_CPU_ISA");
    return chosen;
  }();
  return isa;
}

int64_t prefetch_rows(int64_t ldw) {
  if (ldw <= 0) return 0;
  return (kPrefetchBytes / 4 + ldw - 1) / ldw;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

Isa parse_isa(const std::string& name, const char* source) {
  for (Isa isa : {Isa::avx512, Isa::avx2, Isa::scalar})
    if (name == isa_name(isa)) return isa;
  throw std::invalid_argument(std::string("fastdecode._C: ") + source +
                              " must be avx512, avx2 or scalar, found '" + name + "'");
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2: return best_isa() != Isa::scalar;
    case Isa::avx512: return best_isa() == Isa::avx512;
  }
  return false;
}

Isa best_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() {
  const int forced = g_forced.load(std::memory_order_relaxed);
  return forced >= 0 ? static_cast<Isa>(forced) : default_isa();
}

void set_isa(Isa isa) {
  check_supported(isa, "set_isa");
  g_forced.store(static_cast<int>(isa), std::memory_order_relaxed);
}

void small_linear_cpu_isa(Isa isa, const float* x, int64_t ldx, const float* w, int64_t ldw,
                          const float* bias, float* y, int64_t ldy, int64_t M, int64_t N,
                          int64_t K) {
  const int64_t pf = prefetch_rows(ldw);
  switch (isa) {
#ifdef FD_X86
    case Isa::avx512: return avx512::run(x, ldx, w, ldw, bias, y, ldy, M, N, K, pf);
    case Isa::avx2: return avx2::run(x, ldx, w, ldw, bias, y, ldy, M, N, K, pf);
#endif
    default: return scalar::run(x, ldx, w, ldw, bias, y, ldy, M, N, K, pf);
  }
}

void small_linear_cpu(const float* x, int64_t ldx, const float* w, int64_t ldw,
                      const float* bias, float* y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
  small_linear_cpu_isa(active_isa(), x, ldx, w, ldw, bias, y, ldy, M, N, K);
}

}  // namespace linear
}  // namespace fastdecode
