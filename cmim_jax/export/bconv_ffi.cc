// One packed binary convolution layer per call, as an XLA FFI custom call on CPU.
//
// out[b, y, x, o] = alpha[o] * sum over the taps inside the image of
//                   sum_c sign(x)[b, iy, ix, c] * sign(w)[tap, c, o]
// optionally followed by the per-channel BatchNorm ((v - mean) * mul + bias),
// then optionally a residual add and a hardtanh (a ResNet block's tail).
//
// The input is binarized (x >= 0 is +1, as training's sign) and packed along
// channels into words of T (uint16 for cin <= 16, uint32 for cin <= 32,
// uint64 above); the kernel arrives packed the same way, [kh, kw, K, cs] with
// the output channels zero-padded to cs, a whole number of 512-bit registers
// (laid out by cmim_jax/export/ffi.py). For a tap inside the image the +-1
// dot is cin - 2 * popcount(x ^ w) (channel-padding bits are 0 in both and
// never count); a tap on padding is skipped, i.e. contributes 0, exactly as
// the zero padding after binarization in training. So the integer is exact
// and the float epilogue is the pure-JAX path's operations in its order
// (int -> float, * alpha, then the BatchNorm's subtract and its multiply-add,
// which XLA:CPU contracts into one FMA on a CPU that has one): compiled with
// -ffp-contract=off so that the compiler fuses nothing else.
//
// Portability: compiled with -O3 and no -march. The hot loops exist three
// times (AVX-512 VPOPCNTDQ/BITALG intrinsics; plain C++ compiled for AVX2 +
// POPCNT; plain C++ for the baseline of any architecture); the best variant
// the CPU has (__builtin_cpu_supports) is the default, a lower one can be
// chosen with cmim_bconv_set_isa (CMIM_JAX_FFI_ISA), so the shared object
// runs on any machine of its architecture and tests run every variant.
//
// The AVX-512 loop (RowsAvx512Blocked) keeps a position's output channels in
// up to 8 accumulator registers, runs interior positions from a fixed tap
// list (3x3 one-word layers fully unrolled) and only the border positions
// through the padding checks, and puts two positions in one register where
// one position's channels would fill half of it (16-channel layers); at
// stride 1 those two positions' input words are adjacent, so one 32-bit load
// is the broadcast pair (PairsRow3x3S1). Other 3x3 layers of one word per
// position and up to 8 registers of output channels run each interior row
// with the kernel's registers and the epilogue's constants loaded once per
// row (OneWordRow3x3). Timed kernel-only against the earlier loops by
// bench/bconv_micro.cc.
//
// Threads: a large call (batch 64) is split into row ranges run on XLA's
// intra-op thread pool (ffi::ThreadPool), the calling thread taking ranges
// too, so it completes even if no pool thread is free; small calls (batch 1)
// stay on the calling thread, where a hand-off costs more than it saves.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t b, h, w, cin;      // input
  int64_t kh, kw, k, cs;     // kernel: taps, words per position, output-channel stride
  int64_t sh, sw, pt, pl;    // strides, top/left padding
  int64_t ho, wo, cout;      // output
};

// The output channels [o0, o0 + n) of one position from their mismatch
// counts: the pure-JAX path's float operations in its order.
template <typename T, bool kFma>
inline __attribute__((always_inline)) void Epilogue(float* __restrict dst, const T* __restrict acc,
                                                    int64_t n, int32_t full,
                                                    const float* __restrict alpha,
                                                    const float* __restrict mean,
                                                    const float* __restrict mul,
                                                    const float* __restrict bias,
                                                    const float* __restrict res, bool clip) {
  if (mean == nullptr) {
    for (int64_t o = 0; o < n; ++o)
      dst[o] = static_cast<float>(full - 2 * static_cast<int32_t>(acc[o])) * alpha[o];
    return;
  }
  for (int64_t o = 0; o < n; ++o) {
    const float v = static_cast<float>(full - 2 * static_cast<int32_t>(acc[o])) * alpha[o];
    // XLA:CPU contracts the BatchNorm's multiply and add into one FMA where
    // the CPU has one (measured: its result equals fma(v - mean, mul, bias)
    // everywhere, two roundings differ in 17% of values), so the same here,
    // and two roundings where there is none.
    float u = kFma ? __builtin_fmaf(v - mean[o], mul[o], bias[o]) : (v - mean[o]) * mul[o] + bias[o];
    // The residual add and hardtanh that follow in a ResNet block: one
    // rounding, then an exact clamp (jnp.clip's max then min).
    if (res != nullptr) u = u + res[o];
    if (clip) u = std::min(std::max(u, -1.0f), 1.0f);
    dst[o] = u;
  }
}

// The taps of output position (oy, ox) that fall inside the image: rows
// [i0, i1), columns [j0, j1); a tap on padding contributes 0.
struct Window {
  int64_t y0, x0, i0, i1, j0, j1;
};

inline __attribute__((always_inline)) Window TapsInside(const Geometry& g, int64_t oy, int64_t ox) {
  Window t;
  t.y0 = oy * g.sh - g.pt;
  t.x0 = ox * g.sw - g.pl;
  t.i0 = std::max<int64_t>(0, -t.y0);
  t.i1 = std::min(g.kh, g.h - t.y0);
  t.j0 = std::max<int64_t>(0, -t.x0);
  t.j1 = std::min(g.kw, g.w - t.x0);
  return t;
}

