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

#include "bconv_common.inc"

#if defined(__x86_64__) && defined(__GNUC__)
#include "bconv_avx512.inc"
#include "bconv_avx512_rows.inc"
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
  if (bytes * 8 != word_bits || g.k != (cin + word_bits - 1) / word_bits)
    return ffi::Error::InvalidArgument(
        "cmim_bconv: kernel words do not match word_bits/cin (make them with ffi.kernel_words)");
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
