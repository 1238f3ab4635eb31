// The integer model's two attention matmuls on AVX-512 VNNI / BF16 (docs/integer.md), read
// straight from the qkv codes [B, N, 3 * dim] (no float copy, no permute):
//
//   attention_scores:  acc[b, h, i, j] = sum_d (q_id - zp) * (k_jd - zp)     (float32 out)
//   attention_context: out[b, i, h * hd + c] = sum_j p[b, h, i, j] * (v_jc - zp)
//
// Both results are exact, so they equal ATen's float32 bmm of the same operands bit for bit
// (which is exact too, see kernels.int_matmul_exact):
// - scores: u8 x s8 -> s32 dot products (vpdpbusd) of k's codes and q's codes - 128, the zero
//   points folded in exactly in int32:
//     sum (c_q - zp)(c_k - zp) = sum (c_q - 128) c_k + (128 - zp) sum c_k - zp sum c_q + d zp^2.
//   Every term is an integer of magnitude below d * 255 * 255 (plus the folded sums, each below
//   d * 255 * 256), far inside int32 for d <= 258; the result, |acc| <= d * 255^2 < 2^24, converts
//   to float32 exactly.
// - context: bf16 x bf16 pairs accumulated in float32 (vdpbf16ps). The operands are exact in
//   bf16 (8 significant bits): v - zp is an integer of magnitude <= 255, and the probabilities are
//   0 or 2^-r (Log-Int-Softmax) or integers of magnitude <= 255 (a uint8 softmax point minus its
//   zero point); the kernel checks that every float32 probability is exactly a bf16 and refuses
//   otherwise (bfloat16 probabilities are read as they are).
//   Each product then has at most 16 significant bits (exact in float32) and every partial sum
//   is exact under the bound the caller proves (IntegerAttention.forward: multiples of 2^-15
//   below 2^9, or integers below 2^24), in whatever order or pairing the instruction adds, with
//   or without its denormal flushing (no value below 2^-30 occurs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && \
    defined(__AVX512BF16__)
#define FQVIT_ATTNMM_SIMD 1
#include <immintrin.h>
#endif

namespace {

constexpr int kRows = 6;     // rows of a micro-tile
constexpr int kVectors = 4;  // 16-lane column vectors of a micro-tile

bool vectorized() {
#ifdef FQVIT_ATTNMM_SIMD
  return true;
#else
  return false;
#endif
}

void check_qkv(const at::Tensor& qkv, int64_t heads, int64_t zero_point, const char* op) {
  TORCH_CHECK(zero_point >= 0 && zero_point <= 255, op, ": zero point ", zero_point,
              " is not a uint8 code");
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kByte && qkv.dim() == 3,
              op, ": expected uint8 qkv codes [B, N, 3 * dim] on the CPU, got ",
              qkv.scalar_type(), " ", qkv.sizes());
  TORCH_CHECK(heads > 0 && qkv.size(2) % (3 * heads) == 0, op, ": qkv width ", qkv.size(2),
              " is not 3 * heads * head_dim for ", heads, " heads");
  const int64_t head_dim = qkv.size(2) / (3 * heads);
  TORCH_CHECK(head_dim % 16 == 0 && head_dim <= 256, op, ": head_dim ", head_dim,
              " must be a multiple of 16 and at most 256 (use the float32 path)");
}

#ifdef FQVIT_ATTNMM_SIMD

// The dot-product instructions through inline asm: GCC 12's intrinsics for them keep a 6 x 4 tile
// of accumulators on the stack (a load and a store around every instruction); with "v" operands the
// register allocator keeps all 24 in zmm registers.
inline __m512i dot_u8s8(__m512i acc, __m512i unsigned_bytes, __m512i signed_bytes) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(unsigned_bytes), "v"(signed_bytes));
  return acc;
}

inline __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

inline __mmask16 lanes(int64_t valid) {
  return valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1u);
}

// acc[r][v] = sum_g kp[g][j0 + 16 v ..][4] . qs[i0 + r][4 g ..]; out = acc + rowq + colk (float)
template <int MR, int NV>
void scores_tile(const int8_t* qs, int64_t groups, const uint8_t* kp, int64_t n_pad,
                 const int32_t* rowq, const int32_t* colk, float* out, int64_t n, int64_t i0,
                 int64_t j0) {
  __m512i acc[MR][NV];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
  const int64_t row = groups * 4;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i b[NV];
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      b[v] = _mm512_loadu_si512(kp + (g * n_pad + j0 + 16 * v) * 4);
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t word;
      std::memcpy(&word, qs + (i0 + r) * row + 4 * g, 4);
      const __m512i a = _mm512_set1_epi32(word);
      #pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = dot_u8s8(acc[r][v], b[v], a);
    }
  }
  #pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int64_t j = j0 + 16 * v;
    const __mmask16 m = lanes(n - j);
    const __m512i col = _mm512_loadu_si512(colk + j);
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(acc[r][v], col),
                                           _mm512_set1_epi32(rowq[i0 + r]));
      _mm512_mask_storeu_ps(out + (i0 + r) * n + j, m, _mm512_cvtepi32_ps(sum));
    }
  }
}

