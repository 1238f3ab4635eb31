// The integer LayerNorm of docs/method.md §7 and the residual addition before it, fused (CPU).
//
// Each kernel replaces a chain of ATen elementwise passes by one pass per token and gives the same
// bits: the same IEEE float32/float64 operations in the same order (-ffp-contract=off: no FMA),
// round half to even (nearbyint in the default rounding mode), NaN propagated by the clamps and
// cast to code 0 as ATen's conversion does; where a shortcut is taken (exact integer sums, the
// float32 row kernel of ln_apply) the comment next to it proves the results equal. Python side
// and the per-token float32 formula between ln_stats and ln_apply:
// fqvit_pl/quant/integer/native_ln.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

// The row loops compare floats (clamps, range checks); GCC if-converts and vectorizes them only
// without -ftrapping-math. That option is about floating-point exception flags, which nothing here
// reads: every value is the same (the tests compare the bits with the ATen kernels'). The loops
// call __builtin_* rather than std:: functions, which (compiled before this pragma, with other
// options) GCC would not inline here.
#pragma GCC optimize("no-trapping-math")

namespace {

// |x_q| = |c - zp| * k <= kMaxXq keeps x_q**2 <= 2**24 (exact in float32, as ATen squares it) and
// every partial sum an exact int64; the Python side uses the kernels only when the PTF steps are
// at most 16 (|c - zp| <= 255).
constexpr float kMaxXq = 4096.0f;
constexpr int64_t kGrain = 16;  // tokens per task of at::parallel_for

// ``t`` as a float32 [n] vector: a 0-dim or [1] tensor is broadcast, a [n / r] one tiled r times.
std::vector<float> per_channel(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fqvit_native: ", name, " must be on the CPU");
  at::Tensor flat = t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
  int64_t m = flat.numel();
  TORCH_CHECK(m >= 1 && n % m == 0, "fqvit_native: ", name, " has ", m,
              " values, which do not tile the ", n, " channels");
  const float* src = flat.data_ptr<float>();
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = src[i % m];
  return out;
}

float first_value(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() >= 1, "fqvit_native: ", name, " is empty");
  TORCH_CHECK(t.device().is_cpu(), "fqvit_native: ", name, " must be on the CPU");
  if (t.scalar_type() == at::kFloat) return *t.data_ptr<float>();  // element 0 in any layout
  return t.reshape(-1)[0].to(at::kFloat).item<float>();
}

// ATen's clamp: NaN stays NaN (comparisons with NaN are false).
template <typename T>
inline T clamp_nan(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// ATen's float -> uint8 conversion of an in-range value; NaN gives 0 (as ATen's cast does here).
inline uint8_t to_code(double v) {
  return static_cast<uint8_t>(static_cast<int32_t>(v == v ? v : 0.0));
}

void check_codes(const at::Tensor& codes, const char* op) {
  TORCH_CHECK(codes.device().is_cpu(), "fqvit_native::", op, ": expected CPU codes");
  TORCH_CHECK(codes.scalar_type() == at::kByte || codes.scalar_type() == at::kFloat,
              "fqvit_native::", op, ": codes must be uint8 or float32, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() >= 1, "fqvit_native::", op, ": codes need a channel dim");
}

// ---- pass 1: exact row sums of x_q and x_q**2 -------------------------------------------------

// One token: returns whether some x_q was not an integer of magnitude <= kMaxXq.
template <typename T>
bool stats_row(const T* __restrict row, const float* __restrict step, float zp, int64_t channels,
               float* total, float* squares) {
  int64_t sum = 0, sum_sq = 0;
  int32_t bad = 0;
  for (int64_t c = 0; c < channels; ++c) {
    // ATen's x_q = (c - zp) * k in float32, then the integer it holds
    float xq = (static_cast<float>(row[c]) - zp) * step[c];
    float clipped = clamp_nan(xq, -kMaxXq, kMaxXq);  // no out-of-range conversion
    int32_t xi = static_cast<int32_t>(clipped);
    bad |= static_cast<float>(xi) != xq;  // not an integer, out of range, or NaN
    sum += xi;
    sum_sq += static_cast<int64_t>(xi * xi);  // <= 2**24
  }
  // the exact integers, rounded once to float32 as ATen's sum(...).to(float32) rounds them
  *total = static_cast<float>(sum);
  *squares = static_cast<float>(sum_sq);
  return bad != 0;
}

template <typename T>
void stats_rows(const T* codes, const float* step, float zp, int64_t rows, int64_t channels,
                float* total, float* squares) {
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    bool bad = false;
    for (int64_t t = begin; t < end; ++t) {
      bad |= stats_row(codes + t * channels, step, zp, channels, total + t, squares + t);
    }
    TORCH_CHECK(!bad, "fqvit_native::ln_stats: x_q = (code - zero_point) * step must be an "
                "integer of magnitude <= 4096 (integer codes and zero point, PTF steps <= 16)");
  });
}

