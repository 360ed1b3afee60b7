/* Batch-invariant CPU kernels for the target's forward pass.
 *
 * A row's result must not depend on how many other rows share the forward: a token verified in
 * a 16-node tree must get bitwise the logits it gets in a one-row decode step. BLAS does not
 * promise that (MKL picks a different blocking of the reduction for 1, 4 or 16 rows). Here every
 * output element is one fixed sequence of operations that depends only on its own inputs:
 *
 *   - linear:    y[r,n] = one scalar fma chain over k = 0, 1, 2, ... of x[r,k] * W[n,k],
 *                computed 8 outputs to a vector. The register blocking (1-3 rows x 2-4 panels
 *                of 16 outputs, or 4-6 rows x 1 panel) only decides which accumulators live
 *                together; each accumulator still runs k in the same order.
 *   - attention: for one query row and head, the scores of its visible keys in key-index order
 *                (the same fixed dot product), their max, exp(s - max) by one vector routine
 *                (the tail padded, so every element goes through the same code), the sum in
 *                8 lanes by list position, and the weighted sum of V in list order. A query's
 *                visible keys in a tree verification (prefix, then its ancestors) are exactly
 *                the keys it sees in an autoregressive step, in the same order. With
 *                AVX512-BF16, bfloat16 queries and keys: each score one vdpbf16ps chain instead
 *                (attention_dp_unit), still one fixed sequence per score, and the weighted sum
 *                of V on vdpbf16ps too: the probabilities rounded to bfloat16 and paired by list
 *                position, one chain over the pairs per output dimension.
 *
 * Weights may be float32 or bfloat16 (widened exactly to float32 on load); activations and
 * accumulators are float32. On a CPU with AVX512-BF16, bfloat16 linears take their activations
 * in bfloat16 too and run on vdpbf16ps (sense_linear_bf16dp), one chain of pair products per output. Built once per machine with -march=native (decoding/invariant/build.py);
 * without AVX2+FMA a portable 8-lane emulation with fmaf gives the same guarantee. In float32 the
 * three codes give the same bits (tests/test_kernel_builds.py builds the other two with -march).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp for x <= 0, one routine at every width (Cephes expf: x clamped at EXP_MIN, reduced by
 * ln 2 split in two, a degree-5 polynomial, scaled by 2^n): the AVX2 code's v_exp, the portable
 * code's exp_cephes lane by lane and the AVX-512 code's v16_exp run the same operations, so a
 * float32 forward has the same bits on each (tests/test_kernel_builds.py). */
#define EXP_MIN (-87.3f)
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO (-2.12194440e-4f)
#define EXP_P0 1.9875691500E-4f
#define EXP_P1 1.3981999507E-3f
#define EXP_P2 8.3334519073E-3f
#define EXP_P3 4.1665795894E-2f
#define EXP_P4 1.6666665459E-1f
#define EXP_P5 5.0000001201E-1f

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef __m256 vec;
static inline vec v_zero(void) { return _mm256_setzero_ps(); }
static inline vec v_load(const float *p) { return _mm256_loadu_ps(p); }
static inline vec v_load_bf16(const uint16_t *p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
/* Half h of a panel row of the widened-FMA kernel's bfloat16 weights: 32 bytes hold its 16
 * outputs interleaved, output i in the low 16 bits of dword i and output 8 + i in the high ones
 * (pack_panels), so each half widens exactly in one instruction: a shift for h = 0, a mask for
 * h = 1 (a zero-extension and a shift per 8 outputs with the plain layout). */
static inline vec v_load_bf16_half(const uint16_t *p, int h) {
    const __m256i w = _mm256_loadu_si256((const __m256i *)p);
    return _mm256_castsi256_ps(h ? _mm256_and_si256(w, _mm256_set1_epi32((int)0xffff0000u)) : _mm256_slli_epi32(w, 16));
}
static inline vec v_fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec v_add(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec v_set1(float x) { return _mm256_set1_ps(x); }
static inline void v_store(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline float v_hsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
/* The four v_hsum of a0..a3 at once, each summed in exactly v_hsum's order (lane i + lane i+4,
 * then (0 + 2) + (1 + 3)), times scale, stored to out[0..3]. */
static inline void v_hsum4_scaled(vec a0, vec a1, vec a2, vec a3, float scale, float *out) {
    const __m256 s01 = _mm256_add_ps(_mm256_permute2f128_ps(a0, a1, 0x20), _mm256_permute2f128_ps(a0, a1, 0x31));
    const __m256 s23 = _mm256_add_ps(_mm256_permute2f128_ps(a2, a3, 0x20), _mm256_permute2f128_ps(a2, a3, 0x31));
    const __m256 g = _mm256_add_ps(_mm256_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm256_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(g, g, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm256_shuffle_ps(g, g, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m128 h = _mm_unpacklo_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    _mm_storeu_ps(out, _mm_mul_ps(h, _mm_set1_ps(scale)));
}
static inline vec v_max(vec a, vec b) { return _mm256_max_ps(a, b); }
/* exp for x <= 0 (Cephes expf: range reduction by ln 2, degree-5 polynomial). */
static inline vec v_exp(vec x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN));
    vec fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(EXP_LOG2E), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(EXP_LN2_HI), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(EXP_LN2_LO), x);
    vec z = _mm256_mul_ps(x, x);
    vec y = _mm256_set1_ps(EXP_P0);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P1));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P2));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P4));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P5));
    y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
static inline vec v_mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec v_div(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec v_neg_abs(vec a) { return _mm256_or_ps(a, _mm256_set1_ps(-0.0f)); }
/* where c >= 0: a, else b */
static inline vec v_sel_nonneg(vec c, vec a, vec b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(c, _mm256_setzero_ps(), _CMP_GE_OQ)); }
/* each lane rounded to bfloat16 as torch rounds (nearest even; NaN -> 0x7fc0), kept as float32 */
static inline vec v_rnd_bf16(vec x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    r = _mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), _mm256_castsi256_ps(r),
                            _mm256_cmp_ps(x, x, _CMP_ORD_Q));
}
/* 8 lanes already rounded to bfloat16 -> their 8 bfloat16 values */
static inline void v_store_bf16(uint16_t *p, vec rounded) {
    const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(rounded), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    _mm_storeu_si128((__m128i *)p, packed);
}
#define KERNEL_ISA "avx2-fma"
#else
typedef struct { float v[8]; } vec;
static inline vec v_zero(void) { vec r; for (int i = 0; i < 8; i++) r.v[i] = 0.f; return r; }
static inline vec v_load(const float *p) { vec r; memcpy(r.v, p, sizeof r.v); return r; }
static inline vec v_load_bf16(const uint16_t *p) {
    vec r;
    for (int i = 0; i < 8; i++) { uint32_t u = (uint32_t)p[i] << 16; memcpy(&r.v[i], &u, 4); }
    return r;
}
static inline vec v_load_bf16_half(const uint16_t *p, int h) {
    vec r;
    for (int i = 0; i < 8; i++) { const uint32_t u = (uint32_t)p[2 * i + h] << 16; memcpy(&r.v[i], &u, 4); }
    return r;
}
static inline vec v_fma(vec a, vec b, vec c) { for (int i = 0; i < 8; i++) c.v[i] = fmaf(a.v[i], b.v[i], c.v[i]); return c; }
static inline vec v_add(vec a, vec b) { for (int i = 0; i < 8; i++) a.v[i] += b.v[i]; return a; }
static inline vec v_set1(float x) { vec r; for (int i = 0; i < 8; i++) r.v[i] = x; return r; }
static inline void v_store(float *p, vec v) { memcpy(p, v.v, sizeof v.v); }
static inline float v_hsum(vec v) {
    float a[4];
    for (int i = 0; i < 4; i++) a[i] = v.v[i] + v.v[i + 4];
    a[0] += a[2]; a[1] += a[3];
    return a[0] + a[1];
}
static inline void v_hsum4_scaled(vec a0, vec a1, vec a2, vec a3, float scale, float *out) {
    out[0] = v_hsum(a0) * scale; out[1] = v_hsum(a1) * scale; out[2] = v_hsum(a2) * scale; out[3] = v_hsum(a3) * scale;
}
static inline vec v_max(vec a, vec b) { for (int i = 0; i < 8; i++) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return a; }
/* exp for x <= 0: the AVX2 code's Cephes routine lane by lane, each step the same correctly rounded
 * operation (fmaf where it fuses), so a float32 forward is bitwise the same on both builds. */
