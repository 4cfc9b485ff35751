/* Fused CPU kernels of dist_quant's k-bit and sign compressors (see kernels_c.py for how they
   are built and fast.py for how they are called). One source for every CPU: the hot loops work
   on groups of 16 coordinates held in GCC/Clang vectors of the target's native width (one
   AVX-512 vector, two AVX2 vectors, four SSE2 or NEON vectors), so the same code runs at full
   width wherever it is compiled; plain C elsewhere (headers, tails, groups across buckets). */
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#define DRAW_BITS 24
#define BLOCK 4096  /* coordinates decoded into a scratch array at a time */
#define PREFETCH 4096  /* software prefetch distance in coordinates (16 KiB) for streams */

/* the draw hash: "lowbias32" (C. Wellons, hash-prospector), a bijection of 32-bit words */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

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

/* ---- vectors (GCC/Clang vector extensions) of the target's native width: 16 lanes on
   AVX-512, 8 on AVX2, 4 on SSE2 and NEON. The kernels work on groups of 16 coordinates (2k
   bytes of the bit stream), NV native vectors each; loops over the NV vectors of a group have
   constant trip counts and unroll, so the vectors stay in registers ---------------------- */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define VBYTES 64
#elif defined(__AVX2__)
#define VBYTES 32
#else
#define VBYTES 16
#endif
#define VL (VBYTES / 4)   /* lanes per native vector */
#define LANES 16          /* coordinates per group */
#define NV (LANES / VL)   /* native vectors per group */
typedef float vf __attribute__((vector_size(VBYTES)));
typedef int32_t vi __attribute__((vector_size(VBYTES)));
typedef uint32_t vu __attribute__((vector_size(VBYTES)));
typedef uint32_t vu4 __attribute__((vector_size(16)));
#define INLINE static inline __attribute__((always_inline))

#if VL == 16
static const vu LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#elif VL == 8
static const vu LANE = {0, 1, 2, 3, 4, 5, 6, 7};
#else
static const vu LANE = {0, 1, 2, 3};
#endif