std::tuple<at::Tensor, at::Tensor> ln_stats(const at::Tensor& codes, const at::Tensor& zero_point,
                                            const at::Tensor& step) {
  check_codes(codes, "ln_stats");
  const int64_t channels = codes.size(-1);
  TORCH_CHECK(channels < (1 << 19), "fqvit_native::ln_stats: too many channels");
  at::Tensor x = codes.contiguous();
  const int64_t rows = channels ? x.numel() / channels : 0;
  std::vector<float> k = per_channel(step, channels, "step");
  const float zp = first_value(zero_point, "zero_point");
  auto shape = codes.sizes().vec();
  shape.back() = 1;
  at::Tensor total = at::empty(shape, codes.options().dtype(at::kFloat));
  at::Tensor squares = at::empty(shape, codes.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kByte) {
    stats_rows(x.data_ptr<uint8_t>(), k.data(), zp, rows, channels, total.data_ptr<float>(),
               squares.data_ptr<float>());
  } else {
    stats_rows(x.data_ptr<float>(), k.data(), zp, rows, channels, total.data_ptr<float>(),
               squares.data_ptr<float>());
  }
  return {total, squares};
}

// ---- pass 2: the per-element multiplier, offset and step 5 ------------------------------------

struct ApplyParams {
  const float* step;
  const float* weight;
  const float* bias;
  const float* out_scale;
  const float* thresholds;  // [256]: floor_log2_thresholds (where ATen's log2 rounds up)
  float zp, out_zp, m_max, lower, upper;
  int32_t bits;
  // the float32 row kernel applies: |B| <= b_limit gives |M x_q + B| < 2**24 (see apply_row_fast)
  bool fast;
  float b_limit;
};

// The exact row kernel: every operation as the pure kernel.
template <typename T>
void apply_row(const T* __restrict row, uint8_t* __restrict dst, float r, float q,
               const ApplyParams& params, int64_t channels) {
  const float* __restrict step = params.step;
  const float* __restrict weight = params.weight;
  const float* __restrict bias = params.bias;
  const float* __restrict out_scale = params.out_scale;
  const float* __restrict thresholds = params.thresholds;
  const float zp = params.zp, m_max = params.m_max;
  const double out_zp = params.out_zp, lower = params.lower, upper = params.upper;
  const int32_t top = params.bits + 127;
  for (int64_t c = 0; c < channels; ++c) {
    float xq = (static_cast<float>(row[c]) - zp) * step[c];
    // step 3: A = ((s_min / std) * gamma) / s_out
    float a = r * weight[c];
    a = a / out_scale[c];
    // 2**N, N = clamp(bits - floor(log2 |A|), 0, 31): floor(log2) from the exponent bits and
    // ATen's rounding-up thresholds (fqvit_pl.quant.kernels.tables.layernorm_power)
    float abs_a = __builtin_fabsf(a);
    int32_t biased = static_cast<int32_t>(__builtin_bit_cast(uint32_t, abs_a) >> 23);
    int32_t up = abs_a >= thresholds[biased] ? 1 : 0;
    int32_t n = clamp_nan(top - biased - up, 0, 31);
    float pw = __builtin_bit_cast(float, static_cast<uint32_t>(n + 127) << 23);
    // 2**-N exactly, so that / 2**N below is the same as * 2**-N (see there)
    double inv_pw = __builtin_bit_cast(double, static_cast<uint64_t>(1023 - n) << 52);
    // sign(A) * M = clamp(trunc(A * 2**N), -m_max, m_max)
    float m = clamp_nan(__builtin_truncf(a * pw), -m_max, m_max);
    // step 4: B = round((beta - (mean / std) * gamma) / s_out * 2**N)
    float b = q * weight[c];
    b = bias[c] - b;
    b = b / out_scale[c];
    b = __builtin_nearbyintf(b * pw);
    // step 5 in float64 as the pure kernel: (M x_q + B) / 2**N, half-even, + zp_out, clamp. The
    // division by the power of two 2**N is exact as the multiplication by 2**-N (v is an integer,
    // inf or NaN: no subnormal result)
    double v = static_cast<double>(m) * static_cast<double>(xq);
    v = v + static_cast<double>(b);
    v = v * inv_pw;
    v = __builtin_nearbyint(v);
    v = v + out_zp;
    v = clamp_nan(v, lower, upper);
    dst[c] = to_code(v);
  }
}

