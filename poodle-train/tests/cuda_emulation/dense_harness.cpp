// Host emulation of the dense loss's CUDA kernels: kernels.cu itself is compiled below
// (plan_taps_f32, taps_gather_f32, taps_scatter_f32, normdiff_fwd_f32, normdiff_bwd_f32,
// fused_dense_fwd_f32, fused_dense_bwd_f32; its sync_bn.cuh part is sync_bn_harness.cpp's), on
// the launchers' grids (kernels.rs) and a few others, against double-precision references
// written here from the ops' documented semantics (kernels.cu comments, loss/sample.rs,
// loss/normdiff.rs, loss/fused.rs), with guard areas around every buffer and poisoned outputs.
// The fused kernels run as fibers (emu.h: __syncwarp, double warp shuffles, __syncthreads);
// EMU_RANDOM=1 gives threads random speeds, which exposes shared-memory races.
//
// Tolerances are first-order rounding bounds computed from the reference's own magnitudes
// (f32 unit roundoff U = 2^-24 times the sum of |terms|, the gathers' condition numbers, ...);
// each check prints its worst error as a fraction of its bound ("worst err/bound"), and fails
// above 1.
//
//   c++ -O1 -std=c++20 -ffp-contract=off -I ../../src/cuda -o dense_harness dense_harness.cpp
//   EMU_RANDOM=1 ./dense_harness
#include "emu.h"
#include "kernels.cu"
#include "check.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>


static const double EPS = 1e-12;             // loss::NORM_EPS, what the launchers pass
static const double U = 1.0 / 16777216.0;    // f32 unit roundoff, 2^-24
static const double U64 = 1.0 / 9007199254740992.0;  // f64 unit roundoff, 2^-53
static const float NaNf = std::numeric_limits<float>::quiet_NaN();
static float poison_f() { return __uint_as_float(0x7fbadbadu); }


// ---- launch configurations (kernels.rs) ------------------------------------------------------
// launch_cfg: 256 threads, one block per 256 items, clamped to [1, 65536] blocks.
static unsigned launch_blocks(long long items) {
    return (unsigned)std::clamp<long long>((items + 255) / 256, 1, 1 << 16);
}
// The launcher's grid and others: one block (the grid-stride loop does everything), 3, more
// than needed.
static std::vector<unsigned> grids_for(long long items) {
    unsigned g = launch_blocks(items);
    std::vector<unsigned> v = {g, 1, 3, g + 2};
    if (g > 1) v.push_back(g - 1);
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    return v;
}
// fused_dense: ceil(p_out / FUSED_WARPS) blocks clamped to [1, 2048] (x), the batch (y).
static unsigned fused_blocks(int p_out) {
    return (unsigned)std::clamp((p_out + FUSED_WARPS - 1) / FUSED_WARPS, 1, 2048);
}

struct Worst {
    long plan_bad = 0, plan_taps = 0, plan_invalid = 0, plan_zero_w = 0;
    double gather = 0, scatter = 0, nd_fwd = 0, nd_bwd = 0, f_fwd = 0, f_bwd_o = 0, f_bwd_t = 0;
    double fd = 0;
    long launches = 0, values = 0;
} worst;

// ---- reference sampling plans (loss/sample.rs, flowmath::linear_axis) ------------------------
struct Row {
    int i0, i1;
    double w0, w1;
};
// One axis of align_corners=False bilinear resizing n_in -> n_out (flowmath::linear_axis); the
// identity for equal sizes (sample.rs axis_table).
static std::vector<Row> ref_axis_table(int n_in, int n_out) {
    std::vector<Row> t;
    for (int o = 0; o < n_out; ++o) {
        if (n_in == n_out) {
            t.push_back({o, o, 1.0, 0.0});
            continue;
        }
        double scale = (double)n_in / (double)n_out;
        double src = std::max(((double)o + 0.5) * scale - 0.5, 0.0);
        int i0 = std::min((int)src, n_in - 1);
        double l1 = std::clamp(src - i0, 0.0, 1.0);
        t.push_back({i0, std::min(i0 + 1, n_in - 1), 1.0 - l1, l1});
    }
    return t;
}
static int ref_taps_per_axis(int n_in, int n_up) { return n_in == n_up ? 2 : n_in < n_up ? 3 : 4; }
// sample.rs axis_weights: (1 - f) row(p0) + f row(p0 + 1), merged by index in first-seen
// order, the rest (0, 0). `p.floor() as usize` saturates at 0.
static void ref_axis_weights(const std::vector<Row> &table, double p, int ix[4], double w[4]) {
    int n_up = (int)table.size();
    double fl = std::floor(p);
    int p0 = std::min(fl < 0 ? 0 : (int)fl, n_up - 1), p1 = std::min(p0 + 1, n_up - 1);
    double f = p - p0;
    Row a = table[p0], b = table[p1];
    int ci[4] = {a.i0, a.i1, b.i0, b.i1};
    double cw[4] = {(1.0 - f) * a.w0, (1.0 - f) * a.w1, f * b.w0, f * b.w1};
    int len = 0;
    for (int j = 0; j < 4; ++j) ix[j] = 0, w[j] = 0.0;
    for (int j = 0; j < 4; ++j) {
        int s = 0;
        while (s < len && ix[s] != ci[j]) ++s;
        if (s < len) {
            w[s] += cw[j];
        } else {
            ix[len] = ci[j], w[len] = cw[j], ++len;
        }
    }
}

struct Plan {
    int n = 0, h_in = 0, w_in = 0, h_up = 0, w_up = 0, h_out = 0, w_out = 0, ky = 0, kx = 0;
    std::vector<float> pts;            // [b][2 p]: (x, y) in up pixels, NaN where invalid
    std::vector<float> mask;           // [b][p]: 1 where valid
    std::vector<unsigned> idx;         // reference taps [b][t][p] (sample.rs form_taps)
    std::vector<float> wts;
    std::vector<unsigned> dev_idx;     // the taps plan_taps_f32 formed (launcher's grid)
    std::vector<float> dev_wts;
    int taps() const { return ky * kx; }
    int p_out() const { return h_out * w_out; }
    int hw_in() const { return h_in * w_in; }
    size_t at(int b, int t, int p) const { return ((size_t)b * taps() + t) * p_out() + p; }
};

