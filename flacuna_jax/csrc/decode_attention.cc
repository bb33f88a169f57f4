// Decode attention over a KV cache on the CPU, fp32: scores, softmax and values in one pass over each
// row's kv head, reading only the cache slots its queries may see. Built on first use and called from
// `flacuna_jax/attention_cpu.py` through XLA's FFI; the same numerics as `attention.cached_attention`
// (scores scaled after the dot, an fp32 softmax over the cache and the new keys together).
//
// Shapes (names as in attention.py): q [b, t, h, f]; k_cache [b, k, f, s]; v_cache [b, k, s, f];
// mask [b, t, s]; k_new, v_new [b, n, k, f] (the keys this step writes, not yet in the cache);
// new_mask [b, t, n]; out [b, t, h, f]. Query head i reads kv head i / (h / k).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using flacuna_jax::parallel_for;

namespace {

constexpr float kLowest = std::numeric_limits<float>::lowest();  // a masked score, as attention.py's
constexpr float kExpFloor = -87.33654f;                           // below it expf is denormal or 0
// Software prefetch distances (SmolLM2 fp32, 32 rows x 512 slots half written, 30 layers: 43 -> 35 ms).
constexpr int64_t kFloatsPerLine = 16, kKeyRowsAhead = 2, kValueRowsAhead = 8;

// x[i] = exp(x[i]) for x <= 0 (scores less their max), 0 below kExpFloor. Cephes' expf: 2^n * p(r),
// written as plain loops the compiler vectorizes (a libm call per element would not be).
void exp_nonpositive(float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::max(x[i], kExpFloor);
    const float k = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    float r = v - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float two_k;
    std::memcpy(&two_k, &bits, sizeof two_k);
    x[i] = x[i] < kExpFloor ? 0.0f : p * two_k;
  }
}

struct Shapes {
  int64_t b, t, h, f, k, s, n, g;
};