// The same codes as apply_row, about twice as fast, for the usual row; returns false (and the
// caller runs apply_row on the row) where its two shortcuts might not hold:
// - floor(log2 |A|) as the exponent alone: ATen's log2 rounds up only within the top 2048 floats
//   of a binade (floor_log2_thresholds; checked on the table in ln_apply), so a mantissa below
//   0x7FF800 never reaches its binade's threshold; such |A|, and inf (exponent 255), go to
//   apply_row;
// - step 5 in float32: x_q is an integer with |x_q| <= 4096 (checked), |M| <= m_max and
//   |B| <= b_limit = 2**24 - 1 - 4096 m_max (checked), so M x_q + B is an integer below 2**24 in
//   magnitude, exact in float32 as in float64; its product with 2**-N is exact in both, the same
//   half-even rounding follows, and + zp_out (an integer, |zp_out| <= 2**16) is exact in both up
//   to magnitudes far outside [lower, upper], where the clamp gives the same bound either way.
//   A NaN (M or B) is a NaN value and code 0 in both.
template <typename T>
bool apply_row_fast(const T* __restrict row, uint8_t* __restrict dst, float r, float q,
                    const ApplyParams& params, int64_t channels) {
  const float* __restrict step = params.step;
  const float* __restrict weight = params.weight;
  const float* __restrict bias = params.bias;
  const float* __restrict out_scale = params.out_scale;
  const float zp = params.zp, m_max = params.m_max, b_limit = params.b_limit;
  const float out_zp = params.out_zp, lower = params.lower, upper = params.upper;
  const int32_t top = params.bits + 127;
  int32_t slow = 0;
  for (int64_t c = 0; c < channels; ++c) {
    float xq = (static_cast<float>(row[c]) - zp) * step[c];
    int32_t xi = static_cast<int32_t>(clamp_nan(xq, -kMaxXq, kMaxXq));
    slow |= static_cast<float>(xi) != xq;  // not an integer of magnitude <= 4096, or NaN
    float a = r * weight[c];
    a = a / out_scale[c];
    uint32_t ubits = __builtin_bit_cast(uint32_t, __builtin_fabsf(a));
    int32_t biased = static_cast<int32_t>(ubits >> 23);
    slow |= (ubits & 0x7FFFFFu) >= 0x7FF800u;  // near the next power of two
    slow |= biased == 255;                      // inf (NaN too: harmless)
    int32_t n = clamp_nan(top - biased, 0, 31);
    float pw = __builtin_bit_cast(float, static_cast<uint32_t>(n + 127) << 23);
    float inv_pw = __builtin_bit_cast(float, static_cast<uint32_t>(127 - n) << 23);
    float m = clamp_nan(__builtin_truncf(a * pw), -m_max, m_max);
    float b = q * weight[c];
    b = bias[c] - b;
    b = b / out_scale[c];
    b = __builtin_nearbyintf(b * pw);
    slow |= __builtin_fabsf(b) > b_limit;  // (a NaN B compares false: NaN either way)
    float v = m * xq;
    v = v + b;
    v = v * inv_pw;
    v = __builtin_nearbyintf(v);
    v = v + out_zp;
    v = clamp_nan(v, lower, upper);
    dst[c] = static_cast<uint8_t>(static_cast<int32_t>(v == v ? v : 0.0f));
  }
  return slow == 0;
}

