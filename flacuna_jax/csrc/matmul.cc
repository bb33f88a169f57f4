// y = x w on the CPU, fp32, with w packed in panels of 48 columns: the projections of an inference
// model (`flacuna_jax/matmul_cpu.py`, which packs the weights once and calls this through XLA's FFI).
//
// Why packed: a decode step multiplies a few rows by every weight, so it is bound by streaming the
// weights from memory. Read in place, a 48-column block of w takes k strided pieces of 192 bytes,
// one per 4 KB page or more, which the hardware prefetcher does not follow and which land in a few
// L1 sets; packed, each panel is one contiguous stream, prefetched a chunk or two ahead while an
// earlier chunk is multiplied by every block of rows.
//
// Shapes: x [..., k] (m rows); w [p, k, 48], p = ceil(n / 48), column j of panel q being column
// 48 q + j of the plain [k, n] kernel (the last panel's padding columns are zeros); y [..., n].
// Numerics: y[i, j] is the fp32 sum over k in order of x[i, k] w[k, j] with fused multiply-adds,
// the same whatever the other rows (a row's result does not depend on the batch it is in).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using flacuna_jax::parallel_for;

namespace {

// 16 floats: one AVX-512 register (two AVX2 ones, four NEON ones where the compiler has no wider).
typedef float Vec __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t kLanes = 16, kVecs = 3, kPanel = kLanes * kVecs;
constexpr int kRowBlock = 8;        // rows per register block: 8 x 3 accumulators, 3 weight vectors
constexpr int64_t kDepth = 128;     // rows of w per chunk: 24 KB, multiplied by every row block from L1
constexpr int64_t kRowChunk = 256;  // rows of x per task (a prefill's rows stay in L2)

// y[R, 48] (+)= x[R, depth] w[depth, 48] (x's rows `ldx` apart, y's `ldy`), summed in registers and
// then added to y: a chunk's sum at a time, which rounds less than one running sum over all of k.
// Every `every` rows of w it prefetches one row of the chunk after next into L2 (`ahead` rows in all).
template <int R>
void block(const float* __restrict x, int64_t ldx, const float* __restrict w, float* __restrict y, int64_t ldy,
           int64_t depth, bool first, const float* ahead_from, int64_t ahead, int64_t every) {
  Vec acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = Vec{};
  int64_t countdown = 0;
  for (int64_t d = 0; d < depth; ++d) {
    if (--countdown <= 0 && ahead > 0) {
      for (int v = 0; v < kVecs; ++v) __builtin_prefetch(ahead_from + v * kLanes, 0, 2);
      ahead_from += kPanel, --ahead, countdown = every;
    }
    const float* wd = w + d * kPanel;
    Vec wv[kVecs];
    for (int v = 0; v < kVecs; ++v) wv[v] = *reinterpret_cast<const Vec*>(wd + v * kLanes);
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

using BlockFn = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t, bool, const float*, int64_t,
                         int64_t);
constexpr BlockFn kBlocks[kRowBlock] = {block<1>, block<2>, block<3>, block<4>,
                                        block<5>, block<6>, block<7>, block<8>};

// Rows [m0, m1) of x times panel q, into y's columns 48 q.. (through `scratch` for a last panel
// narrower than 48). Chunk by chunk of w's rows; while one chunk is multiplied by each row block, the
// chunk after next is prefetched into L2, its rows shared out among the blocks, running on into the
// next panel (panels are contiguous, and a task's panels are consecutive: see Matmul).
void panel_rows(const float* x, const float* w, float* y, int64_t k, int64_t n, int64_t q, int64_t m0, int64_t m1) {
  const int64_t columns = std::min(kPanel, n - q * kPanel);
  const int64_t rows = m1 - m0, blocks = (rows + kRowBlock - 1) / kRowBlock;
  float* out = y + m0 * n + q * kPanel;
  int64_t ldy = n;
  std::vector<float> scratch;
  if (columns < kPanel) {
    scratch.resize(rows * kPanel);
    out = scratch.data(), ldy = kPanel;
  }
  const float* wq = w + q * k * kPanel;
  for (int64_t d0 = 0; d0 < k; d0 += kDepth) {
    const int64_t depth = std::min(kDepth, k - d0);
    const float* next = wq + (d0 + depth + kDepth) * kPanel;
    const int64_t share = (std::min(kDepth, k) + blocks - 1) / blocks;
    const int64_t every = std::max<int64_t>(1, depth / share);
    for (int64_t b = 0; b < blocks; ++b) {
      const int r = static_cast<int>(std::min<int64_t>(kRowBlock, rows - b * kRowBlock));
      kBlocks[r - 1](x + (m0 + b * kRowBlock) * k + d0, k, wq + d0 * kPanel, out + b * kRowBlock * ldy, ldy, depth,
                     d0 == 0, next + b * share * kPanel, share, every);
    }
  }
  if (columns < kPanel)
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(y + (m0 + i) * n + q * kPanel, scratch.data() + i * kPanel, columns * sizeof(float));
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, int64_t n,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() < 1 || wd.size() != 3 || wd[2] != kPanel || n < 0 || wd[0] != (n + kPanel - 1) / kPanel ||
      xd.back() != wd[1] || yd.size() != xd.size() || yd.back() != n ||
      !std::equal(xd.begin(), xd.end() - 1, yd.begin()))
    return ffi::Error::InvalidArgument("matmul: x [..., k], w [ceil(n / 48), k, 48], y [..., n]");
  const int64_t k = wd[1], m = k == 0 ? 0 : x.element_count() / k;
  float* yp = y->typed_data();
  if (k == 0) {
    std::fill(yp, yp + y->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  // A task: up to kRowChunk rows times consecutive panels. With one chunk of rows (a decode step),
  // ~2 tasks per thread of consecutive panels, so that each thread streams long runs that its
  // prefetches follow (one panel per task, the threads took turns, and a panel's prefetch ran into a
  // panel the other thread read: SmolLM2's decode step at 8 rows 32.2 -> 29.1 ms, 16 rows 48 -> 42).
  const int64_t chunks = (m + kRowChunk - 1) / kRowChunk, panels = wd[0];
  const int64_t run = chunks == 1 ? std::max<int64_t>(1, panels / (2 * pool.num_threads())) : 1;
  parallel_for(pool, (panels + run - 1) / run * chunks, [=](int64_t task) {
    const int64_t q0 = task / chunks * run, m0 = task % chunks * kRowChunk;
    for (int64_t q = q0; q < std::min(panels, q0 + run); ++q)
      panel_rows(xp, wp, yp, k, n, q, m0, std::min(m, m0 + kRowChunk));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlacunaMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w, packed
                                  .Attr<int64_t>("n")
                                  .Ret<ffi::Buffer<ffi::F32>>());