struct Args {
  const float* x;
  const void* wt;
  const float *alpha, *mean, *mul, *bias;  // mean == nullptr: no BatchNorm
  const float* res;                         // residual added after the BatchNorm, or nullptr
  bool clip;                                // hardtanh after that
  float* out;
};

// Plain C++ (any CPU): binarize + pack the input positions [n0, n1).
template <typename T>
inline __attribute__((always_inline)) void PackGeneric(const Geometry& g, const float* __restrict x,
                                                       T* __restrict packed, int64_t n0, int64_t n1) {
  constexpr int64_t kBits = 8 * sizeof(T);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t word = 0; word < g.k; ++word) {
      const int64_t c0 = word * kBits, c1 = std::min(g.cin, c0 + kBits);
      T v = 0;
      for (int64_t c = c0; c < c1; ++c) v |= static_cast<T>(x[n * g.cin + c] >= 0.0f) << (c - c0);
      packed[n * g.k + word] = v;
    }
  }
}

// Plain C++: the output rows [r0, r1) (row r = image r / ho, row r % ho), per
// position a loop over output channels that the compiler vectorises where it can.
template <typename T, bool kFma>
inline __attribute__((always_inline)) void RowsGeneric(const Geometry& g, const Args& a,
                                                       const T* __restrict packed, int64_t r0,
                                                       int64_t r1) {
  const T* __restrict wt = static_cast<const T*>(a.wt);
  std::vector<T> acc_buf(static_cast<size_t>(g.cout));
  T* __restrict acc = acc_buf.data();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / g.ho, oy = r % g.ho;
    const T* img = packed + b * g.h * g.w * g.k;
    for (int64_t ox = 0; ox < g.wo; ++ox) {
      const Window t = TapsInside(g, oy, ox);
      for (int64_t o = 0; o < g.cout; ++o) acc[o] = 0;
      for (int64_t i = t.i0; i < t.i1; ++i) {
        for (int64_t j = t.j0; j < t.j1; ++j) {
          const T* xw = img + ((t.y0 + i) * g.w + (t.x0 + j)) * g.k;
          const T* wtap = wt + (i * g.kw + j) * g.k * g.cs;
          for (int64_t word = 0; word < g.k; ++word) {
            const T v = xw[word];
            const T* wrow = wtap + word * g.cs;
            for (int64_t o = 0; o < g.cout; ++o)
              acc[o] += static_cast<T>(__builtin_popcountll(static_cast<T>(v ^ wrow[o])));
          }
        }
      }
      const int32_t full = static_cast<int32_t>((t.i1 - t.i0) * (t.j1 - t.j0) * g.cin);
      const int64_t at = (r * g.wo + ox) * g.cout;
      Epilogue<T, kFma>(a.out + at, acc, g.cout, full, a.alpha, a.mean, a.mul, a.bias,
                        a.res ? a.res + at : nullptr, a.clip);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define CMIM_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512vpopcntdq,avx512bitalg,fma")))

// One 512-bit register of T lanes.
template <typename T> struct Zmm;
template <> struct Zmm<uint16_t> {
  CMIM_AVX512 static inline __m512i Set1(uint16_t v) { return _mm512_set1_epi16(static_cast<short>(v)); }
  CMIM_AVX512 static inline __m512i AddPopcount(__m512i acc, __m512i v) {
    return _mm512_add_epi16(acc, _mm512_popcnt_epi16(v));
  }
};
template <> struct Zmm<uint32_t> {
  CMIM_AVX512 static inline __m512i Set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  CMIM_AVX512 static inline __m512i AddPopcount(__m512i acc, __m512i v) {
    return _mm512_add_epi32(acc, _mm512_popcnt_epi32(v));
  }
};
template <> struct Zmm<uint64_t> {
  CMIM_AVX512 static inline __m512i Set1(uint64_t v) { return _mm512_set1_epi64(static_cast<long long>(v)); }
  CMIM_AVX512 static inline __m512i AddPopcount(__m512i acc, __m512i v) {
    return _mm512_add_epi64(acc, _mm512_popcnt_epi64(v));
  }
};

// AVX-512: the sign bits of 16 floats are one compare into a mask register.
template <typename T>
CMIM_AVX512 void PackAvx512(const Geometry& g, const float* x, T* packed, int64_t n0, int64_t n1) {
  const int64_t chunks = (g.cin + 15) / 16;                        // 16 channels each
  const int64_t slots = g.k * static_cast<int64_t>(sizeof(T)) / 2;  // uint16 per position
  const __mmask16 tail = static_cast<__mmask16>((1u << (g.cin - 16 * (chunks - 1))) - 1u);
  const __m512 zero = _mm512_setzero_ps();
  uint16_t* p16 = reinterpret_cast<uint16_t*>(packed);
  for (int64_t n = n0; n < n1; ++n) {
    const float* xs = x + n * g.cin;
    uint16_t* ps = p16 + n * slots;
    for (int64_t q = 0; q + 1 < chunks; ++q)
      ps[q] = _mm512_cmp_ps_mask(_mm512_loadu_ps(xs + 16 * q), zero, _CMP_GE_OQ);
    const int64_t q = chunks - 1;  // The last chunk: lanes past cin are 0 bits.
    ps[q] = _mm512_mask_cmp_ps_mask(tail, _mm512_maskz_loadu_ps(tail, xs + 16 * q), zero,
                                    _CMP_GE_OQ);
    for (int64_t r = chunks; r < slots; ++r) ps[r] = 0;
  }
}

// AVX-512: each (tap, word) adds XOR + popcount of one broadcast input word
// against a register of output channels, accumulated in a register.
template <typename T, bool kFma>
CMIM_AVX512 void RowsAvx512(const Geometry& g, const Args& a, const T* packed, int64_t r0,
                            int64_t r1) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  const T* wt = static_cast<const T*>(a.wt);
  alignas(64) T lanes[kLanes];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / g.ho, oy = r % g.ho;
    const T* img = packed + b * g.h * g.w * g.k;
    for (int64_t ox = 0; ox < g.wo; ++ox) {
      const Window t = TapsInside(g, oy, ox);
      const int32_t full = static_cast<int32_t>((t.i1 - t.i0) * (t.j1 - t.j0) * g.cin);
      const int64_t at = (r * g.wo + ox) * g.cout;
      float* dst = a.out + at;
      for (int64_t o0 = 0; o0 < g.cout; o0 += kLanes) {
        __m512i acc = _mm512_setzero_si512();
        for (int64_t i = t.i0; i < t.i1; ++i) {
          for (int64_t j = t.j0; j < t.j1; ++j) {
            const T* xw = img + ((t.y0 + i) * g.w + (t.x0 + j)) * g.k;
            const T* wtap = wt + (i * g.kw + j) * g.k * g.cs + o0;
            for (int64_t word = 0; word < g.k; ++word) {
              const __m512i w = _mm512_loadu_si512(wtap + word * g.cs);
              acc = Zmm<T>::AddPopcount(acc, _mm512_xor_si512(w, Zmm<T>::Set1(xw[word])));
            }
          }
        }
        _mm512_store_si512(lanes, acc);
        Epilogue<T, kFma>(dst + o0, lanes, std::min(kLanes, g.cout - o0), full, a.alpha + o0,
                          a.mean ? a.mean + o0 : nullptr, a.mul ? a.mul + o0 : nullptr,
                          a.bias ? a.bias + o0 : nullptr, a.res ? a.res + at + o0 : nullptr,
                          a.clip);
      }
    }
  }
}

