// One packed binary convolution layer per call, as an XLA FFI custom call on CPU.
//
// out[b, y, x, o] = alpha[o] * sum over the taps inside the image of
//                   sum_c sign(x)[b, iy, ix, c] * sign(w)[tap, c, o]
// optionally followed by the per-channel BatchNorm ((v - mean) * mul + bias).
//
// The input is binarized (x >= 0 is +1, as training's sign) and packed along
// channels into words of T (uint16 for cin <= 16, uint32 for cin <= 32,
// uint64 above), the kernel arrives packed the same way ([kh, kw, K, cout],
// laid out by cmim_jax/export/ffi.py). For a tap inside the image the +-1 dot
// is cin - 2 * popcount(x ^ w) (channel-padding bits are 0 in both and never
// count); a tap on padding is skipped, i.e. contributes 0, exactly as the
// zero padding after binarization in training. So the integer is exact and
// the float epilogue is the pure-JAX path's operations in its order
// (int -> float, * alpha, then the BatchNorm's subtract and its multiply-add,
// which XLA:CPU contracts into one FMA on a CPU that has one): compiled with
// -ffp-contract=off so that the compiler fuses nothing else.
//
// Portability: compiled with -O3 and no -march. The hot loop is compiled
// three times (AVX-512 with VPOPCNTDQ/BITALG, AVX2 + POPCNT, baseline
// x86-64 or any other CPU) and the variant is chosen once at run time with
// __builtin_cpu_supports, so the shared object runs on any machine of its
// architecture. GCC vectorises the popcount loop over output channels with
// vpopcnt{w,d,q} in the AVX-512 variant.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t b, h, w, cin;      // input
  int64_t kh, kw, k, cout;   // kernel: taps, words per position, outputs
  int64_t sh, sw, pt, pl;    // strides, top/left padding
  int64_t ho, wo;            // output
};

// Binarizes and packs one image row range: x[..., cin] floats -> words[..., k].
template <typename T>
inline __attribute__((always_inline)) void PackInput(const float* __restrict x, T* __restrict p,
                                                     int64_t positions, int64_t cin, int64_t k) {
  constexpr int64_t kBits = 8 * sizeof(T);
  for (int64_t n = 0; n < positions; ++n) {
    const float* xs = x + n * cin;
    T* ps = p + n * k;
    for (int64_t word = 0; word < k; ++word) {
      const int64_t c0 = word * kBits;
      const int64_t c1 = std::min(cin, c0 + kBits);
      T v = 0;
      for (int64_t c = c0; c < c1; ++c) v |= static_cast<T>(xs[c] >= 0.0f) << (c - c0);
      ps[word] = v;
    }
  }
}

template <typename T, bool kFma>
inline __attribute__((always_inline)) void Conv(const Geometry& g, const float* __restrict x,
                                                const T* __restrict wt, const float* __restrict alpha,
                                                const float* __restrict mean, const float* __restrict mul,
                                                const float* __restrict bias, float* __restrict out,
                                                T* __restrict packed, T* __restrict acc) {
  PackInput<T>(x, packed, g.b * g.h * g.w, g.cin, g.k);
  for (int64_t b = 0; b < g.b; ++b) {
    const T* img = packed + b * g.h * g.w * g.k;
    for (int64_t oy = 0; oy < g.ho; ++oy) {
      const int64_t y0 = oy * g.sh - g.pt;
      const int64_t i0 = std::max<int64_t>(0, -y0), i1 = std::min(g.kh, g.h - y0);
      for (int64_t ox = 0; ox < g.wo; ++ox) {
        const int64_t x0 = ox * g.sw - g.pl;
        const int64_t j0 = std::max<int64_t>(0, -x0), j1 = std::min(g.kw, g.w - x0);
        for (int64_t o = 0; o < g.cout; ++o) acc[o] = 0;
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < j1; ++j) {
            const T* xw = img + ((y0 + i) * g.w + (x0 + j)) * g.k;
            const T* wtap = wt + (i * g.kw + j) * g.k * g.cout;
            for (int64_t word = 0; word < g.k; ++word) {
              const T v = xw[word];
              const T* wrow = wtap + word * g.cout;
              // Vectorised over output channels: XOR + popcount + add.
              for (int64_t o = 0; o < g.cout; ++o)
                acc[o] += static_cast<T>(__builtin_popcountll(static_cast<T>(v ^ wrow[o])));
            }
          }
        }
        const int32_t full = static_cast<int32_t>((i1 - i0) * (j1 - j0) * g.cin);
        float* dst = out + ((b * g.ho + oy) * g.wo + ox) * g.cout;
        if (mean == nullptr) {
          for (int64_t o = 0; o < g.cout; ++o)
            dst[o] = static_cast<float>(full - 2 * static_cast<int32_t>(acc[o])) * alpha[o];
        } else {
          for (int64_t o = 0; o < g.cout; ++o) {
            const float v = static_cast<float>(full - 2 * static_cast<int32_t>(acc[o])) * alpha[o];
            // XLA:CPU contracts the BatchNorm's multiply and add into one
            // FMA where the CPU has one (measured: its result equals
            // fma(v - mean, mul, bias) everywhere, two roundings in 17% of
            // values), so the same here, and two roundings where it has none.
            if (kFma)
              dst[o] = __builtin_fmaf(v - mean[o], mul[o], bias[o]);
            else
              dst[o] = (v - mean[o]) * mul[o] + bias[o];
          }
        }
      }
    }
  }
}

