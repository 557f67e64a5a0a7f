// Host emulation of the elementwise CUDA kernels (the very text that kernels.cu includes):
// - ReLU (src/cuda/relu.cuh) against PyTorch's rules written out here: relu keeps x > 0, keeps
//   NaN, gives +0 otherwise; threshold_backward(dy, y, 0) gives +0 where y <= 0 and dy
//   elsewhere (NaN y too). f32 on special values and random bit patterns, bf16 on every one of
//   its 65,536 patterns (input, and output for the backward);
// - AdamW's moments and parameter update and the EMA (src/cuda/optim.cuh) against PyTorch's
//   AdamW and the EMA in double precision, within f32 rounding.
// On the launcher's grid and on smaller ones (the grid-stride loop), with guard areas around
// every buffer. Run by the test cuda_kernels_emulated.
//
//   c++ -O1 -std=c++20 -ffp-contract=off -I ../../src/cuda -o harness elementwise_harness.cpp
//   ./harness
#include "emu.h"
#include "relu.cuh"
#include "optim.cuh"
#include "check.h"

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

static float f_of(uint32_t u) { return __uint_as_float(u); }
static float f_of(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }
static bool is_nan_bits(uint32_t u) { return (u & 0x7fffffffu) > 0x7f800000u; }
static bool is_nan_bits(uint16_t b) { return (b & 0x7fff) > 0x7f80; }

// PyTorch's forward on bits: x if x > 0, NaN stays NaN (any payload), else +0.
template <class B>
static bool fwd_ok(B x, B y) {
    if (is_nan_bits(x)) return is_nan_bits(y);
    return f_of(x) > 0.f ? y == x : y == 0;
}
// PyTorch's backward on bits: +0 where y <= 0, else dy (a NaN dy may come back quietened).
template <class B>
static bool bwd_ok(B y, B dy, B dx) {
    if (!is_nan_bits(y) && f_of(y) <= 0.f) return dx == 0;
    return is_nan_bits(dy) ? is_nan_bits(dx) : dx == dy;
}

template <class E, class B>
static typename E::T *as_elem(B *p) {
    return reinterpret_cast<typename E::T *>(p);
}

// The launcher's grid (kernels.rs launch_cfg: one block per 256 values, at most 65536) and
// smaller ones, so that threads take several values each.
static std::vector<unsigned> grids(long long n) {
    unsigned g = (unsigned)std::clamp((n + 255) / 256, 1LL, 65536LL);
    std::vector<unsigned> v = {g, 1, 3};
    if (g > 1) v.push_back(g - 1);
    return v;
}

template <class B, class E>
static long run(const std::vector<B> &xs, const std::vector<B> &dys, const char *name) {
    long checked = 0;
    long long n = (long long)xs.size();
    for (unsigned g : grids(n)) {
        // Inputs and outputs have different guard patterns: a write past the end copies an input's.
        Buf<B> x(xs, (B)0x5a5a), y(xs.size(), (B)0x7777, (B)0x3c3c);
        emu::launch({g, 1, 1}, {256, 1, 1}, false, [&] { relu_fwd<E>(as_elem<E>(x.p()), as_elem<E>(y.p()), n); });
        CHECK(x.guards_ok() && y.guards_ok(), "%s fwd grid %u: guards", name, g);
        for (long long i = 0; i < n; ++i) {
            CHECK(fwd_ok(xs[i], y[i]), "%s fwd grid %u: x %#x gave %#x", name, g,
                  (unsigned)xs[i], (unsigned)y[i]);
        }
        // Backward from the forward's own output, and from the raw patterns as outputs.
        for (int from_out = 0; from_out < 2; ++from_out) {
            std::vector<B> ys(xs.size());
            for (long long i = 0; i < n; ++i) ys[i] = from_out ? y[i] : xs[i];
            Buf<B> yb(ys, (B)0x5a5a), dy(dys, (B)0x5a5a), dx(xs.size(), (B)0x7777, (B)0x3c3c);
            emu::launch({g, 1, 1}, {256, 1, 1}, false,
                        [&] {
                relu_bwd<E>(as_elem<E>(yb.p()), as_elem<E>(dy.p()), as_elem<E>(dx.p()), n);
            });
            CHECK(yb.guards_ok() && dy.guards_ok() && dx.guards_ok(), "%s bwd grid %u: guards",
                  name, g);
            for (long long i = 0; i < n; ++i) {
                CHECK(bwd_ok(ys[i], dys[i], dx[i]), "%s bwd grid %u: y %#x dy %#x gave %#x", name,
                      g, (unsigned)ys[i], (unsigned)dys[i], (unsigned)dx[i]);
            }
            checked += n;
        }
        checked += n;
    }
    return checked;
}

