// AVX2 matrix-vector product with bfloat16, float16 or float32 weights for decode steps: one to three
// activation rows with rows of weights interleaved, more (up to 64) four at a time per weight tile.
//
// y[m, n] = sum_k w[n, k] * x[m, k] (+ bias[n]) accumulated in fp32 and rounded once to x's dtype, as
// torch's own matmul does. On AVX2-only CPUs torch's bf16 GEMV converts through slower paths; a
// bf16 value is the top half of an fp32, so 16 weights become two fp32 vectors with one shift and one
// mask: even columns `w << 16`, odd columns `w & 0xffff0000`, multiplied against x split the same way.
// float16 weights convert exactly with F16C, eight at a time, in the float32 path's order, so they give
// the same bits as the same values stored in float32.
// Rows are taken several at a time, interleaved, so each load of x serves all of them; this also
// beats the BLAS fp32 GEMV on this kind of machine (docs/benchmarks.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Threads take runs of 64 rows; within a run, NR rows at a time (then single rows) go to tile(n, nr).
template <int NR, typename Tile>
void for_row_tiles(int64_t N, const Tile& tile) {
  constexpr int64_t kRowsPerGrab = 64;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t n0 = next.fetch_add(kRowsPerGrab); n0 < N; n0 = next.fetch_add(kRowsPerGrab)) {
      const int64_t n1 = std::min(N, n0 + kRowsPerGrab);
      for (int64_t n = n0; n < n1;) {
        const bool full = n1 - n >= NR;
        tile(n, full);
        n += full ? NR : 1;
      }
    }
  });
}

// M activation rows against NR bf16 weight rows from `w0` (row stride K): y[m * N + n0 + r].
template <int M, int NR>
void bf16_tile(const uint16_t* w0, const float* xe, const float* xo, const float* x, const float* bias,
               float* y, int64_t n0, int64_t N, int64_t K) {
  const int64_t vec = K & ~int64_t{15}, half = K / 2 + 8;
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[M][NR];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < vec; c += 16) {
    for (int r = 0; r < NR; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + r * K + c));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
      for (int m = 0; m < M; ++m) {
        acc[m][r] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xe + m * half + c / 2), acc[m][r]);
        acc[m][r] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xo + m * half + c / 2), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) {
      float s = hsum8(acc[m][r]);
      for (int64_t k = vec; k < K; ++k) s += bf16_to_float(w0[r * K + k]) * x[m * K + k];
      y[m * N + n0 + r] = s + (bias ? bias[n0 + r] : 0.f);
    }
}

// The same for float32 weights, or float16 ones widened as they load (exact, so the same bits).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

template <int M, int NR, typename W>
void f32_tile(const W* w0, const float* x, const float* bias, float* y, int64_t n0, int64_t N, int64_t K) {
  const int64_t vec = K & ~int64_t{7};
  __m256 acc[M][NR];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < vec; c += 8) {
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = load8(w0 + r * K + c);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + c), acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) {
      float s = hsum8(acc[m][r]);
      for (int64_t k = vec; k < K; ++k) s += static_cast<float>(w0[r * K + k]) * x[m * K + k];
      y[m * N + n0 + r] = s + (bias ? bias[n0 + r] : 0.f);
    }
}

// Rows interleaved per tile: as many as the registers hold (NR * M accumulators), 8 at one activation
// row. As in the int8 kernel, interleaved rows sharing each x load and no software prefetch stream
// fastest here.
template <int M>
void gemv_bf16(const uint16_t* w, const float* xe, const float* xo, const float* x, const float* bias,
               float* y, int64_t N, int64_t K) {
  constexpr int NR = M == 1 ? 8 : M == 2 ? 4 : 2;
  for_row_tiles<NR>(N, [&](int64_t n, bool full) {
    if (full) bf16_tile<M, NR>(w + n * K, xe, xo, x, bias, y, n, N, K);
    else bf16_tile<M, 1>(w + n * K, xe, xo, x, bias, y, n, N, K);
  });
}

// More activation rows (a batched decode step): NR = 3 weight rows per tile, each tile multiplied by
// the activation rows four at a time while it is in L1/L2, so the weights are read from memory once
// and widened in registers (no fp32 copy). Each output sums in the same order as with one to three
// rows, so a row's result does not depend on how many rows come with it. `tile(C, full, m0, n)` runs
// the C-row tile kernel on rows m0.. and weight rows n.. (NR of them when `full`, else one).
template <typename Tile>
void gemv_many_rows(int64_t M, int64_t N, const Tile& tile) {
  constexpr int NR = 3, MC = 4;
  for_row_tiles<NR>(N, [&](int64_t n, bool full) {
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
      switch (std::min<int64_t>(MC, M - m0)) {
        case 4: tile(std::integral_constant<int, 4>{}, full, m0, n); break;
        case 3: tile(std::integral_constant<int, 3>{}, full, m0, n); break;
        case 2: tile(std::integral_constant<int, 2>{}, full, m0, n); break;
        default: tile(std::integral_constant<int, 1>{}, full, m0, n); break;
      }
    }
  });
}