static inline float exp_cephes(float x) {
    x = x > EXP_MIN ? x : EXP_MIN;
    const float fx = floorf(fmaf(x, EXP_LOG2E, 0.5f));
    x = fmaf(-fx, EXP_LN2_HI, x);
    x = fmaf(-fx, EXP_LN2_LO, x);
    const float z = x * x;
    float y = EXP_P0;
    y = fmaf(y, x, EXP_P1);
    y = fmaf(y, x, EXP_P2);
    y = fmaf(y, x, EXP_P3);
    y = fmaf(y, x, EXP_P4);
    y = fmaf(y, x, EXP_P5);
    y = fmaf(y, z, x + 1.0f);
    const uint32_t e = (uint32_t)((int32_t)fx + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return y * scale;
}
static inline vec v_exp(vec x) { for (int i = 0; i < 8; i++) x.v[i] = exp_cephes(x.v[i]); return x; }
static inline vec v_mul(vec a, vec b) { for (int i = 0; i < 8; i++) a.v[i] *= b.v[i]; return a; }
static inline vec v_div(vec a, vec b) { for (int i = 0; i < 8; i++) a.v[i] /= b.v[i]; return a; }
static inline vec v_neg_abs(vec a) { for (int i = 0; i < 8; i++) a.v[i] = -fabsf(a.v[i]); return a; }
static inline vec v_sel_nonneg(vec c, vec a, vec b) { for (int i = 0; i < 8; i++) if (!(c.v[i] >= 0.f)) a.v[i] = b.v[i]; return a; }
static inline vec v_rnd_bf16(vec x) {
    for (int i = 0; i < 8; i++) {
        uint32_t u;
        memcpy(&u, &x.v[i], 4);
        u = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
        memcpy(&x.v[i], &u, 4);
    }
    return x;
}
static inline void v_store_bf16(uint16_t *p, vec rounded) {
    for (int i = 0; i < 8; i++) { uint32_t u; memcpy(&u, &rounded.v[i], 4); p[i] = (uint16_t)(u >> 16); }
}
#define KERNEL_ISA "portable"
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define BF16DP 1
#define BF16DP_ISA "+avx512bf16-dp"
#else
#define BF16DP 0
#define BF16DP_ISA ""
#endif

const char *sense_kernel_isa(void) { return KERNEL_ISA BF16DP_ISA; }
int sense_has_bf16dp(void) { return BF16DP; }

#define PANEL 16

/* ---------------------------------------------------------------------------------------- */
/* bfloat16 <-> float32 as torch converts them (round to nearest even; NaN -> 0x7fc0), and the  */
/* epilogue of a linear: where its float32 accumulators go.                                    */

static inline uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float bf16_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* An activation of the model's dtype (bf16: bfloat16, else float32) as float32, and back: every
 * elementwise op of a bfloat16 model computes in float32 and rounds once, as torch's do. */
static inline float act_ld(const void *p, size_t i, int bf16) {
    return bf16 ? bf16_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void act_st(void *p, size_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = bf16_rne(v);
    else ((float *)p)[i] = v;
}
static inline float act_rnd(float v, int bf16) { return bf16 ? bf16_f32(bf16_rne(v)) : v; }
static inline vec vact_ld(const void *p, size_t i, int bf16) {
    return bf16 ? v_load_bf16((const uint16_t *)p + i) : v_load((const float *)p + i);
}
static inline void vact_st(void *p, size_t i, vec v, int bf16) {
    if (bf16) v_store_bf16((uint16_t *)p + i, v_rnd_bf16(v));
    else v_store((float *)p + i, v);
}
static inline vec vact_rnd(vec v, int bf16) { return bf16 ? v_rnd_bf16(v) : v; }

/* Modes: 0 y = acc (+ bias), float32; 1 out = bf16(acc + bias); 2 out = bf16(res + bf16(acc)),
 * the residual add of a bfloat16 model (in place when out == res); 3 out = res + acc, float32;
 * 4 y = float32(bf16(acc)) (a bfloat16 model's logits, widened). Each is the same arithmetic as
 * the torch ops it replaces (y.to(bfloat16), x + y), so fusing changes no bit. */
typedef struct {
    float *y;
    void *out;
    const void *res;
    const float *bias;
    int64_t ld;
    int mode;
} Epi;

static inline void epi_store(const Epi *e, size_t row, int col, const float *acc, int nc) {
    const size_t o = row * (size_t)e->ld + (size_t)col;
    float buf[PANEL];
    for (int i = 0; i < nc; i++) buf[i] = e->bias ? acc[i] + e->bias[col + i] : acc[i];
    if (nc % 8 == 0 && e->mode >= 1 && e->mode <= 4) {      /* the same arithmetic, 8 lanes at a time */
        for (int h = 0; h < nc; h += 8) {
            const vec a = v_load(buf + h);
            if (e->mode == 1) v_store_bf16((uint16_t *)e->out + o + h, v_rnd_bf16(a));
            else if (e->mode == 2)
                v_store_bf16((uint16_t *)e->out + o + h,
                             v_rnd_bf16(v_add(v_load_bf16((const uint16_t *)e->res + o + h), v_rnd_bf16(a))));
            else if (e->mode == 3) v_store((float *)e->out + o + h, v_add(v_load((const float *)e->res + o + h), a));
            else v_store(e->y + o + h, v_rnd_bf16(a));
        }
        return;
    }
    switch (e->mode) {
    case 1: {
        uint16_t *d = (uint16_t *)e->out + o;
        for (int i = 0; i < nc; i++) d[i] = bf16_rne(buf[i]);
        break;
    }
    case 2: {
        uint16_t *d = (uint16_t *)e->out + o;
        const uint16_t *r = (const uint16_t *)e->res + o;
        for (int i = 0; i < nc; i++) d[i] = bf16_rne(bf16_f32(r[i]) + bf16_f32(bf16_rne(buf[i])));
        break;
    }
    case 3: {
        float *d = (float *)e->out + o;
        const float *r = (const float *)e->res + o;
        for (int i = 0; i < nc; i++) d[i] = r[i] + buf[i];
        break;
    }
    case 4:
        for (int i = 0; i < nc; i++) e->y[o + i] = bf16_f32(bf16_rne(buf[i]));
        break;
    default: memcpy(e->y + o, buf, sizeof(float) * (size_t)nc);
    }
}

/* epi_store of one whole vector of 8 outputs straight from its accumulator: the same arithmetic. */
static inline void epi_store8(const Epi *e, size_t row, int col, vec a) {
    const size_t o = row * (size_t)e->ld + (size_t)col;
    if (e->bias) a = v_add(a, v_load(e->bias + col));
    switch (e->mode) {
    case 1: v_store_bf16((uint16_t *)e->out + o, v_rnd_bf16(a)); break;
    case 2: v_store_bf16((uint16_t *)e->out + o, v_rnd_bf16(v_add(v_load_bf16((const uint16_t *)e->res + o), v_rnd_bf16(a))));
            break;
    case 3: v_store((float *)e->out + o, v_add(v_load((const float *)e->res + o), a)); break;
    case 4: v_store(e->y + o, v_rnd_bf16(a)); break;
    default: v_store(e->y + o, a);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* linear: y[R, N] = x[R, K] @ W[N, K]^T with W packed panel by panel (PANEL = 16 outputs, the  */
/* panel's rows k contiguous: element (n, k) at P[(n / 16) * 16 K + k * 16 + n % 16], N padded */
/* with zeros to whole panels). y[r, n] = fma(x[r, K-1], W[n, K-1], ... fma(x[r, 0], W[n, 0], 0)): */
/* one sequential chain over k per output element, whatever the number of rows or the block.  */
/* Blocks are RB input rows x NV vectors of 8 outputs (half panels), chosen so that 8-12         */
/* independent chains are in flight and the block fits AVX2's 16 vector registers: 1 row x 8     */
/* vectors, 2 x 6, 3 x 4, 4 x 3, 5-6 x 2; more rows are split into blocks of at most 6, as even  */
/* as they go (8 rows: 4 + 4, not 6 + 2, whose 4 chains wait on the FMA latency). Each block is  */
/* its own function with constant RB and NV, so its accumulators stay in registers. On the 2-core */
/* AVX2 EPYC (Zen 3, all the model's bfloat16 linears from memory, in one process alternating):  */
/* against blocks of 1-3 rows x 4-2 panels (which spilled an accumulator) and of up to 6 rows x 1 */
/* panel, 2 rows 12-18% faster, 4 rows 12-15%, 8 rows 10-14%, 16 rows even.                     */

#include <omp.h>
/* Prefetching the weights: a group of panels is read from memory by its first block of rows and */
/* from cache by the others, which are compute-bound; so while a thread works through a group's */
/* blocks it prefetches its next group, each block the share of it that is its share of the      */
/* rows, and the memory traffic overlaps the arithmetic instead of adding to it (on the 2-core   */
/* AVX512-BF16 EPYC, Zen 4: a 16-node bfloat16 verification 34 -> 27 ms, an 8-node float32 one    */
/* 58 -> 41 ms, prefetching into L2). Where the lines should go differs by machine: on the Zen 4  */
/* EPYC into L2; on the Zen 5 EPYC into L1 or as non-temporal (the model's 4-16-token            */
/* verifications 6-9% faster than into L2, one token 14% faster with none); on the 2-core AVX2    */
/* EPYC (Zen 3) not at all at 2-8 rows (6-15% slower: the hardware prefetcher keeps up there).  */
/* So it is a mode per                                                                           */
/* weight dtype (float32, bfloat16) and row count (2 rows, 3-4, 5 and more): off, into L2, into   */
/* L1, non-temporal, set by decoding/invariant/tuning.py from a measurement on this machine.     */
/* One row streams at memory speed by itself, and prefetching weights that are in cache already */
/* is pure overhead: one-row passes never prefetch. Prefetches change no arithmetic.             */
enum { PF_OFF, PF_L2, PF_L1, PF_NTA };
static int prefetch_mode[2][3] = {{PF_L2, PF_L2, PF_L2}, {PF_L2, PF_L2, PF_L2}};
static inline int rows_range(int R) { return R <= 2 ? 0 : R <= 4 ? 1 : 2; }
void sense_set_prefetch(int bf16, int range, int mode) {
    if (range >= 0 && range < 3 && mode >= PF_OFF && mode <= PF_NTA) prefetch_mode[bf16 ? 1 : 0][range] = mode;
}
int sense_prefetch(int bf16, int range) { return range >= 0 && range < 3 ? prefetch_mode[bf16 ? 1 : 0][range] : -1; }
static inline int prefetching(int bf16, int R) { return R > 1 ? prefetch_mode[bf16][rows_range(R)] : PF_OFF; }
typedef struct { const char *from, *to; int per_step, mode; } Prefetch;  /* lines, lines per k step */
#define PREFETCH_START(pf)                                                                     \
    const char *pf_at = (pf) ? (pf)->from : 0, *pf_end = (pf) ? (pf)->to : 0;                   \
    const int pf_step = (pf) ? (pf)->per_step : 0, pf_mode = (pf) ? (pf)->mode : PF_OFF
#define PREFETCH_STEP()                                                                        \
    for (int l = 0; l < pf_step && pf_at < pf_end; l++, pf_at += 64) prefetch_line(pf_at, pf_mode)
#if defined(__x86_64__) || defined(__i386__)
/* The x86 instructions by name, in asm: GCC 12 dropped the T1 and NTA prefetches of this switch
 * from the kernels' loops altogether (-O3 -march=native, only the T0 one was left), and its
 * __builtin_prefetch may emit AMD's plain `prefetch` for a locality below 3. */
static inline void prefetch_line(const char *p, int mode) {
    if (mode == PF_L1) __asm__ volatile("prefetcht0 (%0)" : : "r"(p));
    else if (mode == PF_NTA) __asm__ volatile("prefetchnta (%0)" : : "r"(p));
    else __asm__ volatile("prefetcht1 (%0)" : : "r"(p));
}
#else
static inline void prefetch_line(const char *p, int mode) {
    if (mode == PF_L1) __builtin_prefetch(p, 0, 3);
    else if (mode == PF_NTA) __builtin_prefetch(p, 0, 0);
    else __builtin_prefetch(p, 0, 2);
}
#endif

/* The share of the next group (lines [0, lines) from `next`, clamped at `last`) that a block of */
/* rows r0 .. r0 + rb of R prefetches over `steps` steps of k, in `mode`; NULL when there is     */
/* nothing to do. */
static inline const Prefetch *prefetch_share(Prefetch *pf, int mode, const char *next, const char *last,
                                             size_t lines, int r0, int rb, int R, int steps) {
    const size_t l0 = lines * (size_t)r0 / (size_t)R, l1 = lines * (size_t)(r0 + rb) / (size_t)R;
    pf->from = next + l0 * 64;
    pf->to = next + l1 * 64 < last ? next + l1 * 64 : last;
    pf->per_step = (int)((l1 - l0 + (size_t)steps - 1) / (size_t)steps);
    pf->mode = mode;
    return mode != PF_OFF && pf->from < pf->to ? pf : 0;
}

/* A block: RB input rows x NV vectors of 8 outputs (a vector is half a panel; a block may start */
/* at either half). Its accumulators live in the 16 vector registers of AVX2 with the weights or */
/* the rows' broadcasts streamed: XH (the rows' x hoisted, each weight vector loaded and used by  */
/* every row in turn) for few rows and many vectors, else the weight vectors hoisted and each row */
/* broadcast in turn; either way RB x NV accumulators + min(RB, NV) + 1 registers.               */
#define DEFINE_LINEAR_BLOCK(NAME, WT, LOADW, HOFF, RB, NV, XH, H0)                             \
static __attribute__((noinline)) void NAME##_r##RB##_v##NV##_h##H0(                          \
        const float *x, int K, const WT *P, size_t pstride, const Epi *e, size_t row0, int v0, int N, \
        const Prefetch *pf) {                                                                  \
    vec acc[RB][NV];                                                                           \
    const WT *wp[NV];                                                                          \
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                                       \
        wp[v] = P + (size_t)((v0 + v) >> 1) * pstride + (size_t)(((H0 + v) & 1) * HOFF);       \
    _Pragma("GCC unroll 8") for (int j = 0; j < RB; j++)                                       \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) acc[j][v] = v_zero();             \
    PREFETCH_START(pf);                                                                        \
    for (int k = 0; k < K; k++) {                                                              \
        PREFETCH_STEP();                                                                       \
        if (XH) {                                                                              \
            vec xv[RB];                                                                        \
            _Pragma("GCC unroll 8") for (int j = 0; j < RB; j++) xv[j] = v_set1(x[(size_t)j * K + k]); \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) {                             \
                const vec w = LOADW(wp[v] + (size_t)k * PANEL, (H0 + v) & 1);                  \
                _Pragma("GCC unroll 8") for (int j = 0; j < RB; j++) acc[j][v] = v_fma(xv[j], w, acc[j][v]); \
            }                                                                                  \
        } else {                                                                               \
            vec w[NV];                                                                         \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) w[v] = LOADW(wp[v] + (size_t)k * PANEL, (H0 + v) & 1); \
            _Pragma("GCC unroll 8") for (int j = 0; j < RB; j++) {                             \
                const vec xv = v_set1(x[(size_t)j * K + k]);                                   \
                _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) acc[j][v] = v_fma(xv, w[v], acc[j][v]); \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    for (int j = 0; j < RB; j++)                                                               \
        for (int v = 0; v < NV; v++) {                                                         \
            const int c0 = (v0 + v) * 8, nc = N - c0 < 8 ? N - c0 : 8;                         \
            if (nc == 8) epi_store8(e, row0 + (size_t)j, c0, acc[j][v]);                        \
            else if (nc > 0) {                                                                 \
                float buf[8];                                                                  \
                v_store(buf, acc[j][v]);                                                       \
                epi_store(e, row0 + (size_t)j, c0, buf, nc);                                   \
            }                                                                                  \
        }                                                                                      \
}

/* The blocks: 1 row x 8 vectors, 2 x 6, 3 x 4, 4 x 3, 5 x 2, 6 x 2 (8-12 FMA chains in flight,  */
/* which the instruction's latency needs at two a cycle).                                        */
/* Each block twice, for a first vector in either half of its panel (H0 = v0 & 1), so that every */
/* load knows its half at compile time (v_load_bf16_half).                                       */
#define DEFINE_LINEAR_BLOCK2(NAME, WT, LOADW, HOFF, RB, NV, XH)                                  \
DEFINE_LINEAR_BLOCK(NAME, WT, LOADW, HOFF, RB, NV, XH, 0)                                      \
DEFINE_LINEAR_BLOCK(NAME, WT, LOADW, HOFF, RB, NV, XH, 1)
#define HALF(F, v0, ...) (((v0) & 1) ? F##_h1(__VA_ARGS__) : F##_h0(__VA_ARGS__))
#define DEFINE_LINEAR(NAME, WT, LOADW, HOFF)                                                    \
DEFINE_LINEAR_BLOCK2(NAME, WT, LOADW, HOFF, 1, 8, 1)                                           \
DEFINE_LINEAR_BLOCK2(NAME, WT, LOADW, HOFF, 2, 6, 1)                                           \
DEFINE_LINEAR_BLOCK2(NAME, WT, LOADW, HOFF, 3, 4, 1)                                           \
DEFINE_LINEAR_BLOCK2(NAME, WT, LOADW, HOFF, 4, 3, 0)                                           \
DEFINE_LINEAR_BLOCK2(NAME, WT, LOADW, HOFF, 5, 2, 0)                                           \
DEFINE_LINEAR_BLOCK2(NAME, WT, LOADW, HOFF, 6, 2, 0)                                           \
DEFINE_LINEAR_BLOCK2(NAME, WT, LOADW, HOFF, 1, 1, 0)                                           \
DEFINE_LINEAR_BLOCK2(NAME, WT, LOADW, HOFF, 2, 1, 0)                                           \
DEFINE_LINEAR_BLOCK2(NAME, WT, LOADW, HOFF, 3, 1, 0)                                           \
DEFINE_LINEAR_BLOCK2(NAME, WT, LOADW, HOFF, 4, 1, 0)                                           \
DEFINE_LINEAR_BLOCK2(NAME, WT, LOADW, HOFF, 5, 1, 0)                                           \
DEFINE_LINEAR_BLOCK2(NAME, WT, LOADW, HOFF, 6, 1, 0)                                           \
/* one vector of a thread's short last group, never past it */                               \
static void NAME##_tail(const float *x, int K, const WT *P, size_t pstride, const Epi *e,      \
                        size_t row0, int v0, int N, int rb) {                                  \
    switch (rb) {                                                                              \
        case 6: HALF(NAME##_r6_v1, v0, x, K, P, pstride, e, row0, v0, N, 0); break;           \
        case 5: HALF(NAME##_r5_v1, v0, x, K, P, pstride, e, row0, v0, N, 0); break;           \
        case 4: HALF(NAME##_r4_v1, v0, x, K, P, pstride, e, row0, v0, N, 0); break;           \
        case 3: HALF(NAME##_r3_v1, v0, x, K, P, pstride, e, row0, v0, N, 0); break;           \
        case 2: HALF(NAME##_r2_v1, v0, x, K, P, pstride, e, row0, v0, N, 0); break;           \
        default: HALF(NAME##_r1_v1, v0, x, K, P, pstride, e, row0, v0, N, 0); break;          \
    }                                                                                          \
}                                                                                              \
static void NAME##_block(const float *x, int K, const WT *P, size_t pstride, const Epi *e,     \
                         size_t row0, int v0, int N, int rb, const Prefetch *pf) {             \
    switch (rb) {                                                                              \
        case 6: HALF(NAME##_r6_v2, v0, x, K, P, pstride, e, row0, v0, N, pf); break;          \
        case 5: HALF(NAME##_r5_v2, v0, x, K, P, pstride, e, row0, v0, N, pf); break;          \
        case 4: HALF(NAME##_r4_v3, v0, x, K, P, pstride, e, row0, v0, N, pf); break;          \
        case 3: HALF(NAME##_r3_v4, v0, x, K, P, pstride, e, row0, v0, N, pf); break;          \
        case 2: HALF(NAME##_r2_v6, v0, x, K, P, pstride, e, row0, v0, N, pf); break;          \
        default: HALF(NAME##_r1_v8, v0, x, K, P, pstride, e, row0, v0, N, pf); break;         \
    }                                                                                          \
}                                                                                              \
void NAME(const float *x, const WT *P, int64_t pstride, float *y, void *out, const void *res,      \
          const float *bias, int mode, int R, int K, int N, int threads) {                      \
    const Epi e = {y, out, res, bias, N, mode};                                                \
    const int panels = (N + PANEL - 1) / PANEL;                                                \
    /* rows in blocks of at most 6, as even as they go; a group of panels is what every block */ \
    /* size among them divides (in vectors) */                                                 \
    const int nblk = (R + 5) / 6;                                                              \
    int vecs = 1;                                                                              \
    for (int b = 0; b < nblk; b++) {                                                           \
        const int rb = R * (b + 1) / nblk - R * b / nblk;                                      \
        const int nv = rb == 1 ? 8 : rb == 2 ? 6 : rb == 3 ? 4 : rb == 4 ? 3 : 2;              \
        int a = vecs, c = nv;                                                                  \
        while (c) { const int t = a % c; a = c; c = t; }                                       \
        vecs = vecs / a * nv;                                                                  \
    }                                                                                          \
    const int gp = vecs % 2 ? vecs : vecs / 2;          /* panels per group */                 \
    const size_t lines = (size_t)gp * (size_t)pstride * sizeof(WT) / 64;                       \
    _Pragma("omp parallel num_threads(threads)")                                               \
    {                                                                                          \
        /* each thread an even share of the panels, a group at a time (as the vdpbf16ps       */ \
        /* kernel below); its last group may be short: a block's stores stop at the share's    */ \
        /* end (nlim), where the next thread's panels start                                    */ \
        const int nth = omp_get_num_threads(), t = omp_get_thread_num();                      \
        const int q0 = (int)((int64_t)panels * t / nth), q1 = (int)((int64_t)panels * (t + 1) / nth); \
        const int nlim = N < q1 * PANEL ? N : q1 * PANEL;                                      \
        const char *last = (const char *)(P + (size_t)q1 * pstride);                           \
        for (int p0 = q0; p0 < q1; p0 += gp) {                                                 \
            const int np = q1 - p0 < gp ? q1 - p0 : gp;                                        \
            const char *next = (const char *)(P + (size_t)(p0 + gp) * pstride);                \
            for (int b = 0; b < nblk; b++) {                                                   \
                const int r0 = R * b / nblk, rb = R * (b + 1) / nblk - r0;                     \
                const int nv = rb == 1 ? 8 : rb == 2 ? 6 : rb == 3 ? 4 : rb == 4 ? 3 : 2;      \
                const float *xr = x + (size_t)r0 * K;                                          \
                const int calls = 2 * np / nv;                                                 \
                for (int c = 0; c < calls; c++) {                                              \
                    Prefetch share;                                                            \
                    const Prefetch *pfp = prefetch_share(&share, p0 + gp < q1 ? prefetching(sizeof(WT) == 2, R) : PF_OFF, \
                                                         next, last, lines, r0 * calls + c * rb, rb, R * calls, K); \
                    NAME##_block(xr, K, P, (size_t)pstride, &e, (size_t)r0, 2 * p0 + c * nv, nlim, rb, pfp); \
                }                                                                              \
                for (int v = 2 * p0 + calls * nv; v < 2 * (p0 + np); v++)     /* a short group */ \
                    NAME##_tail(xr, K, P, (size_t)pstride, &e, (size_t)r0, v, nlim, rb);        \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}

static inline vec v_load_f32_half(const float *p, int h) { (void)h; return v_load(p); }
DEFINE_LINEAR(sense_linear_f32, float, v_load_f32_half, 8)     /* the half's 8 outputs at +8 */
DEFINE_LINEAR(sense_linear_bf16, uint16_t, v_load_bf16_half, 0)  /* both halves in one 32 bytes */

/* ---------------------------------------------------------------------------------------- */
/* linear, bfloat16 on AVX512-BF16: y[R, N] = x[R, K] @ W[N, K]^T, x and W in bfloat16, with     */
/* vdpbf16ps. W is packed in pairs of k: element (n, k) at P[(n / 16) * 16 K + (k / 2) * 32 +    */
/* (n % 16) * 2 + k % 2] (K even, padded with a zero column by the caller), so one 32-bit lane  */
/* holds (W[n, k], W[n, k+1]) and a broadcast of (x[r, k], x[r, k+1]) meets all 16 outputs of   */
/* a panel. y[r, n] = dp(... dp(dp(0, pair 0), pair 1) ..., pair K/2-1): one chain per output  */
/* in the order of k, as in the linears above (each step adds the pair's two exact products,   */
/* as the instruction defines it), so a row's result does not depend on the rows beside it or  */
/* on the block. Twice the products per instruction of the float32 FMA, half the weight bytes. */
#if BF16DP
/* 16 lanes rounded to bfloat16 as bf16_rne rounds them (nearest even; NaN -> 0x7fc0), kept as
 * float32; and 16 rounded lanes stored as their bfloat16 values. */
static inline __m512 v16_rnd_bf16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))),
                                       _mm512_set1_epi32((int)0xffff0000u));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), _mm512_set1_ps(__builtin_nanf("")),
                                _mm512_castsi512_ps(r));
}
static inline void v16_store_bf16(uint16_t *p, __m512 rounded) {
    const __m512i bits = _mm512_castps_si512(rounded);
    /* NaN lanes hold the float NaN 0x7fc00000: its top half is 0x7fc0 */
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
/* epi_store of one whole panel straight from its accumulator: the same arithmetic (the bias
 * added in float32, each rounding as bf16_rne's), 16 lanes at a time; a dp block's epilogue was
 * ~10% of a 16-row linear through the 8-lane path. */
static inline void epi_store16(const Epi *e, size_t row, int col, __m512 a) {
    const size_t o = row * (size_t)e->ld + (size_t)col;
    if (e->bias) a = _mm512_add_ps(a, _mm512_loadu_ps(e->bias + col));
    switch (e->mode) {
    case 1: v16_store_bf16((uint16_t *)e->out + o, v16_rnd_bf16(a)); break;
    case 2: v16_store_bf16((uint16_t *)e->out + o,
                           v16_rnd_bf16(_mm512_add_ps(load16_bf16((const uint16_t *)e->res + o), v16_rnd_bf16(a))));
            break;
    case 3: _mm512_storeu_ps((float *)e->out + o, _mm512_add_ps(_mm512_loadu_ps((const float *)e->res + o), a)); break;
    case 4: _mm512_storeu_ps(e->y + o, v16_rnd_bf16(a)); break;
    default: _mm512_storeu_ps(e->y + o, a);
    }
}
#define DEFINE_DP_BLOCK(RB, NP)                                                                \
static __attribute__((noinline)) void dp_r##RB##_p##NP(const uint32_t *x, int K2, const uint16_t *P, \
                                                     size_t pstride, const Epi *e, size_t row0, int col0, int ncols, \
                                                     const Prefetch *pf) { \
    __m512 acc[RB][NP];                                                                        \
    _Pragma("GCC unroll 8") for (int j = 0; j < RB; j++)                                       \
        _Pragma("GCC unroll 8") for (int q = 0; q < NP; q++) acc[j][q] = _mm512_setzero_ps();  \
    PREFETCH_START(pf);                                                                        \
    for (int kk = 0; kk < K2; kk++) {                                                          \
        PREFETCH_STEP();                                                                       \
        __m512i w[NP];                                                                         \
        _Pragma("GCC unroll 8") for (int q = 0; q < NP; q++)                                   \
            w[q] = _mm512_loadu_si512((const void *)(P + q * pstride + (size_t)kk * 2 * PANEL)); \
        _Pragma("GCC unroll 8") for (int j = 0; j < RB; j++) {                                 \
            const __m512i xv = _mm512_set1_epi32((int)x[(size_t)j * K2 + kk]);                 \
            _Pragma("GCC unroll 8") for (int q = 0; q < NP; q++)                               \
                acc[j][q] = _mm512_dpbf16_ps(acc[j][q], (__m512bh)xv, (__m512bh)w[q]);         \
        }                                                                                      \
    }                                                                                          \
    for (int j = 0; j < RB; j++)                                                               \
        for (int q = 0; q < NP; q++) {                                                         \
            const int c0 = q * PANEL, nc = ncols - c0 < PANEL ? ncols - c0 : PANEL;            \
            if (nc == PANEL) epi_store16(e, row0 + (size_t)j, col0 + c0, acc[j][q]);            \
            else if (nc > 0) {                                                                 \
                float buf[PANEL];                                                              \
                _mm512_storeu_ps(buf, acc[j][q]);                                              \
                epi_store(e, row0 + (size_t)j, col0 + c0, buf, nc);                            \
            }                                                                                  \
        }                                                                                      \
}
/* Blocks: 1 row x 8 panels, 2 x 6, 3 x 4 (8-12 chains in flight, which the instruction's
 * latency needs); from 4 rows, blocks of up to 8 rows x 3 panels (up to 24 chains, each weight
 * vector loaded once for all of them), the rows split as evenly as they go, the panels staying
 * in cache between a group's blocks (leftover panels one at a time, in blocks of up to 4 rows);
 * but 9 and 17 rows take a first block of 9 (27 accumulators, 3 weights and a broadcast fill the
 * 32 registers) and then one of 8: 9, not 5 + 4; 9 + 8, not 6 + 6 + 5. On the Zen 5 EPYC, one
 * process alternating the builds: a 9-row verification 7.71-7.91 -> 6.44-6.45 ms, 17 rows
 * 9.44-9.60 -> 9.05-9.24. Measured slower than the even split: 9 + 8 + 8 for 25 rows (12.6
 * against 11.8 ms), 9 + 9 for 18, and a first block of 9 at 10-16 rows (a block of 9's
 * accumulators spill where the arithmetic is the bound). Earlier, on the Zen 4 EPYC, blocks of up to 8 rows against blocks of at most 4 (the
 * last 1-3 alone): all the linears of SmolLM2-135M from memory 8 rows 11.9 -> 10.3 ms, 5-7 rows
 * 8% faster, 9 and 16 rows 6%. The blocking changes no bits. */
/* The row blocks of a pass of R rows (at most 1 + R / 8 of them): their first rows and sizes. */
static int dp_row_blocks(int R, int *r0s, int *rbs) {
    if (R == 9 || R == 17) {
        const int n = R / 8;
        for (int b = 0; b < n; b++) {
            r0s[b] = b ? 1 + 8 * b : 0;
            rbs[b] = b ? 8 : 9;
        }
        return n;
    }
    const int n = (R + 7) / 8;
    for (int b = 0; b < n; b++) {
        r0s[b] = R * b / n;
        rbs[b] = R * (b + 1) / n - R * b / n;
    }
    return n;
}
DEFINE_DP_BLOCK(1, 8) DEFINE_DP_BLOCK(2, 6) DEFINE_DP_BLOCK(3, 4) DEFINE_DP_BLOCK(4, 3)
DEFINE_DP_BLOCK(1, 3) DEFINE_DP_BLOCK(2, 3) DEFINE_DP_BLOCK(3, 3)
DEFINE_DP_BLOCK(5, 3) DEFINE_DP_BLOCK(6, 3) DEFINE_DP_BLOCK(7, 3) DEFINE_DP_BLOCK(8, 3) DEFINE_DP_BLOCK(9, 3)
DEFINE_DP_BLOCK(1, 1) DEFINE_DP_BLOCK(2, 1) DEFINE_DP_BLOCK(3, 1) DEFINE_DP_BLOCK(4, 1)

static void dp_rows(const uint32_t *x, int K2, const uint16_t *P, size_t ps, const Epi *e, size_t row0,
                    int col0, int nc, int rb, int np, const Prefetch *pf) {
    if (np == 8) dp_r1_p8(x, K2, P, ps, e, row0, col0, nc, pf);
    else if (np == 6) dp_r2_p6(x, K2, P, ps, e, row0, col0, nc, pf);
    else if (np == 4) dp_r3_p4(x, K2, P, ps, e, row0, col0, nc, pf);
    else if (np == 3) switch (rb) {
        case 9: dp_r9_p3(x, K2, P, ps, e, row0, col0, nc, pf); break;
        case 8: dp_r8_p3(x, K2, P, ps, e, row0, col0, nc, pf); break;
        case 7: dp_r7_p3(x, K2, P, ps, e, row0, col0, nc, pf); break;
        case 6: dp_r6_p3(x, K2, P, ps, e, row0, col0, nc, pf); break;
        case 5: dp_r5_p3(x, K2, P, ps, e, row0, col0, nc, pf); break;
        case 4: dp_r4_p3(x, K2, P, ps, e, row0, col0, nc, pf); break;
        case 3: dp_r3_p3(x, K2, P, ps, e, row0, col0, nc, pf); break;
        case 2: dp_r2_p3(x, K2, P, ps, e, row0, col0, nc, pf); break;
        default: dp_r1_p3(x, K2, P, ps, e, row0, col0, nc, pf); break;
    }
    else switch (rb) {
        case 4: dp_r4_p1(x, K2, P, ps, e, row0, col0, nc, pf); break;
        case 3: dp_r3_p1(x, K2, P, ps, e, row0, col0, nc, pf); break;
        case 2: dp_r2_p1(x, K2, P, ps, e, row0, col0, nc, pf); break;
        default: dp_r1_p1(x, K2, P, ps, e, row0, col0, nc, pf); break;
    }
}

/* x: [R, K] bfloat16 (K even) read as R x K/2 pairs; P: the pair-packed weight; y: [R, N] float32.
 * Each thread takes an even share of the panels (not of the groups: 36 panels in groups of 8, a
 * one-row o_proj or down_proj of SmolLM2-135M, split 24 + 12 and one core waited on the other) and
 * works through it a group at a time, prefetching its next group as the float32 kernels do. */
void sense_linear_bf16dp(const uint16_t *x, const uint16_t *P, int64_t pstride, float *y, void *out,
                         const void *res, const float *bias, int mode, int R, int K, int N, int threads) {
    const Epi e = {y, out, res, bias, N, mode};
    const uint32_t *x32 = (const uint32_t *)x;
    const int K2 = K / 2, panels = (N + PANEL - 1) / PANEL;
    const int group = R == 1 ? 8 : R == 2 ? 6 : R == 3 ? 4 : 3;
    int r0s[1 + R / 8], rbs[1 + R / 8];
    const int nblk = dp_row_blocks(R, r0s, rbs);
    const size_t lines = (size_t)group * (size_t)pstride * sizeof(uint16_t) / 64;    /* of a group */
    _Pragma("omp parallel num_threads(threads)")
    {
        const int nth = omp_get_num_threads(), t = omp_get_thread_num();
        const int q0 = (int)((int64_t)panels * t / nth), q1 = (int)((int64_t)panels * (t + 1) / nth);
        const char *last = (const char *)(P + (size_t)q1 * pstride);
        for (int p0 = q0; p0 < q1; p0 += group) {
            const int np = q1 - p0 < group ? q1 - p0 : group;
            const char *next = (const char *)(P + (size_t)(p0 + group) * pstride);
            for (int b = 0; b < nblk; b++) {
                const int r0 = r0s[b], rb = rbs[b];
                const uint32_t *xr = x32 + (size_t)r0 * K2;
                Prefetch share;
                const Prefetch *pfp = prefetch_share(&share, p0 + group < q1 ? prefetching(1, R) : PF_OFF, next, last,
                                                     lines, r0, rb, R, K2);
                if (np == group) {
                    dp_rows(xr, K2, P + (size_t)p0 * pstride, (size_t)pstride, &e, (size_t)r0, p0 * PANEL,
                            N - p0 * PANEL, rb, np, pfp);
                    continue;
                }
                /* the share's last few panels: three at a time where a group is larger (rows as
                 * the block has them), then one at a time in blocks of up to 4 rows */
                int p = p0;
                for (; group > 3 && p + 3 <= p0 + np; p += 3)
                    dp_rows(xr, K2, P + (size_t)p * pstride, (size_t)pstride, &e, (size_t)r0, p * PANEL,
                            N - p * PANEL, rb, 3, 0);
                for (; p < p0 + np; p++)
                    for (int s0 = 0; s0 < rb; s0 += 4)
                        dp_rows(xr + (size_t)s0 * K2, K2, P + (size_t)p * pstride, (size_t)pstride, &e,
                                (size_t)(r0 + s0), p * PANEL, N - p * PANEL, rb - s0 < 4 ? rb - s0 : 4, 1, 0);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* linear, bfloat16 on AMX (tdpbf16ps): the same pair-packed weights, read as B tiles of 16      */
/* pairs of k x 16 outputs (64 bytes a row: exactly 16 consecutive pairs of a panel), x as A      */
/* tiles of up to 16 rows x 32 k, float32 C tiles of rows x 16 outputs. Each output element is   */
/* the tile instruction's fixed sequence over its own row of A and column of B, chunk after      */
/* chunk of 32 k in order: nothing in it depends on the other rows of the tile (a one-row decode */
/* step configures a one-row tile), so a row's result is the same whatever the row count. It is */
/* not bitwise sense_linear_bf16dp's (another sequence of roundings): a process uses one of the  */
/* two for every bfloat16 linear with K a multiple of 32 (decoding/invariant/tuning.py chooses by */
/* measuring). Needs the kernel's permission for the tile state (sense_amx_init, once).          */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define HAVE_AMX 1
#define AMX_PF 1
#define AMX_PF2 4
#include <sys/syscall.h>
#include <unistd.h>

typedef struct __attribute__((aligned(64))) {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

int sense_amx_init(void) {
    /* arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): Linux hands out the tile state only on request. */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

/* Tiles 0-2: C (rows x 16 float32), 3: A (rows x 32 bfloat16), 4-6: B (16 pairs x 16 outputs). */
static void amx_configure(int rows) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 4; t++) { c.rows[t] = (uint8_t)rows; c.colsb[t] = 64; }
    for (int t = 4; t < 7; t++) { c.rows[t] = 16; c.colsb[t] = 64; }
    _tile_loadconfig(&c);
}

/* rb (<= 16) rows x np (1-3) panels; x: the block's first row, K a multiple of 32. */
static void amx_block(const uint16_t *x, int K, const uint16_t *P, size_t ps, const Epi *e, size_t row0,
                      int col0, int ncols, int rb, int np) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    const size_t chunk = 16 * 2 * PANEL;            /* one B tile: 16 pairs of the panel */
    for (int c = 0; c < K / 32; c++) {
        /* the next chunk into L1, the one after 3 more into L2: tile loads alone stream at ~70% of the
         * memory bandwidth a one-row decode step needs, vector loads' rate with these */
        if (c + AMX_PF < K / 32)
            for (int q = 0; q < np; q++)
                for (int l = 0; l < 16; l++)
                    _mm_prefetch((const char *)(P + q * ps + (size_t)(c + AMX_PF) * chunk) + 64 * l, _MM_HINT_T0);
        if (c + AMX_PF2 < K / 32)
            for (int q = 0; q < np; q++)
                for (int l = 0; l < 16; l++)
                    _mm_prefetch((const char *)(P + q * ps + (size_t)(c + AMX_PF2) * chunk) + 64 * l, _MM_HINT_T1);
        _tile_loadd(3, x + (size_t)c * 32, (long)K * 2);
        _tile_loadd(4, P + (size_t)c * chunk, 64);
        _tile_dpbf16ps(0, 3, 4);
        if (np > 1) {
            _tile_loadd(5, P + ps + (size_t)c * chunk, 64);
            _tile_dpbf16ps(1, 3, 5);
        }
        if (np > 2) {
            _tile_loadd(6, P + 2 * ps + (size_t)c * chunk, 64);
            _tile_dpbf16ps(2, 3, 6);
        }
    }
    float buf[3][16][PANEL];
    _tile_stored(0, buf[0], 64);
    if (np > 1) _tile_stored(1, buf[1], 64);
    if (np > 2) _tile_stored(2, buf[2], 64);
    for (int q = 0; q < np; q++) {
        const int c0 = q * PANEL, nc = ncols - c0 < PANEL ? ncols - c0 : PANEL;
        if (nc > 0)
            for (int j = 0; j < rb; j++) epi_store(e, row0 + (size_t)j, col0 + c0, buf[q][j], nc);
    }
}

/* As sense_linear_bf16dp (same packing and epilogues); K a multiple of 32. */
void sense_linear_bf16amx(const uint16_t *x, const uint16_t *P, int64_t pstride, float *y, void *out,
                          const void *res, const float *bias, int mode, int R, int K, int N, int threads) {
    const Epi e = {y, out, res, bias, N, mode};
    const int panels = (N + PANEL - 1) / PANEL, groups = (panels + 2) / 3;
    _Pragma("omp parallel num_threads(threads)")
    {
        int configured = 0;
        _Pragma("omp for schedule(static)")
        for (int gi = 0; gi < groups; gi++) {
            const int p0 = gi * 3, np = panels - p0 < 3 ? panels - p0 : 3;
            for (int r0 = 0; r0 < R; r0 += 16) {
                const int rb = R - r0 < 16 ? R - r0 : 16;
                if (rb != configured) {
                    amx_configure(rb);
                    configured = rb;
                }
                amx_block(x + (size_t)r0 * K, K, P + (size_t)p0 * pstride, (size_t)pstride, &e, (size_t)r0,
                          p0 * PANEL, N - p0 * PANEL, rb, np);
            }
        }
        if (configured) _tile_release();
    }
}
#endif
#else
void sense_linear_bf16dp(const uint16_t *x, const uint16_t *P, int64_t pstride, float *y, void *out,
                         const void *res, const float *bias, int mode, int R, int K, int N, int threads) {
    (void)x; (void)P; (void)pstride; (void)y; (void)out; (void)res; (void)bias; (void)mode;    /* never called */
    (void)R; (void)K; (void)N; (void)threads;
}
#endif

/* ---------------------------------------------------------------------------------------- */
/* attention over an explicit list of visible keys per query row                             */

static inline float dot_f32(const float *q, const float *k, int D) {
    vec acc = v_zero();
    for (int d = 0; d < D; d += 8) acc = v_fma(v_load(q + d), v_load(k + d), acc);
    return v_hsum(acc);
}
static inline float dot_bf16(const float *q, const uint16_t *k, int D) {
    vec acc = v_zero();
    for (int d = 0; d < D; d += 8) acc = v_fma(v_load(q + d), v_load_bf16(k + d), acc);
    return v_hsum(acc);
}

#if BF16DP
/* v_exp's operations on 16 lanes (each lane the same value as v_exp's: change the two together;
 * tests/test_lean_forward.py checks a row's 16-lane and 8-lane columns give the same bits). The
 * SiLU, the attention's softmax and the prefill's take it where they have 16 lanes. */
static inline __m512 v16_exp(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN));
    const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(EXP_LOG2E), _mm512_set1_ps(0.5f)),
                                           _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(EXP_LN2_HI), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(EXP_LN2_LO), x);
    const __m512 z = _mm512_mul_ps(x, x);
    __m512 y = _mm512_set1_ps(EXP_P0);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(EXP_P1));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(EXP_P2));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(EXP_P3));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(EXP_P4));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(EXP_P5));
    y = _mm512_fmadd_ps(y, z, _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}
#endif

/* s[0..n) <- exp(s - max), returns their sum (8 lanes by position, then the fixed hsum). */
static float softmax_numerators(float *s, int n) {
    vec m8 = v_set1(-INFINITY);
    const int n8 = n & ~7;
    for (int p = 0; p < n8; p += 8) m8 = v_max(m8, v_load(s + p));
    float buf[8];
    v_store(buf, m8);
    float m = -INFINITY;
    for (int i = 0; i < 8; i++) m = buf[i] > m ? buf[i] : m;
    for (int p = n8; p < n; p++) m = s[p] > m ? s[p] : m;
    vec sum = v_zero();
    int p0 = 0;
#if BF16DP
    for (; p0 + 16 <= n8; p0 += 16) {      /* v_exp's lanes 16 at a time; the sum still by 8 */
        const __m512 e = v16_exp(_mm512_add_ps(_mm512_loadu_ps(s + p0), _mm512_set1_ps(-m)));
        _mm512_storeu_ps(s + p0, e);
        sum = v_add(sum, _mm512_castps512_ps256(e));
        sum = v_add(sum, _mm512_extractf32x8_ps(e, 1));
    }
#endif
    for (int p = p0; p < n8; p += 8) {
        vec e = v_exp(v_add(v_load(s + p), v_set1(-m)));
        v_store(s + p, e);
        sum = v_add(sum, e);
    }
    if (n8 < n) {
        float t[8];
        for (int i = 0; i < 8; i++) t[i] = n8 + i < n ? s[n8 + i] - m : -INFINITY;
        vec e = v_exp(v_load(t));
        v_store(t, e);
        for (int i = 0; i < 8; i++) if (n8 + i >= n) t[i] = 0.f;
        for (int i = 0; i < n - n8; i++) s[n8 + i] = t[i];
        sum = v_add(sum, v_load(t));
    }
    return v_hsum(sum);
}

/* Attention logit soft-capping (Gemma 2): s <- cap * tanh(s / cap), each score as transformers
 * computes it (divide, tanh, multiply), before the softmax; a score's bits depend only on the score.
 * cap <= 0: none. */
static void softcap_scores(float *s, size_t n, float cap) {
    if (cap <= 0.f) return;
    for (size_t i = 0; i < n; i++) s[i] = cap * tanhf(s[i] / cap);
}

/* The (heads per KV group, head size) pairs the attention routine is compiled for as constants. */
#define ATTENTION_SHAPES(X, NAME, KT)                                                           \
    X(NAME, KT, 3, 64) X(NAME, KT, 4, 64) X(NAME, KT, 2, 64) X(NAME, KT, 1, 64) X(NAME, KT, 5, 64) \
    X(NAME, KT, 1, 128) X(NAME, KT, 2, 128) X(NAME, KT, 4, 128) X(NAME, KT, 6, 128)              \
    X(NAME, KT, 7, 128) X(NAME, KT, 8, 128)
#define ATTENTION_SHAPE(NAME, KT, HPG, DIM)                                                    \
static __attribute__((noinline)) void NAME##_unit_##HPG##_##DIM(                                \
        const void *q, int64_t ldq, const KT *kg, const KT *vg, int64_t kr, const int32_t *ids, int n, \
        void *out, int64_t ldo, int io_bf16, int row, int g, float scale, float cap) {             \
    NAME##_unit_body(q, ldq, kg, vg, kr, ids, n, out, ldo, io_bf16, row, g, HPG, DIM, scale, cap); \
}
#define ATTENTION_CASE(NAME, KT, HPG, DIM)                                                     \
    if (hpg == HPG && D == DIM) {                                                              \
        NAME##_unit_##HPG##_##DIM(q, ldq, kg, vg, kr, ids, n, out, ldo, io_bf16, row, g, scale, cap); \
        return;                                                                                \
    }

#if BF16DP
/* bfloat16 attention on AVX512-BF16, for bfloat16 queries and caches with D a multiple of 32:
 * each score is one vdpbf16ps chain over d in steps of 32 (16 lanes, each adding the products of
 * its pair of dimensions), the 16 lanes folded to 8 (lane i + lane i+8), then v_hsum's order;
 * the same fixed sequence for every score whatever the key's place in the list, as the float32
 * route. The softmax is softmax_numerators; the weighted sum of V takes the probabilities in
 * bfloat16, two keys a lane (see below), as the large-row prefill kernel does: half the
 * instructions of float32 FMAs (measured at a 4,096-token context: a prompt's invariant prefill
 * 5.37 against 5.93 s, a 16-token verification 39 against 43 ms). The route a machine takes
 * depends only on the machine, the dtype and D, never on the rows. */
static inline __m256 fold16(__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}
static inline float dot_dp(const uint16_t *q, const uint16_t *k, int D) {
    __m512 acc = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(k + d));
    return v_hsum(fold16(acc));
}

/* Eight scores of one head at once: key j's 16 dp lanes in a[j] summed in exactly fold16 then
 * v_hsum's order (lane i + lane i+8, then lane i + lane i+4, then (0 + 2) + (1 + 3)), as
 * v_hsum4_scaled and dot_dp sum them, by transposing shuffles; times scale, stored to out[0..7]. */
static inline void hsum8_scaled_dp(const __m512 *a, float scale, float *out) {
    __m512 x[4], s[2];
    for (int j = 0; j < 4; j++)     /* [key 2j folded, key 2j+1 folded] */
        x[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int j = 0; j < 2; j++)     /* 128-bit lane k: key 4j+k's lane i + lane i+4 */
        s[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    /* 128-bit lane k: [key k: 0+2, 1+3, key k+4: 0+2, 1+3] */
    const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(s[0], s[1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* 128-bit lane k: [key k, key k+4, ...] */
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(t, t, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(t, t, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256 k8 = _mm512_castps512_ps256(_mm512_permutexvar_ps(order, r));
    _mm256_storeu_ps(out, _mm256_mul_ps(k8, _mm256_set1_ps(scale)));
}
static inline __attribute__((always_inline)) void attention_dp_unit_body(
        const uint16_t *qr, const uint16_t *kg, const uint16_t *vg, int64_t kr, const int32_t *ids, int n,
        uint16_t *out, int hpg, int D, float scale, float cap) {
    /* the scores, then (after them) the probabilities in bfloat16 for the weighted sum of V: one
     * allocation a call, on the decode step's path */
    const int n16 = (n + 15) & ~15;
    float *s = (float *)malloc(sizeof(float) * (size_t)(n > 0 ? n : 1) * hpg
                               + sizeof(uint16_t) * (size_t)hpg * (n16 + 16));
    int p = 0;
    for (; p + 8 <= n; p += 8) {
        const uint16_t *kp[8];
        for (int j = 0; j < 8; j++) kp[j] = kg + ids[p + j] * kr;
        /* The keys two blocks ahead, and below the values eight pairs ahead, prefetched: a batch
         * of requests reads as many caches as requests, from memory (16 requests at a
         * 300-token context: 110 MB of keys and values a step, beside the weights' 270 MB);
         * a step of 16 one-row requests 3% faster on the Zen 5 EPYC, one request's no slower.
         * Prefetches change no arithmetic. */
        if (p + 24 <= n)
            for (int j = 16; j < 24; j++)
                for (int b = 0; b < D * 2; b += 64) _mm_prefetch((const char *)(kg + ids[p + j] * kr) + b, _MM_HINT_T0);
        for (int h0 = 0; h0 < hpg; h0 += 3) {
            const int nh = hpg - h0 < 3 ? hpg - h0 : 3;
            __m512 a[3][8];
            for (int i = 0; i < 3; i++) for (int j = 0; j < 8; j++) a[i][j] = _mm512_setzero_ps();
            for (int d = 0; d < D; d += 32) {
                __m512bh qv[3];
                for (int i = 0; i < nh; i++) qv[i] = (__m512bh)_mm512_loadu_si512(qr + (size_t)(h0 + i) * D + d);
                for (int j = 0; j < 8; j++) {
                    const __m512bh x = (__m512bh)_mm512_loadu_si512(kp[j] + d);
                    for (int i = 0; i < nh; i++) a[i][j] = _mm512_dpbf16_ps(a[i][j], qv[i], x);
                }
            }
            for (int i = 0; i < nh; i++) hsum8_scaled_dp(a[i], scale, s + (size_t)(h0 + i) * n + p);
        }
    }
    for (; p + 4 <= n; p += 4) {
        const uint16_t *k0 = kg + ids[p] * kr, *k1 = kg + ids[p + 1] * kr;
        const uint16_t *k2 = kg + ids[p + 2] * kr, *k3 = kg + ids[p + 3] * kr;
        for (int h0 = 0; h0 < hpg; h0 += 3) {
            const int nh = hpg - h0 < 3 ? hpg - h0 : 3;
            __m512 a[3][4];
            for (int i = 0; i < 3; i++) for (int j = 0; j < 4; j++) a[i][j] = _mm512_setzero_ps();
            for (int d = 0; d < D; d += 32) {
                const __m512bh x0 = (__m512bh)_mm512_loadu_si512(k0 + d), x1 = (__m512bh)_mm512_loadu_si512(k1 + d);
                const __m512bh x2 = (__m512bh)_mm512_loadu_si512(k2 + d), x3 = (__m512bh)_mm512_loadu_si512(k3 + d);
                for (int i = 0; i < nh; i++) {
                    const __m512bh qv = (__m512bh)_mm512_loadu_si512(qr + (size_t)(h0 + i) * D + d);
                    a[i][0] = _mm512_dpbf16_ps(a[i][0], qv, x0); a[i][1] = _mm512_dpbf16_ps(a[i][1], qv, x1);
                    a[i][2] = _mm512_dpbf16_ps(a[i][2], qv, x2); a[i][3] = _mm512_dpbf16_ps(a[i][3], qv, x3);
                }
            }
            for (int i = 0; i < nh; i++)
                v_hsum4_scaled(fold16(a[i][0]), fold16(a[i][1]), fold16(a[i][2]), fold16(a[i][3]), scale,
                               s + (size_t)(h0 + i) * n + p);
        }
    }
    for (; p < n; p++) {
        const uint16_t *kj = kg + ids[p] * kr;
        for (int h = 0; h < hpg; h++) s[(size_t)h * n + p] = dot_dp(qr + (size_t)h * D, kj, D) * scale;
    }
    if (n == 0) {
        for (int i = 0; i < hpg * D; i++) out[i] = 0;
        free(s);
        return;
    }
    softcap_scores(s, (size_t)hpg * n, cap);
    float l[hpg];
    for (int h = 0; h < hpg; h++) l[h] = softmax_numerators(s + (size_t)h * n, n);
    /* The weighted sum of V on vdpbf16ps: each probability rounded to bfloat16 (as bf16_rne rounds),
     * paired by list position (2j, 2j + 1; an odd count's last paired with 0), the two keys' values
     * interleaved a pair per 32-bit lane; per output dimension one chain over the pairs in list
     * order. A row's visible list is the same in a decode step, a tree verification and a prefill,
     * so are its pairs and its bits. */
    const int np = (n + 1) / 2;
    uint16_t *eb = (uint16_t *)(s + (size_t)n * hpg);
    for (int h = 0; h < hpg; h++) {
        const float *sh = s + (size_t)h * n;
        uint16_t *e = eb + (size_t)h * (n16 + 16);
        int p = 0;
        for (; p + 16 <= n; p += 16) v16_store_bf16(e + p, v16_rnd_bf16(_mm512_loadu_ps(sh + p)));
        for (; p < n; p++) e[p] = bf16_rne(sh[p]);
        e[n] = 0;
    }
    static const uint16_t zeros[128] = {0};
    for (int h0 = 0; h0 < hpg; h0 += 3) {
        const int nh = hpg - h0 < 3 ? hpg - h0 : 3;
        for (int d0 = 0; d0 < D; d0 += 64) {
            const int nw = D - d0 < 64 ? 1 : 2;       /* 512-bit words of 32 dimensions in this block */
            __m512 acc[3][4];
            for (int i = 0; i < 3; i++) for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
            for (int j = 0; j < np; j++) {
                if (h0 == 0 && d0 == 0 && 2 * j + 17 < n)
                    for (int b = 0; b < D * 2; b += 64) {
                        _mm_prefetch((const char *)(vg + ids[2 * j + 16] * kr) + b, _MM_HINT_T0);
                        _mm_prefetch((const char *)(vg + ids[2 * j + 17] * kr) + b, _MM_HINT_T0);
                    }
                const uint16_t *va = vg + ids[2 * j] * kr + d0;
                const uint16_t *vb = 2 * j + 1 < n ? vg + ids[2 * j + 1] * kr + d0 : zeros;
                __m512bh vv[4];
                for (int w = 0; w < nw; w++) {
                    const __m512i x = _mm512_loadu_si512(va + 32 * w), y = _mm512_loadu_si512(vb + 32 * w);
                    vv[2 * w] = (__m512bh)_mm512_unpacklo_epi16(x, y);
                    vv[2 * w + 1] = (__m512bh)_mm512_unpackhi_epi16(x, y);
                }
                for (int i = 0; i < nh; i++) {
                    uint32_t pair;
                    memcpy(&pair, eb + (size_t)(h0 + i) * (n16 + 16) + 2 * j, sizeof pair);
                    const __m512bh pv = (__m512bh)_mm512_set1_epi32((int)pair);
                    for (int m = 0; m < 2 * nw; m++) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], pv, vv[m]);
                }
            }
            /* lane t of an unpacklo (m even) / unpackhi (m odd) word: dimension
             * 32 (m / 2) + 8 (t / 4) + 4 (m % 2) + t % 4; each output the lane / l rounded as
             * bf16_rne rounds it, 16 dimensions at a time */
            const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
            const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
            for (int i = 0; i < nh; i++) {
                uint16_t *o = out + (size_t)(h0 + i) * D + d0;
                const __m512 li = _mm512_set1_ps(l[h0 + i]);
                for (int w = 0; w < nw; w++) {
                    const __m512 lo = acc[i][2 * w], hi = acc[i][2 * w + 1];
                    v16_store_bf16(o + 32 * w, v16_rnd_bf16(_mm512_div_ps(_mm512_permutex2var_ps(lo, first, hi), li)));
                    v16_store_bf16(o + 32 * w + 16,
                                   v16_rnd_bf16(_mm512_div_ps(_mm512_permutex2var_ps(lo, second, hi), li)));
                }
            }
        }
    }
    free(s);
}
#define ATTENTION_DP_SHAPE(NAME, KT, HPG, DIM)                                                 \
static __attribute__((noinline)) void attention_dp_unit_##HPG##_##DIM(                         \
        const uint16_t *qr, const uint16_t *kg, const uint16_t *vg, int64_t kr, const int32_t *ids, int n, \
        uint16_t *out, float scale, float cap) {                                               \
    attention_dp_unit_body(qr, kg, vg, kr, ids, n, out, HPG, DIM, scale, cap);                 \
}
#define ATTENTION_DP_CASE(NAME, KT, HPG, DIM)                                                  \
    if (hpg == HPG && D == DIM) { attention_dp_unit_##HPG##_##DIM(qr, kg, vg, kr, ids, n, out, scale, cap); return; }
ATTENTION_SHAPES(ATTENTION_DP_SHAPE, , )
static void attention_dp_unit(const uint16_t *qr, const uint16_t *kg, const uint16_t *vg, int64_t kr,
                              const int32_t *ids, int n, uint16_t *out, int hpg, int D, float scale, float cap) {
    ATTENTION_SHAPES(ATTENTION_DP_CASE, , )
    attention_dp_unit_body(qr, kg, vg, kr, ids, n, out, hpg, D, scale, cap);
}
/* In sense_attention_bf16's unit: bfloat16 queries and D a multiple of 32 take this route. */
#define ATTENTION_FAST_BF16                                                                    \
    if (io_bf16 && D % 32 == 0) {                                                              \
        attention_dp_unit((const uint16_t *)q + (size_t)row * ldq + (size_t)g * hpg * D, kg, vg, kr, ids, n, \
                          (uint16_t *)out + (size_t)row * ldo + (size_t)g * hpg * D, hpg, D, scale, cap); \
        return;                                                                                \
    }
#else
#define ATTENTION_FAST_BF16
#endif
#define ATTENTION_FAST_NONE

/* q: element (row, h, d) at row*ldq + h*D + d, row = b*T + t; k, v: element (b, g, j, d) at
 * b*kb + g*kh + j*kr + d; rows see keys idx[rowptr[row] .. rowptr[row+1]) (ascending); out:
 * element (row, h, d) at row*ldo + h*D + d. q and out are bfloat16 if io_bf16, else float32. */
#define DEFINE_ATTENTION(NAME, KT, DOT, LOADK, FAST)                                                  \
static inline __attribute__((always_inline)) void NAME##_unit_body(                            \
                        const void *q, int64_t ldq, const KT *kg, const KT *vg, int64_t kr,        \
                        const int32_t *ids, int n, void *out, int64_t ldo, int io_bf16, int row,     \
                        int g, int hpg, int D, float scale, float cap) {                             \
        float *s = (float *)malloc(sizeof(float) * ((size_t)(n > 0 ? n : 1) + D) * hpg);       \
        float *qr = s + (size_t)(n > 0 ? n : 1) * hpg;                                         \
        for (int i = 0; i < hpg * D; i += 8)     /* hpg * D: a multiple of 8 (D is) */         \
            v_store(qr + i, vact_ld(q, (size_t)row * ldq + (size_t)g * hpg * D + i, io_bf16)); \
        /* Scores: each one DOT's chain over d, 4 keys x up to 3 heads interleaved (12          \
         * independent chains in flight instead of 1: the same bits, several times faster). */ \
        int p = 0;                                                                             \
        for (; p + 4 <= n; p += 4) {                                                           \
            const KT *k0 = kg + ids[p] * kr, *k1 = kg + ids[p + 1] * kr;                        \
            const KT *k2 = kg + ids[p + 2] * kr, *k3 = kg + ids[p + 3] * kr;                    \
            for (int h0 = 0; h0 < hpg; h0 += 3) {                                              \
                const int nh = hpg - h0 < 3 ? hpg - h0 : 3;                                    \
                vec a[3][4];                                                                   \
                for (int i = 0; i < 3; i++) for (int j = 0; j < 4; j++) a[i][j] = v_zero();    \
                for (int d = 0; d < D; d += 8) {                                               \
                    const vec x0 = LOADK(k0 + d), x1 = LOADK(k1 + d);                          \
                    const vec x2 = LOADK(k2 + d), x3 = LOADK(k3 + d);                          \
                    for (int i = 0; i < nh; i++) {                                             \
                        const vec qv = v_load(qr + (size_t)(h0 + i) * D + d);                  \
                        a[i][0] = v_fma(qv, x0, a[i][0]); a[i][1] = v_fma(qv, x1, a[i][1]);    \
                        a[i][2] = v_fma(qv, x2, a[i][2]); a[i][3] = v_fma(qv, x3, a[i][3]);    \
                    }                                                                          \
                }                                                                              \
                for (int i = 0; i < nh; i++)                                                   \
                    v_hsum4_scaled(a[i][0], a[i][1], a[i][2], a[i][3], scale, s + (size_t)(h0 + i) * n + p); \
            }                                                                                  \
        }                                                                                      \
        for (; p < n; p++) {                                                                   \
            const KT *kj = kg + ids[p] * kr;                                                   \
            for (int h = 0; h < hpg; h++) s[(size_t)h * n + p] = DOT(qr + (size_t)h * D, kj, D) * scale; \
        }                                                                                      \
        if (n == 0) {                                                                          \
            for (int i = 0; i < hpg * D; i++) act_st(out, (size_t)row * ldo + (size_t)g * hpg * D + i, 0.f, io_bf16); \
            free(s);                                                                           \
            return;                                                                            \
        }                                                                                      \
        softcap_scores(s, (size_t)hpg * n, cap);                                               \
        float l[hpg];                                                                          \
        for (int h = 0; h < hpg; h++) l[h] = softmax_numerators(s + (size_t)h * n, n);         \
        /* out[h, d] = sum over p (in list order) of e_hp * V[ids[p], d], then / l_h: up to 3 heads \
         * x 32 dimensions in registers, each V row loaded (and widened) once for the heads that \
         * share it; every (h, d) still sums p in list order, so the bits do not depend on it. */ \
        for (int h0 = 0; h0 < hpg; h0 += 3) {                                                  \
            const int nh = hpg - h0 < 3 ? hpg - h0 : 3;                                        \
            for (int d0 = 0; d0 < D; d0 += 32) {                                               \
                const int nv = (D - d0 < 32 ? D - d0 : 32) / 8;                                \
                vec acc[3][4];                                                                 \
                for (int i = 0; i < 3; i++) for (int j = 0; j < 4; j++) acc[i][j] = v_zero();  \
                for (int p = 0; p < n; p++) {                                                  \
                    const KT *vr = vg + ids[p] * kr + d0;                                      \
                    vec vv[4];                                                                 \
                    for (int j = 0; j < nv; j++) vv[j] = LOADK(vr + 8 * j);                    \
                    for (int i = 0; i < nh; i++) {                                             \
                        const vec e = v_set1(s[(size_t)(h0 + i) * n + p]);                     \
                        for (int j = 0; j < nv; j++) acc[i][j] = v_fma(e, vv[j], acc[i][j]);   \
                    }                                                                          \
                }                                                                              \
                for (int i = 0; i < nh; i++) {                                                 \
                    const size_t o = (size_t)row * ldo + ((size_t)g * hpg + h0 + i) * D + d0;  \
                    for (int j = 0; j < nv; j++)     /* each lane / l, rounded as act_st does */ \
                        vact_st(out, o + 8 * j, v_div(acc[i][j], v_set1(l[h0 + i])), io_bf16);  \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        free(s);                                                                               \
}                                                                                              \
/* The body with the head count and size of common models as constants (GCC then unrolls the   \
 * head and dimension loops and keeps the accumulators in registers; the same operations in the \
 * same order, so the same bits), any other shape on the general one. */                        \
ATTENTION_SHAPES(ATTENTION_SHAPE, NAME, KT)                                                    \
static void NAME##_unit(const void *q, int64_t ldq, const KT *kg, const KT *vg, int64_t kr,        \
                        const int32_t *ids, int n, void *out, int64_t ldo, int io_bf16, int row,     \
                        int g, int hpg, int D, float scale, float cap) {                             \
    FAST                                                                                       \
    ATTENTION_SHAPES(ATTENTION_CASE, NAME, KT)                                                 \
    NAME##_unit_body(q, ldq, kg, vg, kr, ids, n, out, ldo, io_bf16, row, g, hpg, D, scale, cap); \
}                                                                                              \
void NAME(const void *q, int64_t ldq, const KT *k, const KT *v, int64_t kb, int64_t kh,       \
          int64_t kr, const int32_t *rowptr, const int32_t *idx, void *out, int64_t ldo,       \
          int io_bf16, int B, int T, int H, int G, int D, float scale, float cap, int threads) { \
    const int hpg = H / G;                                                                     \
    const int units = B * T * G;                                                               \
    (void)B;                                                                                   \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads)")                      \
    for (int u = 0; u < units; u++) {                                                          \
        const int g = u % G, row = u / G, b = row / T;                                         \
        NAME##_unit(q, ldq, k + b * kb + g * kh, v + b * kb + g * kh, kr, idx + rowptr[row],   \
                    rowptr[row + 1] - rowptr[row], out, ldo, io_bf16, row, g, hpg, D, scale, cap); \
    }                                                                                          \
}                                                                                              \
/* Several requests' rows in one call: row r belongs to request req[r], whose cache is one       \
 * buffer [2, L, 1, G, caps[b], D] at address bufs[b] (keys of layer i, then values of layer i   \
 * at L + i); rowptr/idx list each row's visible positions in its own cache. */                  \
void NAME##_multi(const void *q, int64_t ldq, const int64_t *bufs, const int64_t *caps,            \
                  const int32_t *req, const int32_t *rowptr, const int32_t *idx, void *out,        \
                  int64_t ldo, int io_bf16, int rows, int H, int G, int D, int L, int layer,       \
                  float scale, float cap, int threads) {                                           \
    const int hpg = H / G;                                                                     \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads)")                      \
    for (int u = 0; u < rows * G; u++) {                                                       \
        const int g = u % G, row = u / G, b = req[row];                                        \
        const int64_t lay = (int64_t)G * caps[b] * D, gs = caps[b] * D;                        \
        const KT *base = (const KT *)bufs[b];                                                  \
        NAME##_unit(q, ldq, base + layer * lay + g * gs, base + (L + layer) * lay + g * gs, D,  \
                    idx + rowptr[row], rowptr[row + 1] - rowptr[row], out, ldo, io_bf16, row, g, \
                    hpg, D, scale, cap);                                                       \
    }                                                                                          \
}

DEFINE_ATTENTION(sense_attention_f32, float, dot_f32, v_load, ATTENTION_FAST_NONE)
DEFINE_ATTENTION(sense_attention_bf16, uint16_t, dot_bf16, v_load_bf16, ATTENTION_FAST_BF16)

/* ---------------------------------------------------------------------------------------- */
/* the elementwise steps of a Llama-family decoder layer, one call each instead of a dozen      */
/* torch ops (whose dispatch cost a third of a one-row decode step). Activations are in the    */
/* model's dtype (bf16 flag); every value is computed in float32 and rounded once per torch op  */
/* it replaces, so the rotary embedding and the residual adds are bitwise torch's; the norm's   */
/* sum of squares and the SiLU's exp are this file's own fixed code (close to torch's, not      */
/* bitwise: a forward is compared with this forward, not with transformers'). Each row's result */
/* depends on that row only.                                                                    */

/* RMSNorm: out = w * bf16(x * 1/sqrt(mean(x^2) + eps)) (LlamaRMSNorm), the sum of squares in
 * 8 lanes by position then a fixed tree. One row of H elements at element offset o of x and out
 * (the same offset in both: in place is allowed, each element is read before it is written). */
/* 1 / sqrt(mean(x^2) + eps) of a row of H: the sum of squares 8 lanes at a time in order, then
 * the lanes in v_hsum's order (the same for every RMSNorm here). */
static inline float rms_inv(const void *x, size_t o, int H, float eps, int bf16) {
    const int H8 = H & ~7;
    vec acc = v_zero();
    for (int k = 0; k < H8; k += 8) {
        const vec v = vact_ld(x, o + k, bf16);
        acc = v_add(acc, v_mul(v, v));
    }
    if (H8 < H) {       /* the tail, zero-padded (adds exactly nothing) */
        float t[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int k = H8; k < H; k++) t[k - H8] = act_ld(x, o + k, bf16);
        const vec v = v_load(t);
        acc = v_add(acc, v_mul(v, v));
    }
    return 1.0f / sqrtf(v_hsum(acc) / (float)H + eps);
}
static inline void rmsnorm_row(const void *x, const void *w, void *out, size_t o, int H, float eps, int bf16) {
    const int H8 = H & ~7;
    const float inv = rms_inv(x, o, H, eps, bf16);
    const vec vi = v_set1(inv);
    for (int k = 0; k < H8; k += 8)
        vact_st(out, o + k, v_mul(vact_ld(w, k, bf16), vact_rnd(v_mul(vact_ld(x, o + k, bf16), vi), bf16)), bf16);
    for (int k = H8; k < H; k++)
        act_st(out, o + k, act_ld(w, k, bf16) * act_rnd(act_ld(x, o + k, bf16) * inv, bf16), bf16);
}
void sense_rmsnorm(const void *x, const void *w, void *out, int rows, int H, float eps, int bf16, int threads) {
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(rows >= 16)")
    for (int r = 0; r < rows; r++) rmsnorm_row(x, w, out, (size_t)r * H, H, eps, bf16);
}

/* Gemma's RMSNorm (Gemma, Gemma 2, Gemma 3): the same sum of squares and scale as rmsnorm_row,
 * then x * inv * (1 + w) in float32, rounded once (transformers' GemmaRMSNorm computes in float32
 * and casts at the end, where Llama's rounds x * inv to the model's dtype before the weight). */
static inline void rmsnorm_offset_row(const void *x, const void *w, void *out, size_t o, int H, float eps,
                                      int bf16) {
    const int H8 = H & ~7;
    const float inv = rms_inv(x, o, H, eps, bf16);
    const vec vi = v_set1(inv), one = v_set1(1.0f);
    for (int k = 0; k < H8; k += 8)
        vact_st(out, o + k, v_mul(v_mul(vact_ld(x, o + k, bf16), vi), v_add(one, vact_ld(w, k, bf16))), bf16);
    for (int k = H8; k < H; k++)
        act_st(out, o + k, (act_ld(x, o + k, bf16) * inv) * (1.0f + act_ld(w, k, bf16)), bf16);
}
void sense_rmsnorm_offset(const void *x, const void *w, void *out, int rows, int H, float eps, int bf16,
                          int threads) {
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(rows >= 16)")
    for (int r = 0; r < rows; r++) rmsnorm_offset_row(x, w, out, (size_t)r * H, H, eps, bf16);
}
/* Gemma 3's per-head q_norm and k_norm, in place, as sense_rmsnorm_heads with Gemma's norm. */
void sense_rmsnorm_offset_heads(void *qkv, int64_t ld, int rows, int first, int n, int D, const void *w,
                                float eps, int bf16, int threads) {
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(rows * n >= 64)")
    for (int u = 0; u < rows * n; u++)
        rmsnorm_offset_row(qkv, w, qkv, (size_t)(u / n) * (size_t)ld + (size_t)(first + u % n) * D, D, eps, bf16);
}

/* The per-head RMSNorm of Qwen3's attention (q_norm, k_norm), in place: heads first .. first +
 * n - 1 of each row of qkv (row stride ld elements, heads of D), each normed over its D
 * elements exactly as sense_rmsnorm norms a row of D. */
void sense_rmsnorm_heads(void *qkv, int64_t ld, int rows, int first, int n, int D, const void *w, float eps,
                         int bf16, int threads) {
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(rows * n >= 64)")
    for (int u = 0; u < rows * n; u++)
        rmsnorm_row(qkv, w, qkv, (size_t)(u / n) * (size_t)ld + (size_t)(first + u % n) * D, D, eps, bf16);
}

/* Rotary embedding in place on the first H + G heads of each row of qkv (row stride ld), as
 * transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin (three rounded ops); cos,
 * sin: [rows, D]. Then the rotated keys and the values (heads H+G .. H+2G) are written to the
 * cache at positions pos0, pos0 + 1, ...: element (g, pos, d) at g * gstride + pos * D + d. */
void sense_rope_kv(void *qkv, int64_t ld, int rows, int H, int G, int D, const void *cos, const void *sin,
                   void *kc, void *vc, int64_t gstride, int64_t pos0, int bf16) {
    const int half = D / 2;
    const size_t es = bf16 ? 2 : 4;
    const vec neg = v_set1(-1.0f);
    for (int r = 0; r < rows; r++) {
        const size_t cs = (size_t)r * D;
        for (int h = 0; h < H + G; h++) {
            const size_t o = (size_t)r * ld + (size_t)h * D;
            int d = 0;
            for (; d + 8 <= half; d += 8) {
                const vec a = vact_ld(qkv, o + d, bf16), b = vact_ld(qkv, o + d + half, bf16);
                const vec c0 = vact_ld(cos, cs + d, bf16), s0 = vact_ld(sin, cs + d, bf16);
                const vec c1 = vact_ld(cos, cs + d + half, bf16), s1 = vact_ld(sin, cs + d + half, bf16);
                vact_st(qkv, o + d, v_add(vact_rnd(v_mul(a, c0), bf16), vact_rnd(v_mul(v_mul(b, neg), s0), bf16)), bf16);
                vact_st(qkv, o + d + half, v_add(vact_rnd(v_mul(b, c1), bf16), vact_rnd(v_mul(a, s1), bf16)), bf16);
            }
            for (; d < half; d++) {
                const float a = act_ld(qkv, o + d, bf16), b = act_ld(qkv, o + d + half, bf16);
                const float c0 = act_ld(cos, cs + d, bf16), s0 = act_ld(sin, cs + d, bf16);
                const float c1 = act_ld(cos, cs + d + half, bf16), s1 = act_ld(sin, cs + d + half, bf16);
                act_st(qkv, o + d, act_rnd(a * c0, bf16) + act_rnd(-b * s0, bf16), bf16);
                act_st(qkv, o + d + half, act_rnd(b * c1, bf16) + act_rnd(a * s1, bf16), bf16);
            }
        }
        for (int g = 0; g < G; g++) {
            const size_t dst = (size_t)g * gstride + (size_t)(pos0 + r) * D;
            memcpy((char *)kc + dst * es, (const char *)qkv + ((size_t)r * ld + (size_t)(H + g) * D) * es, D * es);
            memcpy((char *)vc + dst * es, (const char *)qkv + ((size_t)r * ld + (size_t)(H + G + g) * D) * es, D * es);
        }
    }
}

/* sense_rope_kv for several requests' rows in one call: request b's rows bounds[b] ..
 * bounds[b + 1] go to its cache, one buffer [2, L, 1, G, caps[b], D] at address bufs[b], layer
 * `layer`, positions starts[b], starts[b] + 1, ... */
void sense_rope_kv_multi(void *qkv, int64_t ld, int H, int G, int D, const void *cos, const void *sin,
                         const int64_t *bufs, const int64_t *caps, const int64_t *starts, const int32_t *bounds,
                         int B, int L, int layer, int bf16, int threads) {
    const size_t es = bf16 ? 2 : 4;
    const int R = bounds[B];
    /* a row at a time (each its own, the same operations): on the threads from 8 rows */
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(R >= 8)")
    for (int r = 0; r < R; r++) {
        int b = 0;
        while (bounds[b + 1] <= r) b++;
        const size_t lay = (size_t)G * (size_t)caps[b] * (size_t)D;
        char *buf = (char *)(intptr_t)bufs[b];
        sense_rope_kv((char *)qkv + (size_t)r * (size_t)ld * es, ld, 1, H, G, D,
                      (const char *)cos + (size_t)r * (size_t)D * es, (const char *)sin + (size_t)r * (size_t)D * es,
                      buf + (size_t)layer * lay * es, buf + (size_t)(L + layer) * lay * es, caps[b] * D,
                      starts[b] + (r - bounds[b]), bf16);
    }
}

/* Columns i0 .. i0 + n - 1 (n <= 8) of a gated MLP's gate and up halves of a row of gu (the gate
 * at gi, the up at gi + I), zero-padded past n; and 8 (or n) outputs of its activation stored. */
static inline void gate_up_load8(const void *gu, size_t gi, int I, int i0, int n, int bf16, vec *g, vec *u) {
    if (n == 8) {
        *g = vact_ld(gu, gi + i0, bf16);
        *u = vact_ld(gu, gi + I + i0, bf16);
        return;
    }
    float tg[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, tu[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < n; j++) { tg[j] = act_ld(gu, gi + i0 + j, bf16); tu[j] = act_ld(gu, gi + I + i0 + j, bf16); }
    *g = v_load(tg);
    *u = v_load(tu);
}
static inline void act_store8(void *out, size_t oi, int n, vec y, int bf16) {
    if (n == 8) {
        vact_st(out, oi, y, bf16);
        return;
    }
    float ty[8];
    v_store(ty, y);
    for (int j = 0; j < n; j++) act_st(out, oi + j, ty[j], bf16);
}

/* The gated MLP's activation: out[r, i] = silu(gu[r, i]) * gu[r, I + i] (two rounded ops);
 * silu(g) = g / (1 + exp(-g)), as g * e / (1 + e) with e = exp(g) for g < 0 (no overflow). */
#if BF16DP
/* 16 columns of sense_silu_mul's row: the 8-lane loop's operations, lane for lane (the same bits,
 * half the instructions: the SiLU was 4% of a 16-token verification on the Zen 5 EPYC). */
static inline void silu_mul16(const void *gu, void *out, size_t gi, size_t gu_i, size_t oi, int bf16) {
    const __m512 g = bf16 ? load16_bf16((const uint16_t *)gu + gi) : _mm512_loadu_ps((const float *)gu + gi);
    const __m512 u = bf16 ? load16_bf16((const uint16_t *)gu + gu_i) : _mm512_loadu_ps((const float *)gu + gu_i);
    const __m512 t = v16_exp(_mm512_or_ps(g, _mm512_set1_ps(-0.0f)));
    const __m512 sel = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ),
                                            _mm512_mul_ps(g, t), g);
    const __m512 sv = _mm512_div_ps(sel, _mm512_add_ps(_mm512_set1_ps(1.0f), t));
    const __m512 y = _mm512_mul_ps(bf16 ? v16_rnd_bf16(sv) : sv, u);
    if (bf16) v16_store_bf16((uint16_t *)out + oi, v16_rnd_bf16(y));
    else _mm512_storeu_ps((float *)out + oi, y);
}
#endif
void sense_silu_mul(const void *gu, void *out, int rows, int I, int bf16, int threads) {
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(rows >= 8)")
    for (int r = 0; r < rows; r++) {
        const size_t gi = (size_t)r * 2 * I, oi = (size_t)r * I;
        const vec one = v_set1(1.0f);
        int i0 = 0;
#if BF16DP
        for (; i0 + 16 <= I; i0 += 16) silu_mul16(gu, out, gi + i0, gi + I + i0, oi + i0, bf16);
#endif
        for (; i0 < I; i0 += 8) {
            const int n = I - i0 < 8 ? I - i0 : 8;
            vec g, u;
            gate_up_load8(gu, gi, I, i0, n, bf16, &g, &u);
            const vec t = v_exp(v_neg_abs(g));
            const vec s = v_div(v_sel_nonneg(g, g, v_mul(g, t)), v_add(one, t));
            act_store8(out, oi + i0, n, v_mul(vact_rnd(s, bf16), u), bf16);
        }
    }
}

/* Gemma's gated MLP activation: out[r, i] = gelu_tanh(gu[r, i]) * gu[r, I + i] (two rounded ops),
 * gelu_tanh(g) = (0.5 g)(1 + tanh(z)), z = b (g + k g^3) in torch's order of operations
 * (b = sqrt(2 / pi), k = 0.044715), and 1 + tanh(z) = 2 / (1 + e) for z >= 0, 2 e / (1 + e) below,
 * e = exp(-2 |z|): no overflow, and no cancellation where z is very negative (torch's 1 + tanh(z)
 * keeps few bits there). Fixed code of its own, as the SiLU's: within rounding of torch's. */
void sense_gelu_tanh_mul(const void *gu, void *out, int rows, int I, int bf16, int threads) {
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(rows >= 8)")
    for (int r = 0; r < rows; r++) {
        const size_t gi = (size_t)r * 2 * I, oi = (size_t)r * I;
        const vec one = v_set1(1.0f), half = v_set1(0.5f), two = v_set1(2.0f);
        const vec beta = v_set1((float)0.7978845608028654), kappa = v_set1(0.044715f);   /* sqrt(2 / pi) */
        for (int i0 = 0; i0 < I; i0 += 8) {
            const int n = I - i0 < 8 ? I - i0 : 8;
            vec g, u;
            gate_up_load8(gu, gi, I, i0, n, bf16, &g, &u);
            const vec cube = v_mul(v_mul(g, g), g);
            const vec z = v_mul(beta, v_add(g, v_mul(kappa, cube)));
            const vec e = v_exp(v_mul(two, v_neg_abs(z)));
            const vec onep = v_div(v_sel_nonneg(z, two, v_mul(two, e)), v_add(one, e));    /* 1 + tanh(z) */
            const vec s = v_mul(v_mul(half, g), onep);
            act_store8(out, oi + i0, n, v_mul(vact_rnd(s, bf16), u), bf16);
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* a prompt's causal prefill attention on AVX512-BF16                                          */
/* A lone prefill from an empty cache is shared by every decoding mode (autoregressive and      */
/* speculative decode the same prompt through the same forward), so it needs no row invariance: */
/* it is blocked for speed, like flash attention. Per (head, block of 16 query rows): the scores */
/* of all keys up to the block's diagonal, 4 rows x 4 blocks of 16 keys at a time on vdpbf16ps   */
/* (keys packed by the block, a pair of dimensions per 32-bit lane, so 16 keys fill a vector),  */
/* the causal mask on the diagonal block, an exact softmax (max, exp, sum in float32), the       */
/* probabilities rounded to bfloat16 (as flash attention's second product takes them) and the   */
/* weighted sum of V on vdpbf16ps (values packed by pairs of keys), 4 rows x 64 dimensions.     */
#if BF16DP

#define PQ 16       /* query rows per block, and keys per block */

/* Scores of query rows q[0..4) (pairs of dimensions, D2 of them) against key blocks kb0 ..
 * kb0 + NB of the packed keys, times scale, into s[row * ld + key]. */
#define DEFINE_PREFILL_QK(NB)                                                                  \
static inline __attribute__((always_inline)) void prefill_qk_##NB(                            \
        const uint32_t *q, int D2, const uint32_t *kp, int kb0, float scale, float *s, int ld) { \
    __m512 acc[4][NB];                                                                         \
    for (int i = 0; i < 4; i++) for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();  \
    for (int p = 0; p < D2; p++) {                                                             \
        __m512bh kv[NB];                                                                       \
        for (int j = 0; j < NB; j++)                                                           \
            kv[j] = (__m512bh)_mm512_loadu_si512(kp + ((size_t)(kb0 + j) * D2 + p) * PQ);      \
        for (int i = 0; i < 4; i++) {                                                          \
            const __m512bh qv = (__m512bh)_mm512_set1_epi32((int)q[(size_t)i * D2 + p]);        \
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], qv, kv[j]);    \
        }                                                                                      \
    }                                                                                          \
    const __m512 sc = _mm512_set1_ps(scale);                                                   \
    for (int i = 0; i < 4; i++)                                                                \
        for (int j = 0; j < NB; j++)                                                           \
            _mm512_storeu_ps(s + (size_t)i * ld + (size_t)(kb0 + j) * PQ, _mm512_mul_ps(acc[i][j], sc)); \
}
DEFINE_PREFILL_QK(4)
DEFINE_PREFILL_QK(1)

/* q: element (t, h, d) at t*ldq + h*D + d; k, v: element (g, t, d) at g*kh + t*D + d, positions
 * 0 .. T-1 (the prompt from position 0); row t sees keys 0..t; out: (t, h, d) at t*ldo + h*D + d.
 * All bfloat16; D a multiple of 32. */
void sense_prefill_attention_bf16dp(const uint16_t *q, int64_t ldq, const uint16_t *k, const uint16_t *v,
                                    int64_t kh, uint16_t *out, int64_t ldo, int T, int H, int G, int D,
                                    float scale, int threads) {
    const int nb = (T + PQ - 1) / PQ, tp = nb * PQ, D2 = D / 2, hpg = H / G;
    /* kp[g][b][p][j] = dimensions (2p, 2p+1) of key 16b + j; vp[g][jp][d] = V[2jp][d], V[2jp+1][d] */
    uint32_t *kp = (uint32_t *)calloc((size_t)G * tp * D2, sizeof(uint32_t));
    uint32_t *vp = (uint32_t *)calloc((size_t)G * tp * D2, sizeof(uint32_t));
    _Pragma("omp parallel num_threads(threads)")
    {
        _Pragma("omp for schedule(static)")
        for (int u = 0; u < G * nb; u++) {
            const int g = u / nb, b = u % nb;
            uint32_t *kd = kp + ((size_t)g * nb + b) * D2 * PQ;
            uint16_t *vd = (uint16_t *)(vp + ((size_t)g * tp + (size_t)b * PQ) * D2);
            for (int j = 0; j < PQ && b * PQ + j < T; j++) {
                const uint32_t *kr = (const uint32_t *)(k + g * kh + (int64_t)(b * PQ + j) * D);
                const uint16_t *vr = v + g * kh + (int64_t)(b * PQ + j) * D;
                for (int p = 0; p < D2; p++) kd[(size_t)p * PQ + j] = kr[p];
                for (int d = 0; d < D; d++) vd[((size_t)(j / 2) * D + d) * 2 + (j & 1)] = vr[d];
            }
        }
        float *s = (float *)malloc(sizeof(float) * PQ * tp + sizeof(float) * PQ);
        uint16_t *pb = (uint16_t *)malloc(sizeof(uint16_t) * PQ * tp);
        uint32_t *qb = (uint32_t *)malloc(sizeof(uint32_t) * PQ * D2);
        float *l = s + (size_t)PQ * tp;
        _Pragma("omp for schedule(dynamic, 1)")
        for (int u = 0; u < H * nb; u++) {
            const int blk = nb - 1 - u / H, h = u % H, g = h / hpg;     /* the longest blocks first */
            const int r0 = blk * PQ, nr = T - r0 < PQ ? T - r0 : PQ, nk = blk + 1, n = nk * PQ;
            memset(qb, 0, sizeof(uint32_t) * PQ * D2);
            for (int i = 0; i < nr; i++) memcpy(qb + (size_t)i * D2, q + (int64_t)(r0 + i) * ldq + (int64_t)h * D, 2 * D);
            const uint32_t *kg = kp + (size_t)g * nb * D2 * PQ;
            for (int i0 = 0; i0 < PQ; i0 += 4) {
                int b = 0;
                for (; b + 4 <= nk; b += 4) prefill_qk_4(qb + (size_t)i0 * D2, D2, kg, b, scale, s + (size_t)i0 * tp, tp);
                for (; b < nk; b++) prefill_qk_1(qb + (size_t)i0 * D2, D2, kg, b, scale, s + (size_t)i0 * tp, tp);
            }
            for (int i = 0; i < PQ; i++) {
                float *si = s + (size_t)i * tp;
                for (int j = i + 1; j < PQ; j++) si[r0 + j] = -INFINITY;      /* the causal mask */
                __m512 m = _mm512_set1_ps(-INFINITY);
                for (int j = 0; j < n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(si + j));
                const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
                __m512 sum = _mm512_setzero_ps();
                for (int j = 0; j < n; j += 16) {
                    const __m512 e = v16_exp(_mm512_sub_ps(_mm512_loadu_ps(si + j), mx));
                    sum = _mm512_add_ps(sum, e);
                    _mm256_storeu_si256((__m256i *)(pb + (size_t)i * tp + j), (__m256i)_mm512_cvtneps_pbh(e));
                }
                l[i] = _mm512_reduce_add_ps(sum);
            }
            const uint32_t *vg = vp + (size_t)g * tp * D2;
            for (int i0 = 0; i0 < nr; i0 += 4) {
                const uint32_t *p32 = (const uint32_t *)(pb + (size_t)i0 * tp);
                for (int d0 = 0; d0 < D; d0 += 64) {
                    const int nv = (D - d0 < 64 ? D - d0 : 64) / 16;
                    __m512 acc[4][4];
                    for (int i = 0; i < 4; i++) for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
                    for (int jp = 0; jp < n / 2; jp++) {
                        __m512bh vv[4];
                        for (int j = 0; j < nv; j++) vv[j] = (__m512bh)_mm512_loadu_si512(vg + (size_t)jp * D + d0 + 16 * j);
                        for (int i = 0; i < 4; i++) {
                            const __m512bh pv = (__m512bh)_mm512_set1_epi32((int)p32[(size_t)i * tp / 2 + jp]);
                            for (int j = 0; j < nv; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], pv, vv[j]);
                        }
                    }
                    for (int i = 0; i < 4 && i0 + i < nr; i++) {
                        const __m512 inv = _mm512_set1_ps(1.0f / l[i0 + i]);
                        uint16_t *o = out + (int64_t)(r0 + i0 + i) * ldo + (int64_t)h * D + d0;
                        for (int j = 0; j < nv; j++)
                            _mm256_storeu_si256((__m256i *)(o + 16 * j), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][j], inv)));
                    }
                }
            }
        }
        free(s);
        free(pb);
        free(qb);
    }
    free(kp);
    free(vp);
}
#undef PQ
#else
void sense_prefill_attention_bf16dp(const uint16_t *q, int64_t ldq, const uint16_t *k, const uint16_t *v,
                                    int64_t kh, uint16_t *out, int64_t ldo, int T, int H, int G, int D,
                                    float scale, int threads) {
    (void)q; (void)ldq; (void)k; (void)v; (void)kh; (void)out; (void)ldo; (void)T; (void)H; (void)G;   /* never called */
    (void)D; (void)scale; (void)threads;
}
#endif

