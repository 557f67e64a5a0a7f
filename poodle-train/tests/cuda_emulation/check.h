// What both harnesses check with: a failure counter and CHECK (the run goes on after a failed
// check and prints at most 40), and buffers with guard areas on both sides.
#pragma once
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

static int failures = 0;
#define CHECK(cond, ...)                                             \
    do {                                                             \
        if (!(cond)) {                                               \
            ++failures;                                              \
            if (failures < 40) {                                     \
                fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
                fprintf(stderr, __VA_ARGS__);                        \
                fprintf(stderr, "\n");                               \
            }                                                        \
        }                                                            \
    } while (0)

// ---- buffers with guards -------------------------------------------------------------------
template <class T>
struct Buf {
    static constexpr size_t G = 64;
    std::vector<T> v;
    T pattern;
    size_t n;
    Buf(size_t n_, T fill, T guard) : v(n_ + 2 * G, guard), pattern(guard), n(n_) {
        std::fill(v.begin() + G, v.begin() + G + n, fill);
    }
    Buf(const std::vector<T> &src, T guard) : Buf(src.size(), T(), guard) {
        std::copy(src.begin(), src.end(), v.begin() + G);
    }
    T *p() { return v.data() + G; }
    T &operator[](size_t i) { return v[G + i]; }
    bool guards_ok() const {
        for (size_t i = 0; i < G; ++i)
            if (memcmp(&v[i], &pattern, sizeof(T)) || memcmp(&v[G + n + i], &pattern, sizeof(T)))
                return false;
        return true;
    }
};