// SampleGrid::from_fn_upsampled then Plan::form_taps: points outside [0, w_up - 1] x
// [0, h_up - 1] (or NaN, or none) become invalid (NaN point, mask 0, taps (0, 0)).
template <class F>
static Plan make_plan(int n, std::pair<int, int> in, std::pair<int, int> up, std::pair<int, int> out,
                      F point) {
    Plan pl;
    pl.n = n, pl.h_in = in.first, pl.w_in = in.second, pl.h_up = up.first, pl.w_up = up.second;
    pl.h_out = out.first, pl.w_out = out.second;
    pl.ky = ref_taps_per_axis(pl.h_in, pl.h_up), pl.kx = ref_taps_per_axis(pl.w_in, pl.w_up);
    int p = pl.p_out();
    double hf = pl.h_up - 1.0, wf = pl.w_up - 1.0;
    pl.pts.assign((size_t)n * 2 * p, NaNf);
    pl.mask.assign((size_t)n * p, 0.f);
    for (int b = 0; b < n; ++b)
        for (int y = 0; y < pl.h_out; ++y)
            for (int x = 0; x < pl.w_out; ++x) {
                std::optional<std::pair<double, double>> q = point(b, y, x, wf, hf);
                if (!q) continue;
                auto [px, py] = *q;
                if (!(px >= 0.0 && py >= 0.0 && px <= wf && py <= hf)) continue;
                size_t k = (size_t)b * p + y * pl.w_out + x;
                pl.pts[2 * k] = (float)px, pl.pts[2 * k + 1] = (float)py, pl.mask[k] = 1.f;
            }
    auto ty = ref_axis_table(pl.h_in, pl.h_up), tx = ref_axis_table(pl.w_in, pl.w_up);
    pl.idx.assign((size_t)n * pl.taps() * p, 0u);
    pl.wts.assign((size_t)n * pl.taps() * p, 0.f);
    for (int b = 0; b < n; ++b)
        for (int k = 0; k < p; ++k) {
            double x = pl.pts[2 * ((size_t)b * p + k)], y = pl.pts[2 * ((size_t)b * p + k) + 1];
            if (std::isnan(x) || std::isnan(y)) continue;
            int ri[4], ci[4];
            double rw[4], cw[4];
            ref_axis_weights(ty, y, ri, rw);
            ref_axis_weights(tx, x, ci, cw);
            for (int r = 0; r < pl.ky; ++r)
                for (int c = 0; c < pl.kx; ++c) {
                    pl.idx[pl.at(b, r * pl.kx + c, k)] = (unsigned)(ri[r] * pl.w_in + ci[c]);
                    pl.wts[pl.at(b, r * pl.kx + c, k)] = (float)(rw[r] * cw[c]);
                }
        }
    return pl;
}

// Points as the Rust tests draw them: corners and borders, integers, just below integers (in
// f64, and in f32), NaN, none, and some outside the map.
static auto test_points(int salt) {
    return [salt](int b, int y, int x, double wf, double hf) -> std::optional<std::pair<double, double>> {
        long k = ((long)b * 97 + y) * 31 + x + salt;
        auto frac = [](double v) { return v - std::floor(v); };
        double u = frac(k * 0.6180339887), v = frac(k * 0.7548776662);
        switch (k % 9) {
            case 0: return std::nullopt;
            case 1: return std::pair{wf, hf};
            case 2: return std::pair{0.0, std::round(v * hf)};
            case 3: return std::pair{std::floor(u * wf) - 1e-9, std::ceil(v * hf)};
            case 4: return std::pair{u * (wf + 2.0) - 1.0, v * hf};
            case 5: return std::pair{(double)std::nextafter((float)std::ceil(u * wf), 0.f), hf};
            case 6: return std::pair{(double)NaNf, v * hf};
            default: return std::pair{u * wf, v * hf};
        }
    };
}

// Generic points: everywhere inside, never on an integer (every tap of a plan nonzero).
static auto interior_points(int salt) {
    return [salt](int b, int y, int x, double wf, double hf) -> std::optional<std::pair<double, double>> {
        long k = ((long)b * 97 + y) * 31 + x + salt;
        auto frac = [](double v) { return v - std::floor(v); };
        return std::pair{(0.05 + 0.9 * frac(k * 0.6180339887)) * wf,
                         (0.05 + 0.9 * frac(k * 0.7548776662)) * hf};
    };
}

// ---- plan_taps_f32: bit for bit the CPU's taps --------------------------------------------
static void test_plan_taps(Plan &pl, const char *what) {
    long n_items = (long)pl.n * pl.p_out(), len = n_items * pl.taps();
    long bad_total = 0;
    for (unsigned gx : grids_for(n_items)) {
        Buf<unsigned> idx(len, 0xdeadbeefu, 0xfeedfaceu);
        Buf<float> wts(len, poison_f(), poison_f());
        Buf<float> pts(pl.pts, poison_f());
        emu::launch({gx, 1, 1}, {256, 1, 1}, false, [&] {
            plan_taps_f32(pts.p(), idx.p(), wts.p(), pl.n, pl.p_out(), pl.h_in, pl.w_in, pl.h_up,
                          pl.w_up, pl.ky, pl.kx);
        });
        ++worst.launches;
        CHECK(idx.guards_ok() && wts.guards_ok() && pts.guards_ok(), "plan_taps %s grid %u: guards",
              what, gx);
        long bad = 0;
        for (long i = 0; i < len; ++i) {
            bool ok = idx[i] == pl.idx[i] && __float_as_uint(wts[i]) == __float_as_uint(pl.wts[i]);
            if (!ok && bad++ < 3)
                fprintf(stderr, "plan_taps %s grid %u entry %ld: (%u, %a) want (%u, %a)\n", what, gx,
                        i, idx[i], wts[i], pl.idx[i], pl.wts[i]);
        }
        CHECK(bad == 0, "plan_taps %s grid %u: %ld of %ld taps differ from the CPU's", what, gx, bad,
              len);
        bad_total += bad;
        if (gx == launch_blocks(n_items)) {
            pl.dev_idx.assign(idx.p(), idx.p() + len);
            pl.dev_wts.assign(wts.p(), wts.p() + len);
        }
    }
    long invalid = 0, zero_w = 0;
    for (float m : pl.mask) invalid += m == 0.f;
    for (float w : pl.wts) zero_w += w == 0.f;
    worst.plan_bad += bad_total, worst.plan_taps += len * (long)grids_for(n_items).size();
    worst.plan_invalid += invalid, worst.plan_zero_w += zero_w;
    printf("plan_taps %-28s %dx%d -> %dx%d, %d x %d taps, %d x %d px: %ld invalid px, %ld zero-weight "
           "taps; grids", what, pl.h_in, pl.w_in, pl.h_up, pl.w_up, pl.ky, pl.kx, pl.n, pl.p_out(),
           invalid, zero_w);
    for (unsigned g : grids_for(n_items)) printf(" %u", g);
    printf(": %ld taps differ\n", bad_total);
}

// ---- taps_gather_f32 / taps_scatter_f32 -----------------------------------------------------
// A tap table [b][t][p] over (n, c, hw_in) maps: out[b, ch, p] = sum_t w x[b, ch, idx] and
// its adjoint out[b, ch, idx] += w g[b, ch, p] (`out` zeroed, as the launcher allocates it).
struct Table {
    int n, taps, p_out, hw_in;
    std::vector<unsigned> idx;
    std::vector<float> wts;
};

