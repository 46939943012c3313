// offload_native::int4_mm: y[M, N] = x[M, K] @ W.T on cpu for small M (decode), W symmetric int4.
// offload_native::int8_mm: the same for the int8 format (the output projection), see the end of the file.
// offload_native::decode_attention: one query position against a KV cache, in fp32, over the cached
// positions only (see the end of the file).
//
// Layout (offload/kernels/cpu_native.py `repack`): w uint8 [N, Kq/2], Kq = K padded to the block and to 64.
// Each 64-column chunk of a row is 32 bytes; byte j holds column j (low nibble) and column j + 32 (high
// nibble), as the unsigned nibble u = q + 8: one 32-byte load, an AND and a shift give the 64 columns in two
// registers, in order. scales bf16 [N, Kq/block], one per block of `block` columns (32 or a multiple of 64),
// as stored (block 32 with an odd number of blocks gets one more: a zero-scale block of padding).
//
// Arithmetic (llama.cpp's Q4_0 x Q8_0): each row of x is quantized per 32 columns, d = max|x| / 127 (fp32),
// xq = round-half-even(x * (1 / d)) in [-127, 127], with sx = sum(xq) over the chunk. Then
//   y[m, n] = sum_b s[n, b] * (sum_{c in b} d[m, c] * sum_{j in c} u[n, j] * xq[m, j]  -  corr[m, b]),
//   corr[m, b] = 8 * sum_{c in b} d[m, c] * sx[m, c]     (u * xq = q * xq + 8 * xq)
// u * xq is exact in integers: maddubs (unsigned u <= 15 times signed xq) cannot saturate, as
// 2 * 15 * 127 < 32767; VNNI's dpbusd does the same in one instruction. Chunk sums are scaled by d and
// accumulated in fp32 per block, blocks by s: fp32 throughout, only the summation order differs from a
// reference computing the same formula.
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int QK = 32;     // columns per activation scale
constexpr int MAX_MG = 4;  // rows of x handled together (accumulators in registers)
// Software prefetch this many bytes ahead of each weight load: decode streams W from RAM once per token and
// one core alone keeps too few cache misses in flight (measured: 4 KiB-16 KiB ~1.6x faster than none, 8 KiB best)
constexpr int64_t PREFETCH = 8192;

// x quantized: q int8 [M, Kq], d fp32 [M, Kq/32], corr fp32 [M, Kq/block]
struct QuantX {
  std::vector<int8_t> q;
  std::vector<float> d, corr;
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

QuantX quantize_x(const at::Tensor& x, int64_t kq, int64_t block) {
  const int64_t m_rows = x.size(0), k = x.size(1), nc = kq / QK;
  QuantX out{std::vector<int8_t>(m_rows * kq), std::vector<float>(m_rows * nc), std::vector<float>(m_rows * (kq / block))};
  std::vector<float> row(kq, 0.f);  // one row of x in fp32, zero-padded to Kq
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t m = 0; m < m_rows; ++m) {
    if (x.scalar_type() == at::kBFloat16) {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr()) + m * k;
      for (int64_t j = 0; j < k; ++j) row[j] = bf16_to_float(src[j]);
    } else {
      std::memcpy(row.data(), x.data_ptr<float>() + m * k, k * sizeof(float));
    }
    for (int64_t c = 0; c < nc; ++c) {
      const float* v = row.data() + c * QK;
      __m256 f[4], amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        f[i] = _mm256_loadu_ps(v + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, f[i]));
      }
      __m128 a = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      a = _mm_max_ps(a, _mm_movehl_ps(a, a));
      a = _mm_max_ss(a, _mm_movehdup_ps(a));
      const float d = _mm_cvtss_f32(a) / 127.f;
      const __m256 id = _mm256_set1_ps(d != 0.f ? 1.f / d : 0.f);
      __m256i q[4];
      for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(f[i], id));  // round half to even
      // int32 x 32 -> int8 x 32: the packs interleave 128-bit lanes, the permute restores column order
      __m256i q16a = _mm256_packs_epi32(q[0], q[1]), q16b = _mm256_packs_epi32(q[2], q[3]);
      __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16a, q16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + m * kq + c * QK), q8);
      __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      out.d[m * nc + c] = d;
      out.corr[m * (kq / block) + c * QK / block] += 8.f * d * float(_mm_cvtsi128_si32(s4));
    }
  }
  return out;
}

