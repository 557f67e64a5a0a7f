// Host emulation of the CUDA built-ins that the kernels of kernels.cu use (sync_bn.cuh and the
// dense loss's kernels). Threads of a block are ucontext fibers run by a deterministic
// scheduler; __syncthreads is a barrier over the block's live fibers, __syncwarp one over the
// warp's 32 lanes, __shfl_xor_sync (any type of up to 8 bytes) exchanges through a per-warp
// buffer between two warp barriers. Fibers switch only at those barriers, so atomicAdd is a
// plain read-modify-write. Kernels without barriers may run in "direct" mode (each thread
// called in turn), where a barrier call aborts.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <type_traits>
#include <utility>
#include <ucontext.h>

struct uint3 {
    unsigned int x, y, z;
};
static uint3 threadIdx, blockIdx, blockDim, gridDim;

#define __device__
#define __global__
#define __shared__ static  /* one copy; blocks run one after another */
#define __forceinline__ inline

// A template, so that a header's own `int min(int, int)` (plan_taps.cuh's host branch) may
// sit beside it.
template <class T>
static inline T min(T a, T b) {
    return a < b ? a : b;
}
static inline float __uint_as_float(unsigned int u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    memcpy(&u, &f, 4);
    return u;
}

namespace emu {
constexpr int MAXT = 1024;
constexpr size_t STACK = 128 * 1024;
enum St { RUN, WAIT_BLOCK, WAIT_WARP, DONE };
enum WarpOp { SHFL = 1, SYNCWARP = 2 };
inline St st[MAXT];
inline ucontext_t ctx[MAXT], sched;
inline char *stacks[MAXT];
inline int cur = -1, nthreads = 0;
inline bool in_fiber = false;
inline unsigned long long shfl_buf[MAXT];  // each lane's value, its bytes
inline long nsync[MAXT], nshfl[MAXT];      // barriers passed; warp barriers (shuffles, __syncwarp)
inline int warp_op[MAXT];                  // what a lane waits at: SHFL or SYNCWARP
inline std::function<void()> body;
inline bool random_order = false;
inline unsigned run_p[MAXT];
inline std::minstd_rand rng(7);
inline long long stat_blocks = 0, stat_syncs = 0, stat_shfl_rounds = 0;

[[noreturn]] inline void die(const char *m) {
    fprintf(stderr, "EMULATION ERROR: %s (block %u,%u thread %d)\n", m, blockIdx.x, blockIdx.y,
            cur);
    abort();
}

inline void tramp() {
    body();
    st[cur] = DONE;
    // returns to uc_link = sched
}

inline void wait(St s) {
    if (!in_fiber) die("barrier in a kernel launched without fibers");
    st[cur] = s;
    swapcontext(&ctx[cur], &sched);
}

// All 32 lanes of warp w wait at the same warp barrier: same count, same kind.
inline void check_warp(int w) {
    for (int l = 1; l < 32; ++l) {
        if (nshfl[w * 32 + l] != nshfl[w * 32]) die("warp shuffle/__syncwarp count mismatch");
        if (warp_op[w * 32 + l] != warp_op[w * 32]) die("lanes at a shuffle and at __syncwarp");
    }
}

// Lets warp w run again if all its 32 lanes wait at a warp barrier (checking they wait at
// the same one).
inline bool release_warp(int w) {
    int waiting = 0;
    for (int l = 0; l < 32; ++l) waiting += st[w * 32 + l] == WAIT_WARP;
    if (waiting != 32) return false;
    check_warp(w);
    for (int l = 0; l < 32; ++l) st[w * 32 + l] = RUN;
    ++stat_shfl_rounds;
    return true;
}

inline void run_block(int nt) {
    nthreads = nt;
    for (int t = 0; t < nt; ++t) {
        if (!stacks[t]) stacks[t] = (char *)malloc(STACK);
        getcontext(&ctx[t]);
        ctx[t].uc_stack.ss_sp = stacks[t];
        ctx[t].uc_stack.ss_size = STACK;
        ctx[t].uc_link = &sched;
        makecontext(&ctx[t], (void (*)())tramp, 0);
        st[t] = RUN;
        nsync[t] = nshfl[t] = 0;
    }
    if (random_order) {  // per-block speeds: some fibers lag far behind the others
        static const unsigned ps[] = {100000, 100000, 50000, 5000, 500};
        for (int t = 0; t < nt; ++t) run_p[t] = ps[rng() % 5];
        if (rng() % 2) {  // or whole warps lag
            for (int t = 0; t < nt; ++t) run_p[t] = run_p[t & ~31];
        }
    }
    in_fiber = true;
    for (;;) {
        if (random_order) {
            // a random nonempty subset of the runnable fibers, in random order; the rest
            // lag behind (explores interleavings at barrier granularity)
            int order[MAXT], k = 0;
            for (int t = 0; t < nt; ++t)
                if (st[t] == RUN) order[k++] = t;
            if (k) {
                // release any warp whose 32 lanes all wait at a shuffle now, so that a warp
                // can run ahead of fibers of other warps that are still runnable
                for (int w = 0; w * 32 < nt; ++w) {
                    if (release_warp(w))
                        for (int l = 0; l < 32; ++l) order[k++] = w * 32 + l;
                }
                for (int i = k - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);
                int ran = 0;
                for (int i = 0; i < k; ++i) {
                    if (ran && (rng() % 100000) >= run_p[order[i]]) continue;
                    int t = order[i];
                    ++ran;
                    cur = t;
                    threadIdx = {(unsigned)t, 0, 0};
                    swapcontext(&sched, &ctx[t]);
                }
                continue;
            }
        } else {
            for (int t = 0; t < nt; ++t) {
                if (st[t] == RUN) {
                    cur = t;
                    threadIdx = {(unsigned)t, 0, 0};
                    swapcontext(&sched, &ctx[t]);
                }
            }
        }
        // A warp with only some lanes at a warp barrier is left waiting: the checks below
        // abort on the deadlock.
        bool released = false;
        for (int w = 0; w * 32 < nt; ++w) released |= release_warp(w);
        if (released) continue;
        int wb = 0, done = 0;
        for (int t = 0; t < nt; ++t) wb += st[t] == WAIT_BLOCK, done += st[t] == DONE;
        if (done == nt) break;
        if (wb == nt) {
            for (int t = 1; t < nt; ++t)
                if (nsync[t] != nsync[0]) die("__syncthreads count mismatch");
            for (int t = 0; t < nt; ++t) st[t] = RUN;
            ++stat_syncs;
            continue;
        }
        die("deadlock: divergent __syncthreads / partial-warp shuffle");
    }
    in_fiber = false;
    cur = -1;
    for (int t = 1; t < nt; ++t)
        if (nsync[t] != nsync[0]) die("threads ended with different __syncthreads counts");
    ++stat_blocks;
}

// Launch f over grid x block (block.y = block.z = 1); fibers when the kernel has barriers.
template <class F>
void launch(uint3 grid, uint3 block, bool fibers, F f) {
    if (block.y != 1 || block.z != 1 || block.x > MAXT || block.x % 32) die("block shape");
    blockDim = block;
    gridDim = grid;
    body = f;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = {bx, by, bz};
                if (fibers) {
                    run_block((int)block.x);
                } else {
                    for (unsigned t = 0; t < block.x; ++t) {
                        threadIdx = {t, 0, 0};
                        cur = (int)t;
                        f();
                    }
                    cur = -1;
                }
            }
    body = nullptr;
}
}  // namespace emu