#ifndef HAVE_AMX
int sense_amx_init(void) { return 0; }
void sense_linear_bf16amx(const uint16_t *x, const uint16_t *P, int64_t pstride, float *y, void *out,
                          const void *res, const float *bias, int mode, int R, int K, int N, int threads) {
    (void)x; (void)P; (void)pstride; (void)y; (void)out; (void)res; (void)bias; (void)mode;    /* never called */
    (void)R; (void)K; (void)N; (void)threads;
}
#endif
int sense_has_amx(void) {
#ifdef HAVE_AMX
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------------- */
/* The decoder layers of a Llama-family forward in one call: per layer the same kernels, in the */
/* same order and on the same buffers, as decoding/lean_forward.py's loop runs them one ctypes  */
/* call at a time (so the same bits), without ~10 Python calls and torch ops per layer (1.5-2 ms */
/* of a 14 ms decode step on the AVX2 EPYC). Per layer l, w[10 l ..] holds the addresses of:   */
/* the input norm's weight, the fused q|k|v panels, their float32 bias (0: none), the output    */
/* projection's panels, the post-attention norm's weight, the fused gate|up panels, the down    */
/* projection's panels, Qwen3's per-head q and k norms' weights (0: none; they run on q|k|v     */
/* before the rotary embedding), 0; eps[3 l], eps[3 l + 1], eps[3 l + 2] the input, post-       */
/* attention and head norms' epsilons. kind: how the linears                                    */
/* run (0 float32 weights; 1 bfloat16 weights on the 8-lane kernel, activations widened into   */
/* xf; 2 pair-packed bfloat16 on vdpbf16ps; 3 the same panels on AMX tiles where K allows).     */
/* x [R, H] is the residual stream, updated in place; h, qkv, attn, gu, act are scratch; the    */
/* requests' caches and visible lists as sense_attention_*_multi takes them; after layer        */
/* capture_after (1-based; 0: none) x is copied to captured.                                    */
static void layer_linear(int kind, const void *x, float *xf, const void *P, void *out, const void *res,
                         const float *bias, int mode, int R, int K, int N, int threads) {
    float *y = (mode == 0 || mode == 4) ? (float *)out : 0;
    if (kind == 0) {
        sense_linear_f32((const float *)x, (const float *)P, (int64_t)PANEL * K, y, out, res, bias, mode, R, K, N,
                         threads);
    } else if (kind == 1) {
        const uint16_t *xb = (const uint16_t *)x;
        for (size_t i = 0; i < (size_t)R * K; i++) xf[i] = bf16_f32(xb[i]);
        sense_linear_bf16(xf, (const uint16_t *)P, (int64_t)PANEL * K, y, out, res, bias, mode, R, K, N, threads);
    } else if (kind == 3 && (K / 2) % 16 == 0) {
        sense_linear_bf16amx((const uint16_t *)x, (const uint16_t *)P, (int64_t)PANEL * K, y, out, res, bias, mode,
                             R, K, N, threads);
    } else {
        sense_linear_bf16dp((const uint16_t *)x, (const uint16_t *)P, (int64_t)PANEL * K, y, out, res, bias, mode,
                            R, K, N, threads);
    }
}

void sense_decoder_layers(void *x, void *h, void *qkv, void *attn, void *gu, void *act, float *xf,
                          const int64_t *w, const float *eps, int kind, int R, int L, int Hd, int heads, int groups,
                          int D, int I, const void *cos, const void *sin, const int64_t *bufs, const int64_t *caps,
                          const int64_t *starts, const int32_t *bounds, int B, const int32_t *req,
                          const int32_t *rowptr, const int32_t *idx, float scale, int capture_after, void *captured,
                          int threads) {
    const int bf16 = kind != 0;
    const int nq = (heads + 2 * groups) * D, ha = heads * D;
    const size_t es = bf16 ? 2 : 4;
    for (int l = 0; l < L; l++) {
        const int64_t *p = w + 10 * (size_t)l;
        sense_rmsnorm(x, (const void *)p[0], h, R, Hd, eps[3 * l], bf16, threads);
        layer_linear(kind, h, xf, (const void *)p[1], qkv, 0, (const float *)p[2], bf16 ? 1 : 0, R, Hd, nq, threads);
        if (p[7]) sense_rmsnorm_heads(qkv, nq, R, 0, heads, D, (const void *)p[7], eps[3 * l + 2], bf16, threads);
        if (p[8]) sense_rmsnorm_heads(qkv, nq, R, heads, groups, D, (const void *)p[8], eps[3 * l + 2], bf16, threads);
        sense_rope_kv_multi(qkv, nq, heads, groups, D, cos, sin, bufs, caps, starts, bounds, B, L, l, bf16, threads);
        if (bf16)
            sense_attention_bf16_multi(qkv, nq, bufs, caps, req, rowptr, idx, attn, ha, 1, R, heads, groups, D, L,
                                       l, scale, 0.f, threads);
        else
            sense_attention_f32_multi(qkv, nq, bufs, caps, req, rowptr, idx, attn, ha, 0, R, heads, groups, D, L, l,
                                      scale, 0.f, threads);
        layer_linear(kind, attn, xf, (const void *)p[3], x, x, 0, bf16 ? 2 : 3, R, ha, Hd, threads);
        sense_rmsnorm(x, (const void *)p[4], h, R, Hd, eps[3 * l + 1], bf16, threads);
        layer_linear(kind, h, xf, (const void *)p[5], gu, 0, 0, bf16 ? 1 : 0, R, Hd, 2 * I, threads);
        sense_silu_mul(gu, act, R, I, bf16, threads);
        layer_linear(kind, act, xf, (const void *)p[6], x, x, 0, bf16 ? 2 : 3, R, I, Hd, threads);
        if (capture_after == l + 1) memcpy(captured, x, (size_t)R * Hd * es);
    }
}