template <typename T>
void apply_rows(const T* codes, const float* inv_std, const float* mean_std, const ApplyParams& p,
                int64_t rows, int64_t channels, uint8_t* out) {
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      // inv_std = s_min / std and mean_std = mean / std of the token
      const T* row = codes + t * channels;
      uint8_t* dst = out + t * channels;
      if (!(p.fast && apply_row_fast(row, dst, inv_std[t], mean_std[t], p, channels))) {
        apply_row(row, dst, inv_std[t], mean_std[t], p, channels);
      }
    }
  });
}

// Whether every finite threshold lies in the top 2048 floats of its binade and the entries of
// zero/subnormals (0) and inf/NaN (255) are inf: then apply_row_fast's exponent rule holds.
bool thresholds_near_powers_of_two(const float* thresholds) {
  if (!std::isinf(thresholds[0]) || !std::isinf(thresholds[255])) return false;
  for (int e = 1; e < 255; ++e) {
    float t = thresholds[e];
    if (std::isinf(t) && t > 0) continue;
    uint32_t u;
    std::memcpy(&u, &t, sizeof(u));
    if (static_cast<int>(u >> 23) != e || (u & 0x7FFFFFu) < 0x7FF800u) return false;
  }
  return true;
}

at::Tensor ln_apply(const at::Tensor& codes, const at::Tensor& zero_point, const at::Tensor& step,
                    const at::Tensor& inv_std, const at::Tensor& mean_std,
                    const at::Tensor& weight, const at::Tensor& bias,
                    const at::Tensor& out_scale, const at::Tensor& out_zero_point,
                    const at::Tensor& thresholds, int64_t bits, int64_t lower, int64_t upper) {
  check_codes(codes, "ln_apply");
  const int64_t channels = codes.size(-1);
  at::Tensor x = codes.contiguous();
  const int64_t rows = channels ? x.numel() / channels : 0;
  at::Tensor r = inv_std.to(at::kFloat).contiguous();
  at::Tensor q = mean_std.to(at::kFloat).contiguous();
  TORCH_CHECK(r.numel() == rows && q.numel() == rows,
              "fqvit_native::ln_apply: one inv_std and mean_std per token expected");
  at::Tensor thr = thresholds.to(at::kFloat).contiguous();
  TORCH_CHECK(thr.numel() == 256, "fqvit_native::ln_apply: thresholds must have 256 entries");
  TORCH_CHECK(bits >= 0 && bits <= 22, "fqvit_native::ln_apply: bits out of range");
  std::vector<float> k = per_channel(step, channels, "step");
  std::vector<float> w = per_channel(weight, channels, "weight");
  std::vector<float> b = per_channel(bias, channels, "bias");
  std::vector<float> so = per_channel(out_scale, channels, "out_scale");
  const float m_max = static_cast<float>((int64_t{1} << (bits + 1)) - 1);
  const float out_zp = first_value(out_zero_point, "out_zero_point");
  const float b_limit = 16777215.0f - kMaxXq * m_max;  // exact: both terms are integers < 2**24
  const bool fast = b_limit >= 0.0f && std::nearbyint(out_zp) == out_zp &&
                    std::fabs(out_zp) <= 65536.0f && std::abs(lower) <= 65536 &&
                    std::abs(upper) <= 65536 && thresholds_near_powers_of_two(thr.data_ptr<float>());
  ApplyParams p{k.data(), w.data(), b.data(), so.data(), thr.data_ptr<float>(),
                first_value(zero_point, "zero_point"), out_zp, m_max, static_cast<float>(lower),
                static_cast<float>(upper), static_cast<int32_t>(bits), fast, b_limit};
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kByte));
  if (x.scalar_type() == at::kByte) {
    apply_rows(x.data_ptr<uint8_t>(), r.data_ptr<float>(), q.data_ptr<float>(), p, rows, channels,
               out.data_ptr<uint8_t>());
  } else {
    apply_rows(x.data_ptr<float>(), r.data_ptr<float>(), q.data_ptr<float>(), p, rows, channels,
               out.data_ptr<uint8_t>());
  }
  return out;
}

// ---- the residual addition: LNQ(dequantize(x) + dequantize(branch)) -----------------------------

