"""C source of the fused CPU kernels (compiled and loaded by :mod:`dist_quant.compress.fast`).

Kept as a Python string so that it ships inside the package with no build step at install time.
Plain C (gnu11) plus GCC's ``_Float16``, with AVX-512 intrinsics where ``-march=native``
offers them (the portable loops otherwise; both give identical results); no Python or torch
headers, so compiling takes about a second. Every function works on a coordinate range so
that callers can split a tensor across threads; ranges start on a multiple of 8 coordinates (a
byte boundary of the bit stream for every k) and, for the fused encoder, on a bucket boundary.

The arithmetic mirrors the pure-torch path of :mod:`dist_quant.compress.quantize` operation by
operation (compiled with ``-ffp-contract=off``, so no fused multiply-adds): headers and decodes
are bit-identical to it; only the stream of random integers differs.

Random draws: a counter-based generator, ``r_i = mix32(i m + s) >> 8`` with the 32-bit keys
``s`` and odd ``m`` drawn from the caller's torch.Generator and ``mix32`` the "lowbias32" integer
hash (C. Wellons, hash-prospector), a bijection of 32-bit words; the counter ``i`` is the
coordinate's index (the fast path serves tensors below 2^31 coordinates). For a uniform ``s`` every
``r_i`` is exactly uniform on ``0..2^24 - 1`` (a bijection of a uniform word is uniform), which is
all that unbiasedness needs; independence between coordinates rests on the hash's avalanche
(tested). Counter-based: the draw of coordinate i does not depend on how the work is split.
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define DRAW_BITS 24
#define BLOCK 4096  /* coordinates quantised into the scratch array at a time */
#define PREFETCH 4096  /* software prefetch distance in coordinates (16 KiB) for streams */

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

/* ---- header types: 0 fp32, 1 fp16, 2 bf16; values handled as their bit patterns ---------- */
static double hval(int hdt, uint32_t u) {
    if (hdt == 0) { float f; memcpy(&f, &u, 4); return (double)f; }
    if (hdt == 1) { uint16_t v = (uint16_t)u; _Float16 h; memcpy(&h, &v, 2); return (double)h; }
    { uint32_t w = u << 16; float f; memcpy(&f, &w, 4); return (double)f; }
}
static uint32_t hnearest(int hdt, double v) {
    float f = (float)v; uint32_t w; memcpy(&w, &f, 4);
    if (hdt == 0) return w;
    if (hdt == 1) { _Float16 h = (_Float16)f; uint16_t u; memcpy(&u, &h, 2); return u; }
    return w >> 16;  /* truncation; the callers step to the right neighbour */
}
/* next value up / down in the type's order (sign-magnitude bit patterns) */
static uint32_t hstep(int hdt, uint32_t u, int up) {
    uint32_t sign = hdt == 0 ? 0x80000000U : 0x8000U;
    if ((u & ~sign) == 0) return up ? 1U : (sign | 1U);   /* +-0 -> smallest denormal */
    int neg = (u & sign) != 0;
    return (up != neg) ? u + 1 : u - 1;
}
static uint32_t hround_down(int hdt, double v) {
    uint32_t u = hnearest(hdt, v);
    while (hval(hdt, u) > v) u = hstep(hdt, u, 0);
    while (hval(hdt, hstep(hdt, u, 1)) <= v) u = hstep(hdt, u, 1);
    return u;
}
static uint32_t hround_up(int hdt, double v) {
    uint32_t u = hnearest(hdt, v);
    while (hval(hdt, u) < v) u = hstep(hdt, u, 1);
    while (hval(hdt, hstep(hdt, u, 0)) >= v) u = hstep(hdt, u, 0);
    return u;
}
static void hstore(int hdt, uint8_t *dst, int64_t j, uint32_t u) {
    if (hdt == 0) memcpy(dst + 4 * j, &u, 4);
    else { uint16_t v = (uint16_t)u; memcpy(dst + 2 * j, &v, 2); }
}

/* ---- bit packing: 8 values -> k bytes, LSB first ------------------------------------------ */
static void pack(const uint8_t *t, int64_t count, int k, uint8_t *out) {
    int64_t full = count / 8;
    if (k == 1) {
        for (int64_t j = 0; j < full; j++) {
            const uint8_t *s = t + 8 * j;
            out[j] = (uint8_t)(s[0] | s[1] << 1 | s[2] << 2 | s[3] << 3 | s[4] << 4 |
                               s[5] << 5 | s[6] << 6 | s[7] << 7);
        }
    } else if (k == 8) {
        memcpy(out, t, (size_t)(8 * full));
    } else if (k == 2 || k == 4) {
        /* 8 values, one per byte of a little-endian word, folded into k bytes */
        for (int64_t j = 0; j < full; j++) {
            uint64_t w;
            memcpy(&w, t + 8 * j, 8);
            if (k == 4) {
                w = (w | (w >> 4)) & 0x00FF00FF00FF00FFULL;
                w = (w | (w >> 8)) & 0x0000FFFF0000FFFFULL;
                w = (w | (w >> 16)) & 0xFFFFFFFFULL;
                memcpy(out + 4 * j, &w, 4);
            } else {
                w = (w | (w >> 6)) & 0x000F000F000F000FULL;
                w = (w | (w >> 12)) & 0x000000FF000000FFULL;
                w = (w | (w >> 24)) & 0xFFFFULL;
                uint16_t h = (uint16_t)w;
                memcpy(out + 2 * j, &h, 2);
            }
        }
    } else {
        for (int64_t j = 0; j < full; j++) {
            uint64_t w = 0;
            for (int q = 0; q < 8; q++) w |= (uint64_t)t[8 * j + q] << (q * k);
            for (int q = 0; q < k; q++) out[j * k + q] = (uint8_t)(w >> (8 * q));
        }
    }
    int64_t rest = count - 8 * full;
    if (rest) {
        uint64_t w = 0;
        for (int q = 0; q < rest; q++) w |= (uint64_t)t[8 * full + q] << (q * k);
        for (int q = 0; q < (rest * k + 7) / 8; q++) out[full * k + q] = (uint8_t)(w >> (8 * q));
    }
}

static void unpack(const uint8_t *in, int64_t count, int k, uint8_t *t) {
    uint8_t mask = (uint8_t)((1U << k) - 1U);
    if (k == 1) {
        for (int64_t i = 0; i < count; i++) t[i] = (in[i >> 3] >> (i & 7)) & 1;
    } else if (k == 2 || k == 4 || k == 8) {
        int per = 8 / k;
        for (int64_t i = 0; i < count; i++)
            t[i] = (uint8_t)((in[i / per] >> ((i % per) * k)) & mask);
    } else {
        for (int64_t i = 0; i < count; i++) {
            int64_t bit = i * k;
            uint32_t w = in[bit >> 3];
            if ((bit & 7) + k > 8) w |= (uint32_t)in[(bit >> 3) + 1] << 8;
            t[i] = (uint8_t)((w >> (bit & 7)) & mask);
        }
    }
}

/* ---- non-temporal copy of a finished block to the output (large outputs only) ------------- */
static void flush(float *dst, const float *src, int64_t len, int nt) {
#if defined(__SSE2__)
    if (nt) {
        int64_t i = 0;
        while (i < len && ((uintptr_t)(dst + i) & 15)) { dst[i] = src[i]; i++; }
        for (; i + 4 <= len; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
        for (; i < len; i++) dst[i] = src[i];
        return;
    }
#endif
    (void)nt;
    memcpy(dst, src, (size_t)len * sizeof(float));
}

static void fence(int nt) {
#if defined(__SSE2__)
    if (nt) _mm_sfence();
#endif
    (void)nt;
}

/* per-bucket multiplier: 1 / a, 0 for a constant bucket; slow = 1 when 1 / a overflows (a
   denormal), where the kernels divide instead (the pure-torch path does the same) */
static inline float bucket_mul(float a, int *slow) {
    float mul = a > 0 ? 1.0f / a : 0.0f;
    *slow = isinf(mul);
    return mul;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define DQ_AVX512 1
static inline __m512i mix32_v(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846ca68bU));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    return x;
}
static inline __mmask16 lanes(int64_t p, int64_t i0, int64_t i1) {
    int64_t lo = i0 - p > 0 ? i0 - p : 0, hi = i1 - p < 16 ? i1 - p : 16;
    return (__mmask16)(((1U << hi) - 1U) & ~((1U << lo) - 1U));
}
/* the hash inputs i m + s of the 16 coordinates p..p+15 */
static inline __m512i counters(int64_t p, uint32_t s, uint32_t m) {
    return _mm512_add_epi32(
        _mm512_set1_epi32((int)((uint32_t)p * m + s)),
        _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                             15), _mm512_set1_epi32((int)m)));
}
/* one bucket segment [i0, i1) of the block starting at blk, k = 1: bit masks into masks[].
   Same arithmetic as the scalar loop below, minus the clamps, which cannot change a 1-bit
   result (y >= 0 since x >= b; any y >= 1 gives t = 1), and with the scale 2^24 folded into
   the multiplier (exact: a power of two; the caller checks that mul 2^24 is finite).
   pf > 0: prefetch the same position pf elements ahead (the next chunk) into L2. */
static void quantize1_segment(const float *x, float bj, float mul, uint32_t s, uint32_t m,
                              uint16_t *masks, int64_t blk, int64_t i0, int64_t i1,
                              int64_t pf) {
    const __m512 vb = _mm512_set1_ps(bj), vm = _mm512_set1_ps(mul * 16777216.0f);
    const __m512i vthr = _mm512_set1_epi32(1 << DRAW_BITS);
    const __m512i step = _mm512_set1_epi32((int)(16U * m));
    int64_t v = (i0 - blk) >> 4;
    __m512i ctr = counters(blk + 16 * v, s, m);
    for (; blk + 16 * v < i1; v++) {
        int64_t p = blk + 16 * v;
        if (pf) _mm_prefetch((const char *)(x + p + pf), _MM_HINT_T1);
        __mmask16 lm = lanes(p, i0, i1);
        __m512 xv = _mm512_maskz_loadu_ps(lm, x + p);
        __m512i q = _mm512_cvttps_epu32(_mm512_mul_ps(_mm512_sub_ps(xv, vb), vm));
        __m512i r = _mm512_srli_epi32(mix32_v(ctr), 32 - DRAW_BITS);
        masks[v] |= _mm512_mask_cmpge_epu32_mask(lm, _mm512_add_epi32(q, r), vthr);
        ctr = _mm512_add_epi32(ctr, step);
    }
}

/* one bucket segment, any k: level indices t (one byte each) into t[] at (p - blk); clamps
   y to L (rounding can exceed it), scale folded as in quantize1_segment */
static void quantizek_segment(const float *x, float bj, float mul, float levels, uint32_t s,
                              uint32_t m, uint8_t *t, int64_t blk, int64_t i0, int64_t i1,
                              int64_t pf) {
    const __m512 vb = _mm512_set1_ps(bj), vm = _mm512_set1_ps(mul * 16777216.0f);
    const __m512 top = _mm512_set1_ps(levels * 16777216.0f);
    const __m512i step = _mm512_set1_epi32((int)(16U * m));
    int64_t v = (i0 - blk) >> 4;
    __m512i ctr = counters(blk + 16 * v, s, m);
    for (; blk + 16 * v < i1; v++) {
        int64_t p = blk + 16 * v;
        if (pf) _mm_prefetch((const char *)(x + p + pf), _MM_HINT_T1);
        __mmask16 lm = lanes(p, i0, i1);
        __m512 xv = _mm512_maskz_loadu_ps(lm, x + p);
        __m512 y = _mm512_min_ps(_mm512_mul_ps(_mm512_sub_ps(xv, vb), vm), top);
        __m512i q = _mm512_cvttps_epu32(y);
        __m512i r = _mm512_srli_epi32(mix32_v(ctr), 32 - DRAW_BITS);
        __m512i tv = _mm512_srli_epi32(_mm512_add_epi32(q, r), DRAW_BITS);
        _mm512_mask_cvtepi32_storeu_epi8(t + (p - blk), lm, tv);
        ctr = _mm512_add_epi32(ctr, step);
    }
}
#endif

/* ---- quantise [c0, c1) with per-bucket fp32 a, b into packed bits ------------------------- */
static void quantize_range(const float *x, int64_t d, int k, const float *a, const float *b,
                           uint32_t s, uint32_t m, uint8_t *bits, int64_t c0, int64_t c1,
                           int64_t pf) {
    uint8_t t[BLOCK];
    const float levels = (float)((1 << k) - 1);
    for (int64_t blk = c0; blk < c1; blk += BLOCK) {
        int64_t end = blk + BLOCK < c1 ? blk + BLOCK : c1;
#ifdef DQ_AVX512
        uint16_t masks[BLOCK / 16 + 1];
        int vector_ok = k == 1;
        if (vector_ok) memset(masks, 0, sizeof(masks));
#else
        int vector_ok = 0;
        (void)pf;
#endif
        for (int64_t i0 = blk; i0 < end;) {
            int64_t j = i0 / d;
            int64_t i1 = (j + 1) * d < end ? (j + 1) * d : end;
            float bj = b[j];
            int slow;
            float mul = bucket_mul(a[j], &slow);
#ifdef DQ_AVX512
            if (vector_ok && !slow && isfinite(mul * 16777216.0f)) {
                quantize1_segment(x, bj, mul, s, m, masks, blk, i0, i1, pf);
                i0 = i1;
                continue;
            }
            if (!vector_ok && !slow && isfinite(mul * 16777216.0f)) {
                quantizek_segment(x, bj, mul, levels, s, m, t, blk, i0, i1, pf);
                i0 = i1;
                continue;
            }
#endif
            uint32_t base = (uint32_t)i0 * m + s;
            uint8_t *tt = t + (i0 - blk);
            const float *xx = x + i0;
            int64_t len = i1 - i0;
            if (slow) {
                for (int64_t i = 0; i < len; i++) {
                    float y = (xx[i] - bj) / a[j];
                    y = y < 0.0f ? 0.0f : (y > levels ? levels : y);
                    uint32_t q = (uint32_t)(y * 16777216.0f);
                    uint32_t r = mix32(base + (uint32_t)i * m) >> (32 - DRAW_BITS);
                    tt[i] = (uint8_t)((q + r) >> DRAW_BITS);
                }
            } else {
                #pragma omp simd
                for (int64_t i = 0; i < len; i++) {
                    float y = (xx[i] - bj) * mul;
                    y = y < 0.0f ? 0.0f : (y > levels ? levels : y);
                    uint32_t q = (uint32_t)(y * 16777216.0f);
                    uint32_t r = mix32(base + (uint32_t)i * m) >> (32 - DRAW_BITS);
                    tt[i] = (uint8_t)((q + r) >> DRAW_BITS);
                }
            }
#ifdef DQ_AVX512
            if (vector_ok) {  /* a slow bucket inside a vectorised block: merge its bits */
                for (int64_t i = i0; i < i1; i++)
                    masks[(i - blk) >> 4] |= (uint16_t)(t[i - blk] << ((i - blk) & 15));
            }
#endif
            i0 = i1;
        }
#ifdef DQ_AVX512
        if (vector_ok) {
            memcpy(bits + blk / 8, masks, (size_t)((end - blk + 7) / 8));
            continue;
        }
#endif
        pack(t, end - blk, k, bits + (blk * k) / 8);
    }
}

/* ---- decode one block [blk, end) of one row: dst = a t + b, or dst += a t + b (acc) ----- */
static void decode_block(const uint8_t *bits, int64_t d, int k, const float *a, const float *b,
                         float *dst, int64_t blk, int64_t end, int acc) {
    uint8_t t[BLOCK];
#ifdef DQ_AVX512
    if (k == 1) {
        for (int64_t i0 = blk; i0 < end;) {
            int64_t j = i0 / d;
            int64_t i1 = (j + 1) * d < end ? (j + 1) * d : end;
            const __m512 v0 = _mm512_set1_ps(0.0f * a[j] + b[j]);
            const __m512 v1 = _mm512_set1_ps(1.0f * a[j] + b[j]);
            for (int64_t v = (i0 - blk) >> 4; blk + 16 * v < i1; v++) {
                int64_t p = blk + 16 * v;
                uint16_t word = bits[p / 8];
                if (end - p > 8) word |= (uint16_t)(bits[p / 8 + 1] << 8);
                __m512 vals = _mm512_mask_blend_ps((__mmask16)word, v0, v1);
                __mmask16 lm = lanes(p, i0, i1);
                float *o = dst + (p - blk);
                if (acc) vals = _mm512_add_ps(_mm512_maskz_loadu_ps(lm, o), vals);
                _mm512_mask_storeu_ps(o, lm, vals);
            }
            i0 = i1;
        }
        return;
    }
    if (k == 2 || k == 4 || k == 8) {
        /* 16 values span 2k bytes: spread them over the lanes, shift, mask, scale */
        const __m512i shifts = k == 2
            ? _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
            : _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
        const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        const __m512i mask = _mm512_set1_epi32((1 << k) - 1);
        for (int64_t i0 = blk; i0 < end;) {
            int64_t j = i0 / d;
            int64_t i1 = (j + 1) * d < end ? (j + 1) * d : end;
            const __m512 va = _mm512_set1_ps(a[j]), vb = _mm512_set1_ps(b[j]);
            for (int64_t v = (i0 - blk) >> 4; blk + 16 * v < i1; v++) {
                int64_t p = blk + 16 * v;
                int64_t have = end - p < 16 ? end - p : 16;
                const uint8_t *src = bits + p * k / 8;
                uint8_t raw[16] = {0};
                if (have < 16) {  /* the tail: copy only the bytes that exist */
                    memcpy(raw, src, (size_t)((have * k + 7) / 8));
                    src = raw;
                }
                __m512i tv;
                if (k == 8) {
                    tv = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)src));
                } else {
                    /* loads of the exact width (a wider load of a narrower store would
                       stall on store forwarding) */
                    __m512i words;
                    if (k == 2) {
                        uint32_t w;
                        memcpy(&w, src, 4);
                        words = _mm512_set1_epi32((int)w);
                    } else {
                        uint64_t w;
                        memcpy(&w, src, 8);
                        words = _mm512_permutexvar_epi32(pick, _mm512_set1_epi64((long long)w));
                    }
                    tv = _mm512_and_si512(_mm512_srlv_epi32(words, shifts), mask);
                }
                __m512 vals = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(tv), va), vb);
                __mmask16 lm = lanes(p, i0, i1);
                float *o = dst + (p - blk);
                if (acc) vals = _mm512_add_ps(_mm512_maskz_loadu_ps(lm, o), vals);
                _mm512_mask_storeu_ps(o, lm, vals);
            }
            i0 = i1;
        }
        return;
    }
#endif
    unpack(bits + (blk * k) / 8, end - blk, k, t);
    for (int64_t i0 = blk; i0 < end;) {
        int64_t j = i0 / d;
        int64_t i1 = (j + 1) * d < end ? (j + 1) * d : end;
        float aj = a[j], bj = b[j];
        const uint8_t *tt = t + (i0 - blk);
        float *oo = dst + (i0 - blk);
        int64_t len = i1 - i0;
        if (acc) {
            #pragma omp simd
            for (int64_t i = 0; i < len; i++) oo[i] = oo[i] + ((float)tt[i] * aj + bj);
        } else {
            #pragma omp simd
            for (int64_t i = 0; i < len; i++) oo[i] = (float)tt[i] * aj + bj;
        }
        i0 = i1;
    }
}

/* min, max and the count of non-finite values of x[c0, c1) */
static int64_t count_nonfinite(const float *x, int64_t c0, int64_t c1) {
    int64_t count = 0;
    for (int64_t i = c0; i < c1; i++) count += !isfinite(x[i]);
    return count;
}

static int64_t minmax(const float *x, int64_t c0, int64_t c1, float *lo_out, float *hi_out) {
    float lo = INFINITY, hi = -INFINITY;
    uint32_t expo = 0;  /* largest exponent field seen: all ones iff a NaN or +-Inf */
    int64_t i = c0;
#ifdef DQ_AVX512
    /* four independent accumulators: the reduction is bound by memory, not by latency */
    __m512 l0 = _mm512_set1_ps(INFINITY), l1 = l0, l2 = l0, l3 = l0;
    __m512 h0 = _mm512_set1_ps(-INFINITY), h1 = h0, h2 = h0, h3 = h0;
    __m512i e0 = _mm512_setzero_si512(), e1 = e0;
    const __m512i emask = _mm512_set1_epi32(0x7f800000);
    for (; i + 64 <= c1; i += 64) {
        for (int l = 0; l < 4; l++) _mm_prefetch((const char *)(x + i + PREFETCH + 16 * l),
                                                 _MM_HINT_T0);
        __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
        __m512 v2 = _mm512_loadu_ps(x + i + 32), v3 = _mm512_loadu_ps(x + i + 48);
        l0 = _mm512_min_ps(l0, v0); l1 = _mm512_min_ps(l1, v1);
        l2 = _mm512_min_ps(l2, v2); l3 = _mm512_min_ps(l3, v3);
        h0 = _mm512_max_ps(h0, v0); h1 = _mm512_max_ps(h1, v1);
        h2 = _mm512_max_ps(h2, v2); h3 = _mm512_max_ps(h3, v3);
        e0 = _mm512_max_epu32(e0, _mm512_and_si512(_mm512_castps_si512(v0), emask));
        e1 = _mm512_max_epu32(e1, _mm512_and_si512(_mm512_castps_si512(v1), emask));
        e0 = _mm512_max_epu32(e0, _mm512_and_si512(_mm512_castps_si512(v2), emask));
        e1 = _mm512_max_epu32(e1, _mm512_and_si512(_mm512_castps_si512(v3), emask));
    }
    lo = _mm512_reduce_min_ps(_mm512_min_ps(_mm512_min_ps(l0, l1), _mm512_min_ps(l2, l3)));
    hi = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(h0, h1), _mm512_max_ps(h2, h3)));
    expo = (uint32_t)_mm512_reduce_max_epu32(_mm512_max_epu32(e0, e1));
#endif
    #pragma omp simd reduction(min:lo) reduction(max:hi) reduction(max:expo)
    for (int64_t t = i; t < c1; t++) {
        float v = x[t];
        uint32_t u;
        memcpy(&u, &v, 4);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
        u &= 0x7f800000U;
        expo = u > expo ? u : expo;
    }
    *lo_out = lo;
    *hi_out = hi;
    return expo == 0x7f800000U ? count_nonfinite(x, c0, c1) : 0;
}

/* Public: min/max/non-finite count of a range (whole-tensor or large buckets: pass 1). */
int64_t dq_minmax(const float *x, int64_t c0, int64_t c1, float *lohi) {
    return minmax(x, c0, c1, lohi, lohi + 1);
}

/* Public: pass 2 with fp32 header values already known (whole-tensor or large buckets). */
void dq_quantize(const float *x, int64_t d, int k, const float *a, const float *b,
                 uint32_t s, uint32_t m, uint8_t *bits, int64_t c0, int64_t c1) {
    quantize_range(x, d, k, a, b, s, m, bits, c0, c1, PREFETCH);
}

/* Public: fused encoder for buckets [c0, c1) (c0 on a bucket boundary and a multiple of 8):
   per chunk of whole buckets, min/max -> outward-rounded headers -> draws -> packed bits,
   while the chunk is in cache. Returns the number of non-finite inputs, or -1 if a header
   does not fit its type (0: all written). */
int64_t dq_encode_fused(const float *x, int64_t n, int64_t d, int k, int hdt, uint32_t s,
                        uint32_t m, uint8_t *a_out, uint8_t *b_out, uint8_t *bits,
                        int64_t c0, int64_t c1, int64_t chunk) {
    enum { MAXB = 8192 };
    float a32[MAXB], b32[MAXB];
    const double levels = (double)((1 << k) - 1);
    int64_t bad = 0, overflow = 0;
    for (int64_t cs = c0; cs < c1; cs += chunk) {
        int64_t ce = cs + chunk < c1 ? cs + chunk : c1;
        int64_t j0 = cs / d, j1 = (ce + d - 1) / d;
        for (int64_t j = j0; j < j1; j++) {
            int64_t e = (j + 1) * d < n ? (j + 1) * d : n;
            float lo, hi;
            int64_t nb = minmax(x, j * d, e, &lo, &hi);
            if (nb) { bad += nb; lo = hi = 0.0f; }
            uint32_t bu = hround_down(hdt, (double)lo);
            double bv = hval(hdt, bu);
            uint32_t au = hround_up(hdt, ((double)hi - bv) / levels);
            if (bv + levels * hval(hdt, au) < (double)hi) au = hstep(hdt, au, 1);
            if (!isfinite(bv) || !isfinite(hval(hdt, au))) overflow = 1;
            hstore(hdt, a_out, j, au);
            hstore(hdt, b_out, j, bu);
            a32[j - j0] = (float)hval(hdt, au);
            b32[j - j0] = (float)bv;
        }
        if (bad || overflow) continue;
        quantize_range(x + j0 * d, d, k, a32, b32, s + (uint32_t)(j0 * d) * m, m,
                       bits + (j0 * d * k) / 8, 0, ce - cs, ce < c1 ? chunk : 0);
    }
    return bad ? bad : (overflow ? -1 : 0);
}

/* Public: header values of `rows` payloads (row_stride bytes apart) as fp32, and the number
   of invalid ones (non-finite or negative scale a, non-finite offset b). */
int64_t dq_headers(const uint8_t *a_raw, const uint8_t *b_raw, int64_t row_stride,
                   int64_t rows, int64_t nb, int hdt, float *a32, float *b32) {
    int64_t bad = 0, hb = hdt == 0 ? 4 : 2;
    for (int64_t w = 0; w < rows; w++) {
        for (int64_t j = 0; j < nb; j++) {
            uint32_t au = 0, bu = 0;
            memcpy(&au, a_raw + w * row_stride + j * hb, (size_t)hb);
            memcpy(&bu, b_raw + w * row_stride + j * hb, (size_t)hb);
            double av = hval(hdt, au), bv = hval(hdt, bu);
            bad += !isfinite(av) || av < 0 || !isfinite(bv);
            a32[w * nb + j] = (float)av;
            b32[w * nb + j] = (float)bv;
        }
    }
    return bad;
}

/* Public: decode [c0, c1) (c0 a multiple of 8) into out: a t + b with fp32 header values.
   nt = 1: non-temporal stores (outputs much larger than the caches). */
void dq_decode(const uint8_t *bits, int64_t d, int k, const float *a, const float *b,
               float *out, int64_t c0, int64_t c1, int nt) {
    float tmp[BLOCK];
    for (int64_t blk = c0; blk < c1; blk += BLOCK) {
        int64_t end = blk + BLOCK < c1 ? blk + BLOCK : c1;
        if (nt) {
            decode_block(bits, d, k, a, b, tmp, blk, end, 0);
            flush(out + blk, tmp, end - blk, 1);
        } else {
            decode_block(bits, d, k, a, b, out + blk, blk, end, 0);
        }
    }
    fence(nt);
}

/* Public: mean of W decodes over [c0, c1): rows of packed bits at a stride of row_stride
   bytes, header values a, b as [W, nb] fp32. Sums in row order from zero, then divides by W
   (the pure-torch path's order of operations, so the results are identical). */
void dq_decode_mean(const uint8_t *bits, int64_t row_stride, int64_t w_count, int64_t nb,
                    int64_t d, int k, const float *a, const float *b, float *out,
                    int64_t c0, int64_t c1, int nt) {
    float acc[BLOCK];
    const float wf = (float)w_count;
    for (int64_t blk = c0; blk < c1; blk += BLOCK) {
        int64_t end = blk + BLOCK < c1 ? blk + BLOCK : c1;
        int64_t len = end - blk;
        memset(acc, 0, sizeof(float) * (size_t)len);
        for (int64_t w = 0; w < w_count; w++)
            decode_block(bits + w * row_stride, d, k, a + w * nb, b + w * nb, acc, blk, end, 1);
        if (w_count > 1) {
            #pragma omp simd
            for (int64_t i = 0; i < len; i++) acc[i] = acc[i] / wf;
        }
        flush(out + blk, acc, len, nt);
    }
    fence(nt);
}

/* Public: ask for transparent huge pages on the 2 MiB-aligned interior of a freshly allocated,
   not yet touched output (advice only: 32 page faults instead of 16384 for 64 MiB).
   Returns 0 on success or when the system has no such advice. */
int dq_advise_huge(void *p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t hi = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
    if (hi <= lo) return 0;
    return madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#else
    (void)p; (void)bytes;
    return 0;
#endif
}

/* Public: the raw draws r_i for coordinates [c0, c1) (for tests of the stream). */
void dq_draws(uint32_t s, uint32_t m, int64_t c0, int64_t c1, uint32_t *out) {
    for (int64_t i = c0; i < c1; i++) out[i - c0] = mix32((uint32_t)i * m + s) >> (32 - DRAW_BITS);
}
"""
