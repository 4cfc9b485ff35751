/* Fused CPU kernels of dist_quant's k-bit and sign compressors (see kernels_c.py for how they
   are built and fast.py for how they are called). One source for every CPU: the hot loops work
   on 16-lane GCC/Clang vectors, which the compiler maps onto one AVX-512 register, two AVX2
   registers or four SSE2/NEON registers, so the same code runs at full width wherever it is
   compiled; plain C elsewhere (headers, tails, groups across buckets). */
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

/* ---- 16-lane vectors (GCC/Clang vector extensions): one AVX-512 register, two AVX2
   registers, four SSE2 or NEON registers; the compiler picks the instructions ------------- */
#define LANES 16
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint32_t vu4 __attribute__((vector_size(16)));
typedef uint8_t vb16 __attribute__((vector_size(16)));
#define INLINE static inline __attribute__((always_inline))

static const vu LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
static const vu SHIFT4 = {0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28};
static const vi HIGH8 = {0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1};

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

/* OR of the four 4-lane quarters of v, then of the four lanes (disjoint bits: a sum) */
INLINE uint32_t or_quarters(vu v, int first, int count) {
    vu4 q[4];
    memcpy(q, &v, sizeof q);
    vu4 acc = q[first];
    for (int i = 1; i < count; i++) acc |= q[first + i];
    return acc[0] | acc[1] | acc[2] | acc[3];
}

/* pack 16 level indices (k in 1, 2, 4, 8; any k through the scalar loop) into 2k bytes */
INLINE void pack16(vu t, int k, uint8_t *out) {
    if (k == 1) {
        uint16_t w = (uint16_t)or_quarters(t << LANE, 0, 4);
        memcpy(out, &w, 2);
    } else if (k == 2) {
        uint32_t w = or_quarters(t << (LANE + LANE), 0, 4);
        memcpy(out, &w, 4);
    } else if (k == 4) {
        vu s = t << SHIFT4;
        uint32_t w[2] = {or_quarters(s, 0, 2), or_quarters(s, 2, 2)};
        memcpy(out, w, 8);
    } else if (k == 8) {
        vb16 b = __builtin_convertvector(t, vb16);
        memcpy(out, &b, 16);
    } else {
        uint64_t lo = 0, hi = 0;  /* 16 k <= 112 bits */
        for (int l = 0; l < LANES; l++) {
            int bit = l * k;
            uint64_t v = t[l];
            if (bit < 64) {
                lo |= v << bit;
                if (bit + k > 64) hi |= v >> (64 - bit);
            } else {
                hi |= v << (bit - 64);
            }
        }
        memcpy(out, &lo, k * 2 < 8 ? (size_t)(k * 2) : 8);
        if (k * 2 > 8) memcpy(out + 8, &hi, (size_t)(k * 2 - 8));
    }
}