template <int MR>
void scores_rows(int nv, const int8_t* qs, int64_t groups, const uint8_t* kp, int64_t n_pad,
                 const int32_t* rowq, const int32_t* colk, float* out, int64_t n, int64_t i0,
                 int64_t j0) {
  switch (nv) {
    case 1: return scores_tile<MR, 1>(qs, groups, kp, n_pad, rowq, colk, out, n, i0, j0);
    case 2: return scores_tile<MR, 2>(qs, groups, kp, n_pad, rowq, colk, out, n, i0, j0);
    case 3: return scores_tile<MR, 3>(qs, groups, kp, n_pad, rowq, colk, out, n, i0, j0);
    default: return scores_tile<MR, 4>(qs, groups, kp, n_pad, rowq, colk, out, n, i0, j0);
  }
}

void scores_block(int mr, int nv, const int8_t* qs, int64_t groups, const uint8_t* kp,
                  int64_t n_pad, const int32_t* rowq, const int32_t* colk, float* out,
                  int64_t n, int64_t i0, int64_t j0) {
  switch (mr) {
    case 1: return scores_rows<1>(nv, qs, groups, kp, n_pad, rowq, colk, out, n, i0, j0);
    case 2: return scores_rows<2>(nv, qs, groups, kp, n_pad, rowq, colk, out, n, i0, j0);
    case 3: return scores_rows<3>(nv, qs, groups, kp, n_pad, rowq, colk, out, n, i0, j0);
    case 4: return scores_rows<4>(nv, qs, groups, kp, n_pad, rowq, colk, out, n, i0, j0);
    case 5: return scores_rows<5>(nv, qs, groups, kp, n_pad, rowq, colk, out, n, i0, j0);
    default: return scores_rows<6>(nv, qs, groups, kp, n_pad, rowq, colk, out, n, i0, j0);
  }
}

// out[i][c0 + 16 v ..] = sum_p ap[i][2 p ..] . vp[p][c0 + 16 v ..][2]   (bf16 pairs, fp32 sums)
template <int MR, int NV>
void context_tile(const uint16_t* ap, int64_t pairs, const uint16_t* vp, int64_t hd, float* out,
                  int64_t out_stride, int64_t i0, int64_t c0) {
  __m512 acc[MR][NV];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const int64_t row = pairs * 2;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i b[NV];
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(vp + (p * hd + c0 + 16 * v) * 2);
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t word;
      std::memcpy(&word, ap + (i0 + r) * row + 2 * p, 4);
      const __m512i a = _mm512_set1_epi32(word);
      #pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = dot_bf16(acc[r][v], a, b[v]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_ps(out + (i0 + r) * out_stride + c0 + 16 * v, acc[r][v]);
}

template <int MR>
void context_rows(int nv, const uint16_t* ap, int64_t pairs, const uint16_t* vp, int64_t hd,
                  float* out, int64_t out_stride, int64_t i0, int64_t c0) {
  switch (nv) {
    case 1: return context_tile<MR, 1>(ap, pairs, vp, hd, out, out_stride, i0, c0);
    case 2: return context_tile<MR, 2>(ap, pairs, vp, hd, out, out_stride, i0, c0);
    case 3: return context_tile<MR, 3>(ap, pairs, vp, hd, out, out_stride, i0, c0);
    default: return context_tile<MR, 4>(ap, pairs, vp, hd, out, out_stride, i0, c0);
  }
}

void context_block(int mr, int nv, const uint16_t* ap, int64_t pairs, const uint16_t* vp,
                   int64_t hd, float* out, int64_t out_stride, int64_t i0, int64_t c0) {
  switch (mr) {
    case 1: return context_rows<1>(nv, ap, pairs, vp, hd, out, out_stride, i0, c0);
    case 2: return context_rows<2>(nv, ap, pairs, vp, hd, out, out_stride, i0, c0);
    case 3: return context_rows<3>(nv, ap, pairs, vp, hd, out, out_stride, i0, c0);
    case 4: return context_rows<4>(nv, ap, pairs, vp, hd, out, out_stride, i0, c0);
    case 5: return context_rows<5>(nv, ap, pairs, vp, hd, out, out_stride, i0, c0);
    default: return context_rows<6>(nv, ap, pairs, vp, hd, out, out_stride, i0, c0);
  }
}

