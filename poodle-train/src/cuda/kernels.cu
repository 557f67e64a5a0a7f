// CUDA kernels of the dense loss's own ops (loss/sample.rs `Taps`, loss/normdiff.rs
// `NormDiff`), f32, the same arithmetic as their CPU kernels up to rounding (nvcc contracts
// multiply-adds into FMAs; the fused kernels gather in f32 where the CPU uses f64; only
// plan_taps_f32 is bit-exact). Compiled at build time to PTX
// (compute_80, JIT-compiled for later cards) by poodle-train's build.rs, which also runs
// ptxas on it for sm_80 and sm_90 so that errors show on the build machine.
//
// Layouts: maps are contiguous (n, c, positions); a sampling plan holds, per sample b, tap
// t and output pixel p, an input index idx[(b * taps + t) * p_out + p] and a weight wts[...],
// formed on the device from the plan's points by plan_taps_f32.

#include "plan_taps.cuh"

#define GRID_STRIDE(i, total)                                                              \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (total);       \
         i += (long long)blockDim.x * gridDim.x)

// The taps of a sampling plan from its points (plan_taps.cuh), a thread per output pixel.
extern "C" __global__ void plan_taps_f32(const float *pts, unsigned int *idx, float *wts, int n,
                                         long long p_out, int h_in, int w_in, int h_up,
                                         int w_up, int ky, int kx) {
    GRID_STRIDE(i, (long long)n * p_out) {
        plan_taps_pixel(pts, idx, wts, i, p_out, h_in, w_in, h_up, w_up, ky, kx);
    }
}

// out[b, ch, p] = sum_t w[b, t, p] * x[b, ch, idx[b, t, p]]
extern "C" __global__ void taps_gather_f32(const float *x, const unsigned int *idx,
                                           const float *wts, float *out, int n, int c,
                                           int hw_in, int p_out, int taps) {
    long long total = (long long)n * c * p_out;
    GRID_STRIDE(i, total) {
        long long plane = i / p_out;
        int p = (int)(i - plane * p_out);
        int b = (int)(plane / c);
        const float *src = x + plane * hw_in;
        const unsigned int *ib = idx + (long long)b * taps * p_out + p;
        const float *wb = wts + (long long)b * taps * p_out + p;
        float acc = 0.f;
        for (int t = 0; t < taps; ++t) {
            acc += wb[(long long)t * p_out] * src[ib[(long long)t * p_out]];
        }
        out[i] = acc;
    }
}

// The adjoint: out[b, ch, idx[b, t, p]] += w[b, t, p] * g[b, ch, p]; `out` starts zeroed.
// Atomic adds make the sum order (and the last bits) vary from run to run, as in PyTorch's
// grid_sample backward.
extern "C" __global__ void taps_scatter_f32(const float *g, const unsigned int *idx,
                                            const float *wts, float *out, int n, int c,
                                            int hw_in, int p_out, int taps) {
    long long total = (long long)n * c * p_out;
    GRID_STRIDE(i, total) {
        long long plane = i / p_out;
        int p = (int)(i - plane * p_out);
        int b = (int)(plane / c);
        float gv = g[i];
        if (gv == 0.f) continue;
        float *dst = out + plane * hw_in;
        const unsigned int *ib = idx + (long long)b * taps * p_out + p;
        const float *wb = wts + (long long)b * taps * p_out + p;
        for (int t = 0; t < taps; ++t) {
            float w = wb[(long long)t * p_out];
            if (w != 0.f) atomicAdd(dst + ib[(long long)t * p_out], w * gv);
        }
    }
}

// 1 / max(|x[s, :, pos]|, eps) and whether |x| > eps; channel sums in double as on the CPU.
__device__ static void inv_norm(const float *x, long long base, int c, long long hw, double eps,
                                double *inv, bool *ok) {
    double s2 = 0.0;
    for (int ch = 0; ch < c; ++ch) {
        double v = x[base + ch * hw];
        s2 += v * v;
    }
    double nrm = sqrt(s2);
    *inv = 1.0 / fmax(nrm, eps);
    *ok = nrm > eps;
}