INLINE vf loadf(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void storef(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE vf splatf(float f) { return (vf){0} + f; }
INLINE vu splatu(uint32_t u) { return (vu){0} + u; }
INLINE vf self(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }
INLINE vu selu(vi mask, vu yes, vu no) { return (yes & (vu)mask) | (no & ~(vu)mask); }

INLINE vu mix32v(vu x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

/* OR of all lanes (disjoint bits: their sum) */
INLINE uint32_t or_lanes(vu v) {
    vu4 q[VL / 4];
    memcpy(q, &v, sizeof q);
    vu4 acc = q[0];
    for (int i = 1; i < VL / 4; i++) acc |= q[i];
    return acc[0] | acc[1] | acc[2] | acc[3];
}

/* lane L of a group (0..15) of vector h: LANE + VL h */
#define GLANE(h) (LANE + (uint32_t)(VL * (h)))

/* pack the 16 level indices of a group (k in 1, 2, 4, 8; any k through the scalar loop) into
   2k bytes: index L takes stream bits [L k, (L + 1) k) */
INLINE void pack16(const vu *t, int k, uint8_t *out) {
#if defined(__SSE2__)
    if (k == 1) {  /* x86: the lanes' low bits moved to the sign and collected by movemask
                      (measured: the portable reduction below costs 15% of the encode) */
        uint32_t w = 0;
        for (int h = 0; h < NV; h++) {
#if VBYTES == 64
            w |= (uint32_t)_mm512_test_epi32_mask((__m512i)t[h], (__m512i)t[h]) << (VL * h);
#elif VBYTES == 32
            w |= (uint32_t)_mm256_movemask_ps((__m256)(t[h] << 31)) << (VL * h);
#else
            w |= (uint32_t)_mm_movemask_ps((__m128)(t[h] << 31)) << (VL * h);
#endif
        }
        uint16_t w16 = (uint16_t)w;
        memcpy(out, &w16, 2);
        return;
    }
#endif
    if (k == 1 || k == 2) {
        vu acc = t[0] << (GLANE(0) * (uint32_t)k);
        for (int h = 1; h < NV; h++) acc |= t[h] << (GLANE(h) * (uint32_t)k);
        uint32_t w = or_lanes(acc);
        memcpy(out, &w, (size_t)(2 * k));
    } else if (k == 4 || k == 8) {  /* 32 / k lanes per 32-bit word: 2 or 4 words */
        const int per = 32 / k;
        uint32_t w[4] = {0, 0, 0, 0};
        for (int h = 0; h < NV; h++) {
            vu s = t[h] << ((GLANE(h) & (uint32_t)(per - 1)) * (uint32_t)k);
            vu4 q[VL / 4];
            memcpy(q, &s, sizeof q);
            for (int i = 0; i < VL / 4; i++)  /* a quarter lies inside one word */
                w[(VL * h + 4 * i) / per] |= q[i][0] | q[i][1] | q[i][2] | q[i][3];
        }
        memcpy(out, w, (size_t)(2 * k));
    } else {
        uint32_t v[LANES];
        memcpy(v, t, sizeof v);
        uint64_t lo = 0, hi = 0;  /* 16 k <= 112 bits */
        for (int l = 0; l < LANES; l++) {
            int bit = l * k;
            if (bit < 64) {
                lo |= (uint64_t)v[l] << bit;
                if (bit + k > 64) hi |= (uint64_t)v[l] >> (64 - bit);
            } else {
                hi |= (uint64_t)v[l] << (bit - 64);
            }
        }
        memcpy(out, &lo, k * 2 < 8 ? (size_t)(k * 2) : 8);
        if (k * 2 > 8) memcpy(out + 8, &hi, (size_t)(k * 2 - 8));
    }
}

/* the 16 level indices stored in 2k bytes (the inverse of pack16) */
INLINE void unpack16(const uint8_t *in, int k, vu *t) {
    if (k == 1) {  /* a test of each lane's bit: no per-lane shifts (SSE2 has none) */
        uint16_t w;
        memcpy(&w, in, 2);
        for (int h = 0; h < NV; h++)
            t[h] = (vu)((splatu(w) & (1U << GLANE(h))) != 0U) & 1U;
    } else if (k == 2) {
        uint32_t w = 0;
        memcpy(&w, in, (size_t)(2 * k));
        for (int h = 0; h < NV; h++)
            t[h] = (splatu(w) >> (GLANE(h) * (uint32_t)k)) & ((1U << k) - 1U);
    } else if (k == 4 || k == 8) {  /* each lane picks its 32-bit word, then shifts */
        const int per = 32 / k;
        uint32_t w[4];
        memcpy(w, in, (size_t)(2 * k));
        for (int h = 0; h < NV; h++) {
            vu words = splatu(w[(VL * h) / per]);
            for (int q = (VL * h) / per + 1; q <= (VL * h + VL - 1) / per; q++)
                words = selu((vi)(GLANE(h) / (uint32_t)per == (uint32_t)q), splatu(w[q]), words);
            t[h] = (words >> ((GLANE(h) & (uint32_t)(per - 1)) * (uint32_t)k)) & ((1U << k) - 1U);
        }
    } else {
        uint32_t v[LANES];
        uint32_t mask = (1U << k) - 1U;
        for (int l = 0; l < LANES; l++) {
            int bit = l * k;
            uint32_t w = in[bit >> 3] | (uint32_t)in[(bit >> 3) + 1] << 8;
            v[l] = (w >> (bit & 7)) & mask;
        }
        memcpy(t, v, sizeof v);
    }
}

/* per-bucket multiplier: 1 / a, 0 for a constant bucket; slow = 1 when 1 / a overflows (a
   denormal), where the kernels divide instead (the pure-torch path does the same) */
static inline float bucket_mul(float a, int *slow) {
    float mul = a > 0 ? 1.0f / a : 0.0f;
    *slow = isinf(mul);
    return mul;
}

/* the level index of one coordinate, the documented rule written out (any bucket) */
static inline uint32_t quantize_one(float xi, float aj, float bj, float mul, int slow,
                                    float levels, uint32_t ctr) {
    float y = slow ? (xi - bj) / aj : (xi - bj) * mul;
    y = y < 0.0f ? 0.0f : (y > levels ? levels : y);
    uint32_t q = (uint32_t)(y * 16777216.0f);
    uint32_t r = mix32(ctr) >> (32 - DRAW_BITS);
    return (q + r) >> DRAW_BITS;
}

/* the level indices of the len <= 16 coordinates from g (bucket j ends at next), one at a
   time (0 past len); kept out of line so that the vector loops hold their vectors in registers */
static __attribute__((noinline)) void quantize_lanes(
        const float *x, int64_t d, const float *a, const float *b, uint32_t s, uint32_t m,
        float levels, int64_t g, int64_t len, int64_t j, int64_t next, uint32_t *t) {
    for (int l = 0; l < LANES; l++) {
        if (l >= len) { t[l] = 0; continue; }
        if (g + l >= next) { j++; next += d; }
        int slow;
        float mul = bucket_mul(a[j], &slow);
        t[l] = quantize_one(x[g + l], a[j], b[j], mul, slow, levels, (uint32_t)(g + l) * m + s);
    }
}

/* the headers of the len <= 16 coordinates from g, one at a time (as quantize_lanes) */
static __attribute__((noinline)) void header_lanes(
        int64_t d, const float *a, const float *b, int64_t g, int64_t len, int64_t j,
        int64_t next, float *ga, float *gb) {
    for (int l = 0; l < LANES; l++) {
        if (g + l >= next) { j++; next += d; }
        ga[l] = l < len ? a[j] : 0.0f;
        gb[l] = l < len && b ? b[j] : 0.0f;
    }
}

/* the level indices of one native vector inside one bucket: y 2^24 = (x - b) (2^24 / a) (the
   power of two folded into the multiplier: exact, the caller checks it is finite), clamped to
   L 2^24, truncated, plus the 24-bit draws, shifted down. x >= b, so y >= 0 needs no clamp;
   with k = 1 the top clamp cannot change t. k = 8: y 2^24 reaches 2^32, past the signed
   conversion, so the top half converts shifted down by 2^31 (exact in float). */
INLINE vu quantize_sum(vf x, float bj, float mul24, float top24, vu ctr, int k) {
    vf y = (x - bj) * mul24;
    if (k > 1) y = self(y > top24, splatf(top24), y);
    vu q;
    if (k < 8) {
        q = (vu)__builtin_convertvector(y, vi);
    } else {
        vi big = y >= 2147483648.0f;
        vf lowered = y - self(big, splatf(2147483648.0f), splatf(0.0f));
        q = (vu)__builtin_convertvector(lowered, vi) + ((vu)big & 0x80000000U);
    }
    vu r = mix32v(ctr) >> (32 - DRAW_BITS);
    return q + r;
}

/* the level indices t = (q + r) >> 24 of one native vector inside one bucket */
INLINE vu quantize_vec(vf x, float bj, float mul24, float top24, vu ctr, int k) {
    return quantize_sum(x, bj, mul24, top24, ctr, k) >> DRAW_BITS;
}

#if defined(__SSE2__)
/* x86: the sign bits of the lanes of one native vector */
INLINE uint32_t sign_mask(vu v) {
#if VBYTES == 64
    return (uint32_t)_mm512_cmplt_epi32_mask((__m512i)v, _mm512_setzero_si512());  /* AVX512F */
#elif VBYTES == 32
    return (uint32_t)_mm256_movemask_ps((__m256)v);
#else
    return (uint32_t)_mm_movemask_ps((__m128)v);
#endif
}

/* bit i of x moved to bit 2 i */
INLINE uint32_t spread16(uint32_t x) {
#if defined(__BMI2__)
    return _pdep_u32(x, 0x55555555U);
#else
    x = (x | x << 8) & 0x00ff00ffU;
    x = (x | x << 4) & 0x0f0f0f0fU;
    x = (x | x << 2) & 0x33333333U;
    return (x | x << 1) & 0x55555555U;
#endif
}

/* pack16 for k = 1, 2 from the sums q + r of a group (t = sum >> 24: its bits are bits 24
   and 25 of the sum), collected by movemask: no shifts down, no reduction across lanes */
INLINE void pack16_sums(const vu *sum, int k, uint8_t *out) {
    uint32_t lo = 0, hi = 0;
    for (int h = 0; h < NV; h++) {
        lo |= sign_mask(sum[h] << 7) << (VL * h);
        if (k == 2) hi |= sign_mask(sum[h] << 6) << (VL * h);
    }
    if (k == 1) {
        uint16_t w16 = (uint16_t)lo;
        memcpy(out, &w16, 2);
    } else {
        uint32_t w = spread16(lo) | spread16(hi) << 1;
        memcpy(out, &w, 4);
    }
}
#endif

/* ---- quantise [c0, c1) with per-bucket fp32 a, b into packed bits ------------------------- */
INLINE void quantize_range_k(const float *x, int64_t d, const int k, const float *a,
                             const float *b, uint32_t s, uint32_t m, uint8_t *bits, int64_t c0,
                             int64_t c1, int64_t pf) {
    const float levels = (float)((1 << k) - 1);
    const float top24 = levels * 16777216.0f;
    const vu step = splatu(16U * m);
    int64_t j = c0 / d, next = (j + 1) * d;
    float bj = b[j];
    int slow;
    float mul = bucket_mul(a[j], &slow);
    int fast = !slow && isfinite(mul * 16777216.0f);
    float mul24 = mul * 16777216.0f;
    vu ctr[NV];
    for (int h = 0; h < NV; h++) ctr[h] = splatu((uint32_t)c0 * m + s) + GLANE(h) * m;
    for (int64_t g = c0; g < c1; g += LANES) {
        int64_t len = c1 - g < LANES ? c1 - g : LANES;
        if (pf) __builtin_prefetch(x + g + pf, 0, 2);
        while (g >= next) {
            j++;
            next += d;
            bj = b[j];
            mul = bucket_mul(a[j], &slow);
            fast = !slow && isfinite(mul * 16777216.0f);
            mul24 = mul * 16777216.0f;
        }
        vu t[NV];
        if (fast && len == LANES && g + LANES <= next) {
            for (int h = 0; h < NV; h++)
                t[h] = quantize_vec(loadf(x + g + VL * h), bj, mul24, top24, ctr[h], k);
        } else {  /* a group across buckets, a slow bucket or the tail: lane by lane */
            uint32_t lanes[LANES];
            quantize_lanes(x, d, a, b, s, m, levels, g, len, j, next, lanes);
            memcpy(t, lanes, sizeof t);
        }
        for (int h = 0; h < NV; h++) ctr[h] += step;
        uint8_t *dst = bits + (g * k) / 8;
        if (len == LANES) {
            pack16(t, k, dst);
        } else {
            uint8_t tmp[2 * 8];
            pack16(t, k, tmp);
            memcpy(dst, tmp, (size_t)((len * k + 7) / 8));
        }
    }
}

static void quantize_range(const float *x, int64_t d, int k, const float *a, const float *b,
                           uint32_t s, uint32_t m, uint8_t *bits, int64_t c0, int64_t c1,
                           int64_t pf) {
    switch (k) {  /* one specialisation per common k: constant shifts and packing */
    case 1: quantize_range_k(x, d, 1, a, b, s, m, bits, c0, c1, pf); break;
    case 2: quantize_range_k(x, d, 2, a, b, s, m, bits, c0, c1, pf); break;
    case 4: quantize_range_k(x, d, 4, a, b, s, m, bits, c0, c1, pf); break;
    case 8: quantize_range_k(x, d, 8, a, b, s, m, bits, c0, c1, pf); break;
    default: quantize_range_k(x, d, k, a, b, s, m, bits, c0, c1, pf); break;
    }
}

/* ---- decode [g0, g1) of one row into dst (indexed from g0): a t + b, or s (2 t - 1) for the
   sign compressor (b == NULL), stored or added (acc) ------------------------------------ */
INLINE void decode_range_k(const uint8_t *bits, int64_t d, const int k, const float *a,
                           const float *b, float *dst, int64_t g0, int64_t g1, int acc) {
    int64_t j = g0 / d, next = (j + 1) * d;
    vf va = splatf(a[j]), vb = splatf(b ? b[j] : 0.0f);
    for (int64_t g = g0; g < g1; g += LANES) {
        int64_t len = g1 - g < LANES ? g1 - g : LANES;
        while (g >= next) {
            j++;
            next += d;
            va = splatf(a[j]);
            vb = splatf(b ? b[j] : 0.0f);
        }
        const uint8_t *src = bits + (g * k) / 8;
        uint8_t raw[2 * 8 + 1] = {0};
        /* the tail, or a k whose scalar unpack reads one byte past the group: a copy */
        if (len < LANES || (k != 1 && k != 2 && k != 4 && k != 8)) {
            memcpy(raw, src, (size_t)((len * k + 7) / 8));
            src = raw;
        }
        vu t[NV];  /* level indices below 256: converted as signed (SSE2 and AVX2 have no
                      unsigned conversion) */
        unpack16(src, k, t);
        vf vals[NV];
        if (g + LANES <= next) {
            for (int h = 0; h < NV; h++) {
                vf tf = __builtin_convertvector((vi)t[h], vf);
                vals[h] = b ? tf * va + vb : va * (tf * 2.0f - 1.0f);
            }
        } else {  /* a group across buckets (or the tail): per-lane headers */
            float la[LANES], lb[LANES];
            header_lanes(d, a, b, g, len, j, next, la, lb);
            for (int h = 0; h < NV; h++) {
                vf tf = __builtin_convertvector((vi)t[h], vf);
                vf ga = loadf(la + VL * h), gb = loadf(lb + VL * h);
                vals[h] = b ? tf * ga + gb : ga * (tf * 2.0f - 1.0f);
            }
        }
        float *o = dst + (g - g0);
        if (len == LANES) {
            for (int h = 0; h < NV; h++) {
                vf v = vals[h];
                if (acc) v += loadf(o + VL * h);
                storef(o + VL * h, v);
            }
        } else {
            float v[LANES];
            memcpy(v, vals, sizeof v);
            for (int l = 0; l < len; l++) o[l] = acc ? o[l] + v[l] : v[l];
        }
    }
}

/* decode [g0, g1) (multiples of 16) inside one bucket with header values aj, bj (sign: b
   absent) into dst (indexed from g0), k in 1, 2, 4, 8: no bucket or tail logic in the loop */
INLINE void decode_run_k(const uint8_t *bits, const int k, float aj, float bj, int sign,
                         float *dst, int64_t g0, int64_t g1, int acc) {
    const vf va = splatf(aj), vb = splatf(bj);
    for (int64_t g = g0; g < g1; g += LANES) {
        vu t[NV];
        unpack16(bits + (g * k) / 8, k, t);
        float *o = dst + (g - g0);
        for (int h = 0; h < NV; h++) {
            vf tf = __builtin_convertvector((vi)t[h], vf);
            vf v = sign ? va * (tf * 2.0f - 1.0f) : tf * va + vb;
            if (acc) v += loadf(o + VL * h);
            storef(o + VL * h, v);
        }
    }
}

static void decode_range_any(const uint8_t *bits, int64_t d, int k, const float *a,
                             const float *b, float *dst, int64_t g0, int64_t g1, int acc);

static void decode_range(const uint8_t *bits, int64_t d, int k, const float *a, const float *b,
                         float *dst, int64_t g0, int64_t g1, int acc) {
    if (d % LANES == 0 && g0 % LANES == 0 && (k == 1 || k == 2 || k == 4 || k == 8)) {
        /* bucket by bucket: whole groups in the tight loop, the tail of the range apart */
        for (int64_t g = g0; g < g1;) {
            int64_t j = g / d, e = (j + 1) * d < g1 ? (j + 1) * d : g1;
            int64_t full = g + (e - g) / LANES * LANES;
            float aj = a[j], bj = b ? b[j] : 0.0f;
            float *o = dst + (g - g0);
            switch (k) {
            case 1: decode_run_k(bits, 1, aj, bj, !b, o, g, full, acc); break;
            case 2: decode_run_k(bits, 2, aj, bj, !b, o, g, full, acc); break;
            case 4: decode_run_k(bits, 4, aj, bj, !b, o, g, full, acc); break;
            default: decode_run_k(bits, 8, aj, bj, !b, o, g, full, acc); break;
            }
            if (full < e) decode_range_any(bits, d, k, a, b, dst + (full - g0), full, e, acc);
            g = e;
        }
        return;
    }
    decode_range_any(bits, d, k, a, b, dst, g0, g1, acc);
}

static void decode_range_any(const uint8_t *bits, int64_t d, int k, const float *a,
                             const float *b, float *dst, int64_t g0, int64_t g1, int acc) {
    switch (k) {
    case 1: decode_range_k(bits, d, 1, a, b, dst, g0, g1, acc); break;
    case 2: decode_range_k(bits, d, 2, a, b, dst, g0, g1, acc); break;
    case 4: decode_range_k(bits, d, 4, a, b, dst, g0, g1, acc); break;
    case 8: decode_range_k(bits, d, 8, a, b, dst, g0, g1, acc); break;
    default: decode_range_k(bits, d, k, a, b, dst, g0, g1, acc); break;
    }
}

/* min, max and the count of non-finite values of x[c0, c1) */
static int64_t count_nonfinite(const float *x, int64_t c0, int64_t c1) {
    int64_t count = 0;
    for (int64_t i = c0; i < c1; i++) count += !isfinite(x[i]);
    return count;
}

static int64_t minmax(const float *x, int64_t c0, int64_t c1, float *lo_out, float *hi_out) {
    /* a reduction loop the compiler vectorises to min/max instructions (x < lo ? x : lo is
       exactly their semantics), which the vector-extension selects do not become */
    float lo = INFINITY, hi = -INFINITY;
#if defined(__SSE2__) && !defined(__SSE4_1__)
    /* SSE2 has no 32-bit integer max: an OR of "exponent all ones" (measured 2x faster
       there, slower than the max where it exists) */
    uint32_t inf = 0;
    #pragma omp simd reduction(min:lo) reduction(max:hi) reduction(|:inf)
    for (int64_t i = c0; i < c1; i++) {
        float v = x[i];
        uint32_t u;
        memcpy(&u, &v, 4);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
        inf |= (u & 0x7f800000U) == 0x7f800000U;
    }
    const int nonfinite = inf != 0;
#else
    uint32_t expo = 0;  /* largest exponent field seen: all ones iff a NaN or +-Inf */
    #pragma omp simd reduction(min:lo) reduction(max:hi) reduction(max:expo)
    for (int64_t i = c0; i < c1; i++) {
        float v = x[i];
        uint32_t u;
        memcpy(&u, &v, 4);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
        u &= 0x7f800000U;
        expo = u > expo ? u : expo;
    }
    const int nonfinite = expo == 0x7f800000U;
#endif
    *lo_out = lo;
    *hi_out = hi;
    return nonfinite ? count_nonfinite(x, c0, c1) : 0;
}

/* outward-rounded headers of one bucket with range [lo, hi]: b = lo rounded down, a =
   (hi - b) / L in double rounded up, one step more if b + L a < hi (quantize docstring);
   returns 1 if a value does not fit the type */
static int bucket_headers(int hdt, float lo, float hi, double levels, uint32_t *au_out,
                          uint32_t *bu_out, float *a32, float *b32) {
    uint32_t au, bu;
    double bv, av;
    lo += 0.0f;  /* -0 -> +0: the sign of a zero minimum must not depend on the order in */
    hi += 0.0f;  /* which a vectorised reduction met -0 and +0 (the torch path does the same) */
    if (hdt == 0) {  /* fp32: b = lo exactly, a one rounding and at most two steps up */
        bv = (double)lo;
        memcpy(&bu, &lo, 4);
        double v = ((double)hi - bv) / levels;
        float f = (float)v;
        if ((double)f < v) f = nextafterf(f, INFINITY);
        if (bv + levels * (double)f < (double)hi) f = nextafterf(f, INFINITY);
        memcpy(&au, &f, 4);
        av = (double)f;
    } else {
        bu = hround_down(hdt, (double)lo);
        bv = hval(hdt, bu);
        au = hround_up(hdt, ((double)hi - bv) / levels);
        if (bv + levels * hval(hdt, au) < (double)hi) au = hstep(hdt, au, 1);
        av = hval(hdt, au);
    }
    *au_out = au;
    *bu_out = bu;
    *a32 = (float)av;
    *b32 = (float)bv;
    return !isfinite(bv) || !isfinite(av);
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
/* the level indices of len (a multiple of 16) coordinates of one bucket with a finite
   multiplier, packed: the groups never cross a bucket, so the loop carries no bucket logic */
INLINE void quantize_bucket_k(const float *x, int64_t len, const int k, float bj, float mul24,
                              uint32_t s, uint32_t m, int64_t c, uint8_t *bits) {
    const float top24 = (float)((1 << k) - 1) * 16777216.0f;
    const vu step = splatu(16U * m);
    vu ctr[NV];
    for (int h = 0; h < NV; h++) ctr[h] = splatu((uint32_t)c * m + s) + GLANE(h) * m;
#if defined(__SSE2__)
    if (k <= 2) {
        for (int64_t g = 0; g < len; g += LANES) {
            vu sum[NV];
            for (int h = 0; h < NV; h++) {
                sum[h] = quantize_sum(loadf(x + g + VL * h), bj, mul24, top24, ctr[h], k);
                ctr[h] += step;
            }
            pack16_sums(sum, k, bits + (g * k) / 8);
        }
        return;
    }
#endif
    for (int64_t g = 0; g < len; g += LANES) {
        vu t[NV];
        for (int h = 0; h < NV; h++) {
            t[h] = quantize_vec(loadf(x + g + VL * h), bj, mul24, top24, ctr[h], k);
            ctr[h] += step;
        }
        pack16(t, k, bits + (g * k) / 8);
    }
}

static void quantize_bucket(const float *x, int64_t len, int k, float bj, float mul24,
                            uint32_t s, uint32_t m, int64_t c, uint8_t *bits) {
    switch (k) {
    case 1: quantize_bucket_k(x, len, 1, bj, mul24, s, m, c, bits); break;
    case 2: quantize_bucket_k(x, len, 2, bj, mul24, s, m, c, bits); break;
    case 4: quantize_bucket_k(x, len, 4, bj, mul24, s, m, c, bits); break;
    case 8: quantize_bucket_k(x, len, 8, bj, mul24, s, m, c, bits); break;
    default: quantize_bucket_k(x, len, k, bj, mul24, s, m, c, bits); break;
    }
}

int64_t dq_encode_fused(const float *x, int64_t n, int64_t d, int k, int hdt, uint32_t s,
                        uint32_t m, uint8_t *a_out, uint8_t *b_out, uint8_t *bits,
                        int64_t c0, int64_t c1, int64_t chunk) {
    enum { MAXB = 8192 };
    if (d % LANES == 0) {  /* bucket by bucket: min/max, headers and bits while it is in L1 */
        const double lv = (double)((1 << k) - 1);
        int64_t bad = 0, overflow = 0;
        for (int64_t j = c0 / d; j * d < c1; j++) {
            int64_t st = j * d, e = st + d < n ? st + d : n;
            float lo, hi, a32, b32;
            int64_t nb = minmax(x, st, e, &lo, &hi);
            if (nb) { bad += nb; lo = hi = 0.0f; }
            uint32_t au, bu;
            overflow |= bucket_headers(hdt, lo, hi, lv, &au, &bu, &a32, &b32);
            hstore(hdt, a_out, j, au);
            hstore(hdt, b_out, j, bu);
            if (bad || overflow) continue;
            int slow;
            float mul = bucket_mul(a32, &slow);
            float mul24 = mul * 16777216.0f;
            if (!slow && isfinite(mul24) && (e - st) % LANES == 0)
                quantize_bucket(x + st, e - st, k, b32, mul24, s, m, st, bits + (st * k) / 8);
            else
                quantize_range(x + st, d, k, &a32, &b32, s + (uint32_t)st * m, m,
                               bits + (st * k) / 8, 0, e - st, 0);
        }
        return bad ? bad : (overflow ? -1 : 0);
    }
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
            uint32_t au, bu;
            overflow |= bucket_headers(hdt, lo, hi, levels, &au, &bu, a32 + (j - j0),
                                       b32 + (j - j0));
            hstore(hdt, a_out, j, au);
            hstore(hdt, b_out, j, bu);
        }
        if (bad || overflow) continue;
        /* no software prefetch of the next chunk: measured slower than the hardware's */
        quantize_range(x + j0 * d, d, k, a32, b32, s + (uint32_t)(j0 * d) * m, m,
                       bits + (j0 * d * k) / 8, 0, ce - cs, 0);
    }
    return bad ? bad : (overflow ? -1 : 0);
}
/* ---- sign compressor ----------------------------------------------------------------- */
#define TREE_BLOCK 1024

/* sum of |x_i| over [0, len) in float64 along the complete binary tree of 2^P >= len leaves
   (zeros past len), adjacent pairs first: a fixed order, so the pure-torch path (pairwise
   halving) gets the same bits. Blocks of up to TREE_BLOCK leaves, combined as a binary counter
   (the same tree); what is left on the stack at the end folds from the top (zero siblings). */
static double tree_sum(const float *x, int64_t len) {
    double pa[TREE_BLOCK / 2], pb[TREE_BLOCK / 4];
    float pad[TREE_BLOCK];
    double stack[64];
    int64_t sizes[64];
    int top = 0;
    int64_t p2 = 1;
    while (p2 < len) p2 <<= 1;
    int64_t blk = p2 < TREE_BLOCK ? p2 : TREE_BLOCK;
    for (int64_t i0 = 0; i0 < len; i0 += blk) {
        int64_t m = len - i0 < blk ? len - i0 : blk;
        const float *xb = x + i0;
        if (m < blk) {  /* the last block: zeros past len */
            memcpy(pad, xb, sizeof(float) * (size_t)m);
            memset(pad + m, 0, sizeof(float) * (size_t)(blk - m));
            xb = pad;
        }
        double v;
        if (blk == 1) {
            v = fabs((double)xb[0]);
        } else {  /* the first level straight from the input, then level by level */
            for (int64_t i = 0; i < blk / 2; i++)
                pa[i] = fabs((double)xb[2 * i]) + fabs((double)xb[2 * i + 1]);
            double *src = pa, *dst = pb;
            for (int64_t w = blk / 2; w > 1; w >>= 1) {
                for (int64_t i = 0; i < w / 2; i++) dst[i] = src[2 * i] + src[2 * i + 1];
                double *t = src; src = dst; dst = t;
            }
            v = src[0];
        }
        int64_t size = 1;
        while (top && sizes[top - 1] == size) { v = stack[top - 1] + v; size *= 2; top--; }
        stack[top] = v;
        sizes[top] = size;
        top++;
    }
    double acc = stack[top - 1];
    for (int q = top - 2; q >= 0; q--) acc = stack[q] + acc;
    return acc;
}

/* a float64 value in the header type, rounded to nearest as torch converts it: to float32
   first, then to fp16 / bf16 (ties to even) */
static uint32_t hround_nearest(int hdt, double v) {
    float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, 4);
    if (hdt == 0) return u;
    if (hdt == 1) { _Float16 h = (_Float16)f; uint16_t w; memcpy(&w, &h, 2); return w; }
    if ((u & 0x7fffffffU) > 0x7f800000U) return (u >> 16) | 0x40U;  /* NaN stays NaN */
    return (u + 0x7fffU + ((u >> 16) & 1U)) >> 16;
}

/* Public: sign encoder for buckets [c0, c1) (c0 on a bucket boundary and a multiple of 8):
   s_j = (sum_i |x_i|) / size_j rounded to nearest in the header type, bits 1 for x_i >= 0.
   Returns the number of non-finite inputs, or -1 if a scale does not fit its type. */
/* the sign bits (1 for x_i >= 0) of [g0, g1), g0 a multiple of 8 */
static void sign_bits(const float *x, uint8_t *bits, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g += LANES) {
        int64_t len = g1 - g < LANES ? g1 - g : LANES;
        vu t[NV];
        if (len == LANES) {
            for (int h = 0; h < NV; h++) t[h] = (vu)(loadf(x + g + VL * h) >= 0.0f) & 1U;
            pack16(t, 1, bits + g / 8);
        } else {
            uint32_t v[LANES] = {0};
            for (int l = 0; l < len; l++) v[l] = x[g + l] >= 0.0f;
            memcpy(t, v, sizeof v);
            uint8_t tmp[2];
            pack16(t, 1, tmp);
            memcpy(bits + g / 8, tmp, (size_t)((len + 7) / 8));
        }
    }
}

