/* Antialiased bilinear resize of a uint8 region (1 or 4 channels) into an
 * RGB output, flipped or not, with the arithmetic of Pillow's
 * Image.resize(size, BILINEAR, box=...), so that the output is bit-equal:
 *
 * - per output pixel, the filter's centre, its first input pixel and its
 *   tap count, and the tap weights are computed in double from the box
 *   edges as float32 (Pillow takes the box as C floats, and its width as a
 *   float difference); weights are normalised to sum 1, then rounded to
 *   fixed point with 22 fraction bits (32 - 8 bits of output - 2 of
 *   headroom) away from zero;
 * - two passes, in Pillow's order (see cmim_resample), each summing
 *   pixel * weight in int32 from half of one unit, shifting out the 22 bits
 *   and clamping to 0..255 (the intermediate image is uint8, as Pillow's
 *   is); the first pass runs over only the rows (or columns) the second
 *   one reads.
 *
 * Integer sums are exact, so any order (scalar, SSE4.1, AVX2) gives the same
 * bits. The coefficients are plain double code, compiled without FMA
 * contraction (-ffp-contract=off, no -mfma) as Pillow's are. The SIMD
 * kernels are chosen at run time (__builtin_cpu_supports, asked once a
 * process); simd=0 forces the scalar code (the tests compare both).
 *
 * Built with jpeg_crop.c into one library by cmim_jax/data/jpeg_crop.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <immintrin.h>

#include "resample.h"

#define FRAC_BITS 22

struct taps {
  int ksize;   /* Weights per output pixel (zero-padded). */
  int *first;  /* First input pixel of output pixel i. */
  int *count;  /* Its number of taps. */
  int32_t *w;  /* [n * ksize] fixed-point weights. */
};

