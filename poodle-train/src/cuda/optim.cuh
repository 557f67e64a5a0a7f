// AdamW's and the EMA's in-place updates (optim.rs), f32 (the master weights), a thread per
// value over n contiguous values. Like sync_bn.cuh, nothing here depends on the rest of
// kernels.cu: the host emulation in poodle-train/tests/cuda_emulation runs this very text.
//
// The arithmetic is the composed candle ops' (AdamW::step_with on the CPU), in their order:
// each candle op rounds to f32, and nvcc may contract a product and a sum into one FMA
// (one rounding fewer).
#pragma once

// s = s beta + t (1 - beta), t = g or g^2: AdamW's first (squared = 0) or second moment.
extern "C" __global__ void adam_moment_f32(float *s, const float *g, long long n, float beta,
                                           float one_minus_beta, int squared) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        float t = squared ? g[i] * g[i] : g[i];
        s[i] = s[i] * beta + t * one_minus_beta;
    }
}

// p = p decay - (m / (sqrt(v) inv_bc2_sqrt + eps)) step_size, with decay = 1 - lr wd (1 for the
// no-decay group), step_size = lr / (1 - b1^t), inv_bc2_sqrt = 1 / sqrt(1 - b2^t).
extern "C" __global__ void adamw_param_f32(float *p, const float *m, const float *v, long long n,
                                           float decay, float step_size, float inv_bc2_sqrt,
                                           float eps) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        float denom = sqrtf(v[i]) * inv_bc2_sqrt + eps;
        p[i] = p[i] * decay - (m[i] / denom) * step_size;
    }
}

// t = t m + o (1 - m): the target network's EMA.
extern "C" __global__ void ema_f32(float *t, const float *o, long long n, float m,
                                   float one_minus_m) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        t[i] = t[i] * m + o[i] * one_minus_m;
    }
}
