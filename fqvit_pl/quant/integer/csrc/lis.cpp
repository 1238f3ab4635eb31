// Log-Int-Softmax of the integer attention (docs/method.md §8, §12), one read of the q @ k^T
// accumulator and one write of the probabilities, the rest in L1 per block of rows: the score
// point's codes (Swin: + the relative position bias, the bias point's codes, the shift mask) ->
// row maximum -> integer exponential by table -> exact row sum -> y = round(S / e) -> log
// rounding -> probabilities 2**-r.
//
// Bit for bit the pure PyTorch path (fqvit_pl/quant/integer/kernels.py: quantize_float,
// dequantize, log_int_softmax_codes): every float operation is the same IEEE operation in the
// same order (built with -ffp-contract=off: no fused multiply-add), rounding is half to even
// (std::nearbyint in the default rounding mode), and the row sum is exact in either path (the
// caller's exact_float64 bound, or int64), so its summation order does not matter.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kMasked1d = 256;    // kernels.MASKED: the saturated entry of the [257] table
constexpr int64_t kMasked2d = 65536;  // kernels.MASKED_2D: the same in the [65537] table
constexpr int32_t kMaskedCode = -512;  // what a masked code counts as for the row maximum

// The scalar parameters of one row's computation.
struct Params {
  float step, scale, zero_point, lower, upper;
  bool has_bias;
  float bias_scale, bias_zero_point, bias_lower, bias_upper;
  int32_t levels;  // 2**bits
  bool two_d;      // [65537] table indexed by 256 * rowmax + code, else [257] by rowmax - code
  bool exact_float64;
};

float scalar_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, "fqvit_native::lis_softmax: ", name, " must hold one value, got ",
              t.sizes());
  return t.to(at::kFloat).reshape({}).item<float>();
}

