"""C source of the fused CPU kernels (compiled and loaded by :mod:`dist_quant.compress.fast`).

Kept as a Python string so that it ships inside the package with no build step at install time.
Plain C99 plus GCC's ``_Float16``; no Python or torch headers, so compiling takes well under a
second. Every function works on a coordinate range so that callers can split a tensor across
threads; ranges start on a multiple of 8 coordinates (a byte boundary of the bit stream for
every k) and, for the fused encoder, on a bucket boundary.

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

#define DRAW_BITS 24
#define BLOCK 4096  /* coordinates quantised into the scratch array at a time */

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

/* ---- quantise [c0, c1) with fp32 header values a, b (per bucket) into packed bits --------- */
static void quantize_range(const float *x, int64_t d, int k, const float *a, const float *b,
                           uint32_t s, uint32_t m, uint8_t *bits, int64_t c0, int64_t c1) {
    uint8_t t[BLOCK];
    const float levels = (float)((1 << k) - 1);
    for (int64_t blk = c0; blk < c1; blk += BLOCK) {
        int64_t end = blk + BLOCK < c1 ? blk + BLOCK : c1;
        for (int64_t i0 = blk; i0 < end;) {
            int64_t j = i0 / d;
            int64_t i1 = (j + 1) * d < end ? (j + 1) * d : end;
            float aj = a[j], bj = b[j];
            float div = aj > 0 ? aj : 1.0f;
            float live = aj > 0 ? 1.0f : 0.0f;
            uint32_t base = (uint32_t)i0 * m + s;
            uint8_t *tt = t + (i0 - blk);
            const float *xx = x + i0;
            int64_t len = i1 - i0;
            #pragma omp simd
            for (int64_t i = 0; i < len; i++) {
                float y = (xx[i] - bj) / div * live;
                y = y < 0.0f ? 0.0f : (y > levels ? levels : y);
                uint32_t q = (uint32_t)(y * 16777216.0f);
                uint32_t r = mix32(base + (uint32_t)i * m) >> (32 - DRAW_BITS);
                tt[i] = (uint8_t)(((uint64_t)q + r) >> DRAW_BITS);
            }
            i0 = i1;
        }
        pack(t, end - blk, k, bits + (blk * k) / 8);
    }
}

/* min, max and the count of non-finite values of x[c0, c1) */
static int64_t minmax(const float *x, int64_t c0, int64_t c1, float *lo_out, float *hi_out) {
    float lo = INFINITY, hi = -INFINITY, bad = 0.0f;
    #pragma omp simd reduction(min:lo) reduction(max:hi) reduction(+:bad)
    for (int64_t i = c0; i < c1; i++) {
        float v = x[i];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
        bad += v * 0.0f;  /* NaN as soon as one value is NaN or +-Inf */
    }
    *lo_out = lo;
    *hi_out = hi;
    if (bad == 0.0f) return 0;
    int64_t count = 0;
    for (int64_t i = c0; i < c1; i++) count += !isfinite(x[i]);
    return count;
}

/* Public: min/max/non-finite count of a range (whole-tensor or large buckets: pass 1). */
int64_t dq_minmax(const float *x, int64_t c0, int64_t c1, float *lohi) {
    return minmax(x, c0, c1, lohi, lohi + 1);
}

/* Public: pass 2 with fp32 header values already known (whole-tensor or large buckets). */
void dq_quantize(const float *x, int64_t d, int k, const float *a, const float *b,
                 uint32_t s, uint32_t m, uint8_t *bits, int64_t c0, int64_t c1) {
    quantize_range(x, d, k, a, b, s, m, bits, c0, c1);
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
                       bits + (j0 * d * k) / 8, 0, ce - cs);
    }
    return bad ? bad : (overflow ? -1 : 0);
}

/* Public: decode [c0, c1) (c0 a multiple of 8) into out: a t + b with fp32 header values. */
void dq_decode(const uint8_t *bits, int64_t d, int k, const float *a, const float *b,
               float *out, int64_t c0, int64_t c1) {
    uint8_t t[BLOCK];
    for (int64_t blk = c0; blk < c1; blk += BLOCK) {
        int64_t end = blk + BLOCK < c1 ? blk + BLOCK : c1;
        unpack(bits + (blk * k) / 8, end - blk, k, t);
        for (int64_t i0 = blk; i0 < end;) {
            int64_t j = i0 / d;
            int64_t i1 = (j + 1) * d < end ? (j + 1) * d : end;
            float aj = a[j], bj = b[j];
            const uint8_t *tt = t + (i0 - blk);
            float *oo = out + i0;
            int64_t len = i1 - i0;
            #pragma omp simd
            for (int64_t i = 0; i < len; i++) oo[i] = (float)tt[i] * aj + bj;
            i0 = i1;
        }
    }
}

/* Public: mean of W decodes over [c0, c1): rows of packed bits at a stride of row_stride
   bytes, header values a, b as [W, nb] fp32. Sums in row order, then divides by W. */
void dq_decode_mean(const uint8_t *bits, int64_t row_stride, int64_t w_count, int64_t nb,
                    int64_t d, int k, const float *a, const float *b, float *out,
                    int64_t c0, int64_t c1) {
    uint8_t t[BLOCK];
    const float wf = (float)w_count;
    for (int64_t blk = c0; blk < c1; blk += BLOCK) {
        int64_t end = blk + BLOCK < c1 ? blk + BLOCK : c1;
        float *acc = out + blk;
        int64_t len_blk = end - blk;
        for (int64_t i = 0; i < len_blk; i++) acc[i] = 0.0f;
        for (int64_t w = 0; w < w_count; w++) {
            unpack(bits + w * row_stride + (blk * k) / 8, len_blk, k, t);
            for (int64_t i0 = blk; i0 < end;) {
                int64_t j = i0 / d;
                int64_t i1 = (j + 1) * d < end ? (j + 1) * d : end;
                float aj = a[w * nb + j], bj = b[w * nb + j];
                const uint8_t *tt = t + (i0 - blk);
                float *oo = out + i0;
                int64_t len = i1 - i0;
                #pragma omp simd
                for (int64_t i = 0; i < len; i++) oo[i] = oo[i] + ((float)tt[i] * aj + bj);
                i0 = i1;
            }
        }
        #pragma omp simd
        for (int64_t i = 0; i < len_blk; i++) acc[i] = acc[i] / wf;
    }
}

/* Public: the raw draws r_i for coordinates [c0, c1) (for tests of the stream). */
void dq_draws(uint32_t s, uint32_t m, int64_t c0, int64_t c1, uint32_t *out) {
    for (int64_t i = c0; i < c1; i++) out[i - c0] = mix32((uint32_t)i * m + s) >> (32 - DRAW_BITS);
}
"""
