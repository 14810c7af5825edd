// The small-linear kernel, written once for every instruction set. small_linear_cpu.cpp
// includes this file once per path, inside that path's namespace, after defining
//   FD_FN   the attributes of every function here (the path's target, always_inline), and
//   Ops     the path's vector operations: V (a vector of kLanes floats), zero, load, Tail,
//           tail (mask of the first r lanes), load_tail (masked-out lanes read as 0), fma
//           (a * b + c, lane-wise), sum (the fixed pairwise sum of the lanes), kMaxRows (rows
//           of x per tile) and kCols(MB) (weight rows per tile of MB rows of x).
// No include guard: it is meant to be included several times.
//
// Work order: blocks of kBlock weight rows; for each block, tiles of up to kMaxRows rows of x
// (a single pass for M <= kMaxRows, so each weight row is read from memory once); within a
// tile, kCols(MB) weight rows at a time against all MB rows, one accumulator vector per output.
// The first pass over a block prefetches the block `prefetch_rows` rows ahead.
//
// Every output gets the same operations whatever tile it is in: acc = 0; acc = fma(w, x, acc)
// for each full kLanes-wide step of k in order, then once more for the masked tail; y = sum(acc)
// (+ bias). Tile shapes only decide which outputs are computed together.

constexpr int kBlock = 12;  // weight rows per block: a multiple of every kCols

template <int NB, int MB, bool PF>
FD_FN void tile(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias,
                float* y, int64_t ldy, int64_t K, const float* pf) {
  using V = typename Ops::V;
  constexpr int L = Ops::kLanes;
  V acc[NB][MB];
#pragma GCC unroll 16
  for (int i = 0; i < NB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < MB; ++j) acc[i][j] = Ops::zero();
  const int64_t kfull = K - K % L;
  int64_t k = 0;
  for (; k < kfull; k += L) {
    // One prefetch per 64-byte line of each row, into L2 (locality 2: prefetcht1 on x86).
    if (PF && (L >= 16 || k % 16 == 0)) {
#pragma GCC unroll 16
      for (int i = 0; i < NB; ++i) __builtin_prefetch(pf + i * ldw + k, 0, 2);
    }
    V wv[NB];
#pragma GCC unroll 16
    for (int i = 0; i < NB; ++i) wv[i] = Ops::load(w + i * ldw + k);
#pragma GCC unroll 16
    for (int j = 0; j < MB; ++j) {
      const V xv = Ops::load(x + j * ldx + k);
#pragma GCC unroll 16
      for (int i = 0; i < NB; ++i) acc[i][j] = Ops::fma(wv[i], xv, acc[i][j]);
    }
  }
  if (k < K) {
    const typename Ops::Tail t = Ops::tail(K - k);
    V wv[NB];
#pragma GCC unroll 16
    for (int i = 0; i < NB; ++i) wv[i] = Ops::load_tail(w + i * ldw + k, t);
#pragma GCC unroll 16
    for (int j = 0; j < MB; ++j) {
      const V xv = Ops::load_tail(x + j * ldx + k, t);
#pragma GCC unroll 16
      for (int i = 0; i < NB; ++i) acc[i][j] = Ops::fma(wv[i], xv, acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < NB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < MB; ++j) {
      const float s = Ops::sum(acc[i][j]);
      y[j * ldy + i] = bias ? s + bias[i] : s;
    }
}

// Weight rows [0, nb) of a block against MB rows of x.
template <int MB>
FD_FN void block(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias,
                 float* y, int64_t ldy, int64_t nb, int64_t K, const float* pf) {
  constexpr int NB = Ops::kCols(MB);
  int64_t i = 0;
  for (; i + NB <= nb; i += NB) {
    const float* b = bias ? bias + i : nullptr;
    if (pf)
      tile<NB, MB, true>(x, ldx, w + i * ldw, ldw, b, y + i, ldy, K, pf + i * ldw);
    else
      tile<NB, MB, false>(x, ldx, w + i * ldw, ldw, b, y + i, ldy, K, nullptr);
  }
  for (; i < nb; ++i)
    tile<1, MB, false>(x, ldx, w + i * ldw, ldw, bias ? bias + i : nullptr, y + i, ldy, K,
                       nullptr);
}

template <int MB>
FD_FN void rows(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias,
                float* y, int64_t ldy, int64_t mb, int64_t nb, int64_t K, const float* pf) {
  if constexpr (MB > 1) {
    if (mb < MB) return rows<MB - 1>(x, ldx, w, ldw, bias, y, ldy, mb, nb, K, pf);
  }
  block<MB>(x, ldx, w, ldw, bias, y, ldy, nb, K, pf);
}

__attribute__((noinline)) FD_TARGET_ONLY void run(
    const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* y,
    int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t prefetch_rows) {
  constexpr int R = Ops::kMaxRows;
  for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
    const int64_t nb = N - n0 < kBlock ? N - n0 : kBlock;
    const float* pf = prefetch_rows > 0 && n0 + prefetch_rows + kBlock <= N
                          ? w + (n0 + prefetch_rows) * ldw
                          : nullptr;
    for (int64_t m0 = 0; m0 < M; m0 += R) {
      const int64_t mb = M - m0 < R ? M - m0 : R;
      rows<R>(x + m0 * ldx, ldx, w + n0 * ldw, ldw, bias ? bias + n0 : nullptr,
              y + m0 * ldy + n0, ldy, mb, nb, K, m0 == 0 ? pf : nullptr);
    }
  }
}