static void test_taps(const Table &tb, int c, std::mt19937_64 &rng, const char *what) {
    std::uniform_real_distribution<float> Ud(-1.f, 1.f);
    const int n = tb.n, P = tb.p_out, H = tb.hw_in, T = tb.taps;
    std::vector<float> x((size_t)n * c * H), g((size_t)n * c * P);
    for (auto &v : x) v = 2.f * Ud(rng);
    for (size_t i = 0; i < g.size(); ++i) g[i] = i % 5 == 0 ? 0.f : Ud(rng);  // zeros: skipped
    // references and sum|terms|, contributions per scatter element
    std::vector<double> ref_g((size_t)n * c * P, 0), mag_g(ref_g.size(), 0);
    std::vector<double> ref_s((size_t)n * c * H, 0), mag_s(ref_s.size(), 0), cnt_s(ref_s.size(), 0);
    for (int b = 0; b < n; ++b)
        for (int ch = 0; ch < c; ++ch)
            for (int p = 0; p < P; ++p)
                for (int t = 0; t < T; ++t) {
                    size_t e = ((size_t)b * T + t) * P + p;
                    double w = tb.wts[e];
                    size_t src = ((size_t)b * c + ch) * H + tb.idx[e], o = ((size_t)b * c + ch) * P + p;
                    ref_g[o] += w * x[src], mag_g[o] += std::fabs(w * x[src]);
                    ref_s[src] += w * g[o], mag_s[src] += std::fabs(w * g[o]);
                    cnt_s[src] += w != 0 && g[o] != 0;
                }
    Buf<unsigned> idx(tb.idx, 0xfeedfaceu);
    Buf<float> wts(tb.wts, poison_f()), xb(x, poison_f()), gb(g, poison_f());
    double wg = 0, ws = 0;
    for (unsigned gx : grids_for((long long)n * c * P)) {
        Buf<float> out((size_t)n * c * P, poison_f(), poison_f());
        Buf<float> adj((size_t)n * c * H, 0.f, poison_f());
        emu::launch({gx, 1, 1}, {256, 1, 1}, false, [&] {
            taps_gather_f32(xb.p(), idx.p(), wts.p(), out.p(), n, c, H, P, T);
            taps_scatter_f32(gb.p(), idx.p(), wts.p(), adj.p(), n, c, H, P, T);
        });
        worst.launches += 2;
        CHECK(out.guards_ok() && adj.guards_ok() && idx.guards_ok() && wts.guards_ok() &&
                  xb.guards_ok() && gb.guards_ok(),
              "taps %s c %d grid %u: guards", what, c, gx);
        // f32 sums of `taps` products (gather) or of the contributions (scatter, any order)
        for (size_t i = 0; i < ref_g.size(); ++i) {
            double err = std::fabs(out[i] - ref_g[i]), bound = (T + 1) * U * mag_g[i];
            wg = std::max(wg, err / std::max(bound, 1e-300));
            CHECK(err <= bound, "taps_gather %s c %d grid %u out %zu: %.9g want %.9g", what, c, gx,
                  i, out[i], ref_g[i]);
        }
        for (size_t i = 0; i < ref_s.size(); ++i) {
            double err = std::fabs(adj[i] - ref_s[i]), bound = (cnt_s[i] + 1) * U * mag_s[i];
            ws = std::max(ws, err / std::max(bound, 1e-300));
            CHECK(err <= bound, "taps_scatter %s c %d grid %u out %zu: %.9g want %.9g", what, c, gx,
                  i, adj[i], ref_s[i]);
        }
        worst.values += ref_g.size() + ref_s.size();
    }
    worst.gather = std::max(worst.gather, wg), worst.scatter = std::max(worst.scatter, ws);
    printf("taps %-33s c %3d: %d x %d px, %d taps; worst err/bound gather %.3g, scatter %.3g\n",
           what, c, n, P, T, wg, ws);
}

static Table plan_table(const Plan &pl) {
    return {pl.n, pl.taps(), pl.p_out(), pl.hw_in(), pl.dev_idx, pl.dev_wts};
}
// Any table: repeated indices within a pixel, negative and 0 weights, an odd tap count.
static Table random_table(int n, int taps, int p_out, int hw_in, std::mt19937_64 &rng) {
    Table t{n, taps, p_out, hw_in, {}, {}};
    std::uniform_real_distribution<float> Ud(-1.f, 1.f);
    for (long i = 0; i < (long)n * taps * p_out; ++i) {
        t.idx.push_back((unsigned)(rng() % (i % 7 == 0 ? 2 : hw_in)));
        t.wts.push_back(i % 3 == 0 ? 0.f : Ud(rng));
    }
    return t;
}

// ---- normdiff_fwd_f32 / normdiff_bwd_f32 ----------------------------------------------------
// d = sum_c (a / na - b / nb)^2, na = max(|a|, eps); the gradient where |a| > eps is that of the
// normalisation, (2 / |a|) (r - u (u . r)) with u = a / |a|, r = u - v; where |a| <= eps,
// 2 r / eps (clamp_min passes nothing to the norm); d/db likewise with -r and v.
struct NormRef {
    double d;
    std::vector<double> da, db, sa, sb;  // gradients per unit upstream and their term scales
};
static NormRef ref_normdiff(const std::vector<double> &a, const std::vector<double> &b) {
    size_t c = a.size();
    double na = 0, nb = 0;
    for (size_t k = 0; k < c; ++k) na += a[k] * a[k], nb += b[k] * b[k];
    na = std::sqrt(na), nb = std::sqrt(nb);
    double ca = std::max(na, EPS), cb = std::max(nb, EPS);
    std::vector<double> u(c), v(c), r(c);
    double d = 0, ur = 0, vr = 0, aur = 0, avr = 0;
    for (size_t k = 0; k < c; ++k) {
        u[k] = a[k] / ca, v[k] = b[k] / cb, r[k] = u[k] - v[k];
        d += r[k] * r[k], ur += u[k] * r[k], vr += v[k] * r[k];
        aur += std::fabs(u[k] * r[k]), avr += std::fabs(v[k] * r[k]);
    }
    NormRef o{d, std::vector<double>(c), std::vector<double>(c), std::vector<double>(c),
              std::vector<double>(c)};
    for (size_t k = 0; k < c; ++k) {
        o.da[k] = 2.0 / ca * (r[k] - (na > EPS ? u[k] * ur : 0.0));
        o.db[k] = -2.0 / cb * (r[k] - (nb > EPS ? v[k] * vr : 0.0));
        o.sa[k] = 2.0 / ca * (std::fabs(u[k]) + std::fabs(v[k]) + std::fabs(u[k]) * aur);
        o.sb[k] = 2.0 / cb * (std::fabs(u[k]) + std::fabs(v[k]) + std::fabs(v[k]) * avr);
    }
    return o;
}

