/* Pillow-exact antialiased bilinear resize (resample.c). */
#ifndef CMIM_RESAMPLE_H_
#define CMIM_RESAMPLE_H_

#include <stdint.h>

#define CMIM_RESAMPLE_BAD_ARGS 4
#define CMIM_RESAMPLE_OUTSIDE 5
#define CMIM_RESAMPLE_NOMEM 6

/* 0: scalar only, 1: SSE4.1, 2: AVX2 (what the CPU runs). */
int cmim_resample_simd_level(void);

/* Resizes box = {x0, y0, x1, y1} of an in_w x in_h image (1 channel, or 4:
 * RGBX) to out_w x out_h, as PIL.Image.resize(BILINEAR, box=box), into RGB
 * rows of `out` (`out_stride` bytes apart; mirrored left-right if `flip`).
 * The caller holds only the region rx, ry, rw, rh of the image: `src` is its
 * pixel (rx, ry), rows `src_stride` bytes apart. simd: -1 the best the CPU
 * runs, 0 scalar, 1 at most SSE4.1, 2 at most AVX2.
 * Returns 0, or CMIM_RESAMPLE_* (OUTSIDE: the filter reads outside the
 * region). */
int cmim_resample(const uint8_t *src, long src_stride, int ch, int in_w,
                  int in_h, int rx, int ry, int rw, int rh, const float *box,
                  int out_w, int out_h, int flip, uint8_t *out,
                  long out_stride, int simd);

#endif  /* CMIM_RESAMPLE_H_ */
