/* Input gradient of the softmax pool (the CPU kernel of excitation_pullbacks.rules.pool_kernel).

   One pass over each output row's windows: the window max, the exponentials e_j = exp((x_j - m) / T) and
   their sums stay in row buffers (in cache) and the input gradient is accumulated directly, so the
   k_h * k_w-fold per-offset terms of the torch path never reach memory. Planes are split by OpenMP; the
   library is linked against the OpenMP runtime torch itself has loaded, so torch.set_num_threads governs it.
   Plain C (no torch headers), built on first use by the system C compiler. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* glibc's vector exp (libmvec) for the loops along a row. */
#pragma omp declare simd notinbranch
extern float expf(float);
#pragma omp declare simd notinbranch
extern double exp(double);
#define SIMD _Pragma("omp simd")
/* Elements below which a kernel runs on the calling thread alone. */
#define PARALLEL_MIN 65536

/* A window term's weight exp(u), u = (x - max) / T <= 0, from uc = CLAMP(low, u): 0 at and below low, where
   exp(low) is about the dtype's smallest normal number (negligible beside the max's exp(0) = 1; the products
   would be subnormal) and glibc's vector exp would take a scalar path several times slower. low is read from
   a volatile at run time: with a constant, gcc folds exp(low) and calls exp on the unclamped u (seen in its
   code; 8 instead of 0.9 ns per element on spread-out windows). */
#define WEIGHT(EXP, low, uc) ((uc) <= (low) ? 0 : EXP(uc))
#define CLAMP(low, u) ((u) < (low) ? (low) : (u))
static volatile const float low_f32 = -87.0f;
static volatile const double low_f64 = -708.0;

/* 2 x 2 windows at stride 2 that tile the plane exactly (no padding or dilation, H = 2 Ho, W = 2 Wo: VGG's
   and small CNNs' pools), in one loop per output row: the same terms, in the same order and with the same
   operations as SOFT_POOL below, so the same numbers. SOFT_POOL's dozen short loops per row cost more than
   the arithmetic on small planes (a batch-1 digits pullback's 16 x 16 and 8 x 8), and each input element is
   written once, so the plane needs no zeroing. */