static void test_normdiff(int n, int c, int hw, std::mt19937_64 &rng) {
    std::uniform_real_distribution<float> Ud(-1.f, 1.f);
    size_t total = (size_t)n * c * hw;
    std::vector<float> a(total), b(total), g((size_t)n * hw);
    for (size_t i = 0; i < total; ++i) a[i] = Ud(rng), b[i] = Ud(rng);
    for (size_t i = 0; i < g.size(); ++i) g[i] = i % 4 == 3 ? 0.f : 2.f * Ud(rng);
    // directed positions: a = 0; |a| = 1e-14 (below eps); b = 3.5 a (d ~ 0); a = b = 0; |b| tiny
    auto at = [&](int s, int ch, int pos) { return ((size_t)s * c + ch) * hw + pos; };
    int kinds = std::min(hw, 5);
    for (int s = 0; s < n; ++s)
        for (int ch = 0; ch < c; ++ch) {
            if (kinds > 0) a[at(s, ch, 0)] = 0.f;
            if (kinds > 1) a[at(s, ch, 1)] *= 1e-14f;
            if (kinds > 2) b[at(s, ch, 2)] = 3.5f * a[at(s, ch, 2)];
            if (kinds > 3) a[at(s, ch, 3)] = b[at(s, ch, 3)] = 0.f;
            if (kinds > 4) b[at(s, ch, 4)] *= 3e-15f;
        }
    std::vector<NormRef> ref((size_t)n * hw);
    for (int s = 0; s < n; ++s)
        for (int pos = 0; pos < hw; ++pos) {
            std::vector<double> av(c), bv(c);
            for (int ch = 0; ch < c; ++ch) av[ch] = a[at(s, ch, pos)], bv[ch] = b[at(s, ch, pos)];
            ref[(size_t)s * hw + pos] = ref_normdiff(av, bv);
        }
    Buf<float> ab(a, poison_f()), bb(b, poison_f()), gb(g, poison_f());
    double wf = 0, wb = 0;
    for (unsigned gx : grids_for((long long)n * hw)) {
        Buf<float> d((size_t)n * hw, poison_f(), poison_f()), grad(2 * total, poison_f(), poison_f());
        emu::launch({gx, 1, 1}, {256, 1, 1}, false, [&] {
            normdiff_fwd_f32(ab.p(), bb.p(), d.p(), n, c, hw, EPS);
            normdiff_bwd_f32(ab.p(), bb.p(), gb.p(), grad.p(), n, c, hw, EPS);
        });
        worst.launches += 2;
        CHECK(d.guards_ok() && grad.guards_ok() && ab.guards_ok() && bb.guards_ok() && gb.guards_ok(),
              "normdiff (%d,%d,%d) grid %u: guards", n, c, hw, gx);
        for (int s = 0; s < n; ++s)
            for (int pos = 0; pos < hw; ++pos) {
                // double sums of c terms of magnitude <= 4, then one f32 rounding (1 ulp allowed)
                const NormRef &r = ref[(size_t)s * hw + pos];
                size_t i = (size_t)s * hw + pos;
                double err = std::fabs(d[i] - r.d), bound = 2 * U * r.d + 8.0 * (c + 4) * U64;
                wf = std::max(wf, err / bound);
                CHECK(err <= bound, "normdiff_fwd (%d,%d,%d) grid %u s %d pos %d: %.9g want %.9g", n,
                      c, hw, gx, s, pos, d[i], r.d);
                for (int ch = 0; ch < c; ++ch) {
                    double gv = g[i];
                    double want[2] = {gv * r.da[ch], gv * r.db[ch]};
                    double scale[2] = {std::fabs(gv) * r.sa[ch], std::fabs(gv) * r.sb[ch]};
                    for (int h = 0; h < 2; ++h) {
                        float got = grad[h * total + at(s, ch, pos)];
                        double e = std::fabs(got - want[h]);
                        double bnd = 2 * U * std::fabs(want[h]) + 8.0 * (c + 4) * U64 * scale[h] + 1e-300;
                        wb = std::max(wb, e / bnd);
                        CHECK(e <= bnd, "normdiff_bwd (%d,%d,%d) grid %u d/d%c s %d ch %d pos %d: %.9g "
                              "want %.9g", n, c, hw, gx, h ? 'b' : 'a', s, ch, pos, got, want[h]);
                    }
                }
            }
        worst.values += (size_t)n * hw + 2 * total;
    }
    worst.nd_fwd = std::max(worst.nd_fwd, wf), worst.nd_bwd = std::max(worst.nd_bwd, wb);
    printf("normdiff (n,c,hw)=(%d,%d,%d) (zero, |a| < eps, parallel, both zero, |b| < eps): worst "
           "err/bound fwd %.3g, bwd %.3g\n", n, c, hw, wf, wb);
}

// ---- fused_dense_fwd_f32 / fused_dense_bwd_f32 ----------------------------------------------
// The composition the kernels fuse: z_o = S_online(o), z_t = S_outer(S_inner(t)) (or
// S_inner(t)), each a gather of channels-last (n, hw, c) maps through all of a plan's taps,
// the chain through the materialised inner output; per sample sum_p m(p) d(z_o(p), z_t(p));
// backward: mg(p) dd/dz_o scattered through the online taps, mg(p) dd/dz_t scattered through
// the outer plan into the inner output, then through the inner plan. Alongside, the absolute
// gathers (sum |w| |x|) and composed tap counts for the rounding bounds.
struct Fused {
    std::string name;
    int n, c;
    Plan on, in, out;  // `out` (the outer plan) only when chain
    bool chain;
    bool parallel = false;  // t = 3 o through the online plan's taps: z_t ~ 3 z_o, d ~ 0
    int hw_o() const { return on.hw_in(); }
    int hw_t() const { return in.hw_in(); }
    int p_mid() const { return in.p_out(); }
    int p_out() const { return on.p_out(); }
};

// acc += w x[idx] over all taps of pixel p of plan pl, sample b, map `x` ((hw, c) of sample
// b); abs, k: the same with |w| xa[idx], and the count of nonzero taps (each worth kx[idx]
// taps of a map x that is itself a gather, else 1).
static void ref_gather(const Plan &pl, int b, int p, const double *x, const double *xa,
                       const int *kx, int c, double *acc, double *abs, int *k) {
    for (int t = 0; t < pl.taps(); ++t) {
        double w = pl.wts[pl.at(b, t, p)];
        size_t i = pl.idx[pl.at(b, t, p)];
        for (int ch = 0; ch < c; ++ch) {
            acc[ch] += w * x[i * c + ch];
            abs[ch] += std::fabs(w) * xa[i * c + ch];
        }
        if (w != 0) *k += kx ? kx[i] : 1;
    }
}
// dst[idx] += w v over all taps of pixel p
static void ref_scatter(const Plan &pl, int b, int p, const double *v, int c, double *dst) {
    for (int t = 0; t < pl.taps(); ++t) {
        double w = pl.wts[pl.at(b, t, p)];
        size_t i = pl.idx[pl.at(b, t, p)];
        for (int ch = 0; ch < c; ++ch) dst[i * c + ch] += w * v[ch];
    }
}
static void ref_scatter_abs(const Plan &pl, int b, int p, const double *v, int c, double *dst) {
    for (int t = 0; t < pl.taps(); ++t) {
        double w = std::fabs(pl.wts[pl.at(b, t, p)]);
        size_t i = pl.idx[pl.at(b, t, p)];
        for (int ch = 0; ch < c; ++ch) dst[i * c + ch] += w * v[ch];
    }
}