/* Public: sign encoder for buckets [c0, c1) (c0 on a bucket boundary and a multiple of 8):
   s_j = (sum_i |x_i|) / size_j rounded to nearest in the header type, bits 1 for x_i >= 0;
   bucket by bucket (the sum and the bits while the bucket is in L1) when the buckets start
   on bytes of the bit stream (d a multiple of 8), else the bits in a second pass.
   Returns the number of non-finite inputs, or -1 if a scale does not fit its type. */
int64_t dq_sign_encode(const float *x, int64_t n, int64_t d, int hdt, uint8_t *s_out,
                       uint8_t *bits, int64_t c0, int64_t c1) {
    int64_t bad = 0, overflow = 0;
    const int fused = d % 8 == 0;
    for (int64_t j = c0 / d; j * d < c1; j++) {
        int64_t e = (j + 1) * d < n ? (j + 1) * d : n;
        double sum = tree_sum(x + j * d, e - j * d);
        if (!isfinite(sum)) { bad += count_nonfinite(x, j * d, e); sum = 0.0; }
        uint32_t su = hround_nearest(hdt, sum / (double)(e - j * d));
        overflow |= !isfinite(hval(hdt, su));
        hstore(hdt, s_out, j, su);
        if (fused && !bad && !overflow) sign_bits(x, bits, j * d, e);
    }
    if (bad || overflow) return bad ? bad : -1;
    if (!fused) sign_bits(x, bits, c0, c1);
    return 0;
}