// One row's kv head: its g query heads at each of the t queries (r = t * g score rows).
void attend_one(const Shapes& d, int64_t row, int64_t kv, float scale, const float* q, const float* k_cache,
                const float* v_cache, const bool* mask, const float* k_new, const float* v_new,
                const bool* new_mask, float* out) {
  // The slots any of the row's queries may see, [lo, hi): the rest are masked for all of them.
  int64_t lo = d.s, hi = 0;
  for (int64_t t = 0; t < d.t; ++t) {
    const bool* m = mask + (row * d.t + t) * d.s;
    for (int64_t s = 0; s < d.s; ++s) if (m[s]) { lo = std::min(lo, s); break; }
    for (int64_t s = d.s; s > lo; --s) if (m[s - 1]) { hi = std::max(hi, s); break; }
  }
  if (hi <= lo) lo = hi = 0;
  const int64_t w = hi - lo, width = w + d.n, rows = d.t * d.g;
  std::vector<float> queries(rows * d.f), scores(rows * width, 0.0f), acc(rows * d.f, 0.0f);
  for (int64_t t = 0; t < d.t; ++t)
    for (int64_t g = 0; g < d.g; ++g)
      std::memcpy(&queries[(t * d.g + g) * d.f], q + ((row * d.t + t) * d.h + kv * d.g + g) * d.f, d.f * 4);

  // Scores: each feature's row of keys is read once for all r query rows.
  const float* keys = k_cache + (row * d.k + kv) * d.f * d.s + lo;
  for (int64_t f = 0; f < d.f; ++f) {
    const float* __restrict key_row = keys + f * d.s;
    if (f + kKeyRowsAhead < d.f)  // a part of a row is too short a stream for the hardware prefetcher
      for (int64_t s = 0; s < w; s += kFloatsPerLine) __builtin_prefetch(key_row + kKeyRowsAhead * d.s + s);
    for (int64_t r = 0; r < rows; ++r) {
      const float qf = queries[r * d.f + f];
      float* __restrict out_row = &scores[r * width];
      for (int64_t s = 0; s < w; ++s) out_row[s] += qf * key_row[s];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = r / d.g;
    const float* qr = &queries[r * d.f];
    float* sc = &scores[r * width];
    for (int64_t j = 0; j < d.n; ++j) {
      const float* key = k_new + ((row * d.n + j) * d.k + kv) * d.f;
      float dot = 0.0f;
      for (int64_t f = 0; f < d.f; ++f) dot += qr[f] * key[f];
      sc[w + j] = dot;
    }
    // Scaled after the dot, masked to the lowest float, then softmax: as cached_attention.
    const bool* m = mask + (row * d.t + t) * d.s + lo;
    const bool* nm = new_mask + (row * d.t + t) * d.n;
    float max = kLowest;
    for (int64_t s = 0; s < w; ++s) sc[s] = m[s] ? sc[s] * scale : kLowest;
    for (int64_t j = 0; j < d.n; ++j) sc[w + j] = nm[j] ? sc[w + j] * scale : kLowest;
    for (int64_t s = 0; s < width; ++s) max = std::max(max, sc[s]);
    for (int64_t s = 0; s < width; ++s) sc[s] -= max;
    exp_nonpositive(sc, width);
    float sum = 0.0f;
    for (int64_t s = 0; s < width; ++s) sum += sc[s];
    for (int64_t s = 0; s < width; ++s) sc[s] /= sum;
  }

  // Values: each slot's row of values is read once for all r query rows.
  const float* values = v_cache + ((row * d.k + kv) * d.s + lo) * d.f;
  for (int64_t s = 0; s < width; ++s) {
    const float* __restrict value_row =
        s < w ? values + s * d.f : v_new + ((row * d.n + (s - w)) * d.k + kv) * d.f;
    if (s + kValueRowsAhead < w)
      for (int64_t f = 0; f < d.f; f += kFloatsPerLine) __builtin_prefetch(values + (s + kValueRowsAhead) * d.f + f);
    for (int64_t r = 0; r < rows; ++r) {
      const float p = scores[r * width + s];
      float* __restrict acc_row = &acc[r * d.f];
      for (int64_t f = 0; f < d.f; ++f) acc_row[f] += p * value_row[f];
    }
  }
  for (int64_t t = 0; t < d.t; ++t)
    for (int64_t g = 0; g < d.g; ++g)
      std::memcpy(out + ((row * d.t + t) * d.h + kv * d.g + g) * d.f, &acc[(t * d.g + g) * d.f], d.f * 4);
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_cache,
                           ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> k_new,
                           ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::PRED> new_mask, float scale,
                           ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k_cache.dimensions(), nd = k_new.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || nd.size() != 4 || kd[1] == 0 || qd[2] % kd[1] != 0)
    return ffi::Error::InvalidArgument("decode_attention: q [b, t, h, f], caches [b, k, f, s], new [b, n, k, f]");
  const Shapes d{qd[0], qd[1], qd[2], qd[3], kd[1], kd[3], nd[1], qd[2] / kd[1]};
  // Every buffer's shape follows from q's, the keys' and the new keys' (the kernel indexes them all).
  using Dims = std::vector<int64_t>;
  auto dims = [](auto span) { return Dims(span.begin(), span.end()); };
  if (dims(kd) != Dims{d.b, d.k, d.f, d.s} || dims(v_cache.dimensions()) != Dims{d.b, d.k, d.s, d.f} ||
      dims(mask.dimensions()) != Dims{d.b, d.t, d.s} || dims(nd) != Dims{d.b, d.n, d.k, d.f} ||
      dims(v_new.dimensions()) != Dims{d.b, d.n, d.k, d.f} || dims(new_mask.dimensions()) != Dims{d.b, d.t, d.n} ||
      dims(out->dimensions()) != dims(qd))
    return ffi::Error::InvalidArgument("decode_attention: shapes do not agree with q [b, t, h, f] and the caches");
  const float* qp = q.typed_data();
  const float* kp = k_cache.typed_data();
  const float* vp = v_cache.typed_data();
  const bool* mp = mask.typed_data();
  const float* knp = k_new.typed_data();
  const float* vnp = v_new.typed_data();
  const bool* nmp = new_mask.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, d.b * d.k, [=](int64_t task) {
    attend_one(d, task / d.k, task % d.k, scale, qp, kp, vp, mp, knp, vnp, nmp, op);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlacunaDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_cache
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_cache
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_new
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_new
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // new_mask
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
