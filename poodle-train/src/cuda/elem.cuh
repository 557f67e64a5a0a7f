// Element types of the kernels that take f32 or bf16 activations (sync_bn.cuh, relu.cuh):
// loads widen to float, stores narrow from it. Depends on nothing else, so that the host
// emulation in poodle-train/tests/cuda_emulation compiles this very text.
#pragma once

// bf16 as its 16 bits, so that no cuda_bf16.h is needed: widening is exact, narrowing rounds
// to nearest even (NaN stays NaN), as candle's and the half crate's conversions do.
struct F32Elem {
    typedef float T;
    __device__ static float load(const float *p, long long i) { return p[i]; }
    __device__ static void store(float *p, long long i, float v) { p[i] = v; }
};
struct BF16Elem {
    typedef unsigned short T;
    __device__ static float load(const unsigned short *p, long long i) {
        return __uint_as_float(((unsigned int)p[i]) << 16);
    }
    __device__ static void store(unsigned short *p, long long i, float v) {
        unsigned int u = __float_as_uint(v);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            p[i] = (unsigned short)((u >> 16) | 0x40u);
        } else {
            p[i] = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
    }
};