// AVX-512, blocked: one position's output channels in up to 8 accumulator
// registers at a time (each tap's input word broadcast once for all of
// them), the taps of an interior position from a precomputed offset list
// (no padding checks), two positions per register where one position's
// channels fill at most half of it (uint16 words, cout <= 16: a 16-channel
// layer would leave half of every register empty), and the epilogue 16
// channels per instruction. The same integers and the same float operations
// as the scalar Epilogue, so the same bits (tested against every variant).
constexpr int64_t kMaxTaps = 64;

// The per-channel constants of 16 channels (lanes past n: 0).
struct Chan16 {
  __mmask16 m;
  __m512 alpha, mean, mul, bias;
};

CMIM_AVX512 inline Chan16 LoadChan16(int64_t n, const float* alpha, const float* mean,
                                     const float* mul, const float* bias) {
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
  const __m512 z = _mm512_setzero_ps();
  return {m, _mm512_maskz_loadu_ps(m, alpha), mean ? _mm512_maskz_loadu_ps(m, mean) : z,
          mean ? _mm512_maskz_loadu_ps(m, mul) : z, mean ? _mm512_maskz_loadu_ps(m, bias) : z};
}

// mismatch counts (int32) -> the output channels [0, n) of one position.
CMIM_AVX512 inline void Epilogue16V(float* dst, __m512i cnt, int32_t full, const Chan16& c,
                                    bool bn, const float* res, bool clip) {
  const __m512i d = _mm512_sub_epi32(_mm512_set1_epi32(full), _mm512_add_epi32(cnt, cnt));
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(d), c.alpha);
  if (bn) {
    v = _mm512_fmadd_ps(_mm512_sub_ps(v, c.mean), c.mul, c.bias);
    if (res != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(c.m, res));
    if (clip) v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f));
  }
  _mm512_mask_storeu_ps(dst, c.m, v);
}

CMIM_AVX512 inline void Epilogue16(float* dst, __m512i cnt, int64_t n, int32_t full,
                                   const float* alpha, const float* mean, const float* mul,
                                   const float* bias, const float* res, bool clip) {
  Epilogue16V(dst, cnt, full, LoadChan16(n, alpha, mean, mul, bias), mean != nullptr, res, clip);
}

struct Out {  // where one position's channels go, and its count of valid inputs
  float* dst;
  const float* res;
  int32_t full;
};

// The channels [c0, c0 + width) of one position (clipped to cout) from int32 counts.
CMIM_AVX512 inline void EpilogueChunk(const Geometry& g, const Args& a, const Out& o,
                                      __m512i cnt, int64_t c0, int64_t width) {
  const int64_t n = std::min(width, g.cout - c0);
  if (n <= 0) return;
  Epilogue16(o.dst + c0, cnt, n, o.full, a.alpha + c0, a.mean ? a.mean + c0 : nullptr,
             a.mul ? a.mul + c0 : nullptr, a.bias ? a.bias + c0 : nullptr,
             o.res ? o.res + c0 : nullptr, a.clip);
}

