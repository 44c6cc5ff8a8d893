/* Decode one window of a JPEG, at a 1/1, 1/2, 1/4 or 1/8 DCT scale, with
 * libjpeg-turbo's partial decoding: rows above the window are skipped
 * (jpeg_skip_scanlines: entropy-decoded, no IDCT, no colour conversion),
 * columns outside it are not transformed (jpeg_crop_scanline), and decoding
 * stops after the window's last row (nothing below it is even
 * entropy-decoded).
 *
 * Built by cmim_jax/data/jpeg_crop.py on first use and called through
 * ctypes (no Python headers needed). Pillow decodes with the same library
 * and the same defaults (islow IDCT, fancy upsampling), so the window's
 * pixels equal Pillow's full decode there; the caller asks for a margin
 * around what it reads, because the upsampler at the window's outer column
 * lacks its neighbour. The rows are written where they lie in the whole
 * (scaled) image, into the caller's canvas of the image's size, so that
 * Pillow resizes them with the same geometry as a full decode.
 *
 * Returns 0 on success; 1: libjpeg error (message in err); 2: libjpeg
 * warning (corrupt or truncated data: the caller decodes with Pillow, which
 * decides); 3: the file is not what the caller expected (size, channels,
 * colour space), e.g. CMYK.
 */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#include "resample.h"

struct guard {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  int warned;
  char *err;
  int err_len;
};

static void on_error(j_common_ptr cinfo) {
  struct guard *g = (struct guard *)cinfo->err;
  char msg[JMSG_LENGTH_MAX];
  (*cinfo->err->format_message)(cinfo, msg);
  snprintf(g->err, (size_t)g->err_len, "%s", msg);
  longjmp(g->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
  /* level -1: a warning (corrupt data); trace messages are ignored. */
  if (level < 0) {
    struct guard *g = (struct guard *)cinfo->err;
    if (!g->warned) {
      char msg[JMSG_LENGTH_MAX];
      (*cinfo->err->format_message)(cinfo, msg);
      snprintf(g->err, (size_t)g->err_len, "%s", msg);
    }
    g->warned = 1;
  }
}

/* Decodes the window into `canvas` (rows of `stride` bytes; row y + i of
 * the image at canvas row y + i, its columns at their own place) or, with
 * canvas NULL, into a region of the decoded columns only, h rows of
 * info[1] * channels bytes: the caller's *region of region_size bytes, or,
 * where *region is NULL, one allocated here and returned in *region (the
 * caller frees it). See cmim_jpeg_crop for the rest. */
static int decode_rows(const unsigned char *data, unsigned long size,
                       int denom, int want_w, int want_h, int channels, int x,
                       int y, int w, int h, unsigned char *canvas, long stride,
                       int *info, unsigned char **region,
                       unsigned long region_size, char *err, int err_len) {
  struct jpeg_decompress_struct cinfo;
  struct guard g;
  volatile int status = 0;
  unsigned char *volatile buf = NULL;
  memset(&g, 0, sizeof(g));
  g.err = err;
  g.err_len = err_len;
  err[0] = '\0';
  cinfo.err = jpeg_std_error(&g.pub);
  g.pub.error_exit = on_error;
  g.pub.emit_message = on_message;
  if (setjmp(g.jump)) {
    jpeg_destroy_decompress(&cinfo);
    free(buf);
    return 1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  if (channels == 4 && cinfo.num_components == 3 &&
      (cinfo.jpeg_color_space == JCS_YCbCr ||
       cinfo.jpeg_color_space == JCS_RGB)) {
    cinfo.out_color_space = JCS_EXT_RGBX;
  } else if (channels == 1 && cinfo.num_components == 1) {
    cinfo.out_color_space = JCS_GRAYSCALE;
  } else {
    status = 3;
  }
  if (status == 0) {
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)denom;
    jpeg_start_decompress(&cinfo);
    if ((int)cinfo.output_width != want_w ||
        (int)cinfo.output_height != want_h ||
        cinfo.output_components != channels || x < 0 || y < 0 || w <= 0 ||
        h <= 0 || x + w > want_w || y + h > want_h ||
        (canvas && stride < (long)want_w * channels)) {
      status = 3;
    }
  }
  if (status == 0) {
    JDIMENSION xoff = (JDIMENSION)x, cw = (JDIMENSION)w;
    JSAMPROW row;
    long rs = stride;
    int i;
    if (cw < cinfo.output_width) jpeg_crop_scanline(&cinfo, &xoff, &cw);
    if (!canvas) {
      rs = (long)cw * channels; /* The widened window's columns. */
      if (*region) {
        if ((size_t)h * (size_t)rs > region_size) {
          snprintf(err, (size_t)err_len,
                   "region buffer of %lu bytes < %d rows of %ld", region_size,
                   h, rs);
          status = 3;
        }
      } else {
        buf = malloc((size_t)h * (size_t)rs);
        if (!buf) {
          snprintf(err, (size_t)err_len, "out of memory");
          status = 1;
        }
      }
    }
    if (status == 0 && y > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)y);
    for (i = 0; status == 0 && i < h; i++) {
      row = canvas ? canvas + (size_t)(y + i) * (size_t)rs +
                         (size_t)xoff * (size_t)channels
                   : (buf ? buf : *region) + (size_t)i * (size_t)rs;
      if (jpeg_read_scanlines(&cinfo, &row, 1) != 1) {
        snprintf(err, (size_t)err_len, "no scanline %d", y + i);
        status = 1;
      }
    }
    info[0] = (int)xoff;
    info[1] = (int)cw;
  }
  if (status == 0 && g.warned) status = 2;
  /* The rows below the window are never read: abort, not finish. */
  jpeg_destroy_decompress(&cinfo);
  if (status == 0 && buf) {
    *region = buf;
  } else {
    free(buf);
  }
  return status;
}