#define SOFT_POOL_2X2(NAME, T, EXP, LOW)                                                                 \
static void NAME(const T *x, const T *grad, T *gin, const T *temps, int64_t nt, int64_t planes,         \
                 int64_t Ho, int64_t Wo, int detach) {                                                   \
    const T low = LOW;                                                                                   \
    int64_t W = 2 * Wo;                                                                                  \
    _Pragma("omp parallel for schedule(static) if (planes * Ho * Wo * 4 >= PARALLEL_MIN)")              \
    for (int64_t p = 0; p < planes; p++) {                                                               \
        T inv = (T)1 / temps[p % nt];                                                                    \
        for (int64_t oh = 0; oh < Ho; oh++) {                                                            \
            const T *x0 = x + (p * Ho + oh) * 2 * W, *x1 = x0 + W, *gp = grad + (p * Ho + oh) * Wo;      \
            T *o0 = gin + (p * Ho + oh) * 2 * W, *o1 = o0 + W;                                           \
            SIMD for (int64_t ow = 0; ow < Wo; ow++) {                                                   \
                T a = x0[2 * ow], b = x0[2 * ow + 1], c = x1[2 * ow], d = x1[2 * ow + 1];                \
                T m = -INFINITY;                                                                         \
                m = a > m ? a : m; m = b > m ? b : m; m = c > m ? c : m; m = d > m ? d : m;              \
                T ua = (a - m) * inv, ub = (b - m) * inv, uc = (c - m) * inv, ud = (d - m) * inv;        \
                T ca = CLAMP(low, ua), cb = CLAMP(low, ub), cc = CLAMP(low, uc), cd = CLAMP(low, ud);   \
                T ea = WEIGHT(EXP, low, ca), eb = WEIGHT(EXP, low, cb);                                  \
                T ec = WEIGHT(EXP, low, cc), ed = WEIGHT(EXP, low, cd);                                  \
                T Z = 0, S = 0;                                                                          \
                Z += ea; S += ea * ua; Z += eb; S += eb * ub;                                            \
                Z += ec; S += ec * uc; Z += ed; S += ed * ud;                                            \
                T C = gp[ow] / Z, A = detach ? 0 : 1 - S / Z;                                            \
                if (detach) {                                                                            \
                    o0[2 * ow] = (T)0 + ea * C; o0[2 * ow + 1] = (T)0 + eb * C;                          \
                    o1[2 * ow] = (T)0 + ec * C; o1[2 * ow + 1] = (T)0 + ed * C;                          \
                } else {                                                                                 \
                    o0[2 * ow] = (T)0 + ea * C * (ua + A); o0[2 * ow + 1] = (T)0 + eb * C * (ub + A);    \
                    o1[2 * ow] = (T)0 + ec * C * (uc + A); o1[2 * ow + 1] = (T)0 + ed * C * (ud + A);    \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
}

SOFT_POOL_2X2(soft_pool_2x2_f32, float, expf, low_f32)
SOFT_POOL_2X2(soft_pool_2x2_f64, double, exp, low_f64)


/* Input gradient of the softmax pool of x (planes x H x W, contiguous) for grad (planes x Ho x Wo); writes
   gin (planes x H x W). Plane p has temperature temps[p % nt]. Positions outside the input are excluded, or
   (zero != 0) enter as x = 0 while within the explicit padding. detach: gradient = weights; else the full
   gradient w_j (r_j + 1 - sum(e r) / Z). Returns nonzero when its row buffers could not be allocated. */
#define SOFT_POOL(NAME, T, EXP, LOW, TILES)                                                              \
int NAME(const T *x, const T *grad, T *gin, const T *temps, int64_t nt, int64_t planes, int64_t H,      \
         int64_t W, int64_t Ho, int64_t Wo, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,  \
         int64_t pw, int64_t dh, int64_t dw, int zero, int detach) {                                     \
    if (kh == 2 && kw == 2 && sh == 2 && sw == 2 && ph == 0 && pw == 0 && dh == 1 && dw == 1 &&          \
        H == 2 * Ho && W == 2 * Wo) {                                                                     \
        TILES(x, grad, gin, temps, nt, planes, Ho, Wo, detach);                                          \
        return 0;                                                                                        \
    }                                                                                                    \
    int64_t K = kh * kw;                                                                                 \
    int failed = 0;                                                                                      \
    const T low = LOW;                                                                                   \
    _Pragma("omp parallel if (planes * H * W >= PARALLEL_MIN) reduction(| : failed)")                    \
    {                                                                                                    \
    T *buf = (T *)malloc(sizeof(T) * (size_t)Wo * (size_t)(2 * K + 4));                                  \
    int64_t *lo = (int64_t *)malloc(sizeof(int64_t) * (size_t)(4 * kw));                                \
    int ok = buf != NULL && lo != NULL;                                                                  \
    failed |= !ok;                                                                                       \
    for (int64_t j = 0; ok && j < kw; j++) { /* ow ranges whose column is in the input / the padding */  \
        int64_t off = j * dw - pw, a = 0, b = 0, za = 0, zb = 0;                                         \
        while (a < Wo && a * sw + off < 0) a++;                                                          \
        b = a; while (b < Wo && b * sw + off < W) b++;                                                   \
        while (za < Wo && za * sw + off < -pw) za++;                                                     \
        zb = za; while (zb < Wo && zb * sw + off < W + pw) zb++;                                         \
        lo[j] = a; lo[kw + j] = b; lo[2 * kw + j] = za; lo[3 * kw + j] = zb;                             \
    }                                                                                                    \
    _Pragma("omp for schedule(static)")                                                                  \
    for (int64_t p = 0; p < planes; p++) {                                                               \
        if (!ok) continue;                                                                               \
        T *m = buf, *Z = buf + Wo, *S = buf + 2 * Wo, *C = buf + 3 * Wo, *E = buf + 4 * Wo;              \
        T *R = E + K * Wo;                                                                               \
        int64_t *hi = lo + kw, *zlo = lo + 2 * kw, *zhi = lo + 3 * kw;                                   \
        const T *xp = x + p * H * W, *gp = grad + p * Ho * Wo;                                           \
        T *op = gin + p * H * W;                                                                         \
        T inv = (T)1 / temps[p % nt];                                                                    \
        memset(op, 0, sizeof(T) * (size_t)(H * W));                                                      \
        for (int64_t oh = 0; oh < Ho; oh++) {                                                            \
            for (int64_t ow = 0; ow < Wo; ow++) { m[ow] = -INFINITY; Z[ow] = 0; S[ow] = 0; }             \
            for (int64_t i = 0; i < kh; i++) {                                                           \
                int64_t r = oh * sh - ph + i * dh;                                                       \
                int inside = r >= 0 && r < H, padrow = zero && r >= -ph && r < H + ph;                   \
                for (int64_t j = 0; j < kw; j++) {                                                       \
                    if (inside) {                                                                        \
                        const T *row = xp + r * W + j * dw - pw;                                         \
                        SIMD for (int64_t ow = lo[j]; ow < hi[j]; ow++) {                                \
                            T v = row[ow * sw]; m[ow] = v > m[ow] ? v : m[ow];                           \
                        }                                                                                \
                    }                                                                                    \
                    if (padrow) {                                                                        \
                        for (int64_t ow = zlo[j]; ow < zhi[j]; ow++)                                     \
                            if (!inside || ow < lo[j] || ow >= hi[j]) m[ow] = m[ow] > 0 ? m[ow] : 0;     \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
            for (int64_t i = 0; i < kh; i++) {                                                           \
                int64_t r = oh * sh - ph + i * dh;                                                       \
                int inside = r >= 0 && r < H, padrow = zero && r >= -ph && r < H + ph;                   \
                for (int64_t j = 0; j < kw; j++) {                                                       \
                    T *e = E + (i * kw + j) * Wo, *q = R + (i * kw + j) * Wo;                            \
                    if (inside) {                                                                        \
                        const T *row = xp + r * W + j * dw - pw;                                         \
                        SIMD for (int64_t ow = lo[j]; ow < hi[j]; ow++) {                                \
                            T u = (row[ow * sw] - m[ow]) * inv, uc = CLAMP(low, u), v = WEIGHT(EXP, low, uc); \
                            q[ow] = u; e[ow] = v; Z[ow] += v; S[ow] += v * u;                            \
                        }                                                                                \
                    }                                                                                    \
                    if (padrow) {                                                                        \
                        for (int64_t ow = zlo[j]; ow < zhi[j]; ow++)                                     \
                            if (!inside || ow < lo[j] || ow >= hi[j]) {                                  \
                                T u = -m[ow] * inv, uc = CLAMP(low, u), v = WEIGHT(EXP, low, uc);        \
                                Z[ow] += v; S[ow] += v * u;                                              \
                            }                                                                            \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
            for (int64_t ow = 0; ow < Wo; ow++) {                                                        \
                C[ow] = gp[oh * Wo + ow] / Z[ow];                                                        \
                S[ow] = detach ? 0 : 1 - S[ow] / Z[ow];                                                  \
            }                                                                                            \
            for (int64_t i = 0; i < kh; i++) {                                                           \
                int64_t r = oh * sh - ph + i * dh;                                                       \
                if (r < 0 || r >= H) continue;                                                           \
                for (int64_t j = 0; j < kw; j++) {                                                       \
                    T *e = E + (i * kw + j) * Wo, *q = R + (i * kw + j) * Wo;                            \
                    T *row = op + r * W + j * dw - pw;                                                   \
                    if (detach) {                                                                        \
                        SIMD for (int64_t ow = lo[j]; ow < hi[j]; ow++) row[ow * sw] += e[ow] * C[ow];   \
                    } else {                                                                             \
                        SIMD for (int64_t ow = lo[j]; ow < hi[j]; ow++)                                  \
                            row[ow * sw] += e[ow] * C[ow] * (q[ow] + S[ow]);                             \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    free(buf); free(lo);                                                                                 \
    }                                                                                                    \
    return failed;                                                                                       \
}

SOFT_POOL(soft_pool_f32, float, expf, low_f32, soft_pool_2x2_f32)
SOFT_POOL(soft_pool_f64, double, exp, low_f64, soft_pool_2x2_f64)

/* The number of threads a parallel region of this library runs on (1 without OpenMP): tests read it to show
   that torch.set_num_threads governs the kernel. */
#ifdef _OPENMP
#include <omp.h>
int soft_pool_threads(void) {
    int n = 1;
    _Pragma("omp parallel")
    {
        _Pragma("omp single")
        n = omp_get_num_threads();
    }
    return n;
}
#else
int soft_pool_threads(void) { return 1; }
#endif

/* Flush-to-zero (FTZ) and denormals-are-zero (DAZ) on every thread of the OpenMP team: the backward of a
   pullback runs free of subnormal floats, which some x86 CPUs compute with very slowly. denormals_off(saved,
   n) stores each thread's control word in saved[thread] (n entries at least) and sets both flags; it returns
   the team size, or 0 where the CPU has no such flags. denormals_restore(saved, n) puts them back. The
   team's threads are the ones torch's intra-op parallel regions run on (the same runtime, same size). */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define FTZ_DAZ 0x8040u
static int thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}
int denormals_off(unsigned *saved, int n) {
    int team = 1;
    _Pragma("omp parallel")
    {
        int t = thread_index();
        if (t < n) {
            saved[t] = _mm_getcsr();
            _mm_setcsr(saved[t] | FTZ_DAZ);
        }
#ifdef _OPENMP
        _Pragma("omp single")
        team = omp_get_num_threads();
#endif
    }
    return team;
}
void denormals_restore(const unsigned *saved, int n) {
    _Pragma("omp parallel")
    {
        int t = thread_index();
        if (t < n) _mm_setcsr(saved[t]);
    }
}
unsigned denormals_state(void) { return _mm_getcsr() & FTZ_DAZ; }
#else
int denormals_off(unsigned *saved, int n) { (void)saved; (void)n; return 0; }
void denormals_restore(const unsigned *saved, int n) { (void)saved; (void)n; }
unsigned denormals_state(void) { return 0; }
#endif