// The channels [c, c + lanes of acc) of one position. (No lambdas here: a
// lambda does not inherit the target attribute, and a 512-bit argument
// passed to code compiled without AVX-512 arrives as garbage.)
template <typename T>
CMIM_AVX512 inline void EpilogueReg(const Geometry& g, const Args& a, const Out& o, __m512i acc,
                                    int64_t c) {
  if constexpr (sizeof(T) == 2) {
    EpilogueChunk(g, a, o, _mm512_cvtepu16_epi32(_mm512_castsi512_si256(acc)), c, 16);
    EpilogueChunk(g, a, o, _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(acc, 1)), c + 16, 16);
  } else if constexpr (sizeof(T) == 4) {
    EpilogueChunk(g, a, o, acc, c, 16);
  } else {
    EpilogueChunk(g, a, o, _mm512_castsi256_si512(_mm512_cvtepi64_epi32(acc)), c, 8);
  }
}

struct Taps {  // the taps of a window: input word offsets and kernel offsets
  int64_t n;
  int64_t x[kMaxTaps], w[kMaxTaps];
};

inline void WindowTaps(const Geometry& g, const Window& t, Taps* taps) {
  taps->n = 0;
  for (int64_t i = t.i0; i < t.i1; ++i)
    for (int64_t j = t.j0; j < t.j1; ++j) {
      taps->x[taps->n] = ((t.y0 + i) * g.w + (t.x0 + j)) * g.k;
      taps->w[taps->n] = (i * g.kw + j) * g.k * g.cs;
      ++taps->n;
    }
}

// Registers [r0, r0 + NR) of output channels of one position; xs points at
// the window's top-left input word (offsets in taps are relative to it).
// NT, KW: the number of taps and words per position where known at compile
// time (a 3x3 interior window of one word: loops unrolled), 0 otherwise.
template <typename T, int NR, int NT, int KW>
CMIM_AVX512 inline void OnePosition(const Geometry& g, const Args& a, const T* xs,
                                    const Taps& taps, int64_t r0, const Out& o) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  const T* wt = static_cast<const T*>(a.wt) + r0 * kLanes;
  const int64_t nt = NT ? NT : taps.n, k = KW ? KW : g.k;
  __m512i acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t t = 0; t < nt; ++t) {
    const T* xw = xs + taps.x[t];
    const T* wtap = wt + taps.w[t];
    for (int64_t word = 0; word < k; ++word) {
      const __m512i x = Zmm<T>::Set1(xw[word]);
      const T* wr = wtap + word * g.cs;
      for (int r = 0; r < NR; ++r)
        acc[r] = Zmm<T>::AddPopcount(acc[r], _mm512_xor_si512(_mm512_loadu_si512(wr + r * kLanes), x));
    }
  }
  for (int r = 0; r < NR; ++r) EpilogueReg<T>(g, a, o, acc[r], (r0 + r) * kLanes);
}

template <typename T, int NT, int KW>
CMIM_AVX512 inline void AllChannels(const Geometry& g, const Args& a, const T* xs,
                                    const Taps& taps, const Out& o) {
  const int64_t regs = g.cs * static_cast<int64_t>(sizeof(T)) / 64;
  int64_t r = 0;
  for (; r + 8 <= regs; r += 8) OnePosition<T, 8, NT, KW>(g, a, xs, taps, r, o);
  if (r + 4 <= regs) { OnePosition<T, 4, NT, KW>(g, a, xs, taps, r, o); r += 4; }
  if (r + 2 <= regs) { OnePosition<T, 2, NT, KW>(g, a, xs, taps, r, o); r += 2; }
  if (r < regs) OnePosition<T, 1, NT, KW>(g, a, xs, taps, r, o);
}

// Two interior positions (xs, xs + step) of a uint16 layer with cout <= 16,
// interleaved: 16-bit lane 2c holds channel c of the first, lane 2c + 1 of
// the second, so both input words are one broadcast 32-bit pattern and the
// kernel's words come duplicated (wdup[t][2c] = wdup[t][2c + 1]); the counts
// of the two positions are then the low and high halves of each 32-bit lane.
template <int NT>
CMIM_AVX512 inline void TwoPositions16(const Args& a, const uint16_t* xs, int64_t step,
                                       const Taps& taps, const uint16_t (*wdup)[32],
                                       const Chan16& c, const Out& o1, const Out& o2) {
  const int64_t nt = NT ? NT : taps.n;
  __m512i acc = _mm512_setzero_si512();
  for (int64_t t = 0; t < nt; ++t) {  // cin <= 16: one word
    const uint16_t* xw = xs + taps.x[t];
    const uint32_t pair = xw[0] | static_cast<uint32_t>(xw[step]) << 16;
    const __m512i w = _mm512_loadu_si512(wdup[t]);
    acc = _mm512_add_epi16(acc, _mm512_popcnt_epi16(_mm512_xor_si512(
                                    w, _mm512_set1_epi32(static_cast<int>(pair)))));
  }
  const bool bn = a.mean != nullptr;
  Epilogue16V(o1.dst, _mm512_and_si512(acc, _mm512_set1_epi32(0xffff)), o1.full, c, bn, o1.res,
              a.clip);
  Epilogue16V(o2.dst, _mm512_srli_epi32(acc, 16), o2.full, c, bn, o2.res, a.clip);
}

