// Kernel-only timing of cmim_jax/export/bconv_ffi.cc's variants, paired and
// single-threaded, without XLA: per layer shape, the input pack and each
// row loop (AVX-512 blocked = what runs on an AVX-512 CPU; AVX-512 per
// position = the loop before blocking, kept as the fallback for windows of
// more than 64 taps; AVX2; baseline), every round calling each once back to
// back, reporting the 10th percentile over rounds (the least disturbed by a
// shared machine) and checking that every variant wrote the same bits.
//
//   g++ -O3 -std=c++17 -ffp-contract=off -w \
//       -I"$(python -c 'import jax; print(jax.ffi.include_dir())')" \
//       bench/bconv_micro.cc -o /tmp/bconv_micro && /tmp/bconv_micro
//
// Shapes: ResNet-20's five 3x3 shapes and four of ResNet-18's (CIFAR),
// batch 1, each with the fused BatchNorm + residual + hardtanh epilogue.
// The end-to-end and per-layer figures through XLA are bench/inference.py's.
#include "../cmim_jax/export/bconv_ffi.cc"

#include <chrono>
#include <cstdio>
#include <random>

namespace {

double P10(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 10];
}

template <typename T>
void Case(int64_t hw, int64_t cin, int64_t cout, int64_t s, int rounds) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  const int64_t k = (cin + 8 * sizeof(T) - 1) / (8 * sizeof(T));
  const int64_t cs = (cout + kLanes - 1) / kLanes * kLanes, ho = (hw - 1) / s + 1;
  const Geometry g{1, hw, hw, cin, 3, 3, k, cs, s, s, 1, 1, ho, ho, cout};
  std::mt19937_64 rng(cin * 1000 + cout);
  std::normal_distribution<float> normal;
  std::vector<float> x(hw * hw * cin), res(ho * ho * cout);
  for (auto& v : x) v = normal(rng);
  for (auto& v : res) v = normal(rng);
  std::vector<T> wt(9 * k * cs, 0), packed(hw * hw * k);
  for (int64_t tw = 0; tw < 9 * k; ++tw)
    for (int64_t o = 0; o < cout; ++o) {
      const int64_t bits = std::min<int64_t>(8 * sizeof(T), cin - (tw % k) * 8 * sizeof(T));
      const uint64_t mask = bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
      wt[tw * cs + o] = static_cast<T>(rng() & mask);
    }
  std::vector<float> alpha(cout), mean(cout), mul(cout), bias(cout);
  for (int64_t o = 0; o < cout; ++o) {
    alpha[o] = 0.5f + 0.01f * o, mean[o] = normal(rng), mul[o] = 0.3f * normal(rng);
    bias[o] = normal(rng);
  }
  using RowsFn = void (*)(const Geometry&, const Args&, const T*, int64_t, int64_t);
  struct Variant {
    const char* name;
    RowsFn rows;
  };
  std::vector<Variant> variants;
  if (kBestIsa >= 2)
    variants.push_back({"avx512 blocked", &RowsAvx512Blocked<T>}),
        variants.push_back({"avx512 per position", &RowsAvx512<T, true>});
  if (kBestIsa >= 1) variants.push_back({"avx2", &RowsAvx2<T, true>});
  variants.push_back({"baseline", kHasFma ? &RowsBase<T, true> : &RowsBase<T, false>});
  std::vector<std::vector<float>> outs(variants.size(), std::vector<float>(ho * ho * cout));
  std::vector<std::vector<double>> times(variants.size() + 1);
  const Kernels<T> kernels = Pick<T>(kBestIsa);
  for (int r = 0; r < rounds; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    kernels.pack(g, x.data(), packed.data(), 0, hw * hw);
    auto t1 = std::chrono::steady_clock::now();
    times[0].push_back(std::chrono::duration<double>(t1 - t0).count());
    for (size_t v = 0; v < variants.size(); ++v) {
      const Args a{x.data(), wt.data(), alpha.data(), mean.data(), mul.data(), bias.data(),
                   res.data(), true, outs[v].data()};
      t0 = std::chrono::steady_clock::now();
      variants[v].rows(g, a, packed.data(), 0, ho);
      t1 = std::chrono::steady_clock::now();
      times[v + 1].push_back(std::chrono::duration<double>(t1 - t0).count());
    }
  }
  std::printf("%2ldx%-2ld %3ld -> %3ld s%ld  pack %6.2f us", hw, hw, cin, cout, s, P10(times[0]) * 1e6);
  bool same = true;
  for (size_t v = 0; v < variants.size(); ++v) {
    std::printf(" | %s %7.2f us", variants[v].name, P10(times[v + 1]) * 1e6);
    same = same && std::memcmp(outs[v].data(), outs[0].data(), outs[0].size() * 4) == 0;
  }
  std::printf(" | same bits: %s\n", same ? "yes" : "NO");
  if (!same) std::exit(1);
}

}  // namespace

int main() {
  std::printf("variant %d (2 avx512, 1 avx2, 0 baseline); 10th percentile of paired rounds\n",
              kBestIsa);
  Case<uint16_t>(32, 16, 16, 1, 600);   // ResNet-20 stage 1
  Case<uint16_t>(32, 16, 32, 2, 600);   // stage 2, first conv
  Case<uint32_t>(16, 32, 32, 1, 600);   // stage 2
  Case<uint32_t>(16, 32, 64, 2, 600);   // stage 3, first conv
  Case<uint64_t>(8, 64, 64, 1, 600);    // stage 3
  Case<uint64_t>(32, 64, 64, 1, 100);   // ResNet-18 (CIFAR) stage 1
  Case<uint64_t>(16, 128, 128, 1, 100); // stage 2
  Case<uint64_t>(8, 256, 256, 1, 100);  // stage 3
  Case<uint64_t>(4, 512, 512, 1, 100);  // stage 4
  return 0;
}
