// A CPU fp32 linear for small row counts: y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]).
//
// Made for the few rows of a speculative-decoding verification forward (M = 1..64), where a
// BLAS sgemm is tuned poorly: each weight row is streamed from memory once and reused for up to
// 8 rows of x held in registers, with software prefetch of the rows to come.
//
// Layout: row-major with unit inner stride; ldx, ldw, ldy are row strides in elements
// (ldx >= K, ldw >= K, ldy >= N when the matrices have more than one row). bias may be null.
//
// Row invariance: within one instruction-set path, y[m, n] is computed by the same sequence of
// floating-point operations whatever M is and wherever row m lands in the tiling (lane-wise
// fused multiply-adds over k, a fixed pairwise sum of the lanes, then + bias[n]), so one row
// computed alone equals, bitwise, the same row computed in a batch.
#pragma once

#include <cstdint>
#include <string>

namespace fastdecode {
namespace linear {

// The instruction-set paths. avx512 and avx2 (with FMA) exist on x86-64 builds only.
enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);
// The path named `name` (avx512 | avx2 | scalar); throws std::invalid_argument naming `source`
// for any other name.
Isa parse_isa(const std::string& name, const char* source);
// Whether this build and this CPU can run `isa`.
bool isa_supported(Isa isa);
// The best path this CPU supports (detected once).
Isa best_isa();
// The path small_linear_cpu takes: best_isa(), unless the environment variable
// FASTDECODE_CPU_ISA (avx512 | avx2 | scalar, read once) or set_isa() chose another.
Isa active_isa();
// Forces `isa` for later calls (for tests and benchmarks); throws std::invalid_argument when
// it is not supported here.
void set_isa(Isa isa);

void small_linear_cpu(const float* x, int64_t ldx, const float* w, int64_t ldw,
                      const float* bias, float* y, int64_t ldy, int64_t M, int64_t N, int64_t K);
// The same on the given path (must be supported).
void small_linear_cpu_isa(Isa isa, const float* x, int64_t ldx, const float* w, int64_t ldw,
                          const float* bias, float* y, int64_t ldy, int64_t M, int64_t N,
                          int64_t K);

}  // namespace linear
}  // namespace fastdecode