// The epilogue of Epilogue16V with the BatchNorm / residual / hardtanh
// choice fixed at compile time (no branches in the hot loop).
template <bool kBn, bool kRes, bool kClip>
CMIM_AVX512 inline void Epilogue16T(float* dst, __m512i cnt, __m512i full, const Chan16& c,
                                    const float* res) {
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(full, _mm512_add_epi32(cnt, cnt))),
                           c.alpha);
  if constexpr (kBn) {
    v = _mm512_fmadd_ps(_mm512_sub_ps(v, c.mean), c.mul, c.bias);
    if constexpr (kRes) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(c.m, res));
    if constexpr (kClip)
      v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f));
  }
  _mm512_mask_storeu_ps(dst, c.m, v);
}

// The interior columns [xa, xb) of one output row of a 3x3, stride-1 layer
// with cin <= 16 and cout <= 16 (ResNet-20's first stage), two positions per
// register as TwoPositions16, where at stride 1 the two positions' input
// words are adjacent: one 32-bit load is the broadcast pair. Two pairs per
// step (two independent accumulator chains), the nine duplicated kernel
// registers held across the row, the tap offsets compile-time constants
// from three row pointers. Returns the first column not done (a last odd
// column is left to the caller).
template <bool kBn, bool kRes, bool kClip>
CMIM_AVX512 int64_t PairsRow3x3S1(const Args& a, const uint16_t* rows, int64_t w, int64_t xa,
                                  int64_t xb, int64_t pl, const uint16_t (*wdup)[32],
                                  const Chan16& c, int32_t full_inner, float* out_row,
                                  const float* res_row, int64_t cout) {
  __m512i wd[9];
  for (int t = 0; t < 9; ++t) wd[t] = _mm512_loadu_si512(wdup[t]);
  const __m512i full = _mm512_set1_epi32(full_inner);
  const __m512i low = _mm512_set1_epi32(0xffff);
  auto pair = [](const uint16_t* p) {  // the words at p[0], p[1] as one 32-bit lane pattern
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
  };
  int64_t ox = xa;
  for (; ox + 1 < xb; ox += 2) {
    const uint16_t* x0 = rows + ox - pl;  // tap (0, 0) of column ox
    __m512i acc = _mm512_setzero_si512();
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j)
        acc = _mm512_add_epi16(acc, _mm512_popcnt_epi16(_mm512_xor_si512(
                                        wd[3 * i + j],
                                        _mm512_set1_epi32(static_cast<int>(pair(x0 + i * w + j))))));
    const int64_t at = ox * cout;
    Epilogue16T<kBn, kRes, kClip>(out_row + at, _mm512_and_si512(acc, low), full, c,
                                  kRes ? res_row + at : nullptr);
    Epilogue16T<kBn, kRes, kClip>(out_row + at + cout, _mm512_srli_epi32(acc, 16), full, c,
                                  kRes ? res_row + at + cout : nullptr);
  }
  (void)a;
  return ox;
}

// The interior columns [xa, xb) of one output row of a 3x3 layer with one
// word per position and NR (1, 2, 4 or 8) registers of output channels: the
// kernel's 9 x NR registers and the epilogue's per-channel constants loaded
// once per row (held in registers where they fit), the tap offsets constants
// from the row stride, the epilogue choice fixed at compile time. `row`
// points at the window's top-left input word of column 0.
template <typename T, int NR, bool kBn, bool kRes, bool kClip>
CMIM_AVX512 void OneWordRow3x3(const Geometry& g, const Args& a, const T* row, int64_t xa,
                               int64_t xb, float* out_row, const float* res_row,
                               int32_t full_inner) {
  constexpr int kLanes = 64 / sizeof(T);
  constexpr int kWidth = kLanes < 16 ? kLanes : 16;  // channels per epilogue step
  constexpr int kChunks = NR * kLanes / kWidth;
  const T* wt = static_cast<const T*>(a.wt);
  __m512i w[9][NR];
  for (int t = 0; t < 9; ++t)
    for (int r = 0; r < NR; ++r) w[t][r] = _mm512_loadu_si512(wt + t * g.cs + r * kLanes);
  Chan16 c[kChunks];
  int nq = 0;  // chunks holding channels (cout may fill fewer)
  for (int q = 0; q < kChunks && kWidth * q < g.cout; ++q, ++nq) {
    const int64_t o = kWidth * q;
    c[q] = LoadChan16(std::min<int64_t>(kWidth, g.cout - o), a.alpha + o,
                      a.mean ? a.mean + o : nullptr, a.mul ? a.mul + o : nullptr,
                      a.bias ? a.bias + o : nullptr);
  }
  const __m512i full = _mm512_set1_epi32(full_inner);
  const int64_t w3 = g.w;
  for (int64_t ox = xa; ox < xb; ++ox) {
    const T* x0 = row + ox * g.sw - g.pl;
    __m512i acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_si512();
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) {
        const __m512i xv = Zmm<T>::Set1(x0[i * w3 + j]);
        for (int r = 0; r < NR; ++r)
          acc[r] = Zmm<T>::AddPopcount(acc[r], _mm512_xor_si512(w[3 * i + j][r], xv));
      }
    float* dst = out_row + ox * g.cout;
    const float* res = kRes ? res_row + ox * g.cout : nullptr;
    for (int q = 0; q < nq; ++q) {
      const __m512i v = acc[q * kWidth / kLanes];
      __m512i cnt;  // int32 counts of channels [kWidth * q, kWidth * (q + 1))
      if constexpr (sizeof(T) == 2)
        cnt = _mm512_cvtepu16_epi32(q % 2 ? _mm512_extracti64x4_epi64(v, 1)
                                          : _mm512_castsi512_si256(v));
      else if constexpr (sizeof(T) == 4)
        cnt = v;
      else
        cnt = _mm512_castsi256_si512(_mm512_cvtepi64_epi32(v));
      Epilogue16T<kBn, kRes, kClip>(dst + kWidth * q, cnt, full, c[q],
                                    kRes ? res + kWidth * q : nullptr);
    }
  }
}