/* data/size: the file. denom: 1, 2, 4 or 8. want_w/want_h: the scaled size
 * the caller computed (checked). channels: 4 (RGBX from a 3-component
 * file) or 1 (grayscale). x, y, w, h: the window in scaled pixels.
 * canvas: want_h rows of `stride` bytes; row y + i of the image goes to
 * canvas row y + i, its columns at their own place. info[0], info[1]: the
 * decoded columns' first index and count (x and w widened to iMCU
 * boundaries). */
int cmim_jpeg_crop(const unsigned char *data, unsigned long size, int denom,
                   int want_w, int want_h, int channels, int x, int y, int w,
                   int h, unsigned char *canvas, long stride, int *info,
                   char *err, int err_len) {
  if (!canvas) return 3;
  return decode_rows(data, size, denom, want_w, want_h, channels, x, y, w, h,
                     canvas, stride, info, NULL, 0, err, err_len);
}

/* cmim_jpeg_crop's window, without the canvas: the decoded columns only,
 * h rows of info[1] * channels bytes packed into `region` (region_size
 * bytes; 3 if that is too small), as cmim_jpeg_crop_resize decodes them
 * before it resizes. */
int cmim_jpeg_crop_region(const unsigned char *data, unsigned long size,
                          int denom, int want_w, int want_h, int channels,
                          int x, int y, int w, int h, unsigned char *region,
                          unsigned long region_size, int *info, char *err,
                          int err_len) {
  if (!region) return 3;
  return decode_rows(data, size, denom, want_w, want_h, channels, x, y, w, h,
                     NULL, 0, info, &region, region_size, err, err_len);
}

/* cmim_jpeg_crop's window, then resample.c's resize of `box` (of the scaled
 * image) to out_w x out_h RGB pixels, mirrored if `flip`, into `out` (rows
 * `out_stride` bytes apart): PIL's resize(BILINEAR, box) of the full decode
 * at that scale, bit for bit. Only the window is held in memory, never the
 * whole canvas. Returns 0, cmim_jpeg_crop's codes, or resample.h's
 * CMIM_RESAMPLE_* (e.g. the box reads outside the window). */
int cmim_jpeg_crop_resize(const unsigned char *data, unsigned long size,
                          int denom, int want_w, int want_h, int channels,
                          int x, int y, int w, int h, const float *box,
                          int out_w, int out_h, int flip, unsigned char *out,
                          long out_stride, int simd, char *err, int err_len) {
  unsigned char *region = NULL;
  int info[2] = {0, 0};
  int status = decode_rows(data, size, denom, want_w, want_h, channels, x, y,
                           w, h, NULL, 0, info, &region, 0, err, err_len);
  if (status) return status;
  /* The region's columns: libjpeg's widened window (see decode_rows). */
  status = cmim_resample(region, (long)info[1] * channels, channels, want_w,
                         want_h, info[0], y, info[1], h, box, out_w, out_h,
                         flip, out, out_stride, simd);
  if (status) snprintf(err, (size_t)err_len, "resample status %d", status);
  free(region);
  return status;
}