// d[s, pos] = sum_ch (a / na - b / nb)^2, na = max(|a|, eps).
extern "C" __global__ void normdiff_fwd_f32(const float *a, const float *b, float *out, int n,
                                            int c, long long hw, double eps) {
    long long total = (long long)n * hw;
    GRID_STRIDE(i, total) {
        long long s = i / hw, pos = i - s * hw;
        long long base = s * c * hw + pos;
        double ia, ib;
        bool oa, ob;
        inv_norm(a, base, c, hw, eps, &ia, &oa);
        inv_norm(b, base, c, hw, eps, &ib, &ob);
        double d = 0.0;
        for (int ch = 0; ch < c; ++ch) {
            double r = a[base + ch * hw] * ia - b[base + ch * hw] * ib;
            d += r * r;
        }
        out[i] = (float)d;
    }
}

// [dd/da; dd/db] into out (2, n, c, hw): with u = a / na, v = b / nb, r = u - v, gp = 2 g:
// dd/da = gp (r - u (u . r)) / na, dd/db = -gp (r - v (v . r)) / nb, the projections dropped
// where the norm is clamped (PyTorch's clamp_min passes no gradient to the norm there).
extern "C" __global__ void normdiff_bwd_f32(const float *a, const float *b, const float *g,
                                            float *out, int n, int c, long long hw, double eps) {
    long long total = (long long)n * hw;
    long long half = (long long)n * c * hw;
    GRID_STRIDE(i, total) {
        long long s = i / hw, pos = i - s * hw;
        long long base = s * c * hw + pos;
        double ia, ib;
        bool oa, ob;
        inv_norm(a, base, c, hw, eps, &ia, &oa);
        inv_norm(b, base, c, hw, eps, &ib, &ob);
        double su = 0.0, sv = 0.0;
        for (int ch = 0; ch < c; ++ch) {
            double u = a[base + ch * hw] * ia, v = b[base + ch * hw] * ib;
            su += u * (u - v);
            sv += v * (u - v);
        }
        if (!oa) su = 0.0;
        if (!ob) sv = 0.0;
        double gp = 2.0 * g[i];
        for (int ch = 0; ch < c; ++ch) {
            long long k = base + ch * hw;
            double u = a[k] * ia, v = b[k] * ib, r = u - v;
            out[k] = (float)(gp * (r - u * su) * ia);
            out[half + k] = (float)(-gp * (r - v * sv) * ib);
        }
    }
}

// ---- The fused dense compare (loss/fused.rs) ----------------------------------------------
// Per sample sum_p m[p] |o(p)/|o(p)| - t(p)/|t(p)||^2 where o(p), t(p) are gathered from
// channels-last low-resolution maps (n, hw, c) through the plans' taps, and its backward, which
// scatters the two gradient vectors back through the same taps. One warp per crop pixel, the
// lanes over channels (a tap's C-vector is contiguous, so each gather and each atomic add of a
// warp touches consecutive addresses); grid (blocks, n), 8 warps a block.

#define FUSED_MAX_TAPS 36
#define FUSED_WARPS 8

struct PixelTaps {
    int n;
    unsigned int idx[FUSED_MAX_TAPS];
    float w[FUSED_MAX_TAPS];
};

// Appends the non-zero taps of output pixel p of sample b of one plan (layout
// [b][tap][pixel], np pixels), weights scaled by s. The launcher checks that a chain has at
// most FUSED_MAX_TAPS taps.
__device__ static void plan_taps(const unsigned int *idx, const float *wts, int taps, int np,
                                 int b, int p, float s, PixelTaps *out) {
    long long base = (long long)b * taps * np + p;
    for (int k = 0; k < taps; ++k) {
        float w = wts[base + (long long)k * np];
        if (w != 0.f && out->n < FUSED_MAX_TAPS) {
            out->idx[out->n] = idx[base + (long long)k * np];
            out->w[out->n] = s * w;
            out->n++;
        }
    }
}

