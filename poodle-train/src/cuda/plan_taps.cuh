// The taps of one output pixel of a sampling plan (loss/sample.rs `Plan`), shared by the
// CUDA kernel `plan_taps_f32` (kernels.cu) and a host build of the same code
// (plan_taps_host.c) that the Rust tests compare with the CPU's taps bit for bit.
//
// The arithmetic is IEEE double through _rn intrinsics: nvcc may not contract a multiply and
// an add into an FMA there, so every value equals the CPU's f64 one exactly (the host build
// defines the intrinsics as plain operations and compiles with -ffp-contract=off).
#pragma once

#ifndef __CUDACC__
#include <math.h>
#define __device__
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline float __double2float_rn(double a) { return (float)a; }
static inline int min(int a, int b) { return a < b ? a : b; }
#endif

// One output of `align_corners=False` bilinear resizing from n_in to n_up samples
// (flowmath::linear_axis; loss/sample.rs `axis_table`): output o blends inputs i0 and i1 with
// weights w0 and w1. The _rn intrinsics keep nvcc from contracting a multiply and an add into
// an FMA (see the top of this file).
__device__ static inline void resize_row(int n_in, int n_up, int o, int *i0, int *i1,
                                         double *w0, double *w1) {
    if (n_in == n_up) {
        *i0 = o;
        *i1 = o;
        *w0 = 1.0;
        *w1 = 0.0;
        return;
    }
    double scale = __ddiv_rn((double)n_in, (double)n_up);
    double src = fmax(__dadd_rn(__dmul_rn(__dadd_rn((double)o, 0.5), scale), -0.5), 0.0);
    int a = min((int)src, n_in - 1);
    double l1 = fmin(fmax(__dadd_rn(src, -(double)a), 0.0), 1.0);
    *i0 = a;
    *i1 = min(a + 1, n_in - 1);
    *w0 = __dadd_rn(1.0, -l1);
    *w1 = l1;
}

// Weights over input indices of sampling one upsampled axis at p in [0, n_up - 1]
// (loss/sample.rs `axis_weights`): the two resize rows around p blended by its fraction,
// merged by index in first-seen order; entries past the merged ones stay (0, 0).
__device__ static inline void axis_weights(int n_in, int n_up, double p, int *ix, double *w) {
    // Clamped below at 0 as the CPU's saturating `as usize` is (plans hold no point outside
    // the map, from_fn_upsampled makes them NaN; this keeps GPU = CPU for any finite p).
    int p0 = min((int)fmax(floor(p), 0.0), n_up - 1);
    int p1 = min(p0 + 1, n_up - 1);
    double f = __dadd_rn(p, -(double)p0), g = __dadd_rn(1.0, -f);
    int ci[4];
    double rw[4];
    resize_row(n_in, n_up, p0, &ci[0], &ci[1], &rw[0], &rw[1]);
    resize_row(n_in, n_up, p1, &ci[2], &ci[3], &rw[2], &rw[3]);
    double cw[4] = {__dmul_rn(g, rw[0]), __dmul_rn(g, rw[1]), __dmul_rn(f, rw[2]),
                    __dmul_rn(f, rw[3])};
    int len = 0;
    for (int j = 0; j < 4; ++j) {
        int s = 0;
        while (s < len && ix[s] != ci[j]) ++s;
        if (s < len) {
            w[s] = __dadd_rn(w[s], cw[j]);
        } else {
            ix[len] = ci[j];
            w[len] = cw[j];
            ++len;
        }
    }
}

// Pixel i = b p_out + p: pts[2 i] and pts[2 i + 1] are the (x, y) it samples in the upsampled
// h_up x w_up map, NaN where the pixel is invalid (its taps: index 0, weight 0). Writes
// idx/wts[(b taps + t) p_out + p], t = r kx + c over ky row and kx column taps.
__device__ static inline void plan_taps_pixel(const float *pts, unsigned int *idx, float *wts,
                                              long long i, long long p_out, int h_in,
                                              int w_in, int h_up, int w_up, int ky, int kx) {
    long long b = i / p_out, p = i - b * p_out;
    float x = pts[2 * i], y = pts[2 * i + 1];
    int ri[4] = {0, 0, 0, 0}, ci[4] = {0, 0, 0, 0};
    double rw[4] = {0.0, 0.0, 0.0, 0.0}, cw[4] = {0.0, 0.0, 0.0, 0.0};
    int ok = !isnan(x) && !isnan(y);
    if (ok) {
        axis_weights(h_in, h_up, (double)y, ri, rw);
        axis_weights(w_in, w_up, (double)x, ci, cw);
    }
    long long base = b * ky * kx * p_out + p;
    for (int r = 0; r < ky; ++r) {
        for (int c = 0; c < kx; ++c) {
            long long at = base + (long long)(r * kx + c) * p_out;
            idx[at] = ok ? (unsigned int)ri[r] * (unsigned int)w_in + (unsigned int)ci[c] : 0u;
            wts[at] = ok ? __double2float_rn(__dmul_rn(rw[r], cw[c])) : 0.f;
        }
    }
}