struct FusedRef {
    std::vector<double> sum, sum_bound;  // forward per sample, and its rounding bound
    std::vector<double> go, gt, go_bound, gt_bound;
    long clamped_o = 0, clamped_t = 0, zero_o = 0, zero_t = 0, active = 0, max_kt = 0;
};

static FusedRef ref_fused(const Fused &f, const std::vector<double> &o, const std::vector<double> &t,
                          const std::vector<double> &m, bool grads, unsigned blocks) {
    const int n = f.n, c = f.c, P = f.p_out(), Q = f.p_mid(), HO = f.hw_o(), HT = f.hw_t();
    FusedRef r;
    r.sum.assign(n, 0), r.sum_bound.assign(n, 0);
    if (grads) {
        r.go.assign((size_t)n * HO * c, 0), r.go_bound = r.go;
        r.gt.assign((size_t)n * HT * c, 0), r.gt_bound = r.gt;
    }
    std::vector<double> oa(o.size()), ta(t.size());
    for (size_t i = 0; i < o.size(); ++i) oa[i] = std::fabs(o[i]);
    for (size_t i = 0; i < t.size(); ++i) ta[i] = std::fabs(t[i]);
    for (int b = 0; b < n; ++b) {
        const double *ob = &o[(size_t)b * HO * c], *tb = &t[(size_t)b * HT * c];
        const double *oab = &oa[(size_t)b * HO * c], *tab = &ta[(size_t)b * HT * c];
        // the inner plan's output (the chain's middle map)
        std::vector<double> mid, mida;
        std::vector<int> midk;
        if (f.chain) {
            mid.assign((size_t)Q * c, 0), mida = mid, midk.assign(Q, 0);
            for (int q = 0; q < Q; ++q)
                ref_gather(f.in, b, q, tb, tab, nullptr, c, &mid[(size_t)q * c], &mida[(size_t)q * c],
                           &midk[q]);
        }
        std::vector<double> gmid((size_t)Q * c, 0), gmid_b((size_t)Q * c, 0);
        std::vector<double> go_abs((size_t)HO * c, 0), gmid_abs((size_t)Q * c, 0);  // sum |w grad|
        std::vector<double> cnt_o(HO, 0), cnt_mid(Q, 0);  // contributions per element
        double sum_md = 0;
        for (int p = 0; p < P; ++p) {
            double mp = m[(size_t)b * P + p];
            if (mp == 0) continue;
            ++r.active;
            std::vector<double> ov(c, 0), tv(c, 0), oab_v(c, 0), tab_v(c, 0);
            int ko = 0, kt = 0;
            ref_gather(f.on, b, p, ob, oab, nullptr, c, ov.data(), oab_v.data(), &ko);
            if (f.chain)
                ref_gather(f.out, b, p, mid.data(), mida.data(), midk.data(), c, tv.data(),
                           tab_v.data(), &kt);
            else
                ref_gather(f.in, b, p, tb, tab, nullptr, c, tv.data(), tab_v.data(), &kt);
            NormRef nr = ref_normdiff(ov, tv);
            r.max_kt = std::max<long>(r.max_kt, kt);
            double na = 0, nb = 0, aa = 0, at = 0, uu = 0, vv = 0;
            for (int ch = 0; ch < c; ++ch) {
                na += ov[ch] * ov[ch], nb += tv[ch] * tv[ch];
                aa += oab_v[ch] * oab_v[ch], at += tab_v[ch] * tab_v[ch];
            }
            na = std::sqrt(na), nb = std::sqrt(nb);
            double ia = 1 / std::max(na, EPS), ib = 1 / std::max(nb, EPS);
            r.clamped_o += na <= EPS, r.clamped_t += nb <= EPS, r.zero_o += na == 0, r.zero_t += nb == 0;
            // The kernel gathers in f32 (k taps: (k + 1) U of sum |w||x|; chained weights u w
            // rounded: + U) and rounds the pixel's coefficients; eo, et bound the relative
            // error of u = z_o / |z_o|, v (twice the gather's, its condition number
            // |sum |w||x|| / |z|).
            double go_ = (ko + 2) * U, gt_ = (kt + 3) * U;
            double eo = 2 * go_ * std::sqrt(aa) * ia, et = 2 * gt_ * std::sqrt(at) * ib;
            // d = |u - v|^2 with u, v off by eo, et: 2 |r| e + e^2 (doubled), and the double
            // sums' rounding
            double rn = std::sqrt(nr.d), e = eo + et;
            for (int ch = 0; ch < c; ++ch)
                uu += ov[ch] * ia * ov[ch] * ia, vv += tv[ch] * ib * tv[ch] * ib;
            double dbound = 2 * rn * 2 * e + 4 * e * e + 16 * U64 * (uu + vv + 2);
            r.sum[b] += mp * nr.d;
            r.sum_bound[b] += std::fabs(mp) * dbound;
            sum_md += std::fabs(mp * nr.d);
            if (!grads) continue;
            // gradients of mp d at the pixel, and per channel a first-order bound of the
            // kernel's f32 arithmetic, d/do = ao z_o + cross z_t with ao = 2 g ia^2 (1 - su),
            // cross = -2 g ia ib: ia^2 and su = u.r off by 2 eo and 3 (eo + et) give
            // 2 g ia 9 e |u|, cross off by e gives 2 g ia e |v|; the f32 gathers' own errors
            // (gamma sum |w||x| a channel) times |ao| <= 6 g ia^2 and |cross|; 2 U for the
            // products with the taps' weights
            std::vector<double> vo(c), vt(c), bo(c), bt(c), ao(c), at_(c);
            for (int ch = 0; ch < c; ++ch) {
                double u = ov[ch] * ia, v = tv[ch] * ib;
                double common = 10 * (e + U) * (std::fabs(u) + std::fabs(v)) +
                                4 * (go_ * ia * oab_v[ch] + gt_ * ib * tab_v[ch]);
                vo[ch] = mp * nr.da[ch], vt[ch] = mp * nr.db[ch];
                bo[ch] = 2 * std::fabs(mp) * ia * common + 2 * U * std::fabs(vo[ch]);
                bt[ch] = 2 * std::fabs(mp) * ib * common + 2 * U * std::fabs(vt[ch]);
                ao[ch] = std::fabs(vo[ch]), at_[ch] = std::fabs(vt[ch]);
            }
            ref_scatter(f.on, b, p, vo.data(), c, &r.go[(size_t)b * HO * c]);
            ref_scatter_abs(f.on, b, p, bo.data(), c, &r.go_bound[(size_t)b * HO * c]);
            ref_scatter_abs(f.on, b, p, ao.data(), c, go_abs.data());
            for (int k = 0; k < f.on.taps(); ++k)
                if (f.on.wts[f.on.at(b, k, p)] != 0) cnt_o[f.on.idx[f.on.at(b, k, p)]] += 1;
            if (f.chain) {
                ref_scatter(f.out, b, p, vt.data(), c, gmid.data());
                ref_scatter_abs(f.out, b, p, bt.data(), c, gmid_b.data());
                ref_scatter_abs(f.out, b, p, at_.data(), c, gmid_abs.data());
                for (int k = 0; k < f.out.taps(); ++k)
                    if (f.out.wts[f.out.at(b, k, p)] != 0) cnt_mid[f.out.idx[f.out.at(b, k, p)]] += 1;
            } else {
                for (int ch = 0; ch < c; ++ch) {
                    size_t i = (size_t)p * c + ch;
                    gmid[i] += vt[ch], gmid_b[i] += bt[ch], gmid_abs[i] += at_[ch];
                }
                cnt_mid[p] += 1;
            }
        }
        // forward: block partials rounded to f32, added atomically in f32
        r.sum_bound[b] += (blocks + 2) * U * sum_md;
        if (!grads) continue;
        // the target side: from the middle map through the inner plan; atomic f32 sums of
        // cnt contributions
        std::vector<double> gt_abs((size_t)HT * c, 0), cnt_t(HT, 0);
        for (int q = 0; q < Q; ++q) {
            ref_scatter(f.in, b, q, &gmid[(size_t)q * c], c, &r.gt[(size_t)b * HT * c]);
            ref_scatter_abs(f.in, b, q, &gmid_b[(size_t)q * c], c, &r.gt_bound[(size_t)b * HT * c]);
            ref_scatter_abs(f.in, b, q, &gmid_abs[(size_t)q * c], c, gt_abs.data());
            for (int k = 0; k < f.in.taps(); ++k)
                if (f.in.wts[f.in.at(b, k, q)] != 0) cnt_t[f.in.idx[f.in.at(b, k, q)]] += cnt_mid[q];
        }
        for (int i = 0; i < HO; ++i)
            for (int ch = 0; ch < c; ++ch)
                r.go_bound[((size_t)b * HO + i) * c + ch] += (cnt_o[i] + 2) * U * go_abs[(size_t)i * c + ch];
        for (int i = 0; i < HT; ++i)
            for (int ch = 0; ch < c; ++ch)
                r.gt_bound[((size_t)b * HT + i) * c + ch] += (cnt_t[i] + 2) * U * gt_abs[(size_t)i * c + ch];
    }
    return r;
}