// Taps of pixel p through a chain: the inner plan alone (u_taps == 0), or the outer plan's
// taps (into the inner plan's p_mid outputs) composed with the inner plan's.
__device__ static void chain_taps(const unsigned int *t_idx, const float *t_wts, int t_taps,
                                  const unsigned int *u_idx, const float *u_wts, int u_taps,
                                  int p_mid, int p_out, int b, int p, PixelTaps *out) {
    out->n = 0;
    if (u_taps == 0) {
        plan_taps(t_idx, t_wts, t_taps, p_out, b, p, 1.f, out);
        return;
    }
    long long base = (long long)b * u_taps * p_out + p;
    for (int j = 0; j < u_taps; ++j) {
        float u = u_wts[base + (long long)j * p_out];
        if (u != 0.f) {
            int q = (int)u_idx[base + (long long)j * p_out];
            plan_taps(t_idx, t_wts, t_taps, p_mid, b, q, u, out);
        }
    }
}

__device__ static float tap_gather(const float *x, const PixelTaps *tp, int c, int ch) {
    float acc = 0.f;
    for (int k = 0; k < tp->n; ++k) acc += tp->w[k] * x[(long long)tp->idx[k] * c + ch];
    return acc;
}

__device__ static double warp_sum(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Everything one pixel needs: its taps on both branches (in the warp's shared slot, built by
// lane 0, read by all lanes as broadcasts) and the channel sums |o|^2, |t|^2, o.t (the same in
// every lane after the warp reduction).
struct PixelPair {
    PixelTaps *o, *t;
    double oo, tt, ot;
};

__device__ static void load_pair(const float *o, const float *t, const unsigned int *o_idx,
                                 const float *o_wts, int o_taps, const unsigned int *t_idx,
                                 const float *t_wts, int t_taps, const unsigned int *u_idx,
                                 const float *u_wts, int u_taps, int c, int p_mid, int p_out,
                                 int b, int p, int lane, PixelPair *px) {
    __syncwarp();  // every lane is done with the previous pixel's taps
    if (lane == 0) {
        px->o->n = 0;
        plan_taps(o_idx, o_wts, o_taps, p_out, b, p, 1.f, px->o);
        chain_taps(t_idx, t_wts, t_taps, u_idx, u_wts, u_taps, p_mid, p_out, b, p, px->t);
    }
    __syncwarp();
    double oo = 0.0, tt = 0.0, ot = 0.0;
    for (int ch = lane; ch < c; ch += 32) {
        double ov = tap_gather(o, px->o, c, ch), tv = tap_gather(t, px->t, c, ch);
        oo += ov * ov;
        tt += tv * tv;
        ot += ov * tv;
    }
    px->oo = warp_sum(oo);
    px->tt = warp_sum(tt);
    px->ot = warp_sum(ot);
}

#define FUSED_ARGS                                                                            \
    const float *o, const float *t, const float *m, float *out, const unsigned int *o_idx,     \
        const float *o_wts, int o_taps, const unsigned int *t_idx, const float *t_wts,         \
        int t_taps, const unsigned int *u_idx, const float *u_wts, int u_taps, int c,          \
        long long hw_o, long long hw_t, int p_mid, int p_out, double eps

// out[b] += sum_p m[b, p] d(p); out starts zeroed.
extern "C" __global__ void fused_dense_fwd_f32(FUSED_ARGS) {
    __shared__ double part[FUSED_WARPS];
    __shared__ PixelTaps taps_o[FUSED_WARPS], taps_t[FUSED_WARPS];
    int b = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float *ob = o + (long long)b * hw_o * c, *tb = t + (long long)b * hw_t * c;
    double acc = 0.0;
    PixelPair px = {&taps_o[warp], &taps_t[warp], 0.0, 0.0, 0.0};
    for (int p = blockIdx.x * FUSED_WARPS + warp; p < p_out; p += gridDim.x * FUSED_WARPS) {
        float mp = m[(long long)b * p_out + p];
        if (mp == 0.f) continue;  // the same in the whole warp
        load_pair(ob, tb, o_idx, o_wts, o_taps, t_idx, t_wts, t_taps, u_idx, u_wts, u_taps, c,
                  p_mid, p_out, b, p, lane, &px);
        double ia = 1.0 / fmax(sqrt(px.oo), eps), ib = 1.0 / fmax(sqrt(px.tt), eps);
        double d = px.oo * ia * ia + px.tt * ib * ib - 2.0 * px.ot * ia * ib;
        acc += mp * fmax(d, 0.0);
    }
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int k = 0; k < FUSED_WARPS; ++k) s += part[k];
        if (s != 0.0) atomicAdd(out + b, (float)s);
    }
}