// Three AdamW steps (decay and no-decay) and an EMA on random values, each kernel on each
// grid, against double precision: each value within 1e-6 of the sum of its terms' magnitudes
// (the rounding it carries from three steps of f32 arithmetic).
static long test_optim(std::mt19937_64 &rng) {
    const long long n = 5003;
    std::normal_distribution<double> nd(0.0, 1.0);
    const double b1 = 0.9, b2 = 0.999, eps = 1e-6, wd = 0.01;
    long checked = 0;
    double worst = 0;
    for (unsigned g : grids(n)) {
        for (int decay_group = 0; decay_group < 2; ++decay_group) {
            std::vector<float> p0(n), m0(n, 0.f), v0(n, 0.f);
            for (auto &x : p0) x = (float)nd(rng);
            Buf<float> p(p0, -7.f), m(m0, -7.f), v(v0, -7.f);
            std::vector<double> pd(p0.begin(), p0.end()), md(n, 0.0), vd(n, 0.0);
            // Sums of the terms' magnitudes: the scale of the rounding each value carries.
            std::vector<double> m_abs(n, 0.0), p_abs(p0.begin(), p0.end());
            for (auto &x : p_abs) x = std::fabs(x);
            for (int t = 1; t <= 3; ++t) {
                double lr = 1e-2 / t;
                std::vector<float> gv(n);
                for (auto &x : gv) x = (float)(nd(rng) * (t == 2 ? 1e-3 : 1.0));
                Buf<float> gb(gv, -7.f);
                double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
                double decay = decay_group ? 1 - lr * wd : 1.0, step = lr / bc1;
                emu::launch({g, 1, 1}, {256, 1, 1}, false,
                            [&] { adam_moment_f32(m.p(), gb.p(), n, (float)b1, (float)(1 - b1), 0); });
                emu::launch({g, 1, 1}, {256, 1, 1}, false,
                            [&] { adam_moment_f32(v.p(), gb.p(), n, (float)b2, (float)(1 - b2), 1); });
                emu::launch({g, 1, 1}, {256, 1, 1}, false, [&] {
                    adamw_param_f32(p.p(), m.p(), v.p(), n, (float)decay, (float)step,
                                    (float)(1 / std::sqrt(bc2)), (float)eps);
                });
                CHECK(p.guards_ok() && m.guards_ok() && v.guards_ok() && gb.guards_ok(),
                      "adamw grid %u step %d: guards", g, t);
                for (long long i = 0; i < n; ++i) {
                    // PyTorch's AdamW (amsgrad off), in double, from the same f32 gradient.
                    double gi = gv[i];
                    md[i] = b1 * md[i] + (1 - b1) * gi;
                    m_abs[i] = b1 * m_abs[i] + (1 - b1) * std::fabs(gi);
                    vd[i] = b2 * vd[i] + (1 - b2) * gi * gi;
                    double denom = std::sqrt(vd[i]) / std::sqrt(bc2) + eps;
                    pd[i] = pd[i] * decay - step * md[i] / denom;
                    p_abs[i] = p_abs[i] + step * m_abs[i] / denom;
                    double ev = std::fabs(v[i] - vd[i]) / (vd[i] + 1e-30);
                    double em = std::fabs(m[i] - md[i]) / (m_abs[i] + 1e-30);
                    double ep = std::fabs(p[i] - pd[i]) / (p_abs[i] + 1e-30);
                    worst = std::max({worst, ev, em, ep});
                    CHECK(ev <= 1e-6 && em <= 1e-6 && ep <= 1e-6,
                          "adamw grid %u step %d i %lld: p %.9g vs %.9g, m %.9g vs %.9g, v %.9g vs %.9g",
                          g, t, i, (double)p[i], pd[i], (double)m[i], md[i], (double)v[i], vd[i]);
                }
                checked += n;
            }
            // The EMA toward the parameters.
            std::vector<float> t0(n);
            for (auto &x : t0) x = (float)nd(rng);
            Buf<float> tb(t0, -7.f);
            const double mom = 0.996;
            emu::launch({g, 1, 1}, {256, 1, 1}, false,
                        [&] { ema_f32(tb.p(), p.p(), n, (float)mom, (float)(1 - mom)); });
            CHECK(tb.guards_ok() && p.guards_ok(), "ema grid %u: guards", g);
            for (long long i = 0; i < n; ++i) {
                double want = t0[i] * mom + (double)p[i] * (1 - mom);
                double err = std::fabs(tb[i] - want) / (std::fabs(t0[i]) + std::fabs(p[i]) + 1e-30);
                worst = std::max(worst, err);
                CHECK(err <= 4e-7, "ema grid %u i %lld: %.9g vs %.9g", g, i, (double)tb[i], want);
            }
            checked += n;
        }
    }
    printf("optim.cuh: worst relative error %.3g\n", worst);
    return checked;
}

int main() {
    std::mt19937_64 rng(2026);
    // f32: the special values, then random bit patterns (every class: NaNs, infinities,
    // subnormals, both zeros), n not a multiple of 256.
    std::vector<uint32_t> xs = {0u,          0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                                0xffc00001u, 0x7f800001u, 0x00000001u, 0x80000001u, 0x3f800000u,
                                0xbf800000u, 0x7f7fffffu, 0xff7fffffu, 0x00800000u, 0x80800000u};
    while (xs.size() < 100003) xs.push_back((uint32_t)rng());
    std::vector<uint32_t> dys(xs.size());
    for (auto &d : dys) d = (uint32_t)rng();
    long checked = run<uint32_t, F32Elem>(xs, dys, "f32");
    // The empty launch writes nothing.
    checked += run<uint32_t, F32Elem>({}, {}, "f32 empty");
    // bf16: every pattern as input (and as output in the backward), random gradients.
    std::vector<uint16_t> bx(65536), bdy(65536);
    for (uint32_t b = 0; b < 65536; ++b) bx[b] = (uint16_t)b;
    for (auto &d : bdy) d = (uint16_t)rng();
    checked += run<uint16_t, BF16Elem>(bx, bdy, "bf16");
    long optim = test_optim(rng);
    printf("SUMMARY: relu.cuh: %ld values checked; optim.cuh: %ld values checked; failures %d\n",
           checked, optim, failures);
    return failures ? 1 : 0;
}