// OneWordRow3x3 for this call's word type, register count and epilogue, or
// nullptr where it does not apply.
template <typename T>
using OneWordRowFn = void (*)(const Geometry&, const Args&, const T*, int64_t, int64_t, float*,
                              const float*, int32_t);

template <typename T, int NR>
OneWordRowFn<T> PickOneWordRow(const Args& a) {
  if (a.mean == nullptr) return &OneWordRow3x3<T, NR, false, false, false>;
  if (a.res == nullptr) return &OneWordRow3x3<T, NR, true, false, false>;
  return a.clip ? &OneWordRow3x3<T, NR, true, true, true> : &OneWordRow3x3<T, NR, true, true, false>;
}

template <typename T>
OneWordRowFn<T> OneWordRow(const Geometry& g, const Args& a) {
  if (g.kh != 3 || g.kw != 3 || g.k != 1) return nullptr;
  switch (g.cs * static_cast<int64_t>(sizeof(T)) / 64) {
    case 1: return PickOneWordRow<T, 1>(a);
    case 2: return PickOneWordRow<T, 2>(a);
    case 4: return PickOneWordRow<T, 4>(a);
    case 8: return PickOneWordRow<T, 8>(a);
    default: return nullptr;
  }
}

template <typename T>
CMIM_AVX512 void RowsAvx512Blocked(const Geometry& g, const Args& a, const T* packed, int64_t r0,
                                   int64_t r1) {
  if (g.kh * g.kw > kMaxTaps) return RowsAvx512<T, true>(g, a, packed, r0, r1);
  const bool pairs = sizeof(T) == 2 && g.cout <= 16;
  // Interior output columns [xa, xb) and their taps (all kh x kw of them).
  const int64_t xa = std::min(g.wo, (g.pl + g.sw - 1) / g.sw);
  const int64_t xb = std::max(xa, std::min(g.wo, g.w - g.kw + g.pl >= 0
                                                     ? (g.w - g.kw + g.pl) / g.sw + 1 : 0));
  Taps inner;
  WindowTaps(g, Window{0, 0, 0, g.kh, 0, g.kw}, &inner);
  const int32_t full_inner = static_cast<int32_t>(g.kh * g.kw * g.cin);
  const bool nine = g.kh * g.kw == 9;
  alignas(64) uint16_t wdup[kMaxTaps][32];  // 4 KiB; filled only for pairs
  Chan16 chan{};
  if (pairs) {
    const uint16_t* wt = static_cast<const uint16_t*>(a.wt);
    for (int64_t t = 0; t < inner.n; ++t)
      for (int64_t c = 0; c < 16; ++c) wdup[t][2 * c] = wdup[t][2 * c + 1] = wt[inner.w[t] + c];
    chan = LoadChan16(g.cout, a.alpha, a.mean, a.mul, a.bias);
  }
  // Stride 1, 3x3, one uint16 word: the adjacent-pair loop (PairsRow3x3S1).
  const bool s1_pairs = pairs && nine && g.sh == 1 && g.sw == 1;
  // Other 3x3 one-word layers of up to 8 registers: OneWordRow3x3.
  const OneWordRowFn<T> one_word = pairs ? nullptr : OneWordRow<T>(g, a);
  Taps edge;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / g.ho, oy = r % g.ho;
    const T* img = packed + b * g.h * g.w * g.k;
    const int64_t y0 = oy * g.sh - g.pt;
    const bool row_inner = y0 >= 0 && y0 + g.kh <= g.h;
    auto out = [&](int64_t ox, int32_t full) {
      const int64_t at = (r * g.wo + ox) * g.cout;
      return Out{a.out + at, a.res ? a.res + at : nullptr, full};
    };
    for (int64_t ox = 0; ox < g.wo;) {
      if (s1_pairs && row_inner && ox == xa) {
        const uint16_t* rows = reinterpret_cast<const uint16_t*>(img) + y0 * g.w;
        float* orow = a.out + r * g.wo * g.cout;
        const float* rrow = a.res ? a.res + r * g.wo * g.cout : nullptr;
        const bool bn = a.mean != nullptr;
        auto run = bn ? (a.res ? (a.clip ? &PairsRow3x3S1<true, true, true>
                                         : &PairsRow3x3S1<true, true, false>)
                               : &PairsRow3x3S1<true, false, false>)
                      : &PairsRow3x3S1<false, false, false>;
        ox = run(a, rows, g.w, xa, xb, g.pl, wdup, chan, full_inner, orow, rrow, g.cout);
        if (ox >= xb) continue;  // an odd last interior column: below
      }
      if (one_word != nullptr && row_inner && ox == xa && xb > xa) {
        const int64_t at = r * g.wo * g.cout;
        one_word(g, a, img + y0 * g.w * g.k, xa, xb, a.out + at, a.res ? a.res + at : nullptr,
                 full_inner);
        ox = xb;
        continue;
      }
      if (row_inner && ox >= xa && ox < xb) {
        const T* xs = img + (y0 * g.w + ox * g.sw - g.pl) * g.k;
        if (pairs && ox + 1 < xb) {
          const uint16_t* xs16 = reinterpret_cast<const uint16_t*>(xs);
          if (nine) TwoPositions16<9>(a, xs16, g.sw, inner, wdup, chan, out(ox, full_inner), out(ox + 1, full_inner));
          else TwoPositions16<0>(a, xs16, g.sw, inner, wdup, chan, out(ox, full_inner), out(ox + 1, full_inner));
          ox += 2;
        } else {
          if (nine && g.k == 1) AllChannels<T, 9, 1>(g, a, xs, inner, out(ox, full_inner));
          else AllChannels<T, 0, 0>(g, a, xs, inner, out(ox, full_inner));
          ox += 1;
        }
        continue;
      }
      const Window t = TapsInside(g, oy, ox);
      WindowTaps(g, t, &edge);
      const int32_t full = static_cast<int32_t>((t.i1 - t.i0) * (t.j1 - t.j0) * g.cin);
      AllChannels<T, 0, 0>(g, a, img, edge, out(ox, full));
      ox += 1;
    }
  }
}
#endif