template <typename TX, typename TB>
void residual_row(const TX* __restrict x, const TB* __restrict branch, const float* __restrict xs,
                  const float* __restrict xz, const float* __restrict bs,
                  const float* __restrict bz, const float* __restrict os,
                  const float* __restrict oz, float lower, float upper, int64_t channels,
                  float* __restrict dst) {
  for (int64_t c = 0; c < channels; ++c) {
    float u = (static_cast<float>(x[c]) - xz[c]) * xs[c];
    float v = (static_cast<float>(branch[c]) - bz[c]) * bs[c];
    float s = u + v;
    s = s / os[c];
    s = s + oz[c];
    dst[c] = clamp_nan(__builtin_nearbyintf(s), lower, upper);
  }
}

template <typename TX, typename TB>
void residual_rows(const TX* x, const TB* branch, const float* xs, const float* xz, const float* bs,
                   const float* bz, const float* os, const float* oz, float lower, float upper,
                   int64_t rows, int64_t channels, float* out) {
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      residual_row(x + t * channels, branch + t * channels, xs, xz, bs, bz, os, oz, lower, upper,
                   channels, out + t * channels);
    }
  });
}

at::Tensor residual_codes(const at::Tensor& x, const at::Tensor& x_scale,
                          const at::Tensor& x_zero_point, const at::Tensor& branch,
                          const at::Tensor& branch_scale, const at::Tensor& branch_zero_point,
                          const at::Tensor& out_scale, const at::Tensor& out_zero_point,
                          int64_t lower, int64_t upper) {
  check_codes(x, "residual_codes");
  check_codes(branch, "residual_codes");
  TORCH_CHECK(x.sizes() == branch.sizes(), "fqvit_native::residual_codes: x ", x.sizes(),
              " and branch ", branch.sizes(), " must have the same shape");
  const int64_t channels = x.size(-1);
  at::Tensor xc = x.contiguous(), bc = branch.contiguous();
  const int64_t rows = channels ? xc.numel() / channels : 0;
  std::vector<float> xs = per_channel(x_scale, channels, "x_scale");
  std::vector<float> xz = per_channel(x_zero_point, channels, "x_zero_point");
  std::vector<float> bs = per_channel(branch_scale, channels, "branch_scale");
  std::vector<float> bz = per_channel(branch_zero_point, channels, "branch_zero_point");
  std::vector<float> os = per_channel(out_scale, channels, "out_scale");
  std::vector<float> oz = per_channel(out_zero_point, channels, "out_zero_point");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  float lo = static_cast<float>(lower), hi = static_cast<float>(upper);
  auto run = [&](auto* xp, auto* bp) {
    residual_rows(xp, bp, xs.data(), xz.data(), bs.data(), bz.data(), os.data(), oz.data(), lo,
                  hi, rows, channels, out.data_ptr<float>());
  };
  const bool xb = xc.scalar_type() == at::kByte, bb = bc.scalar_type() == at::kByte;
  if (xb && bb) run(xc.data_ptr<uint8_t>(), bc.data_ptr<uint8_t>());
  else if (xb) run(xc.data_ptr<uint8_t>(), bc.data_ptr<float>());
  else if (bb) run(xc.data_ptr<float>(), bc.data_ptr<uint8_t>());
  else run(xc.data_ptr<float>(), bc.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fqvit_native, m) {
  m.def("ln_stats(Tensor codes, Tensor zero_point, Tensor step) -> (Tensor, Tensor)");
  m.def(
      "ln_apply(Tensor codes, Tensor zero_point, Tensor step, Tensor inv_std, Tensor mean_std, "
      "Tensor weight, Tensor bias, Tensor out_scale, Tensor out_zero_point, Tensor thresholds, "
      "int bits, int lower, int upper) -> Tensor");
  m.def(
      "residual_codes(Tensor x, Tensor x_scale, Tensor x_zero_point, Tensor branch, "
      "Tensor branch_scale, Tensor branch_zero_point, Tensor out_scale, Tensor out_zero_point, "
      "int lower, int upper) -> Tensor");
}

TORCH_LIBRARY_IMPL(fqvit_native, CPU, m) {
  m.impl("ln_stats", &ln_stats);
  m.impl("ln_apply", &ln_apply);
  m.impl("residual_codes", &residual_codes);
}