static double triangle(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

static void free_taps(struct taps *t) {
  free(t->first);
  free(t->count);
  free(t->w);
}

/* Taps of an axis of in_size pixels, resized from [a, b) to n pixels. */
static int make_taps(int in_size, float a, float b, int n, struct taps *t) {
  double scale = (double)(b - a) / n; /* b - a in float, as Pillow. */
  double fscale = scale < 1.0 ? 1.0 : scale;
  double support = 1.0 * fscale; /* Bilinear: support 1 per unit of scale. */
  double inv = 1.0 / fscale;
  double *k;
  int i, j;
  t->ksize = (int)ceil(support) * 2 + 1;
  t->first = malloc(sizeof(int) * (size_t)n);
  t->count = malloc(sizeof(int) * (size_t)n);
  t->w = calloc((size_t)n * (size_t)t->ksize, sizeof(int32_t));
  k = malloc(sizeof(double) * (size_t)t->ksize);
  if (!t->first || !t->count || !t->w || !k) {
    free(k);
    free_taps(t);
    return -1;
  }
  for (i = 0; i < n; i++) {
    double center = a + (i + 0.5) * scale, sum = 0.0;
    int lo = (int)(center - support + 0.5), hi;
    if (lo < 0) lo = 0;
    hi = (int)(center + support + 0.5);
    if (hi > in_size) hi = in_size;
    hi -= lo;
    for (j = 0; j < hi; j++) {
      k[j] = triangle((j + lo - center + 0.5) * inv);
      sum += k[j];
    }
    for (j = 0; j < hi; j++) {
      double v = sum != 0.0 ? k[j] / sum : k[j];
      v *= (double)(1 << FRAC_BITS);
      t->w[(size_t)i * t->ksize + j] = (int32_t)(v < 0 ? v - 0.5 : v + 0.5);
    }
    t->first[i] = lo;
    t->count[i] = hi;
  }
  free(k);
  return 0;
}

static inline uint8_t clamp8(int32_t s) {
  s >>= FRAC_BITS;
  return (uint8_t)(s < 0 ? 0 : s > 255 ? 255 : s);
}

/* ------------------------------------------------------ horizontal pass */

/* The horizontal kernels read a row `in` that starts at the image's pixel
 * `org` (org <= every t->first[i]): pixel f is in[(f - org) * ch], an index,
 * so no pointer is formed before the row (undefined in C even unread). */

/* One row: out[i * ch + c]. */
static void hrow_scalar(const uint8_t *in, int org, int ch,
                        const struct taps *t, int n, uint8_t *out) {
  int i, j, c;
  for (i = 0; i < n; i++) {
    const uint8_t *p = in + (size_t)(t->first[i] - org) * ch;
    const int32_t *w = t->w + (size_t)i * t->ksize;
    for (c = 0; c < ch; c++) {
      int32_t s = 1 << (FRAC_BITS - 1);
      for (j = 0; j < t->count[i]; j++) s += p[j * ch + c] * w[j];
      out[i * ch + c] = clamp8(s);
    }
  }
}

/* 4 channels: one pixel's RGBX in the four lanes of one register. */
__attribute__((target("sse4.1"))) static void hrow4_sse41(
    const uint8_t *in, int org, const struct taps *t, int n, uint8_t *out) {
  int i, j;
  for (i = 0; i < n; i++) {
    const uint8_t *p = in + (size_t)(t->first[i] - org) * 4;
    const int32_t *w = t->w + (size_t)i * t->ksize;
    __m128i s = _mm_set1_epi32(1 << (FRAC_BITS - 1));
    int32_t px;
    for (j = 0; j < t->count[i]; j++) {
      memcpy(&px, p + j * 4, 4);
      s = _mm_add_epi32(s, _mm_mullo_epi32(
          _mm_cvtepu8_epi32(_mm_cvtsi32_si128(px)), _mm_set1_epi32(w[j])));
    }
    s = _mm_srai_epi32(s, FRAC_BITS);
    s = _mm_packus_epi16(_mm_packs_epi32(s, s), s);
    px = _mm_cvtsi128_si32(s);
    memcpy(out + i * 4, &px, 4);
  }
}

/* 4 channels, two output pixels per register (AVX2): the pair shares a
 * loop over the longer tap list; the shorter one's extra weights are the
 * zero padding, and its extra reads must stay inside the row: from the
 * first pair that would read up to pixel `end` (exclusive) or past it on,
 * hrow4_sse41 does the rest. */
__attribute__((target("avx2"))) static void hrow4_avx2(
    const uint8_t *in, int org, int end, const struct taps *t, int n,
    uint8_t *out) {
  int i = 0, j;
  for (; i + 1 < n; i += 2) {
    int f0 = t->first[i], f1 = t->first[i + 1];
    int c = t->count[i] > t->count[i + 1] ? t->count[i] : t->count[i + 1];
    const int32_t *w0 = t->w + (size_t)i * t->ksize, *w1 = w0 + t->ksize;
    __m256i s = _mm256_set1_epi32(1 << (FRAC_BITS - 1));
    __m128i r;
    int32_t a, b;
    if (f0 + c > end || f1 + c > end || c > t->ksize) break;
    for (j = 0; j < c; j++) {
      memcpy(&a, in + (size_t)(f0 - org + j) * 4, 4);
      memcpy(&b, in + (size_t)(f1 - org + j) * 4, 4);
      s = _mm256_add_epi32(s, _mm256_mullo_epi32(
          _mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, b, a)),
          _mm256_setr_epi32(w0[j], w0[j], w0[j], w0[j], w1[j], w1[j], w1[j],
                            w1[j])));
    }
    s = _mm256_srai_epi32(s, FRAC_BITS);
    r = _mm_packs_epi32(_mm256_castsi256_si128(s),
                        _mm256_extracti128_si256(s, 1));
    _mm_storel_epi64((__m128i *)(out + i * 4), _mm_packus_epi16(r, r));
  }
  if (i < n) {
    struct taps rest = *t;
    rest.first += i;
    rest.count += i;
    rest.w += (size_t)i * t->ksize;
    hrow4_sse41(in, org, &rest, n - i, out + i * 4);
  }
}

/* ---------------------------------------------------------- vertical pass */

/* One output row from `count` rows of `len` bytes, `stride` apart. */
static void vrow_scalar(const uint8_t *in, long stride, const int32_t *w,
                        int count, int len, uint8_t *out) {
  int x, j;
  for (x = 0; x < len; x++) {
    int32_t s = 1 << (FRAC_BITS - 1);
    for (j = 0; j < count; j++) s += in[(size_t)j * stride + x] * w[j];
    out[x] = clamp8(s);
  }
}

