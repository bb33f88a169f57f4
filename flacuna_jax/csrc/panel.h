// The product of a few rows by one packed panel of 48 columns, register-blocked: what the
// projection kernel (matmul.cc) and the greedy screen (greedy.cc) run. Weights are float, or half
// (the screen's copy), converted to float as they are loaded; the sums are float either way.
//
// Numerics: y[i, j] is the fp32 sum over k in order of x[i, k] w[k, j] with fused multiply-adds,
// chunk by chunk of kDepth, the same whatever the other rows and whatever the column's place in its
// panel (each lane accumulates its own column): greedy.cc recomputes a few columns, gathered into a
// panel of their own, and gets the very bits the full product gives.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

#include <cmath>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace flacuna_jax {
namespace {

// 16 floats: one AVX-512 register (two AVX2 ones, four NEON ones where the compiler has no wider).
typedef float Vec __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t kLanes = 16, kVecs = 3, kPanel = kLanes * kVecs;
constexpr int kRowBlock = 8;        // rows per register block: 8 x 3 accumulators, 3 weight vectors
constexpr int64_t kDepth = 128;     // rows of w per chunk: 24 KB, multiplied by every row block from L1
constexpr int64_t kRowChunk = 256;  // rows of x per task (a prefill's rows stay in L2)

// An IEEE half, as its bits: `_Float16` needs GCC 12 on x86, and one compiler that lacks it would
// leave every kernel of the library unbuilt.
struct Half {
  uint16_t bits;
};

// One half as a float, exactly, where the CPU has no instruction for 16 at once.
inline float half_to_float(uint16_t h) {
  const uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0) {  // zero or subnormal: mantissa x 2^-24, exact in float
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    std::memcpy(&bits, &magnitude, sizeof bits);
  } else if (exponent == 31) {  // inf or NaN
    bits = 0x7f800000u | (mantissa << 13);
  } else {
    bits = ((exponent + 112) << 23) | (mantissa << 13);
  }
  bits |= static_cast<uint32_t>(h & 0x8000) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// 16 weights as floats: float ones as they are, half ones converted (exactly).
inline Vec load(const float* w) { return *reinterpret_cast<const Vec*>(w); }
inline Vec load(const Half* w) {
#if defined(__AVX512F__)
  return reinterpret_cast<Vec>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))));
#elif defined(__F16C__)
  const __m256 low = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  const __m256 high = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8)));
  Vec v;
  std::memcpy(&v, &low, sizeof low);
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof low, &high, sizeof high);
  return v;
#else
  Vec v;
  for (int i = 0; i < kLanes; ++i) v[i] = half_to_float(w[i].bits);
  return v;
#endif
}

// y[R, 48] (+)= x[R, depth] w[depth, 48] (x's rows `ldx` apart, y's `ldy`), summed in registers and
// then added to y: a chunk's sum at a time, which rounds less than one running sum over all of k.
// Every `every` rows of w it prefetches one row of the chunk after next into L2 (`ahead` rows in all).
template <typename W, int R>
void block(const float* __restrict x, int64_t ldx, const W* __restrict w, float* __restrict y, int64_t ldy,
           int64_t depth, bool first, const W* ahead_from, int64_t ahead, int64_t every) {
  Vec acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = Vec{};
  int64_t countdown = 0;
  for (int64_t d = 0; d < depth; ++d) {
    if (--countdown <= 0 && ahead > 0) {
      for (int v = 0; v < kVecs; ++v) __builtin_prefetch(ahead_from + v * kLanes, 0, 2);
      ahead_from += kPanel, --ahead, countdown = every;
    }
    const W* wd = w + d * kPanel;
    Vec wv[kVecs];
    for (int v = 0; v < kVecs; ++v) wv[v] = load(wd + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * ldx + d];
      for (int v = 0; v < kVecs; ++v) acc[r][v] += wv[v] * xr;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) {
      Vec* out = reinterpret_cast<Vec*>(y + r * ldy + v * kLanes);
      *out = first ? acc[r][v] : *out + acc[r][v];
    }
}

template <typename W>
using BlockFn = void (*)(const float*, int64_t, const W*, float*, int64_t, int64_t, bool, const W*, int64_t, int64_t);
template <typename W>
constexpr BlockFn<W> kBlocks[kRowBlock] = {block<W, 1>, block<W, 2>, block<W, 3>, block<W, 4>,
                                           block<W, 5>, block<W, 6>, block<W, 7>, block<W, 8>};

// Rows [m0, m1) of x times panel q, into y's columns 48 q.. (through `scratch` for a last panel
// narrower than 48). Chunk by chunk of w's rows; while one chunk is multiplied by each row block, the
// chunk after next is prefetched into L2, its rows shared out among the blocks, running on into the
// next panel (panels are contiguous, and a task's panels are consecutive: see product).
template <typename W>
void panel_rows(const float* x, const W* w, float* y, int64_t k, int64_t n, int64_t q, int64_t m0, int64_t m1) {
  const int64_t columns = std::min(kPanel, n - q * kPanel);
  const int64_t rows = m1 - m0, blocks = (rows + kRowBlock - 1) / kRowBlock;
  float* out = y + m0 * n + q * kPanel;
  int64_t ldy = n;
  std::vector<float> scratch;
  if (columns < kPanel) {
    scratch.resize(rows * kPanel);
    out = scratch.data(), ldy = kPanel;
  }
  const W* wq = w + q * k * kPanel;
  for (int64_t d0 = 0; d0 < k; d0 += kDepth) {
    const int64_t depth = std::min(kDepth, k - d0);
    const W* next = wq + (d0 + depth + kDepth) * kPanel;
    const int64_t share = (std::min(kDepth, k) + blocks - 1) / blocks;
    const int64_t every = std::max<int64_t>(1, depth / share);
    for (int64_t b = 0; b < blocks; ++b) {
      const int r = static_cast<int>(std::min<int64_t>(kRowBlock, rows - b * kRowBlock));
      kBlocks<W>[r - 1](x + (m0 + b * kRowBlock) * k + d0, k, wq + d0 * kPanel, out + b * kRowBlock * ldy, ldy, depth,
                     d0 == 0, next + b * share * kPanel, share, every);
    }
  }
  if (columns < kPanel)
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(y + (m0 + i) * n + q * kPanel, scratch.data() + i * kPanel, columns * sizeof(float));
}

// y[m, n] = x[m, k] w, w packed ([ceil(n / 48), k, 48]), over the pool. A task: up to kRowChunk rows
// times consecutive panels. With one chunk of rows (a decode step), ~2 tasks per thread of
// consecutive panels, so that each thread streams long runs that its prefetches follow (one panel
// per task, the threads took turns, and a panel's prefetch ran into a panel the other thread read:
// SmolLM2's decode step at 8 rows 32.2 -> 29.1 ms, 16 rows 48 -> 42).
template <typename W>
void product(xla::ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t m, int64_t k, int64_t n) {
  const int64_t chunks = (m + kRowChunk - 1) / kRowChunk, panels = (n + kPanel - 1) / kPanel;
  const int64_t run = chunks == 1 ? std::max<int64_t>(1, panels / (2 * pool.num_threads())) : 1;
  parallel_for(pool, (panels + run - 1) / run * chunks, [=](int64_t task) {
    const int64_t q0 = task / chunks * run, m0 = task % chunks * kRowChunk;
    for (int64_t q = q0; q < std::min(panels, q0 + run); ++q) panel_rows(x, w, y, k, n, q, m0, std::min(m, m0 + kRowChunk));
  });
}

}  // namespace
}  // namespace flacuna_jax