static inline void __syncthreads() {
    ++emu::nsync[emu::cur];
    emu::wait(emu::WAIT_BLOCK);
}

template <class T>
static inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(emu::shfl_buf[0]));
    if (mask != 0xffffffffu) emu::die("shuffle mask other than full");
    if (lane_mask < 0 || lane_mask > 31) emu::die("shuffle lane mask out of range");
    int t = (int)threadIdx.x;
    ++emu::nshfl[t];
    emu::warp_op[t] = emu::SHFL;
    memcpy(&emu::shfl_buf[t], &v, sizeof(T));
    emu::wait(emu::WAIT_WARP);
    T r;
    memcpy(&r, &emu::shfl_buf[(t & ~31) | ((t & 31) ^ lane_mask)], sizeof(T));
    emu::wait(emu::WAIT_WARP);
    return r;
}

static inline void __syncwarp(unsigned int mask = 0xffffffffu) {
    if (mask != 0xffffffffu) emu::die("__syncwarp mask other than full");
    int t = (int)threadIdx.x;
    ++emu::nshfl[t];
    emu::warp_op[t] = emu::SYNCWARP;
    emu::wait(emu::WAIT_WARP);
}

// Atomic by construction: a fiber yields only at barriers.
template <class T>
static inline T atomicAdd(T *p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