/* Public: header values of `rows` payloads (row_stride bytes apart) as fp32, and the number
   of invalid ones (non-finite or negative scale a, non-finite offset b, or a top level
   a levels + b that overflows fp32 in the decode's arithmetic). */
int64_t dq_headers(const uint8_t *a_raw, const uint8_t *b_raw, int64_t row_stride,
                   int64_t rows, int64_t nb, int hdt, int levels, float *a32, float *b32) {
    int64_t bad = 0, hb = hdt == 0 ? 4 : 2;
    const float lf = (float)levels;
    for (int64_t w = 0; w < rows; w++) {
        for (int64_t j = 0; j < nb; j++) {
            uint32_t au = 0, bu = 0;
            memcpy(&au, a_raw + w * row_stride + j * hb, (size_t)hb);
            memcpy(&bu, b_raw + w * row_stride + j * hb, (size_t)hb);
            double av = hval(hdt, au), bv = hval(hdt, bu);
            float a = (float)av, b = (float)bv;
            volatile float top = lf * a;  /* rounded as the decode rounds it */
            bad += !isfinite(av) || av < 0 || !isfinite(bv) || !isfinite(top + b);
            a32[w * nb + j] = a;
            b32[w * nb + j] = b;
        }
    }
    return bad;
}

/* Public: decode [c0, c1) (c0 a multiple of 8) into out: a t + b with fp32 header values, or
   a (2 t - 1) for the sign compressor (b = NULL).
   nt = 1: non-temporal stores (outputs much larger than the caches). */
void dq_decode(const uint8_t *bits, int64_t d, int k, const float *a, const float *b,
               float *out, int64_t c0, int64_t c1, int nt) {
    float tmp[BLOCK];
    for (int64_t blk = c0; blk < c1; blk += BLOCK) {
        int64_t end = blk + BLOCK < c1 ? blk + BLOCK : c1;
        if (nt) {  /* through a block in L1, copied with streaming stores */
            decode_range(bits, d, k, a, b, tmp, blk, end, 0);
            flush(out + blk, tmp, end - blk, 1);
        } else {
            decode_range(bits, d, k, a, b, out + blk, blk, end, 0);
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
            decode_range(bits + w * row_stride, d, k, a + w * nb, b ? b + w * nb : 0, acc, blk, end, 1);
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