// The reference's gradient against central differences of its own forward (weights mg), on
// every element of o and t: checks the analytic form (projection, chain, scatters).
static void fd_check(const Fused &f, std::mt19937_64 &rng) {
    std::uniform_real_distribution<double> Ud(-1, 1);
    std::vector<double> o((size_t)f.n * f.hw_o() * f.c), t((size_t)f.n * f.hw_t() * f.c),
        mg((size_t)f.n * f.p_out());
    for (auto &v : o) v = Ud(rng);
    for (auto &v : t) v = Ud(rng);
    for (size_t i = 0; i < mg.size(); ++i) mg[i] = i % 3 ? Ud(rng) : 0.0;
    FusedRef r = ref_fused(f, o, t, mg, true, 1);
    double worst_rel = 0;
    auto total = [&](std::vector<double> &oo, std::vector<double> &tt) {
        FusedRef q = ref_fused(f, oo, tt, mg, false, 1);
        double s = 0;
        for (double v : q.sum) s += v;
        return s;
    };
    double scale = 0;
    for (double v : r.go) scale = std::max(scale, std::fabs(v));
    for (double v : r.gt) scale = std::max(scale, std::fabs(v));
    for (int side = 0; side < 2; ++side) {
        std::vector<double> &x = side ? t : o;
        const std::vector<double> &g = side ? r.gt : r.go;
        for (size_t i = 0; i < x.size(); ++i) {
            double x0 = x[i], h = 1e-5;
            x[i] = x0 + h;
            double fp = total(o, t);
            x[i] = x0 - h;
            double fm = total(o, t);
            x[i] = x0;
            double fd = (fp - fm) / (2 * h), rel = std::fabs(fd - g[i]) / scale;
            worst_rel = std::max(worst_rel, rel);
            CHECK(rel < 1e-6, "fd %s d/d%c[%zu]: analytic %.9g, central difference %.9g",
                  f.name.c_str(), side ? 't' : 'o', i, g[i], fd);
        }
    }
    worst.fd = std::max(worst.fd, worst_rel);
    printf("reference gradient vs central differences (%s, %zu + %zu elements): worst |diff| / "
           "max|grad| %.3g\n", f.name.c_str(), o.size(), t.size(), worst_rel);
}