template <typename T>
struct Kernels {
  void (*pack)(const Geometry&, const float*, T*, int64_t, int64_t);
  void (*rows)(const Geometry&, const Args&, const T*, int64_t, int64_t);
};

#define CMIM_VARIANT(NAME, TARGET)                                                          \
  template <typename T>                                                                     \
  TARGET void Pack##NAME(const Geometry& g, const float* x, T* packed, int64_t n0,          \
                         int64_t n1) {                                                      \
    PackGeneric<T>(g, x, packed, n0, n1);                                                   \
  }                                                                                         \
  template <typename T, bool kFma>                                                          \
  TARGET void Rows##NAME(const Geometry& g, const Args& a, const T* packed, int64_t r0,      \
                         int64_t r1) {                                                      \
    RowsGeneric<T, kFma>(g, a, packed, r0, r1);                                             \
  }

#if defined(__x86_64__) && defined(__GNUC__)
CMIM_VARIANT(Avx2, __attribute__((target("avx2,popcnt,fma"))))
#endif
CMIM_VARIANT(Base, )

// Whether XLA:CPU contracts multiply-adds into FMAs here: where the CPU has
// them (always on aarch64). The baseline variant follows this too (compiled
// without -mfma, its fmaf is a library call with the same single rounding),
// so that forcing it on a CPU with FMA still gives XLA's bits.
bool HasFma() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("fma");
#elif defined(__aarch64__) || defined(__FMA__)
  return true;
#else
  return false;
#endif
}

// The best variant this CPU runs: 2 AVX-512 VPOPCNTDQ+BITALG, 1 AVX2+POPCNT
// (both with FMA), 0 baseline.
int BestIsa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("fma")) return 0;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vpopcntdq") &&
      __builtin_cpu_supports("avx512bitalg"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) return 1;
#endif
  return 0;
}

const bool kHasFma = HasFma();
const int kBestIsa = BestIsa();
// The variant in use: the best one unless cmim_bconv_set_isa chose a lower
// one (CMIM_JAX_FFI_ISA, read by ffi.py; tests run every variant this way).
// Read on every call, so a switch applies to already compiled programs.
std::atomic<int> g_isa{kBestIsa};

template <typename T>
Kernels<T> Pick(int isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == 2) return {&PackAvx512<T>, &RowsAvx512Blocked<T>};
  if (isa == 1) return {&PackAvx2<T>, &RowsAvx2<T, true>};
#endif
  if (kHasFma) return {&PackBase<T>, &RowsBase<T, true>};
  return {&PackBase<T>, &RowsBase<T, false>};
}

// Runs fn(0..n-1), on the pool's threads and the calling thread. The calling
// thread takes indices too and then waits for the ones others took, so it
// finishes even if no pool thread ever starts; a task starting after all
// indices are taken returns without touching fn (the state it reads is shared).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  if (n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < n; ++t) pool.Schedule(decltype(work)(work));  // a copy each
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Popcount lane-words below which a call stays on one thread (~0.3 ms of work).
constexpr int64_t kGrain = int64_t{1} << 22;

