// The greedy token of each row, argmax_v h E_v over the vocabulary, exactly as the fp32 output
// projection (matmul.cc over the packed output projection) and a first-index argmax would give it,
// while reading the half-precision copy of the projection instead of the float one (half the bytes:
// at batch 1 the output projection is a fifth of what a decode step reads).
//
// 1. Screen: a_v = h E16_v, the product with the projection rounded to half (E16), in float.
// 2. Bound: |a_v - e_v| <= B_v, where e_v is the float product the model computes. With u = 2^-24,
//    g = k u / (1 - k u) (any order of k fused multiply-adds), S_v = sum_i |h_i| |E_vi| <= |h|_2 |E_v|_2:
//      rounding E to half:          |E16_vi - E_vi| <= 2^-11 |E_vi| + 2^-25 (2^-25: half subnormals)
//      the two float sums:          g S_v  and  g (S_v + 2^-11 S_v + 2^-25 |h|_1)
//    so B_v = (2^-11 + g (2 + 2^-11)) |h|_2 |E_v|_2 + (1 + g) 2^-25 |h|_1, computed in double and
//    widened by 1e-6 of itself for that double arithmetic. |E_v|_2 comes rounded up (`norms`).
// 3. Candidates: every v with a_v + B_v >= max_u (a_u - B_u). Each maximiser of e is one of them:
//    e_v >= e_u0 >= a_u0 - B_u0 for u0 the screen's best. Almost always one or two.
// 4. Exact: the candidates' columns of the float projection, gathered into a panel of their own,
//    multiplied as matmul.cc multiplies them (panel.h: the same bits), and the first maximum taken.
// A row whose screen is not finite or leaves more than 48 candidates gets -1: the caller then
// computes that step's logits in full (greedy_cpu.py).
//
// Shapes: h [m, k]; w16 [p, k, 48] half and w [p, k, 48] float, packed as matmul.cc's; norms [n];
// tokens [m] int32.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "panel.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using flacuna_jax::kPanel;
using flacuna_jax::panel_rows;
using flacuna_jax::parallel_for;
using flacuna_jax::product;

namespace {

typedef float Floats8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef double Doubles8 __attribute__((vector_size(64)));
constexpr int64_t kStep = 8;  // the screen's columns per vector step (in double: 8 lanes of 64 bytes)

inline Doubles8 doubles8(const float* p) { return __builtin_convertvector(*reinterpret_cast<const Floats8*>(p), Doubles8); }

// The row's token from its screen a[n] (see the top), or -1.
int32_t decide(const float* h, const float* a, const float* w, const float* norms, int64_t k, int64_t n) {
  const double u = std::ldexp(1.0, -24), g = k * u / (1 - k * u);
  double h2 = 0, h1 = 0;
  for (int64_t i = 0; i < k; ++i) h2 += double(h[i]) * h[i], h1 += std::fabs(double(h[i]));
  const double widen = 1 + 1e-6;
  const double per_norm = (std::ldexp(1.0, -11) + g * (2 + std::ldexp(1.0, -11))) * std::sqrt(h2) * widen;
  const double floor = (1 + g) * std::ldexp(1.0, -25) * h1 * widen;
  if (!std::isfinite(per_norm) || !std::isfinite(floor)) return -1;
  const auto bound = [&](int64_t v) { return per_norm * norms[v] + floor; };
  const auto bounds8 = [&](int64_t v) { return per_norm * doubles8(norms + v) + floor; };  // B_v .. B_v+7
  // Pass 1: the best lower end, max_u (a_u - B_u), and whether any a is NaN (8 lanes at a time).
  const int64_t whole = n / kStep * kStep;
  Doubles8 best8 = Doubles8{} - INFINITY;
  int64_t nans = 0;
  for (int64_t v = 0; v < whole; v += kStep) {
    const Doubles8 av = doubles8(a + v);
    const Doubles8 low = av - bounds8(v);
    best8 = low > best8 ? low : best8;
    for (int j = 0; j < kStep; ++j) nans += av[j] != av[j];
  }
  double best_low = -INFINITY;
  for (int j = 0; j < kStep; ++j) best_low = std::max(best_low, best8[j]);
  for (int64_t v = whole; v < n; ++v) {
    nans += a[v] != a[v];
    best_low = std::max(best_low, a[v] - bound(v));
  }
  if (nans > 0 || !std::isfinite(best_low)) return -1;
  // Pass 2: the candidates, in order of v.
  int64_t candidates[kPanel];
  int count = 0;
  const auto take = [&](int64_t v) {
    if (a[v] + bound(v) < best_low) return true;
    if (count == kPanel) return false;
    candidates[count++] = v;
    return true;
  };
  for (int64_t v = 0; v < whole; v += kStep) {
    const Doubles8 high = doubles8(a + v) + bounds8(v);
    bool any = false;
    for (int j = 0; j < kStep; ++j) any |= high[j] >= best_low;
    if (any)
      for (int64_t j = v; j < v + kStep; ++j)
        if (!take(j)) return -1;
  }
  for (int64_t v = whole; v < n; ++v)
    if (!take(v)) return -1;
  std::vector<float> panel(k * kPanel, 0.0f);  // column j: candidate j's column of w
  for (int j = 0; j < count; ++j) {
    const float* column = w + candidates[j] / kPanel * k * kPanel + candidates[j] % kPanel;
    for (int64_t d = 0; d < k; ++d) panel[d * kPanel + j] = column[d * kPanel];
  }
  float exact[kPanel];
  panel_rows(h, panel.data(), exact, k, count, 0, 0, 1);
  int best = 0;
  for (int j = 1; j < count; ++j) {
    if (std::isnan(exact[j])) return -1;
    if (exact[j] > exact[best]) best = j;
  }
  return std::isnan(exact[best]) ? -1 : static_cast<int32_t>(candidates[best]);
}

ffi::Error Greedy(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F16> w16,
                  ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> norms, ffi::ResultBuffer<ffi::S32> tokens) {
  const auto hd = h.dimensions(), wd = w.dimensions();
  const int64_t n = norms.element_count();
  const auto w16d = w16.dimensions();
  if (hd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[0] != (n + kPanel - 1) / kPanel || hd[1] != wd[1] ||
      w16d.size() != 3 || !std::equal(wd.begin(), wd.end(), w16d.begin()) || tokens->element_count() != hd[0] ||
      hd[1] == 0)
    return ffi::Error::InvalidArgument("greedy: h [m, k > 0], w16 and w [ceil(n / 48), k, 48], norms [n], tokens [m]");
  const int64_t m = hd[0], k = hd[1];
  const float* hp = h.typed_data();
  const flacuna_jax::Half* w16p = reinterpret_cast<const flacuna_jax::Half*>(w16.typed_data());
  const std::unique_ptr<float[]> screen(new float[m * n]);  // every element written by `product`
  float* sp = screen.get();
  product(pool, hp, w16p, sp, m, k, n);
  int32_t* out = tokens->typed_data();
  const float* wp = w.typed_data();
  const float* np_ = norms.typed_data();
  parallel_for(pool, m, [=](int64_t i) { out[i] = decide(hp + i * k, sp + i * n, wp, np_, k, n); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlacunaGreedy, Greedy,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h [m, k]
                                  .Arg<ffi::Buffer<ffi::F16>>()  // the projection rounded to half, packed
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the projection, packed
                                  .Arg<ffi::Buffer<ffi::F32>>()  // |E_v|_2, rounded up
                                  .Ret<ffi::Buffer<ffi::S32>>());