__attribute__((target("avx2"))) static void vrow_avx2(
    const uint8_t *in, long stride, const int32_t *w, int count, int len,
    uint8_t *out) {
  int x = 0, j;
  for (; x + 16 <= len; x += 16) {
    __m256i s0 = _mm256_set1_epi32(1 << (FRAC_BITS - 1)), s1 = s0;
    for (j = 0; j < count; j++) {
      __m128i v = _mm_loadu_si128((const __m128i *)(in + (size_t)j * stride + x));
      __m256i k = _mm256_set1_epi32(w[j]);
      s0 = _mm256_add_epi32(s0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(v), k));
      s1 = _mm256_add_epi32(s1, _mm256_mullo_epi32(
          _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)), k));
    }
    s0 = _mm256_srai_epi32(s0, FRAC_BITS);
    s1 = _mm256_srai_epi32(s1, FRAC_BITS);
    /* packs/packus work within 128-bit lanes, leaving the 4-byte groups of
     * x.. x+15 in dwords 0, 4, 1, 5. */
    s0 = _mm256_packs_epi32(s0, s1);
    s0 = _mm256_packus_epi16(s0, s0);
    s0 = _mm256_permutevar8x32_epi32(s0, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
    _mm_storeu_si128((__m128i *)(out + x), _mm256_castsi256_si128(s0));
  }
  if (x < len) vrow_scalar(in + x, stride, w, count, len - x, out + x);
}

__attribute__((target("sse4.1"))) static void vrow_sse41(
    const uint8_t *in, long stride, const int32_t *w, int count, int len,
    uint8_t *out) {
  int x = 0, j;
  for (; x + 4 <= len; x += 4) {
    __m128i s = _mm_set1_epi32(1 << (FRAC_BITS - 1));
    int32_t px;
    for (j = 0; j < count; j++) {
      memcpy(&px, in + (size_t)j * stride + x, 4);
      s = _mm_add_epi32(s, _mm_mullo_epi32(
          _mm_cvtepu8_epi32(_mm_cvtsi32_si128(px)), _mm_set1_epi32(w[j])));
    }
    s = _mm_srai_epi32(s, FRAC_BITS);
    s = _mm_packus_epi16(_mm_packs_epi32(s, s), s);
    px = _mm_cvtsi128_si32(s);
    memcpy(out + x, &px, 4);
  }
  if (x < len) vrow_scalar(in + x, stride, w, count, len - x, out + x);
}

/* Asked once a process, on first use: -1 until then. Threads that race on
 * the first use compute the same value; the atomics make that race
 * well-defined. */
static int simd_level = -1;

int cmim_resample_simd_level(void) {
  int level = __atomic_load_n(&simd_level, __ATOMIC_RELAXED);
  if (level < 0) {
    __builtin_cpu_init();
    level = __builtin_cpu_supports("avx2")     ? 2
            : __builtin_cpu_supports("sse4.1") ? 1
                                               : 0;
    __atomic_store_n(&simd_level, level, __ATOMIC_RELAXED);
  }
  return level;
}

/* One row of the horizontal pass, by the best kernel `level` allows.
 * `row` holds the image's pixels `org` .. `end` - 1 of the row. */
static void hrow(const uint8_t *row, int org, int end, int ch,
                 const struct taps *t, int n, int level, uint8_t *out) {
  if (ch == 4 && level >= 2)
    hrow4_avx2(row, org, end, t, n, out);
  else if (ch == 4 && level >= 1)
    hrow4_sse41(row, org, t, n, out);
  else
    hrow_scalar(row, org, ch, t, n, out);
}

static void vrow(const uint8_t *in, long stride, const int32_t *w, int count,
                 int len, int level, uint8_t *out) {
  if (level >= 2)
    vrow_avx2(in, stride, w, count, len, out);
  else if (level >= 1)
    vrow_sse41(in, stride, w, count, len, out);
  else
    vrow_scalar(in, stride, w, count, len, out);
}

/* An output row of `ch`-channel pixels to RGB (grayscale replicated, as
 * Pillow's convert('RGB')), mirrored if `flip`. */