// 32 products u * xq summed into 8 int32 lanes
inline __m256i dot32(__m256i u, __m256i xq) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, xq);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, xq);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, xq), _mm256_set1_epi16(1));
#endif
}

// 32 products w * xq of two signed int8 vectors: |xq| is unsigned and w takes xq's sign (xq is never -128, so
// |xq| <= 127 and each pair sum of maddubs is at most 2 * 127 * 127 < 32767)
inline __m256i dot32_s8(__m256i w, __m256i xq) { return dot32(_mm256_sign_epi8(xq, xq), _mm256_sign_epi8(w, xq)); }

struct Args {
  const QuantX* qx;
  const uint8_t* w;  // int4: packed nibbles; int8: the int8 values
  const uint16_t* s;
  int64_t kq, block, n;
  void* y;  // [M, N], bf16 or fp32
  bool bf16;
};

// Rows n0 .. n0+R of W against rows m0 .. m0+MG of x. R > 1 shares each x load between R weight rows
// and gives the fp32 accumulation R independent chains (MG > 1 shares each weight unpack between rows of x).
// A scale group is one block, or one 64-column chunk holding two 32-column blocks (SPLIT, block 32).
template <int MG, int R, bool SPLIT>
void tile(const Args& a, int64_t m0, int64_t n0) {
  const int64_t nc = a.kq / QK, nb = a.kq / a.block, group = SPLIT ? 64 : a.block;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const int8_t* xq = a.qx->q.data() + m0 * a.kq;
  const float* d = a.qx->d.data() + m0 * nc;
  __m256 acc[MG][R];
  for (int m = 0; m < MG; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < a.kq; g0 += group) {
    __m256 lo[MG][R], hi[MG][R];  // chunk sums times d, low / high half of each 64 columns
    for (int m = 0; m < MG; ++m)
      for (int r = 0; r < R; ++r) lo[m][r] = _mm256_setzero_ps(), hi[m][r] = _mm256_setzero_ps();
    for (int64_t k0 = g0; k0 < g0 + group; k0 += 64) {
      __m256i xl[MG], xh[MG];
      __m256 dl[MG], dh[MG];
      for (int m = 0; m < MG; ++m) {
        xl[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * a.kq + k0));
        xh[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * a.kq + k0 + QK));
        dl[m] = _mm256_set1_ps(d[m * nc + k0 / QK]);
        dh[m] = _mm256_set1_ps(d[m * nc + k0 / QK + 1]);
      }
      for (int r = 0; r < R; ++r) {
        const uint8_t* wp = a.w + (n0 + r) * (a.kq / 2) + k0 / 2;
        _mm_prefetch(reinterpret_cast<const char*>(wp + PREFETCH), _MM_HINT_T0);  // past the end: harmless hint
        __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
        __m256i ul = _mm256_and_si256(raw, low), uh = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        for (int m = 0; m < MG; ++m) {
          lo[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(ul, xl[m])), dl[m], lo[m][r]);
          __m256& h = SPLIT ? hi[m][r] : lo[m][r];
          h = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(uh, xh[m])), dh[m], h);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const uint16_t* s = a.s + (n0 + r) * nb + g0 / a.block;
      const __m256 sl = _mm256_set1_ps(bf16_to_float(s[0]));
      for (int m = 0; m < MG; ++m) {
        acc[m][r] = _mm256_fmadd_ps(lo[m][r], sl, acc[m][r]);
        if (SPLIT) acc[m][r] = _mm256_fmadd_ps(hi[m][r], _mm256_set1_ps(bf16_to_float(s[1])), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MG; ++m) {
    const float* corr = a.qx->corr.data() + (m0 + m) * nb;
    for (int r = 0; r < R; ++r) {
      const uint16_t* s = a.s + (n0 + r) * nb;
      float c = 0.f;
      for (int64_t b = 0; b < nb; ++b) c += bf16_to_float(s[b]) * corr[b];
      const float v = hsum(acc[m][r]) - c;
      const int64_t i = (m0 + m) * a.n + n0 + r;
      if (a.bf16) {
        static_cast<c10::BFloat16*>(a.y)[i] = c10::BFloat16(v);  // round to nearest even
      } else {
        static_cast<float*>(a.y)[i] = v;
      }
    }
  }
}