#endif  // FQVIT_ATTNMM_SIMD

at::Tensor attention_scores(const at::Tensor& qkv_in, int64_t heads, int64_t zero_point) {
  check_qkv(qkv_in, heads, zero_point, "fqvit_native::attention_scores");
  TORCH_CHECK(vectorized(), "fqvit_native::attention_scores needs AVX-512 VNNI and BF16");
  const at::Tensor qkv = qkv_in.contiguous();
  const int64_t batch = qkv.size(0), n = qkv.size(1), width = qkv.size(2);
  const int64_t dim = width / 3, hd = dim / heads;
  at::Tensor out = at::empty({batch, heads, n, n}, qkv.options().dtype(at::kFloat));
#ifdef FQVIT_ATTNMM_SIMD
  const uint8_t* codes = qkv.data_ptr<uint8_t>();
  float* result = out.data_ptr<float>();
  const int64_t groups = hd / 4, n_pad = (n + 15) / 16 * 16;
  const int32_t zp = static_cast<int32_t>(zero_point);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> qs_buf(n * hd);
    std::vector<uint8_t> kp_buf(groups * n_pad * 4, 0);  // padded columns stay 0
    std::vector<int32_t> rowq_buf(n), colk_buf(n_pad, 0);
    int8_t* qs = qs_buf.data();
    uint8_t* kp = kp_buf.data();
    int32_t* rowq = rowq_buf.data();
    int32_t* colk = colk_buf.data();
    const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const uint8_t* base = codes + b * n * width + h * hd;
      for (int64_t i = 0; i < n; ++i) {
        const uint8_t* q = base + i * width;
        const uint8_t* k = q + dim;
        __m128i sum_q = _mm_setzero_si128(), sum_k = _mm_setzero_si128();
        for (int64_t c = 0; c < hd; c += 16) {
          const __m128i qv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c));
          const __m128i kv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(k + c));
          sum_q = _mm_add_epi64(sum_q, _mm_sad_epu8(qv, _mm_setzero_si128()));
          sum_k = _mm_add_epi64(sum_k, _mm_sad_epu8(kv, _mm_setzero_si128()));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qs + i * hd + c), _mm_xor_si128(qv, flip));
          uint32_t words[4];
          _mm_storeu_si128(reinterpret_cast<__m128i*>(words), kv);
          for (int t = 0; t < 4; ++t)
            std::memcpy(kp + ((c / 4 + t) * n_pad + i) * 4, &words[t], 4);
        }
        const int32_t total_q =
            static_cast<int32_t>(_mm_cvtsi128_si64(sum_q) + _mm_extract_epi64(sum_q, 1));
        const int32_t total_k =
            static_cast<int32_t>(_mm_cvtsi128_si64(sum_k) + _mm_extract_epi64(sum_k, 1));
        rowq[i] = static_cast<int32_t>(hd) * zp * zp - zp * total_q;
        colk[i] = (128 - zp) * total_k;
      }
      float* o = result + task * n * n;
      for (int64_t j0 = 0; j0 < n_pad; j0 += 16 * kVectors) {
        const int nv = static_cast<int>(std::min<int64_t>(kVectors, (n_pad - j0) / 16));
        for (int64_t i0 = 0; i0 < n; i0 += kRows) {
          const int mr = static_cast<int>(std::min<int64_t>(kRows, n - i0));
          scores_block(mr, nv, qs, groups, kp, n_pad, rowq, colk, o, n, i0, j0);
        }
      }
    }
  });
#endif
  return out;
}

at::Tensor attention_context(const at::Tensor& probs_in, const at::Tensor& qkv_in, int64_t heads,
                             int64_t zero_point) {
  check_qkv(qkv_in, heads, zero_point, "fqvit_native::attention_context");
  TORCH_CHECK(vectorized(), "fqvit_native::attention_context needs AVX-512 VNNI and BF16");
  const at::Tensor qkv = qkv_in.contiguous();
  const int64_t batch = qkv.size(0), n = qkv.size(1), width = qkv.size(2);
  const int64_t dim = width / 3, hd = dim / heads;
  const bool bf16 = probs_in.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || probs_in.scalar_type() == at::kFloat) && probs_in.dim() == 4 &&
                  probs_in.size(0) == batch && probs_in.size(1) == heads &&
                  probs_in.size(2) == n && probs_in.size(3) == n,
              "fqvit_native::attention_context: expected float32 or bfloat16 probabilities [", batch, ", ",
              heads, ", ", n, ", ", n, "], got ", probs_in.scalar_type(), " ", probs_in.sizes());
  const at::Tensor probs = probs_in.contiguous();
  at::Tensor out = at::empty({batch, n, dim}, qkv.options().dtype(at::kFloat));