// Gradients for mg = m * grad (in place of m): out = [d/do (n, hw_o, c); d/dt (n, hw_t, c) when
// grad_t], zeroed by the launcher. Atomic adds: the sum order, and the last bits, vary between
// runs, as in PyTorch's grid_sample backward.
extern "C" __global__ void fused_dense_bwd_f32(FUSED_ARGS, int grad_t) {
    int b = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float *ob = o + (long long)b * hw_o * c, *tb = t + (long long)b * hw_t * c;
    float *go = out + (long long)b * hw_o * c;
    float *gt = out + (long long)gridDim.y * hw_o * c + (long long)b * hw_t * c;
    __shared__ PixelTaps taps_o[FUSED_WARPS], taps_t[FUSED_WARPS];
    PixelPair px = {&taps_o[warp], &taps_t[warp], 0.0, 0.0, 0.0};
    for (int p = blockIdx.x * FUSED_WARPS + warp; p < p_out; p += gridDim.x * FUSED_WARPS) {
        double g = m[(long long)b * p_out + p];
        if (g == 0.0) continue;
        load_pair(ob, tb, o_idx, o_wts, o_taps, t_idx, t_wts, t_taps, u_idx, u_wts, u_taps, c,
                  p_mid, p_out, b, p, lane, &px);
        double na = sqrt(px.oo), nb = sqrt(px.tt);
        double ia = 1.0 / fmax(na, eps), ib = 1.0 / fmax(nb, eps);
        double uu = px.oo * ia * ia, vv = px.tt * ib * ib, uv = px.ot * ia * ib;
        double su = na > eps ? uu - uv : 0.0, sv = nb > eps ? uv - vv : 0.0;
        float ao = (float)(2.0 * g * ia * ia * (1.0 - su)), cross = (float)(-2.0 * g * ia * ib);
        float bt = (float)(2.0 * g * ib * ib * (1.0 + sv));
        for (int ch = lane; ch < c; ch += 32) {
            float ov = tap_gather(ob, px.o, c, ch), tv = tap_gather(tb, px.t, c, ch);
            float d_o = ao * ov + cross * tv;
            for (int k = 0; k < px.o->n; ++k)
                atomicAdd(go + (long long)px.o->idx[k] * c + ch, px.o->w[k] * d_o);
            if (grad_t) {
                float d_t = cross * ov + bt * tv;
                for (int k = 0; k < px.t->n; ++k)
                    atomicAdd(gt + (long long)px.t->idx[k] * c + ch, px.t->w[k] * d_t);
            }
        }
    }
}

// Synchronised BatchNorm's kernels (bn_sums_*, bn_apply_*, bn_input_grad_*): sync_bn.cuh, which
// tests/cuda_emulation also compiles for the host.
#include "sync_bn.cuh"
// ReLU with PyTorch's backward (relu_fwd_*, relu_bwd_*): relu.cuh, likewise.
#include "relu.cuh"
// AdamW and the EMA in place (adam_moment_f32, adamw_param_f32, ema_f32): optim.cuh, likewise.
#include "optim.cuh"