// The int8 format: w int8 [N, Kq] (Kq = K padded to the block, a multiple of 32), scales bf16 [N, Kq/block].
//   y[m, n] = sum_b s[n, b] * sum_{c in b} d[m, c] * sum_{j in c} w[n, j] * xq[m, j]   (no offset: no correction)
template <int MG, int R>
void tile8(const Args& a, int64_t m0, int64_t n0) {
  const int64_t nc = a.kq / QK, nb = a.kq / a.block;
  const int8_t* xq = a.qx->q.data() + m0 * a.kq;
  const float* d = a.qx->d.data() + m0 * nc;
  const int8_t* w = reinterpret_cast<const int8_t*>(a.w);
  __m256 acc[MG][R];
  for (int m = 0; m < MG; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < a.kq; g0 += a.block) {
    __m256 part[MG][R];  // chunk sums times d over one block
    for (int m = 0; m < MG; ++m)
      for (int r = 0; r < R; ++r) part[m][r] = _mm256_setzero_ps();
    for (int64_t k0 = g0; k0 < g0 + a.block; k0 += QK) {
      __m256i xv[MG];
      __m256 dm[MG];
      for (int m = 0; m < MG; ++m) {
        xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * a.kq + k0));
        dm[m] = _mm256_set1_ps(d[m * nc + k0 / QK]);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* wp = w + (n0 + r) * a.kq + k0;
        _mm_prefetch(reinterpret_cast<const char*>(wp + PREFETCH), _MM_HINT_T0);
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
        for (int m = 0; m < MG; ++m)
          part[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32_s8(wv, xv[m])), dm[m], part[m][r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_set1_ps(bf16_to_float(a.s[(n0 + r) * nb + g0 / a.block]));
      for (int m = 0; m < MG; ++m) acc[m][r] = _mm256_fmadd_ps(part[m][r], sv, acc[m][r]);
    }
  }
  for (int m = 0; m < MG; ++m) {
    for (int r = 0; r < R; ++r) {
      const float v = hsum(acc[m][r]);
      const int64_t i = (m0 + m) * a.n + n0 + r;
      if (a.bf16) {
        static_cast<c10::BFloat16*>(a.y)[i] = c10::BFloat16(v);
      } else {
        static_cast<float*>(a.y)[i] = v;
      }
    }
  }
}

template <int MG, int R, bool SPLIT, bool INT8>
void tile_of(const Args& a, int64_t m0, int64_t n0) {
  if constexpr (INT8) {
    tile8<MG, R>(a, m0, n0);
  } else {
    tile<MG, R, SPLIT>(a, m0, n0);
  }
}

// Tiles of R rows, the last one cropped to N row by row
template <int MG, int R, bool SPLIT, bool INT8>
void rows(const Args& a, int64_t m0, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    if ((t + 1) * R <= a.n) {
      tile_of<MG, R, SPLIT, INT8>(a, m0, t * R);
    } else {
      for (int64_t n = t * R; n < a.n; ++n) tile_of<MG, 1, SPLIT, INT8>(a, m0, n);
    }
  }
}

