/* Gradient of the soft ReLU of a frozen BatchNorm output (the CPU kernel of
   excitation_pullbacks.rules.batch_norm_kernel), compiled into the same library as pool_kernel.c.

   For x (N x C x S, contiguous) it recomputes, plane by plane, z = x * alpha_c + beta_c (+ one addend of x's
   shape) with alpha_c = weight_c / sqrt(var_c + eps) (given) and beta_c = bias_c - mean_c * alpha_c, the
   forward's eval-mode batch_norm and in-place residual sum, and writes gin = grad * sigmoid(z / T) as the
   softplus backward computes it (grad * e / (e + 1), e = exp(z / T); grad itself above the threshold). One
   pass over memory, where the torch ops make a recompute pass and a gate pass. At and below z / T = lo the
   gate is 0: exp(lo) is about the dtype's smallest normal number, so the products would be subnormal (slow,
   and flushed to 0 in the backward anyway), and glibc's vector exp takes a scalar path for lanes out of its
   range, five to ten times slower where many are. Rounding: beta and x * alpha +
   beta are fused multiply-adds, as ATen's batch_norm kernels for AVX2/AVX-512 compute them (bit for bit the
   forward's z there); everything else is rounded op by op (built with -ffp-contract=off). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#pragma omp declare simd notinbranch
extern float expf(float);
#pragma omp declare simd notinbranch
extern double exp(double);
/* Elements below which the kernel runs on the calling thread alone. */
#define BN_PARALLEL_MIN 65536

/* out = grad * e / (e + 1), e = exp(u), or grad where u > thr, or 0 where u <= low, with u clamped to
   [low, thr + 1] first: the selects read the clamped u, so the compiler keeps the clamp (with selects on u
   it may drop it as the identity where e is used, and exp would see the whole range again). */
#define GATE(T, EXP, u, g, out)                                                                                \
    do {                                                                                                 \
        T uc = (u) < low ? low : (u);                                                                    \
        uc = uc > high ? high : uc;                                                                      \
        T e = EXP(uc);                                                                                   \
        out = uc > thr ? (g) : uc <= low ? (T)0 : (g) * e / (e + (T)1);                                  \
    } while (0)

/* bias and add may be NULL (bias 0, no addend). Returns nonzero when its channel buffer could
   not be allocated. */
#define BN_SOFT_RELU(NAME, T, EXP, FMA)                                                                           \
int NAME(const T *x, const T *add, const T *grad, T *gin, const T *alpha, const T *mean, const T *bias,   \
         double inv_t, double threshold, double lo, int64_t N, int64_t C, int64_t S) {                              \
    T *ab = (T *)malloc(sizeof(T) * (size_t)(2 * C));                                                    \
    if (ab == NULL) return 1;                                                                            \
    for (int64_t c = 0; c < C; c++) {                                                                    \
        ab[c] = alpha[c];                                                                                \
        ab[C + c] = FMA(-mean[c], alpha[c], bias ? bias[c] : (T)0);                                      \
    }                                                                                                    \
    const T it = (T)inv_t, thr = (T)threshold, low = (T)lo, high = (T)(threshold + 1);                                                           \
    _Pragma("omp parallel for schedule(static) if (N * C * S >= BN_PARALLEL_MIN)")                       \
    for (int64_t p = 0; p < N * C; p++) {                                                                \
        const T a = ab[p % C], b = ab[C + p % C];                                                        \
        const T *xp = x + p * S, *gp = grad + p * S;                                                     \
        T *op = gin + p * S;                                                                             \
        if (add == NULL) {                                                                               \
            _Pragma("omp simd")                                                                          \
            for (int64_t i = 0; i < S; i++) {                                                            \
                T u = FMA(xp[i], a, b) * it;                                                             \
                GATE(T, EXP, u, gp[i], op[i]);                                                            \
            }                                                                                            \
        } else {                                                                                         \
            const T *rp = add + p * S;                                                                   \
            _Pragma("omp simd")                                                                          \
            for (int64_t i = 0; i < S; i++) {                                                            \
                T u = (FMA(xp[i], a, b) + rp[i]) * it;                                                   \
                GATE(T, EXP, u, gp[i], op[i]);                                                            \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    free(ab);                                                                                            \
    return 0;                                                                                            \
}

BN_SOFT_RELU(bn_soft_relu_f32, float, expf, fmaf)
BN_SOFT_RELU(bn_soft_relu_f64, double, exp, fma)