#ifdef FQVIT_ATTNMM_SIMD
  const uint8_t* codes = qkv.data_ptr<uint8_t>();
  const void* p_all = probs.data_ptr();
  float* result = out.data_ptr<float>();
  const int64_t pairs = (n + 1) / 2;
  std::atomic<bool> inexact{false};
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> ap_buf(n * pairs * 2, 0);   // probability rows as bf16, padded with 0
    std::vector<uint16_t> vp_buf(pairs * hd * 2, 0);  // V as bf16 pairs [pairs][hd][2]
    uint16_t* ap = ap_buf.data();
    uint16_t* vp = vp_buf.data();
    const __m512i zp_vec = _mm512_set1_epi32(static_cast<int32_t>(zero_point));
    __m512i low_bits = _mm512_setzero_si512();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const uint8_t* v_base = codes + b * n * width + 2 * dim + h * hd;
      for (int64_t pair = 0; pair < pairs; ++pair) {
        // word c of the pair: bf16(v[2 pair][c] - zp) | bf16(v[2 pair + 1][c] - zp) << 16; the
        // integers |v - zp| <= 255 have 8 significant bits, so the top half of their float32
        // is their exact bf16; a missing odd row (n odd) is 0
        const uint8_t* even = v_base + 2 * pair * width;
        const bool has_odd = 2 * pair + 1 < n;
        for (int64_t c = 0; c < hd; c += 16) {
          const __m512i e = _mm512_sub_epi32(
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(even + c))),
              zp_vec);
          __m512i word = _mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(e)), 16);
          if (has_odd) {
            const __m512i o = _mm512_sub_epi32(
                _mm512_cvtepu8_epi32(
                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(even + width + c))),
                zp_vec);
            const __m512i high = _mm512_and_si512(_mm512_castps_si512(_mm512_cvtepi32_ps(o)),
                                                  _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u)));
            word = _mm512_or_si512(word, high);
          }
          _mm512_storeu_si512(vp + (pair * hd + c) * 2, word);
        }
      }
      // the probability rows as bf16 pairs (row length 2 * pairs, a missing last column 0)
      const uint16_t* rows = ap;
      if (bf16) {
        const uint16_t* p = static_cast<const uint16_t*>(p_all) + task * n * n;
        if (n % 2 == 0) {
          rows = p;  // already the layout: read in place
        } else {
          for (int64_t i = 0; i < n; ++i) std::memcpy(ap + i * pairs * 2, p + i * n, n * 2);
        }
      } else {
        const float* p = static_cast<const float*>(p_all) + task * n * n;
        for (int64_t i = 0; i < n; ++i) {
          const float* src = p + i * n;
          uint16_t* dst = ap + i * pairs * 2;
          for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 m = lanes(n - j);
            const __m512i x = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, src + j));
            low_bits = _mm512_or_si512(low_bits, _mm512_and_si512(x, _mm512_set1_epi32(0xFFFF)));
            _mm256_mask_storeu_epi16(dst + j, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16)));
          }
        }
      }
      float* o = result + b * n * dim + h * hd;
      for (int64_t c0 = 0; c0 < hd; c0 += 16 * kVectors) {
        const int nv = static_cast<int>(std::min<int64_t>(kVectors, (hd - c0) / 16));
        for (int64_t i0 = 0; i0 < n; i0 += kRows) {
          const int mr = static_cast<int>(std::min<int64_t>(kRows, n - i0));
          context_block(mr, nv, rows, pairs, vp, hd, o, dim, i0, c0);
        }
      }
    }
    if (_mm512_test_epi32_mask(low_bits, low_bits) != 0) inexact = true;
  });
  TORCH_CHECK(!inexact.load(),
              "fqvit_native::attention_context: a probability is not exactly a bfloat16 (expected 0, "
              "powers of two or small integers); use the float32 path (kernels.int_matmul_exact)");
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fqvit_native, m) {
  m.def("attention_matmul_vectorized() -> bool", []() { return vectorized(); });
  m.def("attention_scores(Tensor qkv, int heads, int zero_point) -> Tensor");
  m.def("attention_context(Tensor probs, Tensor qkv, int heads, int zero_point) -> Tensor");
}

TORCH_LIBRARY_IMPL(fqvit_native, CPU, m) {
  m.impl("attention_scores", &attention_scores);
  m.impl("attention_context", &attention_context);
}