void gemv_bf16_rows(const uint16_t* w, const float* xe, const float* xo, const float* x, const float* bias,
                    float* y, int64_t M, int64_t N, int64_t K) {
  const int64_t half = K / 2 + 8;
  gemv_many_rows(M, N, [&](auto c, bool full, int64_t m0, int64_t n) {
    constexpr int C = decltype(c)::value;
    const float *e = xe + m0 * half, *o = xo + m0 * half, *xm = x + m0 * K;
    if (full) bf16_tile<C, 3>(w + n * K, e, o, xm, bias, y + m0 * N, n, N, K);
    else bf16_tile<C, 1>(w + n * K, e, o, xm, bias, y + m0 * N, n, N, K);
  });
}

template <typename W>
void gemv_f32_rows(const W* w, const float* x, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  gemv_many_rows(M, N, [&](auto c, bool full, int64_t m0, int64_t n) {
    constexpr int C = decltype(c)::value;
    if (full) f32_tile<C, 3>(w + n * K, x + m0 * K, bias, y + m0 * N, n, N, K);
    else f32_tile<C, 1>(w + n * K, x + m0 * K, bias, y + m0 * N, n, N, K);
  });
}

template <int M, typename W>
void gemv_f32(const W* w, const float* x, const float* bias, float* y, int64_t N, int64_t K) {
  constexpr int NR = M == 1 ? 8 : M == 2 ? 4 : 2;
  for_row_tiles<NR>(N, [&](int64_t n, bool full) {
    if (full) f32_tile<M, NR>(w + n * K, x, bias, y, n, N, K);
    else f32_tile<M, 1>(w + n * K, x, bias, y, n, N, K);
  });
}

// x [M, K] float32/bfloat16 with M in 1..kMaxRows; weight bfloat16, float16 or float32 [N, K]; bias [N] or
// None.
constexpr int64_t kMaxRows = 64;

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "chatglm_gemv::mv: x and weight must be 2-D");
  const auto wtype = weight.scalar_type();
  TORCH_CHECK((wtype == at::kBFloat16 || wtype == at::kHalf || wtype == at::kFloat) && weight.is_contiguous(),
              "chatglm_gemv::mv: weight must be contiguous bfloat16, float16 or float32");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "chatglm_gemv::mv: 1 to ", kMaxRows, " activation rows, got ", M);
  TORCH_CHECK(weight.size(1) == K, "chatglm_gemv::mv: weight has ", weight.size(1), " columns, x has ", K);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    bf = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bf.numel() == N, "chatglm_gemv::mv: bias must have ", N, " entries");
  }
  const float* xp = xf.data_ptr<float>();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (wtype == at::kFloat || wtype == at::kHalf) {
    auto run = [&](const auto* w) {
      switch (M) {
        case 1: gemv_f32<1>(w, xp, bp, yp, N, K); break;
        case 2: gemv_f32<2>(w, xp, bp, yp, N, K); break;
        case 3: gemv_f32<3>(w, xp, bp, yp, N, K); break;
        default: gemv_f32_rows(w, xp, bp, yp, M, N, K); break;
      }
    };
    if (wtype == at::kFloat) run(weight.data_ptr<float>());
    else run(weight.data_ptr<at::Half>());
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  const int64_t half = K / 2 + 8;  // padded: the vector loop reads 8 floats at c / 2 < K / 2
  std::vector<float> xe(M * half, 0.f), xo(M * half, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; 2 * j + 1 < K; ++j) xe[m * half + j] = xp[m * K + 2 * j], xo[m * half + j] = xp[m * K + 2 * j + 1];
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  switch (M) {
    case 1: gemv_bf16<1>(wp, xe.data(), xo.data(), xp, bp, yp, N, K); break;
    case 2: gemv_bf16<2>(wp, xe.data(), xo.data(), xp, bp, yp, N, K); break;
    case 3: gemv_bf16<3>(wp, xe.data(), xo.data(), xp, bp, yp, N, K); break;
    default: gemv_bf16_rows(wp, xe.data(), xo.data(), xp, bp, yp, M, N, K); break;
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(chatglm_gemv, m) { m.def("mv(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(chatglm_gemv, CPU, m) { m.impl("mv", &gemv); }
