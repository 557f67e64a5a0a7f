// CUDA kernels of the dense loss's own ops (loss/sample.rs `Taps`, loss/normdiff.rs
// `NormDiff`), f32, the same arithmetic as their CPU kernels. Compiled at build time to PTX
// (compute_80, JIT-compiled for later cards) by poodle-train's build.rs, which also runs
// ptxas on it for sm_80 and sm_90 so that errors show on the build machine.
//
// Layouts: maps are contiguous (n, c, positions); a sampling plan holds, per sample b, tap
// t and output pixel p, an input index idx[(b * taps + t) * p_out + p] and a weight wts[...].

#define GRID_STRIDE(i, total)                                                              \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (total);       \
         i += (long long)blockDim.x * gridDim.x)

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
