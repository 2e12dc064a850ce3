/*
 * Decode stored KV rows (fp16, bf16 or int8 with per-row fp16 scales) into fp32, straight into the
 * caches' memory. numpy converts fp16 one element at a time (~6 ns per value on the CI machine:
 * ~100 ms of a restore of 8k tokens); F16C converts 8 per instruction, so a restore is bound by
 * memory bandwidth. Built once by node.native; dispatched at run time on the CPU's features.
 *
 * Every function converts `rows` rows of `width` values; a row starts every `src_stride` values
 * in the source and every `dst_stride` floats in the destination (K/V are stored token-major,
 * caches are head-major).
 */

#include <stdint.h>
#include <string.h>

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000 | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exponent = 113;
        while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            exponent--;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void fp16_rows_portable(const uint16_t *src, long src_stride, float *dst, long dst_stride, long rows, long width) {
    for (long r = 0; r < rows; r++)
        for (long i = 0; i < width; i++) dst[r * dst_stride + i] = half_to_float(src[r * src_stride + i]);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
__attribute__((target("avx,f16c"))) static void fp16_rows_f16c(const uint16_t *src, long src_stride, float *dst,
                                                                long dst_stride, long rows, long width) {
    for (long r = 0; r < rows; r++) {
        const uint16_t *s = src + r * src_stride;
        float *d = dst + r * dst_stride;
        long i = 0;
        for (; i + 8 <= width; i += 8) _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
        for (; i < width; i++) d[i] = half_to_float(s[i]);
    }
}
#endif

void node_kv_fp16_rows(const uint16_t *src, long src_stride, float *dst, long dst_stride, long rows, long width) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx")) {
        fp16_rows_f16c(src, src_stride, dst, dst_stride, rows, width);
        return;
    }
#endif
    fp16_rows_portable(src, src_stride, dst, dst_stride, rows, width);
}

void node_kv_bf16_rows(const uint16_t *src, long src_stride, float *dst, long dst_stride, long rows, long width) {
    for (long r = 0; r < rows; r++) {
        const uint16_t *s = src + r * src_stride;
        uint32_t *d = (uint32_t *)(dst + r * dst_stride);
        for (long i = 0; i < width; i++) d[i] = (uint32_t)s[i] << 16;
    }
}

/* Row r's scale is scales[r * scale_stride] (fp16). */
void node_kv_int8_rows(const int8_t *src, long src_stride, const uint16_t *scales, long scale_stride, float *dst,
                       long dst_stride, long rows, long width) {
    for (long r = 0; r < rows; r++) {
        float scale = half_to_float(scales[r * scale_stride]);
        const int8_t *s = src + r * src_stride;
        float *d = dst + r * dst_stride;
        for (long i = 0; i < width; i++) d[i] = (float)s[i] * scale;
    }
}

/* Encoding, for saves: fp32 -> fp16 (round to nearest even). Returns 0 as soon as a value is not
 * finite or beyond fp16's range (the caller then stores bf16), 1 when all `n` were written. */
static int to_fp16_portable(const float *src, uint16_t *dst, long n) {
    for (long i = 0; i < n; i++) {
        float x = src[i];
        if (!(x <= 65504.0f && x >= -65504.0f)) return 0;
        uint32_t bits;
        memcpy(&bits, &x, 4);
        uint32_t sign = (bits >> 16) & 0x8000, magnitude = bits & 0x7fffffff;
        uint16_t h;
        if (magnitude < 0x38800000) { /* subnormal half (or zero) */
            float scaled = (x < 0 ? -x : x) * 16777216.0f; /* 2^24: units of the smallest subnormal */
            uint32_t m = (uint32_t)scaled, rest = scaled - (float)m >= 0.5f;
            h = (uint16_t)(sign | (m + rest));
        } else {
            uint32_t rounded = magnitude + 0x0fff + ((magnitude >> 13) & 1);
            h = (uint16_t)(sign | ((rounded - 0x38000000) >> 13));
        }
        dst[i] = h;
    }
    return 1;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx,f16c"))) static int to_fp16_f16c(const float *src, uint16_t *dst, long n) {
    const __m256 limit = _mm256_set1_ps(65504.0f), sign = _mm256_set1_ps(-0.0f);
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(src + i);
        /* |x| <= 65504 is false for NaN too (ordered compare) */
        if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, x), limit, _CMP_LE_OQ)) != 0xff) return 0;
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
    return to_fp16_portable(src + i, dst + i, n - i);
}
#endif

int node_kv_to_fp16(const float *src, uint16_t *dst, long n) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx")) return to_fp16_f16c(src, dst, n);
#endif
    return to_fp16_portable(src, dst, n);
}
