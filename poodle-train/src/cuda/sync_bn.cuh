// Synchronised BatchNorm's kernels (model/sync_bn_fused.rs), included by kernels.cu. Nothing
// here depends on the rest of kernels.cu, so that the host emulation in
// poodle-train/tests/cuda_emulation runs this very text on the CPU (the test
// cuda_kernels_emulated).
#pragma once

#include "elem.cuh"

// Per-channel sums over (n, positions) of an (n, c, hw) map, the normalising affine and the
// input gradient, for f32 and bf16 activations with f32 statistics. The all-reduce of the sums
// between them is the caller's (NCCL).

#define BN_SUM_THREADS 256

// Where value j of channel ch (j < n * hw, batch-major) sits in an (n, c, hw) map. The
// launchers keep n * hw (plus a grid's stride) within an int.
__device__ static inline long long bn_index(int j, int ch, int c, int hw) {
    int b = j / hw;
    return ((long long)b * c + ch) * hw + (j - b * hw);
}

// Block-wide sum of v (blockDim.x == BN_SUM_THREADS); the total lands in thread 0.
__device__ static float bn_block_sum(float v, float *smem) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // smem may still be read by a previous call
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = threadIdx.x < BN_SUM_THREADS / 32 ? smem[threadIdx.x] : 0.f;
    if (warp == 0) {
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
}

// Slice s of channel ch (grid (splits, c)) sums, over its part of the channel's n * hw values:
// mode 0: x; mode 1: (x - mean)^2; mode 2: dy and dy (x - mean) (two outputs). Partial sums go
// to part[(k * c + ch) * splits + s]; the caller adds the slices (a fixed order: the result
// does not depend on scheduling). mean (the batch mean over every rank) is read in modes 1, 2.
template <class E>
__device__ static void bn_sums(const typename E::T *x, const typename E::T *dy,
                               const float *mean, float *part, int n, int c, int hw,
                               int splits, int mode) {
    __shared__ float smem[BN_SUM_THREADS / 32];
    int ch = blockIdx.y, s = blockIdx.x;
    int total = n * hw;  // one channel's values: the launcher checks it fits an int
    int per = (total + splits - 1) / splits;
    int lo = s * per, hi = min(total, lo + per);
    float m = mode == 0 ? 0.f : mean[ch];
    float a0 = 0.f, a1 = 0.f;
    for (int j = lo + threadIdx.x; j < hi; j += BN_SUM_THREADS) {
        long long at = bn_index(j, ch, c, hw);
        float v = E::load(x, at);
        if (mode == 0) {
            a0 += v;
        } else if (mode == 1) {
            float d = v - m;
            a0 += d * d;
        } else {
            float g = E::load(dy, at);
            a0 += g;
            a1 += g * (v - m);
        }
    }
    a0 = bn_block_sum(a0, smem);
    if (threadIdx.x == 0) part[(long long)ch * splits + s] = a0;
    if (mode == 2) {
        a1 = bn_block_sum(a1, smem);
        if (threadIdx.x == 0) part[((long long)c + ch) * splits + s] = a1;
    }
}

// y = (x - mean) (w inv_std) + b per channel; coef = [mean; inv_std] (2, c). Grid (blocks, c):
// a block's threads stride over one channel's values, whose coefficients are loaded once.
template <class E>
__device__ static void bn_apply(const typename E::T *x, typename E::T *y, const float *coef,
                                const float *w, const float *b, int n, int c, int hw) {
    int ch = blockIdx.y;
    float mean = coef[ch], scale = w[ch] * coef[c + ch], shift = b[ch];
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < n * hw; j += blockDim.x * gridDim.x) {
        long long at = bn_index(j, ch, c, hw);
        E::store(y, at, (E::load(x, at) - mean) * scale + shift);
    }
}

// dx = scale (dy - k1 - (x - mean) k2); coef = [mean; scale; k1; k2] (4, c), with scale = w
// inv_std, k1 = sum dy / count, k2 = inv_std^2 sum dy (x - mean) / count (global sums). Grid
// as bn_apply's.
template <class E>
__device__ static void bn_input_grad(const typename E::T *x, const typename E::T *dy,
                                     typename E::T *dx, const float *coef, int n, int c,
                                     int hw) {
    int ch = blockIdx.y;
    float mean = coef[ch], scale = coef[c + ch], k1 = coef[2 * c + ch], k2 = coef[3 * c + ch];
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < n * hw; j += blockDim.x * gridDim.x) {
        long long at = bn_index(j, ch, c, hw);
        float g = E::load(dy, at) - k1 - (E::load(x, at) - mean) * k2;
        E::store(dx, at, scale * g);
    }
}

#define BN_KERNELS(suffix, E)                                                                \
    extern "C" __global__ void bn_sums_##suffix(const E::T *x, const E::T *dy,              \
                                                const float *mean, float *part, int n, int c, \
                                                int hw, int splits, int mode) {              \
        bn_sums<E>(x, dy, mean, part, n, c, hw, splits, mode);                              \
    }                                                                                        \
    extern "C" __global__ void bn_apply_##suffix(const E::T *x, E::T *y, const float *coef, \
                                                 const float *w, const float *b, int n,      \
                                                 int c, int hw) {                            \
        bn_apply<E>(x, y, coef, w, b, n, c, hw);                                             \
    }                                                                                        \
    extern "C" __global__ void bn_input_grad_##suffix(const E::T *x, const E::T *dy,        \
                                                      E::T *dx, const float *coef, int n,   \
                                                      int c, int hw) {                       \
        bn_input_grad<E>(x, dy, dx, coef, n, c, hw);                                         \
    }

BN_KERNELS(f32, F32Elem)
BN_KERNELS(bf16, BF16Elem)