// Clamp as ATen's float clamp (max with the lower bound, then min with the upper one); the
// inputs are never NaN here (finite accumulators times finite scales).
inline float clamp(float x, float lo, float hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

// 2**-r as float32 for the key 2E + h of y (kernels._log_round), 0 for r >= levels and for the
// keys of inf and NaN; r <= 0 gives 1 (kernels.lis_prob_table / lis_prob_from_keys).
inline float probability(double y, int32_t levels) {
  uint64_t bits;
  std::memcpy(&bits, &y, sizeof bits);
  // unsigned: a NaN with its sign bit (0 / 0, a row of zero exponentials, where the PyTorch
  // path's table lookup fails with an index error) gets key >= 4096 and probability 0, as the
  // other NaNs and inf (keys 4094, 4095: r >= 1024 >= levels); int32 lanes vectorize twice as wide
  const uint32_t key = static_cast<uint32_t>(bits >> 51);
  int32_t r = static_cast<int32_t>(key >> 1) - 1023 + static_cast<int32_t>(key & 1);
  r = r < 0 ? 0 : r;
  const bool zero = r >= levels;
  const int32_t f = (127 - (zero ? 0 : r)) << 23;
  float p;
  std::memcpy(&p, &f, sizeof p);
  return zero ? 0.0f : p;
}

template <typename out_t>
inline out_t convert(float p) {
  return static_cast<out_t>(p);  // 0 or 2**-r, r <= 126: exact in float32 and bfloat16
}

// Stage 1 of a row: N accumulators -> N codes (masked pairs: kMaskedCode). mask: N entries,
// nonzero where masked, or null.
void row_codes(const float* acc, const float* bias, const int32_t* mask, int64_t n,
               const Params& p, int32_t* codes) {
  // quantize_float(acc * step) (Swin: dequantize, + bias, quantize_float again)
  if (p.has_bias) {
    for (int64_t j = 0; j < n; ++j) {
      float x = acc[j] * p.step;
      x = x / p.scale;
      x = x + p.zero_point;
      x = clamp(std::nearbyint(x), p.lower, p.upper);
      x = (x - p.zero_point) * p.scale;
      x = x + bias[j];
      x = x / p.bias_scale;
      x = x + p.bias_zero_point;
      x = clamp(std::nearbyint(x), p.bias_lower, p.bias_upper);
      codes[j] = static_cast<int32_t>(x);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      float x = acc[j] * p.step;
      x = x / p.scale;
      x = x + p.zero_point;
      codes[j] = static_cast<int32_t>(clamp(std::nearbyint(x), p.lower, p.upper));
    }
  }
  // a masked pair's code counts as kMaskedCode (below every code: never the row maximum unless
  // the whole row is masked, which the converter rules out; even then as the PyTorch path)
  if (mask != nullptr)
    for (int64_t j = 0; j < n; ++j) codes[j] = mask[j] ? kMaskedCode : codes[j];
}

// Stage 2 of a row: codes -> indices into the exponential table, in place (vectorized, no branch).
void row_indices(int32_t* codes, int64_t n, const Params& p) {
  int32_t row_max = kMaskedCode;
  for (int64_t j = 0; j < n; ++j) row_max = codes[j] > row_max ? codes[j] : row_max;
  // codes are >= 0 but where masked
  if (p.two_d) {
    const int32_t base = 256 * row_max;
    for (int64_t j = 0; j < n; ++j)
      codes[j] = codes[j] < 0 ? static_cast<int32_t>(kMasked2d) : base + codes[j];
  } else {
    for (int64_t j = 0; j < n; ++j)
      codes[j] = std::min<int32_t>(row_max - codes[j], static_cast<int32_t>(kMasked1d));
  }
}

// Stage 3 of a row: table indices -> N probabilities (e: scratch of N entries).
template <typename out_t>
void row_probabilities(const int32_t* index, int64_t n, const Params& p, const double* table,
                       double* e, out_t* out) {
  // the integer exponential by table, summed on the way (exact: any order gives the same S)
  if (p.exact_float64) {
    double partial[4] = {0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4)
      for (int k = 0; k < 4; ++k) partial[k] += e[j + k] = table[index[j + k]];
    for (; j < n; ++j) partial[0] += e[j] = table[index[j]];
    const double total = (partial[0] + partial[1]) + (partial[2] + partial[3]);
    // 3. y = round(S / e) (correctly rounded quotient, half to even), 4. log rounding, 2**-r
    for (int64_t j2 = 0; j2 < n; ++j2)
      out[j2] = convert<out_t>(probability(std::nearbyint(total / e[j2]), p.levels));
    return;
  }
  // The int64 path of kernels.log_int_softmax_codes: floor division, remainder rounded half to
  // even, y clamped to 2**40 (inf for e == 0 lands there too). The sum wraps as ATen's int64 sum.
  for (int64_t j = 0; j < n; ++j) e[j] = table[index[j]];
  uint64_t wrapped = 0;
  for (int64_t j = 0; j < n; ++j) wrapped += static_cast<uint64_t>(static_cast<int64_t>(e[j]));
  const int64_t total = static_cast<int64_t>(wrapped);
  constexpr int64_t kCap = int64_t{1} << 40;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t ej = static_cast<int64_t>(e[j]);
    int64_t y;
    if (ej == 0) {
      y = kCap;
    } else {
      const int64_t safe = ej < 1 ? 1 : ej;
      y = total / safe;
      // floor, as rounding_mode="floor"
      if ((total % safe != 0) && ((total < 0) != (safe < 0))) --y;
      const int64_t rem2 = (total - y * safe) * 2;
      const int64_t odd = ((y % 2) + 2) % 2 == 1;  // torch's % follows the divisor's sign
      y += (rem2 > safe) || (rem2 == safe && odd);
      y = y > kCap ? kCap : y;
    }
    out[j] = convert<out_t>(probability(static_cast<double>(y), p.levels));
  }
}

// All rows of [batch, heads, N, N], parallel over rows. A block of rows runs each stage for the
// whole block before the next: stage 3's scalar table lookups then read indices whose (vector)
// stores have left the store buffer, instead of waiting on store-to-load forwarding, which does
// not serve narrow loads from wide stores.
template <typename out_t>
void run_rows(const float* acc, const float* bias, const int32_t* mask, int64_t batch,
              int64_t heads, int64_t n, int64_t windows, const Params& p, const double* table,
              out_t* out) {
  const int64_t rows = batch * heads * n;
  const int64_t block = std::max<int64_t>(1, 4096 / n);  // 16 KiB of codes: stays in L1
  const int64_t grain = std::max<int64_t>(block, 16384 / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> codes(block * n);
    std::vector<double> e(n);
    for (int64_t first = begin; first < end; first += block) {
      const int64_t last = std::min(first + block, end);
      for (int64_t row = first; row < last; ++row) {
        const int64_t i = row % n, h = (row / n) % heads, b = row / (n * heads);
        row_codes(acc + row * n, bias != nullptr ? bias + (h * n + i) * n : nullptr,
                  mask != nullptr ? mask + ((b % windows) * n + i) * n : nullptr, n, p,
                  codes.data() + (row - first) * n);
      }
      for (int64_t row = first; row < last; ++row)
        row_indices(codes.data() + (row - first) * n, n, p);
      for (int64_t row = first; row < last; ++row)
        row_probabilities(codes.data() + (row - first) * n, n, p, table, e.data(), out + row * n);
    }
  });
}