template <int MG, int R, bool INT8>
void run(const Args& a, int64_t m0) {
  const int64_t tiles = (a.n + R - 1) / R;
  // at least ~32 KiB of weights per task: smaller tasks cost more in scheduling than they save
  const int64_t row_bytes = INT8 ? a.kq : a.kq / 2;
  const int64_t grain = std::max<int64_t>(1, (32 << 10) / (R * row_bytes));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    if (INT8 || a.block != QK) {
      rows<MG, R, false, INT8>(a, m0, t0, t1);
    } else {
      rows<MG, R, true, INT8>(a, m0, t0, t1);
    }
  });
}

template <bool INT8>
void run_all(const Args& a, int64_t m_rows) {
  for (int64_t m0 = 0; m0 < m_rows; m0 += MAX_MG) {
    switch (std::min<int64_t>(MAX_MG, m_rows - m0)) {
      case 1: run<1, 4, INT8>(a, m0); break;
      case 2: run<2, 2, INT8>(a, m0); break;
      case 3: run<3, 1, INT8>(a, m0); break;
      default: run<4, 1, INT8>(a, m0); break;
    }
  }
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "int4_mm: x must be a contiguous 2-D bf16 or fp32 tensor");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kByte && w.size(1) % 32 == 0,
              "int4_mm: w must be contiguous uint8 [N, Kq/2] with Kq a multiple of 64");
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous() && scales.scalar_type() == at::kBFloat16 &&
                  scales.size(0) == w.size(0),
              "int4_mm: scales must be contiguous bf16 [N, Kq/block]");
  const int64_t n = w.size(0), kq = w.size(1) * 2, nb = scales.size(1);
  TORCH_CHECK(nb > 0 && kq % nb == 0 && (kq / nb == QK || (kq / nb) % 64 == 0),
              "int4_mm: block size must be 32 or a multiple of 64");
  TORCH_CHECK(x.size(1) == in_features && in_features <= kq, "int4_mm: x has ", x.size(1), " features, in_features ",
              in_features, ", packed K ", kq);
  const QuantX qx = quantize_x(x, kq, kq / nb);
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  const Args a{&qx, w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr()), kq, kq / nb, n,
               y.data_ptr(), x.scalar_type() == at::kBFloat16};
  run_all<false>(a, x.size(0));
  return y;
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "int8_mm: x must be a contiguous 2-D bf16 or fp32 tensor");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar && w.size(1) % QK == 0,
              "int8_mm: w must be contiguous int8 [N, Kp] with Kp a multiple of 32");
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous() && scales.scalar_type() == at::kBFloat16 &&
                  scales.size(0) == w.size(0),
              "int8_mm: scales must be contiguous bf16 [N, Kp/block]");
  const int64_t n = w.size(0), kq = w.size(1), nb = scales.size(1);
  TORCH_CHECK(nb > 0 && kq % nb == 0 && (kq / nb) % QK == 0, "int8_mm: block size must be a multiple of 32");
  TORCH_CHECK(x.size(1) == in_features && in_features <= kq, "int8_mm: x has ", x.size(1), " features, in_features ",
              in_features, ", stored K ", kq);
  const QuantX qx = quantize_x(x, kq, kq / nb);
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  const Args a{&qx, reinterpret_cast<const uint8_t*>(w.data_ptr<int8_t>()),
               reinterpret_cast<const uint16_t*>(scales.data_ptr()), kq, kq / nb, n, y.data_ptr(),
               x.scalar_type() == at::kBFloat16};
  run_all<true>(a, x.size(0));
  return y;
}