template <typename T>
ffi::Error Run(ffi::ThreadPool& pool, const Geometry& g, const Args& a) {
  const Kernels<T> kernels = Pick<T>(g_isa.load(std::memory_order_relaxed));
  // The calling thread's scratch, reused across calls; other threads only
  // read and write it inside ParallelFor, which returns after they are done.
  thread_local std::vector<T> packed_buf;
  packed_buf.resize(static_cast<size_t>(g.b * g.h * g.w * g.k));
  T* packed = packed_buf.data();
  const int64_t work = g.b * g.ho * g.wo * g.kh * g.kw * g.k * g.cs;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t rows = g.b * g.ho, positions = g.b * g.h * g.w;
  const int64_t parts = std::min({threads, std::max<int64_t>(1, work / kGrain), rows});
  ParallelFor(pool, parts, [&](int64_t p) {
    kernels.pack(g, a.x, packed, positions * p / parts, positions * (p + 1) / parts);
  });
  ParallelFor(pool, parts, [&](int64_t p) {
    kernels.rows(g, a, packed, rows * p / parts, rows * (p + 1) / parts);
  });
  return ffi::Error::Success();
}

ffi::Error BConvImpl(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer wt, ffi::Buffer<ffi::F32> alpha,
                     const float* mean, const float* mul, const float* bias, const float* res,
                     bool clip, ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t cin, int64_t sh,
                     int64_t sw, int64_t pt, int64_t pl, int64_t word_bits) {
  auto xd = x.dimensions();
  auto wd = wt.dimensions();
  auto od = out->dimensions();
  // 64-bit words arrive as pairs of uint32 ([..., cout, 2]): JAX without
  // x64 would truncate a uint64 array.
  const size_t rank = word_bits == 64 ? 5 : 4;
  if (xd.size() != 4 || wd.size() != rank || od.size() != 4)
    return ffi::Error::InvalidArgument("cmim_bconv: input, kernel and output ranks");
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[2], wd[3],
             sh, sw, pt, pl, od[1], od[2], od[3]};
  if (g.cin != cin || cin < 1 || od[0] != g.b || alpha.element_count() != g.cout ||
      g.cs < g.cout || (g.cs * word_bits) % 512 != 0)
    return ffi::Error::InvalidArgument("cmim_bconv: inconsistent shapes");
  const int64_t bytes = static_cast<int64_t>(ffi::ByteWidth(wt.element_type())) *
                        (rank == 5 ? wd[4] : 1);
  if (bytes * 8 != word_bits || g.k * word_bits < cin)
    return ffi::Error::InvalidArgument("cmim_bconv: kernel words do not match word_bits/cin");
  const Args a{x.typed_data(), wt.untyped_data(), alpha.typed_data(), mean, mul, bias, res, clip,
               out->typed_data()};
  switch (word_bits) {
    case 16: return Run<uint16_t>(pool, g, a);
    case 32: return Run<uint32_t>(pool, g, a);
    case 64: return Run<uint64_t>(pool, g, a);
    default: return ffi::Error::InvalidArgument("cmim_bconv: word_bits must be 16, 32 or 64");
  }
}

// One handler for the three forms of a call: after x, the kernel words and
// alpha come no more operands, the following BatchNorm's (mean, mul, bias),
// or those and a residual (then `clip` applies the hardtanh).
ffi::Error BConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer wt,
                 ffi::Buffer<ffi::F32> alpha, ffi::RemainingArgs epilogue,
                 ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t cin, int64_t sh, int64_t sw,
                 int64_t pt, int64_t pl, int64_t word_bits, int64_t clip) {
  const size_t n = epilogue.size();
  if (n != 0 && n != 3 && n != 4)
    return ffi::Error::InvalidArgument(
        "cmim_bconv: after x, kernel and alpha pass nothing, the BatchNorm's mean, mul and bias, "
        "or those and a residual");
  if (clip != 0 && n != 4)
    return ffi::Error::InvalidArgument("cmim_bconv: clip applies after a residual add");
  const float* v[4] = {nullptr, nullptr, nullptr, nullptr};  // mean, mul, bias, residual
  for (size_t i = 0; i < n; ++i) {
    auto b = epilogue.get<ffi::Buffer<ffi::F32>>(i);
    if (!b) return b.error();
    if (b->element_count() != (i < 3 ? alpha.element_count() : out->element_count()))
      return ffi::Error::InvalidArgument(
          i < 3 ? "cmim_bconv: BatchNorm vectors must have cout entries"
                : "cmim_bconv: the residual must have the output's shape");
    v[i] = b->typed_data();
  }
  return BConvImpl(pool, x, wt, alpha, v[0], v[1], v[2], v[3], clip != 0, out, cin, sh, sw, pt,
                   pl, word_bits);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CmimBConv, BConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("cin")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("word_bits")
                                  .Attr<int64_t>("clip"));

// For the loader's log line and the tests: which variant runs, and the best
// this CPU has.
extern "C" int cmim_bconv_isa() { return g_isa.load(); }
extern "C" int cmim_bconv_best_isa() { return kBestIsa; }

// Chooses the variant (0 baseline, 1 AVX2, 2 AVX-512) for the calls that
// start after it returns; 0 on success, -1 if this CPU lacks it.
extern "C" int cmim_bconv_set_isa(int isa) {
  if (isa < 0 || isa > kBestIsa) return -1;
  g_isa.store(isa);
  return 0;
}
