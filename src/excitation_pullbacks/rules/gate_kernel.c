/* grad * Phi(z / T), the normal-CDF gate of a GELU site's backward, in one CPU pass (the kernel of
   excitation_pullbacks.rules.gate_kernel), compiled into the same library as pool_kernel.c.

   Phi(u) = erfc(-u / sqrt(2)) / 2: one complementary error function per element (glibc's vector erfc where
   glibc has it, 2.35 on), where the torch ops make a pass per operation (scale, erf, add, halve, multiply). */
#if defined(__has_include)
#if __has_include(<features.h>)
#include <features.h> /* glibc's version, where there is glibc */
#endif
#endif
#include <math.h>
#include <stdint.h>

#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 35)
#pragma omp declare simd notinbranch
extern float erfcf(float);
#pragma omp declare simd notinbranch
extern double erfc(double);
#endif
/* Elements below which the kernel runs on the calling thread alone. */
#define GATE_PARALLEL_MIN 65536
#define GATE_BLOCK 4096

/* out[i] = grad[i] * erfc(z[i] * scale) / 2 for i < n, scale = -1 / (T sqrt(2)); where the argument is at or
   below lo the gate is 1 (erfc / 2 rounds to 1 there), at or above hi 0 (erfc is below the smallest normal number, which
   the backward flushes to 0 anyway): glibc's vector erfc takes a scalar path for lanes out of its range. */
#define NORMAL_CDF_GATE(NAME, T, ERFC)                                                                   \
void NAME(const T *z, const T *grad, T *out, int64_t n, double scale, double lo, double hi) {           \
    const T s = (T)scale, low = (T)lo, high = (T)hi;                                                     \
    int64_t blocks = (n + GATE_BLOCK - 1) / GATE_BLOCK;                                                  \
    _Pragma("omp parallel for schedule(static) if (n >= GATE_PARALLEL_MIN)")                             \
    for (int64_t b = 0; b < blocks; b++) {                                                               \
        int64_t first = b * GATE_BLOCK, last = first + GATE_BLOCK < n ? first + GATE_BLOCK : n;          \
        _Pragma("omp simd")                                                                              \
        for (int64_t i = first; i < last; i++) {                                                         \
            T v = z[i] * s;                                                                              \
            v = v < low ? low : v;                                                                       \
            v = v > high ? high : v; /* the selects below read the clamped v: the compiler keeps it */   \
            T g = ERFC(v) * (T)0.5;                                                                      \
            out[i] = v <= low ? grad[i] : v >= high ? (T)0 : grad[i] * g;                                \
        }                                                                                                \
    }                                                                                                    \
}

NORMAL_CDF_GATE(normal_cdf_gate_f32, float, erfcf)
NORMAL_CDF_GATE(normal_cdf_gate_f64, double, erfc)