static void run_fused(Fused &f, std::mt19937_64 &rng, bool all_grids) {
    const int n = f.n, c = f.c, P = f.p_out(), HO = f.hw_o(), HT = f.hw_t();
    std::uniform_real_distribution<float> Ud(-1.f, 1.f);
    // channels-last maps; sample 0's target is 0 in its top rows (exact zero z_t), sample 1's
    // online map is scaled by 1e-14 in its left columns (|z_o| < eps)
    std::vector<float> o((size_t)n * HO * c), t((size_t)n * HT * c);
    for (auto &v : o) v = Ud(rng);
    for (auto &v : t) v = Ud(rng) + 0.3f;
    for (int i = 0; i < HT; ++i)
        if (i / f.in.w_in < (f.in.h_in + 1) / 2)
            for (int ch = 0; ch < c; ++ch) t[(size_t)i * c + ch] = 0.f;
    if (n > 1)
        for (int i = 0; i < HO; ++i)
            if (i % f.on.w_in < (f.on.w_in + 1) / 2)
                for (int ch = 0; ch < c; ++ch) o[((size_t)HO + i) * c + ch] *= 1e-14f;
    // nearly parallel vectors, as at convergence: d = |u|^2 + |v|^2 - 2 u.v cancels, so the
    // kernel's double channel sums are what keeps d accurate
    if (f.parallel)
        for (size_t i = 0; i < t.size(); ++i) t[i] = 3.f * o[i];
    // mask: the online plan's, some valid pixels off, some invalid ones on (z_o = 0, no taps),
    // some fractional
    std::vector<float> m((size_t)n * P), mg((size_t)n * P);
    for (size_t i = 0; i < m.size(); ++i) {
        m[i] = f.on.mask[i];
        if (i % 11 == 3) m[i] = 1.f - m[i];
        if (i % 7 == 5 && m[i] != 0) m[i] = 0.5f;
    }
    for (size_t i = 0; i < m.size(); ++i) mg[i] = m[i] * (i / P == 0 ? 0.7f : -1.3f);  // m x grad
    std::vector<double> od(o.begin(), o.end()), td(t.begin(), t.end()), md(m.begin(), m.end()),
        mgd(mg.begin(), mg.end());
    const Plan &u = f.chain ? f.out : f.in;  // the launcher passes the inner plan when unused
    int u_taps = f.chain ? f.out.taps() : 0;
    Buf<float> ob(o, poison_f()), tb(t, poison_f()), mb(m, poison_f()), mgb(mg, poison_f());
    Buf<unsigned> oi(f.on.dev_idx, 0xfeedfaceu), ii(f.in.dev_idx, 0xfeedfaceu), ui(u.dev_idx, 0xfeedfaceu);
    Buf<float> ow(f.on.dev_wts, poison_f()), iw(f.in.dev_wts, poison_f()), uw(u.dev_wts, poison_f());
    unsigned g0 = fused_blocks(P);
    std::vector<unsigned> grids = {g0, 1};
    if (all_grids) grids.push_back(2), grids.push_back(g0 + 3);
    std::sort(grids.begin(), grids.end());
    grids.erase(std::unique(grids.begin(), grids.end()), grids.end());
    double wf = 0, wo = 0, wt = 0;
    FusedRef stats;
    for (unsigned gx : grids) {
        FusedRef rf = ref_fused(f, od, td, md, false, gx);
        stats = rf;
        Buf<float> out(n, 0.f, poison_f());
        emu::launch({gx, (unsigned)n, 1}, {32 * FUSED_WARPS, 1, 1}, true, [&] {
            fused_dense_fwd_f32(ob.p(), tb.p(), mb.p(), out.p(), oi.p(), ow.p(), f.on.taps(), ii.p(),
                                iw.p(), f.in.taps(), ui.p(), uw.p(), u_taps, c, HO, HT, f.p_mid(), P,
                                EPS);
        });
        ++worst.launches;
        CHECK(out.guards_ok(), "fused fwd %s grid %u: guards", f.name.c_str(), gx);
        for (int b = 0; b < n; ++b) {
            double err = std::fabs(out[b] - rf.sum[b]), bound = 2 * rf.sum_bound[b];
            wf = std::max(wf, err / bound);
            CHECK(err <= bound, "fused fwd %s grid %u sample %d: %.9g want %.9g (bound %.3g)",
                  f.name.c_str(), gx, b, out[b], rf.sum[b], bound);
        }
        FusedRef rb = ref_fused(f, od, td, mgd, true, gx);
        for (int grad_t = 0; grad_t < 2; ++grad_t) {
            size_t len_o = (size_t)n * HO * c, len = len_o + (grad_t ? (size_t)n * HT * c : 0);
            Buf<float> g(len, 0.f, poison_f());  // zeroed by the launcher
            emu::launch({gx, (unsigned)n, 1}, {32 * FUSED_WARPS, 1, 1}, true, [&] {
                fused_dense_bwd_f32(ob.p(), tb.p(), mgb.p(), g.p(), oi.p(), ow.p(), f.on.taps(),
                                    ii.p(), iw.p(), f.in.taps(), ui.p(), uw.p(), u_taps, c, HO, HT,
                                    f.p_mid(), P, EPS, grad_t);
            });
            ++worst.launches;
            CHECK(g.guards_ok() && ob.guards_ok() && tb.guards_ok() && mgb.guards_ok() &&
                      oi.guards_ok() && ow.guards_ok() && ii.guards_ok() && iw.guards_ok() &&
                      ui.guards_ok() && uw.guards_ok(),
                  "fused bwd %s grid %u grad_t %d: guards", f.name.c_str(), gx, grad_t);
            for (size_t i = 0; i < len; ++i) {
                bool is_t = i >= len_o;
                size_t j = is_t ? i - len_o : i;
                double want = is_t ? rb.gt[j] : rb.go[j];
                double bound = 2 * (is_t ? rb.gt_bound[j] : rb.go_bound[j]) + 1e-300;
                double err = std::fabs(g[i] - want);
                (is_t ? wt : wo) = std::max(is_t ? wt : wo, err / bound);
                CHECK(err <= bound, "fused bwd %s grid %u grad_t %d d/d%c[%zu]: %.9g want %.9g "
                      "(bound %.3g)", f.name.c_str(), gx, grad_t, is_t ? 't' : 'o', j, g[i], want,
                      bound);
            }
            worst.values += len;
        }
    }
    worst.f_fwd = std::max(worst.f_fwd, wf), worst.f_bwd_o = std::max(worst.f_bwd_o, wo);
    worst.f_bwd_t = std::max(worst.f_bwd_t, wt);
    printf("fused %-34s n %d c %3d, %3d px, taps %2d / %2d%s: %ld active px (z_o = 0: %ld, "
           "|z_o| < eps: %ld, z_t = 0: %ld; most target taps %ld); grids", f.name.c_str(), n, c, P,
           f.on.taps(), f.chain ? f.in.taps() * f.out.taps() : f.in.taps(),
           f.chain ? " (chain)" : "", stats.active, stats.zero_o, stats.clamped_o - stats.zero_o,
           stats.zero_t, stats.max_kt);
    for (unsigned g : grids) printf(" (%u,%d)", g, n);
    printf(": worst err/bound fwd %.3g, d/do %.3g, d/dt %.3g\n", wf, wo, wt);
}

static Fused make_fused(std::string name, int n, int c, std::pair<int, int> lo_o,
                        std::pair<int, int> up_o, std::pair<int, int> lo_t, std::pair<int, int> up_t,
                        std::pair<int, int> mid, std::pair<int, int> out, bool chain, int salt,
                        bool interior_target = false) {
    Fused f;
    f.name = name, f.n = n, f.c = c, f.chain = chain;
    f.on = make_plan(n, lo_o, up_o, out, test_points(salt));
    if (interior_target)
        f.in = make_plan(n, lo_t, up_t, chain ? mid : out, interior_points(salt + 4));
    else
        f.in = make_plan(n, lo_t, up_t, chain ? mid : out, test_points(salt + 4));
    test_plan_taps(f.on, (name + " online").c_str());
    test_plan_taps(f.in, (name + " inner").c_str());
    if (chain) {  // the authors' order: sample the warped map at its own size (2 x 2 taps)
        f.out = interior_target ? make_plan(n, mid, mid, out, interior_points(salt + 7))
                                : make_plan(n, mid, mid, out, test_points(salt + 7));
        test_plan_taps(f.out, (name + " outer").c_str());
    }
    return f;
}

