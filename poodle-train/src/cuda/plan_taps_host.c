// A host build of the sampling plans' tap formation (plan_taps.cuh), linked into poodle-train
// so that tests check the CUDA kernel's arithmetic against the CPU's taps without a GPU.
#include "plan_taps.cuh"

void poodle_plan_taps_host(const float *pts, unsigned int *idx, float *wts, int n,
                           long long p_out, int h_in, int w_in, int h_up, int w_up, int ky,
                           int kx) {
    for (long long i = 0; i < (long long)n * p_out; ++i) {
        plan_taps_pixel(pts, idx, wts, i, p_out, h_in, w_in, h_up, w_up, ky, kx);
    }
}