/* the 16 level indices stored in 2k bytes (the inverse of pack16) */
INLINE vu unpack16(const uint8_t *in, int k) {
    if (k == 1) {
        uint16_t w;
        memcpy(&w, in, 2);
        return (splatu(w) >> LANE) & 1U;
    }
    if (k == 2) {
        uint32_t w;
        memcpy(&w, in, 4);
        return (splatu(w) >> (LANE + LANE)) & 3U;
    }
    if (k == 4) {
        uint32_t w[2];
        memcpy(w, in, 8);
        return (selu(HIGH8, splatu(w[1]), splatu(w[0])) >> SHIFT4) & 15U;
    }
    if (k == 8) {
        vb16 b;
        memcpy(&b, in, 16);
        return __builtin_convertvector(b, vu);
    }
    vu t;
    uint32_t mask = (1U << k) - 1U;
    for (int l = 0; l < LANES; l++) {
        int bit = l * k;
        uint32_t w = in[bit >> 3] | (uint32_t)in[(bit >> 3) + 1] << 8;
        t[l] = (w >> (bit & 7)) & mask;
    }
    return t;
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

/* 16 level indices of a group inside one bucket: y 2^24 = (x - b) (2^24 / a) (the power of
   two folded into the multiplier: exact, the caller checks it is finite), clamped to L 2^24,
   truncated, plus the 24-bit draws, shifted down. x >= b, so y >= 0 needs no clamp; with
   k = 1 the top clamp cannot change t. k = 8: y 2^24 reaches 2^32, past the signed
   conversion, so the top half converts shifted down by 2^31 (exact in float). */
INLINE vu quantize16(vf x, float bj, float mul24, float top24, vu ctr, int k) {
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
    return (q + r) >> DRAW_BITS;
}

/* ---- quantise [c0, c1) with per-bucket fp32 a, b into packed bits ------------------------- */
INLINE void quantize_range_k(const float *x, int64_t d, const int k, const float *a,
                             const float *b, uint32_t s, uint32_t m, uint8_t *bits, int64_t c0,
                             int64_t c1, int64_t pf) {
    const float levels = (float)((1 << k) - 1);
    const float top24 = levels * 16777216.0f;
    const vu step = splatu(16U * m);
    int64_t j = c0 / d, next = (j + 1) * d;
    float aj = a[j], bj = b[j], mul24 = 0.0f;
    int slow = 0;
    float mul = bucket_mul(aj, &slow);
    int fast = !slow && isfinite(mul * 16777216.0f);
    mul24 = mul * 16777216.0f;
    vu ctr = splatu((uint32_t)c0 * m + s) + LANE * m;
    for (int64_t g = c0; g < c1; g += LANES, ctr += step) {
        int64_t len = c1 - g < LANES ? c1 - g : LANES;
        if (pf) __builtin_prefetch(x + g + pf, 0, 2);
        while (g >= next) {
            j++;
            next += d;
            aj = a[j];
            bj = b[j];
            mul = bucket_mul(aj, &slow);
            fast = !slow && isfinite(mul * 16777216.0f);
            mul24 = mul * 16777216.0f;
        }
        vu t;
        if (fast && len == LANES && g + LANES <= next) {
            t = quantize16(loadf(x + g), bj, mul24, top24, ctr, k);
        } else {  /* a group across buckets, a slow bucket or the tail: lane by lane */
            int64_t jj = j, nx = next;
            for (int l = 0; l < LANES; l++) {
                if (l >= len) { t[l] = 0; continue; }
                if (g + l >= nx) { jj++; nx += d; }
                int sl;
                float ml = bucket_mul(a[jj], &sl);
                t[l] = quantize_one(x[g + l], a[jj], b[jj], ml, sl, levels,
                                    (uint32_t)(g + l) * m + s);
            }
        }
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
            int64_t have = (len * k + 7) / 8;
            memcpy(raw, src, (size_t)have);
            src = raw;
        }
        vf tf = __builtin_convertvector(unpack16(src, k), vf);
        vf ga = va, gb = vb;
        if (g + LANES > next) {  /* a group across buckets: per-lane headers */
            int64_t jj = j, nx = next;
            for (int l = 0; l < LANES; l++) {
                if (g + l >= nx) { jj++; nx += d; }
                if (l < len) { ga[l] = a[jj]; gb[l] = b ? b[jj] : 0.0f; }
            }
        }
        vf vals = b ? tf * ga + gb : ga * (tf * 2.0f - 1.0f);
        float *o = dst + (g - g0);
        if (len == LANES) {
            if (acc) vals += loadf(o);
            storef(o, vals);
        } else {
            for (int l = 0; l < len; l++) o[l] = acc ? o[l] + vals[l] : vals[l];
        }
    }
}

static void decode_range(const uint8_t *bits, int64_t d, int k, const float *a, const float *b,
                         float *dst, int64_t g0, int64_t g1, int acc) {
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

static int64_t minmax(const float *x, int64_t c0, int64_t c1, float *lo_out, float *hi_out,
                      int64_t pf) {
    vf lo = splatf(INFINITY), hi = splatf(-INFINITY);
    vu expo = {0};  /* largest exponent field seen: all ones iff a NaN or +-Inf */
    int64_t i = c0;
    for (; i + LANES <= c1; i += LANES) {
        if (pf) __builtin_prefetch(x + i + pf, 0, 3);
        vf v = loadf(x + i);
        lo = self(v < lo, v, lo);
        hi = self(v > hi, v, hi);
        vu e = (vu)v & 0x7f800000U;
        expo = selu((vi)(e > expo), e, expo);
    }
    float l = INFINITY, h = -INFINITY;
    uint32_t ex = 0;
    for (int q = 0; q < LANES; q++) {
        l = lo[q] < l ? lo[q] : l;
        h = hi[q] > h ? hi[q] : h;
        ex = expo[q] > ex ? expo[q] : ex;
    }
    for (; i < c1; i++) {
        float v = x[i];
        uint32_t u;
        memcpy(&u, &v, 4);
        l = v < l ? v : l;
        h = v > h ? v : h;
        u &= 0x7f800000U;
        ex = u > ex ? u : ex;
    }
    *lo_out = l;
    *hi_out = h;
    return ex == 0x7f800000U ? count_nonfinite(x, c0, c1) : 0;
}

/* outward-rounded headers of one bucket with range [lo, hi]: b = lo rounded down, a =
   (hi - b) / L in double rounded up, one step more if b + L a < hi (quantize docstring);
   returns 1 if a value does not fit the type */
static int bucket_headers(int hdt, float lo, float hi, double levels, uint32_t *au_out,
                          uint32_t *bu_out, float *a32, float *b32) {
    uint32_t au, bu;
    double bv, av;
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
    return minmax(x, c0, c1, lohi, lohi + 1, PREFETCH);
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
            int64_t nb = minmax(x, j * d, e, &lo, &hi, 0);
            if (nb) { bad += nb; lo = hi = 0.0f; }
            uint32_t au, bu;
            overflow |= bucket_headers(hdt, lo, hi, levels, &au, &bu, a32 + (j - j0),
                                       b32 + (j - j0));
            hstore(hdt, a_out, j, au);
            hstore(hdt, b_out, j, bu);
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
