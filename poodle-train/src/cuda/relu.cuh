// ReLU's kernels (model/relu.rs), included by kernels.cu; like sync_bn.cuh, nothing here
// depends on the rest of kernels.cu, so that the host emulation in
// poodle-train/tests/cuda_emulation runs this very text on the CPU.
#pragma once

#include "elem.cuh"

// PyTorch's semantics, f32 and bf16, over n contiguous values:
// forward  y = x > 0 ? x : 0, NaN kept (torch.relu);
// backward dx = y <= 0 ? 0 : dy, from the output (threshold_backward(dy, y, 0)): one pass
// reading y and dy, where candle's own ReLU backward makes four (zeros, compare, cast,
// product). A NaN y passes dy on, as in PyTorch.
template <class E>
__device__ static void relu_fwd(const typename E::T *x, typename E::T *y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        float v = E::load(x, i);
        E::store(y, i, (v > 0.f || v != v) ? v : 0.f);
    }
}

template <class E>
__device__ static void relu_bwd(const typename E::T *y, const typename E::T *dy,
                                typename E::T *dx, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        E::store(dx, i, E::load(y, i) <= 0.f ? 0.f : E::load(dy, i));
    }
}

#define RELU_KERNELS(suffix, E)                                                              \
    extern "C" __global__ void relu_fwd_##suffix(const E::T *x, E::T *y, long long n) {      \
        relu_fwd<E>(x, y, n);                                                                \
    }                                                                                        \
    extern "C" __global__ void relu_bwd_##suffix(const E::T *y, const E::T *dy, E::T *dx,    \
                                                 long long n) {                              \
        relu_bwd<E>(y, dy, dx, n);                                                           \
    }

RELU_KERNELS(f32, F32Elem)
RELU_KERNELS(bf16, BF16Elem)