at::Tensor lis_softmax(const at::Tensor& acc, const at::Tensor& step, const at::Tensor& scale,
                       const at::Tensor& zero_point, int64_t lower, int64_t upper,
                       const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& bias_scale,
                       const c10::optional<at::Tensor>& bias_zero_point, int64_t bias_lower,
                       int64_t bias_upper, const c10::optional<at::Tensor>& mask,
                       const at::Tensor& exp_table, int64_t bits, bool exact_float64,
                       c10::optional<at::ScalarType> dtype) {
  TORCH_CHECK(acc.dim() == 4 && acc.size(2) == acc.size(3),
              "fqvit_native::lis_softmax: acc must be [batch, heads, N, N], got ", acc.sizes());
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.device().is_cpu(),
              "fqvit_native::lis_softmax: acc must be a float32 CPU tensor");
  TORCH_CHECK(exp_table.scalar_type() == at::kDouble &&
                  (exp_table.numel() == kMasked2d + 1 || exp_table.numel() == kMasked1d + 1),
              "fqvit_native::lis_softmax: exp_table must be float64 [65537] or [257], got ",
              exp_table.sizes());
  TORCH_CHECK(exp_table.device().is_cpu() && (!bias.has_value() || bias->device().is_cpu()) &&
                  (!mask.has_value() || mask->device().is_cpu()),
              "fqvit_native::lis_softmax: exp_table, bias and mask must be CPU tensors");
  TORCH_CHECK(bits >= 1 && bits <= 6, "fqvit_native::lis_softmax: bits must be in 1..6, got ",
              bits);
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  TORCH_CHECK(out_type == at::kFloat || out_type == at::kBFloat16,
              "fqvit_native::lis_softmax: dtype must be float32 or bfloat16");
  const int64_t batch = acc.size(0), heads = acc.size(1), n = acc.size(2);

  Params p{};
  p.step = scalar_of(step, "step");
  p.scale = scalar_of(scale, "scale");
  p.zero_point = scalar_of(zero_point, "zero_point");
  p.lower = static_cast<float>(lower);
  p.upper = static_cast<float>(upper);
  p.has_bias = bias.has_value();
  at::Tensor bias_c;
  if (p.has_bias) {
    TORCH_CHECK(bias_scale.has_value() && bias_zero_point.has_value(),
                "fqvit_native::lis_softmax: bias needs bias_scale and bias_zero_point");
    bias_c = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_c.numel() == heads * n * n,
                "fqvit_native::lis_softmax: bias must be [heads, N, N], got ", bias->sizes());
    p.bias_scale = scalar_of(*bias_scale, "bias_scale");
    p.bias_zero_point = scalar_of(*bias_zero_point, "bias_zero_point");
    p.bias_lower = static_cast<float>(bias_lower);
    p.bias_upper = static_cast<float>(bias_upper);
  }
  at::Tensor mask_c;
  int64_t windows = 0;
  if (mask.has_value()) {
    mask_c = mask->ne(0).to(at::kInt).contiguous();
    TORCH_CHECK(mask_c.dim() == 3 && mask_c.size(1) == n && mask_c.size(2) == n &&
                    mask_c.size(0) > 0 && batch % mask_c.size(0) == 0,
                "fqvit_native::lis_softmax: mask must be [windows, N, N] with windows dividing "
                "the batch, got ", mask->sizes());
    windows = mask_c.size(0);
  }
  p.levels = int32_t{1} << bits;
  p.two_d = exp_table.numel() == kMasked2d + 1;
  p.exact_float64 = exact_float64;

  const at::Tensor acc_c = acc.contiguous();
  const at::Tensor table_c = exp_table.contiguous();
  at::Tensor out = at::empty(acc.sizes(), acc.options().dtype(out_type));
  const float* acc_ptr = acc_c.data_ptr<float>();
  const float* bias_ptr = p.has_bias ? bias_c.data_ptr<float>() : nullptr;
  const int32_t* mask_ptr = windows ? mask_c.data_ptr<int32_t>() : nullptr;
  const double* table = table_c.data_ptr<double>();
  AT_DISPATCH_SWITCH(out_type, "lis_softmax",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      run_rows(acc_ptr, bias_ptr, mask_ptr, batch, heads, n, windows, p, table,
               out.data_ptr<float>());
    })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      run_rows(acc_ptr, bias_ptr, mask_ptr, batch, heads, n, windows, p, table,
               out.data_ptr<c10::BFloat16>());
    }));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fqvit_native, m) {
  m.def(
      "lis_softmax(Tensor acc, Tensor step, Tensor scale, Tensor zero_point, int lower, "
      "int upper, Tensor? bias, Tensor? bias_scale, Tensor? bias_zero_point, int bias_lower, "
      "int bias_upper, Tensor? mask, Tensor exp_table, int bits, bool exact_float64, "
      "ScalarType? dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fqvit_native, CPU, m) { m.impl("lis_softmax", &lis_softmax); }
