// Host loops over the per-thread logic of pool_logic.h: one iteration per CUDA thread.
#include "ngram/pool_logic.h"
#include "ngram/pool_ops.h"

namespace fastdecode {
namespace ngram {

void insert_cpu(const Pool& pool, int64_t B, int64_t M, const int64_t* keys,
                const int64_t* values, const uint8_t* valid) {
  for (int64_t b = 0; b < B; ++b)
    insert_row(pool.row_of(b), M, keys + b * M, values + b * M * pool.W,
               valid ? valid + b * M : nullptr);
}

void harvest_cpu(const Pool& pool, int64_t B, int64_t width, const int64_t* window,
                 const int64_t* new_tokens) {
  for (int64_t b = 0; b < B; ++b)
    harvest_row(pool.row_of(b), width, window + b * pool.W * width, new_tokens + b * width);
}

void insert_sequence_cpu(const Pool& pool, int64_t B, int64_t L, const int64_t* seq,
                         const int64_t* start, const int64_t* end) {
  for (int64_t b = 0; b < B; ++b)
    insert_sequence_row(pool.row_of(b), L, seq + b * L, start[b], end[b]);
}

void lookup_cpu(const Pool& pool, int64_t B, const int64_t* keys, int64_t* candidates,
                int64_t* out_count) {
  for (int64_t b = 0; b < B; ++b) {
    const Pool row = pool.row_of(b);
    for (int64_t g = 0; g < pool.G; ++g)
      lookup_entry(row, keys[b], g, candidates + (b * pool.G + g) * pool.W);
    out_count[b] = lookup_count(row, keys[b]);
  }
}

}  // namespace ngram
}  // namespace fastdecode