template <typename T>
using ConvFn = void (*)(const Geometry&, const float*, const T*, const float*, const float*,
                        const float*, const float*, float*, T*, T*);

#define CMIM_VARIANT(NAME, TARGET, FMA)                                                       \
  template <typename T>                                                                       \
  TARGET void NAME(const Geometry& g, const float* x, const T* wt, const float* alpha,        \
                   const float* mean, const float* mul, const float* bias, float* out,        \
                   T* packed, T* acc) {                                                       \
    Conv<T, FMA>(g, x, wt, alpha, mean, mul, bias, out, packed, acc);                         \
  }

#if defined(__x86_64__) && defined(__GNUC__)
CMIM_VARIANT(ConvAvx512,
             __attribute__((target("avx512f,avx512vl,avx512bw,avx512vpopcntdq,avx512bitalg,fma"))),
             true)
CMIM_VARIANT(ConvAvx2, __attribute__((target("avx2,popcnt,fma"))), true)
#endif
// Baseline: an FMA only where the architecture always has one (XLA uses it there).
#if defined(__aarch64__) || defined(__FMA__)
CMIM_VARIANT(ConvBase, , true)
#else
CMIM_VARIANT(ConvBase, , false)
#endif

// Which variant this CPU runs: 2 AVX-512 VPOPCNTDQ+BITALG, 1 AVX2+POPCNT (both
// with FMA), 0 baseline.
int Isa() {
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

const int kIsa = Isa();

template <typename T>
ConvFn<T> Pick() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kIsa == 2) return &ConvAvx512<T>;
  if (kIsa == 1) return &ConvAvx2<T>;
#endif
  return &ConvBase<T>;
}

template <typename T>
ffi::Error Run(const Geometry& g, const float* x, const void* wt, const float* alpha,
               const float* mean, const float* mul, const float* bias, float* out) {
  // Scratch reused across calls on the same thread (no allocation per call
  // once warm).
  thread_local std::vector<T> packed, acc;
  packed.resize(static_cast<size_t>(g.b * g.h * g.w * g.k));
  acc.resize(static_cast<size_t>(g.cout));
  static const ConvFn<T> fn = Pick<T>();
  fn(g, x, static_cast<const T*>(wt), alpha, mean, mul, bias, out, packed.data(), acc.data());
  return ffi::Error::Success();
}

ffi::Error BConvImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer wt, ffi::Buffer<ffi::F32> alpha,
                     const float* mean, const float* mul, const float* bias,
                     ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t cin, int64_t sh, int64_t sw,
                     int64_t pt, int64_t pl, int64_t word_bits) {
  auto xd = x.dimensions();
  auto wd = wt.dimensions();
  auto od = out->dimensions();
  // 64-bit words arrive as pairs of uint32 ([..., cout, 2]): JAX without
  // x64 would truncate a uint64 array.
  const size_t rank = word_bits == 64 ? 5 : 4;
  if (xd.size() != 4 || wd.size() != rank || od.size() != 4)
    return ffi::Error::InvalidArgument("cmim_bconv: input, kernel and output ranks");
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[2], wd[3],
             sh, sw, pt, pl, od[1], od[2]};
  if (g.cin != cin || od[0] != g.b || od[3] != g.cout || alpha.element_count() != g.cout)
    return ffi::Error::InvalidArgument("cmim_bconv: inconsistent shapes");
  const int64_t bytes = static_cast<int64_t>(ffi::ByteWidth(wt.element_type())) *
                        (rank == 5 ? wd[4] : 1);
  if (bytes * 8 != word_bits || g.k * word_bits < cin)
    return ffi::Error::InvalidArgument("cmim_bconv: kernel words do not match word_bits/cin");
  const float* xp = x.typed_data();
  const float* ap = alpha.typed_data();
  float* op = out->typed_data();
  switch (word_bits) {
    case 16: return Run<uint16_t>(g, xp, wt.untyped_data(), ap, mean, mul, bias, op);
    case 32: return Run<uint32_t>(g, xp, wt.untyped_data(), ap, mean, mul, bias, op);
    case 64: return Run<uint64_t>(g, xp, wt.untyped_data(), ap, mean, mul, bias, op);
    default: return ffi::Error::InvalidArgument("cmim_bconv: word_bits must be 16, 32 or 64");
  }
}

ffi::Error BConv(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer wt, ffi::Buffer<ffi::F32> alpha,
                 ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t cin, int64_t sh, int64_t sw,
                 int64_t pt, int64_t pl, int64_t word_bits) {
  return BConvImpl(x, wt, alpha, nullptr, nullptr, nullptr, out, cin, sh, sw, pt, pl, word_bits);
}

ffi::Error BConvBn(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer wt, ffi::Buffer<ffi::F32> alpha,
                   ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> mul,
                   ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::Buffer<ffi::F32>> out,
                   int64_t cin, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                   int64_t word_bits) {
  const int64_t cout = alpha.element_count();
  if (mean.element_count() != cout || mul.element_count() != cout || bias.element_count() != cout)
    return ffi::Error::InvalidArgument("cmim_bconv_bn: BatchNorm vectors must have cout entries");
  return BConvImpl(x, wt, alpha, mean.typed_data(), mul.typed_data(), bias.typed_data(), out,
                   cin, sh, sw, pt, pl, word_bits);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CmimBConv, BConv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("cin")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("word_bits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CmimBConvBn, BConvBn,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("cin")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("word_bits"));

// For the loader's log line and the tests: which variant runs here.
extern "C" int cmim_bconv_isa() { return kIsa; }