static void to_rgb(const uint8_t *line, int ch, int n, int flip, uint8_t *o) {
  int j;
  for (j = 0; j < n; j++) {
    const uint8_t *p = line + (size_t)(flip ? n - 1 - j : j) * ch;
    o[j * 3 + 0] = p[0];
    o[j * 3 + 1] = p[ch == 4 ? 1 : 0];
    o[j * 3 + 2] = p[ch == 4 ? 2 : 0];
  }
}

int cmim_resample(const uint8_t *src, long src_stride, int ch, int in_w,
                  int in_h, int rx, int ry, int rw, int rh, const float *box,
                  int out_w, int out_h, int flip, uint8_t *out,
                  long out_stride, int simd) {
  struct taps tx, ty;
  int level, y0, y1, x0, x1, i, status = 0, vertical_first;
  uint8_t *tmp = NULL, *line = NULL;
  if ((ch != 1 && ch != 4) || out_w < 1 || out_h < 1 || box[0] < 0 ||
      box[1] < 0 || box[2] > in_w || box[3] > in_h || box[2] < box[0] ||
      box[3] < box[1])
    return CMIM_RESAMPLE_BAD_ARGS;
  /* simd < 0: the best the CPU has; 0: scalar; 1, 2: at most SSE4.1, AVX2. */
  level = simd ? cmim_resample_simd_level() : 0;
  if (simd > 0 && simd < level) level = simd;
  if (make_taps(in_w, box[0], box[2], out_w, &tx)) return CMIM_RESAMPLE_NOMEM;
  if (make_taps(in_h, box[1], box[3], out_h, &ty)) {
    free_taps(&tx);
    return CMIM_RESAMPLE_NOMEM;
  }
  /* The rows and columns the filter reads: they must lie in the region the
   * caller holds. */
  y0 = ty.first[0];
  y1 = ty.first[out_h - 1] + ty.count[out_h - 1];
  x0 = tx.first[0];
  x1 = tx.first[out_w - 1] + tx.count[out_w - 1];
  if (y0 < ry || y1 > ry + rh || x0 < rx || x1 > rx + rw) {
    status = CMIM_RESAMPLE_OUTSIDE;
    goto done;
  }
  /* Pillow (13.0) runs the vertical pass first when it removes more than
   * twice as many rows as the horizontal one removes columns (of the whole
   * image, not the box); the order changes the rounding of the uint8
   * intermediate, so it is followed here. */
  vertical_first = in_h - out_h > 0 && in_h - out_h > 2 * (in_w - out_w);
  line = malloc((size_t)out_w * ch + 16);
  if (!vertical_first) {
    /* Horizontal pass over rows y0..y1 into tmp[y1 - y0][out_w]. */
    long ts = (long)out_w * ch;
    tmp = malloc((size_t)(y1 - y0) * (size_t)ts);
    if (!tmp || !line) {
      status = CMIM_RESAMPLE_NOMEM;
      goto done;
    }
    for (i = y0; i < y1; i++)
      hrow(src + (size_t)(i - ry) * src_stride, rx, rx + rw, ch, &tx, out_w,
           level, tmp + (size_t)(i - y0) * ts);
    for (i = 0; i < out_h; i++) {
      vrow(tmp + (size_t)(ty.first[i] - y0) * ts, ts,
           ty.w + (size_t)i * ty.ksize, ty.count[i], (int)ts, level, line);
      to_rgb(line, ch, out_w, flip, out + (size_t)i * out_stride);
    }
  } else {
    /* Vertical pass over columns x0..x1 into tmp[out_h][x1 - x0]. */
    long ts = (long)(x1 - x0) * ch;
    tmp = malloc((size_t)out_h * (size_t)ts);
    if (!tmp || !line) {
      status = CMIM_RESAMPLE_NOMEM;
      goto done;
    }
    for (i = 0; i < out_h; i++) {
      uint8_t *t = tmp + (size_t)i * ts;
      vrow(src + (size_t)(ty.first[i] - ry) * src_stride +
               (size_t)(x0 - rx) * ch,
           src_stride, ty.w + (size_t)i * ty.ksize, ty.count[i], (int)ts,
           level, t);
      hrow(t, x0, x1, ch, &tx, out_w, level, line);
      to_rgb(line, ch, out_w, flip, out + (size_t)i * out_stride);
    }
  }
done:
  free(tmp);
  free(line);
  free_taps(&tx);
  free_taps(&ty);
  return status;
}
