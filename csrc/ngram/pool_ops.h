// Launchers of the n-gram pool kernels. The pool is tokens [B, V, G, W] int32 and count [B, V]
// int32 (see pool_logic.h); every other array is contiguous and row-major:
//   insert:          keys [B, M] int64, values [B, M, W] int64, valid [B, M] uint8 or null (all);
//   harvest:         window [B, W, width] int64, new_tokens [B, width] int64;
//   insert_sequence: seq [B, L] int64, start, end [B] int64;
//   lookup:          keys [B] int64 -> candidates [B, G, W] int64, out_count [B] int64.
// The CUDA launchers enqueue on `stream` (a cudaStream_t) and do not synchronise.
#pragma once

#include <cstdint>

#include "ngram/pool_logic.h"

namespace fastdecode {
namespace ngram {

void insert_cpu(const Pool& pool, int64_t B, int64_t M, const int64_t* keys,
                const int64_t* values, const uint8_t* valid);
void harvest_cpu(const Pool& pool, int64_t B, int64_t width, const int64_t* window,
                 const int64_t* new_tokens);
void insert_sequence_cpu(const Pool& pool, int64_t B, int64_t L, const int64_t* seq,
                         const int64_t* start, const int64_t* end);
void lookup_cpu(const Pool& pool, int64_t B, const int64_t* keys, int64_t* candidates,
                int64_t* out_count);

#ifdef FASTDECODE_WITH_CUDA
void insert_cuda(const Pool& pool, int64_t B, int64_t M, const int64_t* keys,
                 const int64_t* values, const uint8_t* valid, void* stream);
void harvest_cuda(const Pool& pool, int64_t B, int64_t width, const int64_t* window,
                  const int64_t* new_tokens, void* stream);
void insert_sequence_cuda(const Pool& pool, int64_t B, int64_t L, const int64_t* seq,
                          const int64_t* start, const int64_t* end, void* stream);
void lookup_cuda(const Pool& pool, int64_t B, const int64_t* keys, int64_t* candidates,
                 int64_t* out_count, void* stream);
#endif

}  // namespace ngram
}  // namespace fastdecode