// emu.h itself: shuffles of doubles and 64-bit integers keep every bit (butterfly sums of
// values no float holds), with __syncwarp between rounds.
static void test_emu_shuffle() {
    std::vector<double> got(64);
    std::vector<long long> goti(64);
    emu::launch({1, 1, 1}, {64, 1, 1}, true, [&] {
        int t = (int)threadIdx.x;
        double v = 1.0 + t * 0x1p-40;
        long long k = (1LL << 40) + t;
        for (int off = 16; off > 0; off >>= 1) {
            v += __shfl_xor_sync(0xffffffffu, v, off);
            k += __shfl_xor_sync(0xffffffffu, k, off);
            __syncwarp();
        }
        got[t] = v, goti[t] = k;
    });
    int bad = 0;
    for (int t = 0; t < 64; ++t) {
        long long lanes = 0;
        for (int l = 0; l < 32; ++l) lanes += (t & ~31) + l;
        bad += got[t] != 32.0 + lanes * 0x1p-40 || goti[t] != 32 * (1LL << 40) + lanes;
    }
    CHECK(bad == 0, "emu: double / 64-bit warp sums wrong in %d lanes", bad);
    printf("emu: double and 64-bit butterfly warp sums exact in %d of 64 lanes\n", 64 - bad);
}

int main(int argc, char **argv) {
    std::string mode = argc < 2 ? "small" : argv[1];
    alarm(600);
    emu::random_order = getenv("EMU_RANDOM") != nullptr;
    if (const char *seed = getenv("EMU_SEED")) emu::rng.seed((unsigned)atoi(seed));  // other schedules
    printf("kernel text: kernels.cu (dense loss kernels); scheduling %s; mode %s\n",
           emu::random_order ? "random" : "in order", mode.c_str());
    auto t0 = std::chrono::steady_clock::now();
    std::mt19937_64 rng(2024);
    test_emu_shuffle();

    // plan_taps_f32 alone: upsampling (3 taps an axis), downsampling (4), equal sizes (2),
    // mixed, a single input row, the training geometry's scale
    struct PS {
        std::pair<int, int> in, up, out;
        int n, salt;
    } plans[] = {{{5, 7}, {13, 17}, {13, 17}, 3, 0}, {{6, 9}, {4, 5}, {7, 6}, 2, 1},
                 {{4, 6}, {4, 6}, {9, 11}, 2, 2},    {{4, 9}, {8, 5}, {6, 7}, 2, 3},
                 {{1, 3}, {5, 8}, {4, 4}, 3, 4},     {{64, 128}, {512, 1024}, {19, 23}, 2, 5}};
    std::vector<Plan> built;
    for (auto &s : plans) {
        built.push_back(make_plan(s.n, s.in, s.up, s.out, test_points(s.salt)));
        char what[64];
        snprintf(what, sizeof what, "s%d", s.salt);
        test_plan_taps(built.back(), what);
    }
    // gather / scatter through plans (9, 16, 4 taps) and a random table; c = 1, 3, 40
    test_taps(plan_table(built[0]), 3, rng, "5x7 up 13x17 (9 taps)");
    test_taps(plan_table(built[1]), 40, rng, "6x9 down 4x5 (16 taps)");
    test_taps(plan_table(built[2]), 1, rng, "4x6 same size (4 taps)");
    test_taps(random_table(2, 5, 37, 11, rng), 3, rng, "random table (5 taps, repeats)");
    test_taps(random_table(1, 3, 300, 50, rng), 2, rng, "random table (3 taps, 2 blocks)");

    test_normdiff(2, 5, 21, rng);
    test_normdiff(3, 40, 50, rng);
    test_normdiff(1, 256, 6, rng);
    test_normdiff(2, 1, 7, rng);
    test_normdiff(1, 3, 700, rng);

    // the fused compare: reference checked by central differences, then the kernels
    Fused fd1 = make_fused("fd: small, no chain", 1, 3, {3, 4}, {6, 8}, {3, 3}, {6, 6}, {0, 0},
                           {3, 4}, false, 11);
    Fused fd2 = make_fused("fd: small, chain", 2, 2, {3, 4}, {6, 8}, {3, 3}, {6, 6}, {4, 3}, {3, 4},
                           true, 12);
    fd_check(fd1, rng);
    fd_check(fd2, rng);
    bool all = mode == "all";
    std::vector<Fused> cases;
    cases.push_back(make_fused("c40 up, one target plan", 2, 40, {5, 7}, {20, 28}, {6, 8}, {24, 32},
                               {0, 0}, {8, 10}, false, 20));
    // the target plans at interior points, the inner upsampling by little: 3 x 3 nonzero taps
    // a mid pixel, 2 x 2 outer ones, so pixels reach FUSED_MAX_TAPS = 9 x 4
    cases.push_back(make_fused("c40 up, chain of 9 x 4 taps", 2, 40, {5, 7}, {20, 28}, {6, 8},
                               {7, 9}, {7, 9}, {8, 10}, true, 21, true));
    cases.push_back(make_fused("c256 tiny, chain", 2, 256, {3, 4}, {6, 8}, {3, 3}, {9, 9}, {3, 3},
                               {2, 3}, true, 22));
    cases.push_back(make_fused("c256 tiny, down 16 taps / same 4", 2, 256, {8, 10}, {4, 5}, {4, 4},
                               {4, 4}, {0, 0}, {2, 2}, false, 23));
    cases.push_back(make_fused("c3 same size, one plan", 3, 3, {6, 7}, {6, 7}, {5, 5}, {10, 10},
                               {0, 0}, {5, 6}, false, 24));
    cases.push_back(make_fused("c33 chain", 2, 33, {4, 4}, {8, 8}, {3, 5}, {4, 7}, {5, 5}, {4, 5},
                               true, 25));
    cases.push_back(make_fused("c40 parallel (t = 3 o, same taps)", 2, 40, {5, 6}, {10, 12}, {5, 6},
                               {10, 12}, {0, 0}, {4, 6}, false, 27));
    cases.back().in = cases.back().on, cases.back().parallel = true;
    for (auto &f : cases) run_fused(f, rng, true);
    if (all) {
        cases.push_back(make_fused("c64 larger, chain", 2, 64, {9, 12}, {36, 48}, {8, 10}, {32, 40},
                                   {20, 24}, {18, 22}, true, 26));
        run_fused(cases.back(), rng, true);
    }
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("SUMMARY: %ld launches, %ld outputs checked, %lld fiber blocks (%lld block barriers, "
           "%lld warp rounds), %.1f s; plan_taps: %ld of %ld taps differ from the CPU's (%ld invalid "
           "px, %ld zero-weight taps); worst err/bound: gather %.3g, scatter %.3g, normdiff fwd %.3g, "
           "bwd %.3g, fused fwd %.3g, d/do %.3g, d/dt %.3g; reference vs central differences %.3g; "
           "failures %d\n",
           worst.launches, worst.values, emu::stat_blocks, emu::stat_syncs, emu::stat_shfl_rounds,
           secs, worst.plan_bad, worst.plan_taps, worst.plan_invalid, worst.plan_zero_w, worst.gather,
           worst.scatter, worst.nd_fwd, worst.nd_bwd, worst.f_fwd, worst.f_bwd_o, worst.f_bwd_t,
           worst.fd, failures);
    return failures ? 1 : 0;
}
