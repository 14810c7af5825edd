// Launchers of the draft-tree primitives. Every array is contiguous and row-major:
// draft, parents, predicted, positions [B, T] int64; prefix_len, accept_len, best_node [B] int64;
// path, tokens [B, max_depth + 1] int64; mask [B, T, T] uint8 (0/1); packed [B, T, ceil(T/32)] int32.
// The CUDA launchers enqueue on `stream` (a cudaStream_t) and do not synchronise.
#pragma once

#include <cstdint>

namespace fastdecode {
namespace tree {

void verify_cpu(const int64_t* draft, const int64_t* parents, const int64_t* predicted, int64_t B,
                int64_t T, int64_t max_depth, int64_t* accept_len, int64_t* best_node,
                int64_t* path, int64_t* tokens);
void mask_cpu(const int64_t* parents, int64_t B, int64_t T, uint8_t* mask);
void positions_cpu(const int64_t* parents, const int64_t* prefix_len, int64_t B, int64_t T,
                   int64_t* positions);
void pack_cpu(const uint8_t* mask, int64_t B, int64_t T, int32_t* packed);

#ifdef FASTDECODE_WITH_CUDA
void verify_cuda(const int64_t* draft, const int64_t* parents, const int64_t* predicted, int64_t B,
                 int64_t T, int64_t max_depth, int64_t* accept_len, int64_t* best_node,
                 int64_t* path, int64_t* tokens, void* stream);
void mask_cuda(const int64_t* parents, int64_t B, int64_t T, uint8_t* mask, void* stream);
void positions_cuda(const int64_t* parents, const int64_t* prefix_len, int64_t B, int64_t T,
                    int64_t* positions, void* stream);
void pack_cuda(const uint8_t* mask, int64_t B, int64_t T, int32_t* packed, void* stream);
#endif

}  // namespace tree
}  // namespace fastdecode