// Decode attention: out[b, h] = softmax_t(scale * q[b, h] . k[b, h / G, t]) @ v[b, h / G, t] over the positions t
// with mask[b, t] set (all when there is no mask), where G = H / Hk query heads share a kv head. Only positions up
// to the last one set are read: a static cache's unused tail costs nothing (SDPA reads all T). fp32 throughout;
// q, k, v bf16 or fp32. q [B, H, D], k/v [B, Hk, T, D] with unit stride in D and D a multiple of 8, mask bool
// [B, T] -> [B, H, D]. One task per (b, kv head): each k and v row is read once for its G query heads.
inline __m256 load8(const void* p, bool bf16) {
  if (bf16) {  // bf16 -> fp32: the 16 bits become the high half of the fp32 word
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  return _mm256_loadu_ps(static_cast<const float*>(p));
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() &&
                  k.size(0) == q.size(0) && k.size(3) == q.size(2) && q.size(1) % k.size(1) == 0 &&
                  q.size(2) % 8 == 0,
              "decode_attention: q [B, H, D], k and v [B, Hk, T, D], H a multiple of Hk, D a multiple of 8");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v need unit stride in D");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kBFloat16 || k.scalar_type() == at::kFloat) &&
                  (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat),
              "decode_attention: q, k, v must be bf16 or fp32 (k and v alike)");
  const int64_t n_b = q.size(0), n_h = q.size(1), d = q.size(2), n_kv = k.size(1), n_t = k.size(2);
  const int64_t group = n_h / n_kv;
  at::Tensor m;
  if (mask.has_value()) {
    m = mask->contiguous();
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == n_b && m.size(1) == n_t,
                "decode_attention: mask must be bool [B, T]");
  }
  const at::Tensor qf = q.to(at::kFloat);  // [B, H, D]
  at::Tensor out = at::empty({n_b, n_h, d}, q.options().dtype(at::kFloat));
  const bool bf16 = k.scalar_type() == at::kBFloat16;
  const int64_t es = k.element_size();
  at::parallel_for(0, n_b * n_kv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(group * n_t), acc(group * d), top(group), total(group);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / n_kv, kv = i % n_kv;
      const bool* mb = m.defined() ? m.data_ptr<bool>() + b * n_t : nullptr;
      int64_t len = n_t;
      while (mb && len > 0 && !mb[len - 1]) --len;
      const float* qb = qf.data_ptr<float>() + (b * n_h + kv * group) * d;  // the group's G rows
      const char* kb = static_cast<const char*>(k.data_ptr()) + (b * k.stride(0) + kv * k.stride(1)) * es;
      const char* vb = static_cast<const char*>(v.data_ptr()) + (b * v.stride(0) + kv * v.stride(1)) * es;
      std::fill(top.begin(), top.end(), -INFINITY);
      std::fill(total.begin(), total.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        if (mb && !mb[t]) continue;
        const char* kr = kb + t * k.stride(2) * es;
        for (int64_t g = 0; g < group; ++g) {
          __m256 s = _mm256_setzero_ps();
          for (int64_t j = 0; j < d; j += 8)
            s = _mm256_fmadd_ps(_mm256_loadu_ps(qb + g * d + j), load8(kr + j * es, bf16), s);
          scores[g * n_t + t] = hsum(s) * float(scale);
          top[g] = std::max(top[g], scores[g * n_t + t]);
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        if (mb && !mb[t]) continue;
        const char* vr = vb + t * v.stride(2) * es;
        for (int64_t g = 0; g < group; ++g) {
          const float p = std::exp(scores[g * n_t + t] - top[g]);
          total[g] += p;
          const __m256 pv = _mm256_set1_ps(p);
          float* a = acc.data() + g * d;
          for (int64_t j = 0; j < d; j += 8)
            _mm256_storeu_ps(a + j, _mm256_fmadd_ps(pv, load8(vr + j * es, bf16), _mm256_loadu_ps(a + j)));
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* o = out.data_ptr<float>() + (b * n_h + kv * group + g) * d;
        // no position attended (a fully masked row): zeros, where softmax would give NaN
        for (int64_t j = 0; j < d; ++j) o[j] = total[g] > 0.f ? acc[g * d + j] / total[g] : 0.f;
      }
    }
  });
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY(offload_native, m) {
  m.def("int4_mm(Tensor x, Tensor w, Tensor scales, int in_features) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor w, Tensor scales, int in_features) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(offload_native, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int8_mm", &int8_mm);
  m.impl("decode_attention", &decode_attention);
}
