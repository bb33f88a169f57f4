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
// Numerics: see panel.h (a row's result does not depend on the batch it is in).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "panel.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using flacuna_jax::kPanel;
using flacuna_jax::product;

namespace {

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
  product(pool, xp, wp, yp, m, k, n);
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
