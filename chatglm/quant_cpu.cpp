// AVX2 weight-only int8/int4 matmul reading THUDM's packed layout directly (no repacked copy).
//
// y[m, n] = wscale[n] * sum_k q[n, k] * x[m, k] (+ bias[n]).  Activations (fp32 or bf16) are quantized
// per 512-column block to 16-bit (int8 weights) or 15-bit (int4 weights) integers: the error is at most
// block absmax / 32766, well below bf16 rounding.  Inner loops are integer multiply-adds
// (vpmaddwd; vpmaddubsw on nibbles for int4); each block's int32 sum is scaled in fp32.
// int4 bytes hold column 2j in the high nibble and 2j+1 in the low nibble (4-bit two's complement).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace {

// Activation quantization block, in columns: the int32 sums are rescaled in fp32 once per block. int8: one
// lane sums 32 vpmaddwd results of at most 2 * 127 * 32767 each (< 2^31). int4: 4 sub-blocks of 128
// columns, each at most ~4e6 a lane.
constexpr int64_t kBlock = 512;
constexpr int64_t kSub4 = 128;  // int4 inner block (int16 partial sums must not saturate)
constexpr int64_t kRowTile = 16;  // weight rows per task: a tile stays in L2 while x streams
constexpr int kMaxNR = 4;            // weight rows per pass (4 only for one int8 activation row)

struct QuantizedX {
  std::vector<int16_t> q;  // [M, K] natural column order (int8 weights; ragged tail for int4)
  std::vector<int8_t> p;   // int4 only, [M, v4 * 2 chunks, 128]: per 64 columns the high bytes of
                           // even and odd columns, then the low 7 bits of even and odd
  std::vector<float> s;    // [M, nb] block scales
  std::vector<float> corr; // [M] int4 only: -8 * sum_b s_b * sum(x_b) over the vectorized columns
  int64_t nb = 0, full = 0;
  int64_t v4 = 0;          // int4 only: 128-column sub-blocks the vector path takes (K / 128)
};

inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 widen8(const at::BFloat16* p) {  // a bf16 is the top half of an fp32
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

// Block absmax and int16 quantization of 16 columns at a time (int8 weights). Max is exact in any
// order and _mm256_cvtps_epi32 rounds half to even as the scalar code does: the same values.
template <typename T>
float absmax16(const T* x, int64_t len) {
  const __m256 mag = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 m = _mm256_setzero_ps();
  for (int64_t k = 0; k < len; k += 8) m = _mm256_max_ps(_mm256_and_ps(widen8(x + k), mag), m);  // NaN: keeps m
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

template <typename T>
void quantize16(const T* x, int64_t len, float inv, int16_t* q) {
  const __m256 s = _mm256_set1_ps(inv);
  for (int64_t k = 0; k < len; k += 16) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(widen8(x + k), s));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(widen8(x + k + 8), s));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  // undo lane interleave
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), packed);
  }
}

// int8 weights: x -> round(x / s), s = absmax / 32767.  int4 weights: 15-bit x = 128 * h + l with
// h in [-128, 127] and l in [0, 127], so vpmaddubsw (unsigned nibble x signed byte) never saturates.
template <typename T>
QuantizedX quantize_x(const T* x, int64_t M, int64_t K, int bits) {
  QuantizedX r;
  const float qmax = bits == 8 ? 32767.f : 16383.f;
  const int64_t block = kBlock;
  r.nb = (K + block - 1) / block;
  r.full = K / block;
  r.v4 = bits == 4 ? K / kSub4 : 0;
  const int64_t vec_end = r.v4 * kSub4;  // int4: columns the vector path takes (and corr covers)
  r.q.resize(M * K);
  r.s.assign(M * r.nb, 0.f);
  if (bits == 4) r.p.assign(M * r.v4 * 2 * 128, 0), r.corr.assign(M, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * K;
    int16_t* qr = r.q.data() + m * K;
    for (int64_t b = 0; b < r.nb; ++b) {
      const int64_t k0 = b * block, k1 = std::min(K, k0 + block);
      const int64_t vk = bits == 8 ? k0 + ((k1 - k0) & ~int64_t{15}) : k0;  // int8: vector part
      float amax = vk > k0 ? absmax16(xr + k0, vk - k0) : 0.f;
      for (int64_t k = vk; k < k1; ++k) amax = std::max(amax, std::fabs(static_cast<float>(xr[k])));
      const float inv = amax > 0.f ? qmax / amax : 0.f;
      r.s[m * r.nb + b] = amax / qmax;
      if (vk > k0) quantize16(xr + k0, vk - k0, inv, qr + k0);
      int32_t sum = 0;
      for (int64_t k = vk; k < k1; ++k) {
        qr[k] = static_cast<int16_t>(_mm_cvtss_si32(_mm_set_ss(static_cast<float>(xr[k]) * inv)));  // round half to even
        if (k < vec_end) sum += qr[k];
      }
      if (bits == 4) r.corr[m] -= 8.f * r.s[m * r.nb + b] * static_cast<float>(sum);
    }
    for (int64_t c = 0; bits == 4 && c < r.v4 * 2; ++c) {
      int8_t* pc = r.p.data() + (m * r.v4 * 2 + c) * 128;
      for (int64_t j = 0; j < 64; ++j) {
        const int16_t v = qr[c * 64 + j];
        const int64_t lane = (j & 1) * 32 + (j >> 1);
        pc[lane] = static_cast<int8_t>(v >> 7);  // arithmetic shift: floor(v / 128)
        pc[64 + lane] = static_cast<int8_t>(v & 127);
      }
    }
  }
  return r;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int nibble(int8_t byte, bool high) {
  return high ? (byte >> 4) : static_cast<int8_t>(static_cast<uint8_t>(byte) << 4) >> 4;
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// int32 lane sums over `len` columns (a multiple of 16, at most kBlock): NR int8 weight rows against
// MC activation rows.
template <int MC, int NR>
inline void block8(const int8_t* const* w, const int16_t* const* xs, __m256i (*acc)[NR], int64_t len = kBlock) {
  for (int i = 0; i < MC; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_si256();
  for (int64_t c = 0; c < len; c += 16) {
    __m256i wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + c)));
    for (int i = 0; i < MC; ++i) {
      const __m256i xv = load256(xs[i] + c);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_add_epi32(acc[i][r], _mm256_madd_epi16(wv[r], xv));
    }
  }
}

// For int4, one 128-column sub-block (64 bytes a row), added to acc: sum of u * x with u = q + 8; the
// -8 * sum(x) term is QuantizedX::corr.
template <int MC, int NR>
inline void block4(const int8_t* const* w, const int8_t* const* px, __m256i (*acc)[NR]) {
  const __m256i nib = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x88));
  __m256i hs[MC][NR], ls[MC][NR];  // int16 sums over 2 chunks: <= 2 * 2 * 2 * 15 * 128 = 15360
  for (int i = 0; i < MC; ++i)
    for (int r = 0; r < NR; ++r) hs[i][r] = ls[i][r] = _mm256_setzero_si256();
  for (int c = 0; c < 2; ++c) {
    __m256i ev[NR], od[NR];
    for (int r = 0; r < NR; ++r) {
      const __m256i v = _mm256_xor_si256(load256(w[r] + 32 * c), flip);  // nibble ^ 8 = q + 8
      ev[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);  // columns 2j
      od[r] = _mm256_and_si256(v, nib);                         // columns 2j + 1
    }
    for (int i = 0; i < MC; ++i) {
      const int8_t* x = px[i] + 128 * c;
      const __m256i eh = load256(x), oh = load256(x + 32), el = load256(x + 64), ol = load256(x + 96);
      for (int r = 0; r < NR; ++r) {
        hs[i][r] = _mm256_add_epi16(hs[i][r], _mm256_add_epi16(_mm256_maddubs_epi16(ev[r], eh), _mm256_maddubs_epi16(od[r], oh)));
        ls[i][r] = _mm256_add_epi16(ls[i][r], _mm256_add_epi16(_mm256_maddubs_epi16(ev[r], el), _mm256_maddubs_epi16(od[r], ol)));
      }
    }
  }
  const __m256i ones = _mm256_set1_epi16(1), w128 = _mm256_set1_epi16(128);
  for (int i = 0; i < MC; ++i)
    for (int r = 0; r < NR; ++r)
      acc[i][r] = _mm256_add_epi32(acc[i][r], _mm256_add_epi32(_mm256_madd_epi16(hs[i][r], w128),
                                                              _mm256_madd_epi16(ls[i][r], ones)));
}

// NR consecutive weight rows against MC activation rows: unscaled dot products into dots[i][r].
template <int BITS, int MC, int NR>
void rows_dots(const int8_t* w0, int64_t row_bytes, const QuantizedX& qx, int64_t m0, int64_t K,
               float (*dots)[kMaxNR]) {
  const int8_t* w[NR];
  const int16_t* xs[MC];
  const int8_t* px[MC];
  const float* sc[MC];
  __m256 accf[MC][NR];
  __m256i acc[MC][NR];
  for (int r = 0; r < NR; ++r) w[r] = w0 + r * row_bytes;
  for (int i = 0; i < MC; ++i) {
    xs[i] = qx.q.data() + (m0 + i) * K;
    px[i] = BITS == 4 ? qx.p.data() + (m0 + i) * qx.v4 * 256 : nullptr;
    sc[i] = qx.s.data() + (m0 + i) * qx.nb;
    for (int r = 0; r < NR; ++r) accf[i][r] = _mm256_setzero_ps();
  }
  // Software prefetch of the same columns of the next pass's rows (NR rows further on): the next pass is
  // contiguous with this one, and the hardware prefetcher restarts at every 4 KB page of a row.
  auto prefetch = [&](int64_t bytes) {
    for (int r = 0; r < NR; ++r)
      for (int64_t line = 0; line < bytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w[r]) + NR * row_bytes + line, _MM_HINT_T0);
  };
  auto rescale = [&](int64_t b) {  // acc (int32) * block scale -> accf
    for (int i = 0; i < MC; ++i) {
      const __m256 sb = _mm256_broadcast_ss(sc[i] + b);
      for (int r = 0; r < NR; ++r) accf[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][r]), sb, accf[i][r]);
    }
  };
  int64_t k0;
  if constexpr (BITS == 8) {
    for (int64_t b = 0; b < qx.full; ++b) {
      prefetch(kBlock);
      block8<MC, NR>(w, xs, acc);
      for (int i = 0; i < MC; ++i) xs[i] += kBlock;
      for (int r = 0; r < NR; ++r) w[r] += kBlock;
      rescale(b);
    }
    k0 = qx.full * kBlock;
    const int64_t vec = (K - k0) & ~int64_t{15};  // the last, partial block: 16 columns at a time
    if (vec > 0) {
      block8<MC, NR>(w, xs, acc, vec);
      rescale(qx.full);
      k0 += vec;
    }
  } else {
    constexpr int64_t kSubs = kBlock / kSub4;
    for (int64_t b = 0; b * kSubs < qx.v4; ++b) {
      for (int i = 0; i < MC; ++i)
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_si256();
      for (int64_t sub = b * kSubs; sub < std::min(qx.v4, (b + 1) * kSubs); ++sub) {
        prefetch(kSub4 / 2);
        block4<MC, NR>(w, px, acc);
        for (int i = 0; i < MC; ++i) px[i] += 256;
        for (int r = 0; r < NR; ++r) w[r] += kSub4 / 2;
      }
      rescale(b);
    }
    k0 = qx.v4 * kSub4;
  }
  for (int i = 0; i < MC; ++i) {
    for (int r = 0; r < NR; ++r) {
      float tail = 0.f;
      if (k0 < K) {  // ragged end, natural column order
        const int8_t* wr = w0 + r * row_bytes;
        const int16_t* xr = qx.q.data() + (m0 + i) * K;
        int32_t t = 0;
        for (int64_t k = k0; k < K; ++k) t += (BITS == 8 ? wr[k] : nibble(wr[k / 2], (k & 1) == 0)) * xr[k];
        tail = static_cast<float>(t) * sc[i][k0 / kBlock];
      }
      dots[i][r] = hsum(accf[i][r]) + tail + (BITS == 4 ? qx.corr[m0 + i] : 0.f);
    }
  }
}

template <int BITS, int MC>
void rows_dispatch(int nr, const int8_t* w0, int64_t row_bytes, const QuantizedX& qx, int64_t m0, int64_t K,
                   float (*dots)[kMaxNR]) {
  if constexpr (BITS == 8 && MC == 1) {
    if (nr == 4) return rows_dots<BITS, MC, 4>(w0, row_bytes, qx, m0, K, dots);
  }
  if (nr >= 2) rows_dots<BITS, MC, 2>(w0, row_bytes, qx, m0, K, dots);
  else rows_dots<BITS, MC, 1>(w0, row_bytes, qx, m0, K, dots);
}

// Rows handled in the pass starting at n: `step` when that many are left, else 2 or 1.
inline int nr_taken(int64_t step, int64_t n, int64_t n1) {
  const int64_t left = n1 - n;
  return static_cast<int>(left >= step ? step : (left >= 2 ? 2 : 1));
}

// THUDM int4 row -> one int8 per column (high nibble = even column), sign-extended.
inline void unpack_int4_row(const int8_t* src, int64_t K, int8_t* dst) {
  for (int64_t j = 0; j < K / 2; ++j) {
    dst[2 * j] = static_cast<int8_t>(src[j] >> 4);
    dst[2 * j + 1] = static_cast<int8_t>(static_cast<int8_t>(static_cast<uint8_t>(src[j]) << 4) >> 4);
  }
}

// BITS: stored weight format. UNPACK (int4 with many activation rows): each 16-row tile is
// unpacked once to int8 in a per-thread scratch and multiplied by the int8 path, which takes
// 4 activation rows a pass; the unpack costs ~1/M of the multiply-adds.
template <int BITS, bool UNPACK>
void gemm_impl(const QuantizedX& qx, const int8_t* w, const float* wscale, const float* bias,
               float* y, int64_t M, int64_t N, int64_t K) {
  constexpr int KB = UNPACK ? 8 : BITS;           // the format the row kernels read
  constexpr int64_t kMaxM = KB == 8 ? 4 : 2;      // activation rows per pass (register budget)
  const int64_t row_bytes = K * BITS / 8, krow = K * KB / 8;
  const int64_t tiles = (N + kRowTile - 1) / kRowTile;
  // Tiles are handed out dynamically: on a shared VM a descheduled thread would otherwise hold
  // up the whole matmul at the end of a static split.
  std::atomic<int64_t> next{0};
  constexpr int64_t kGrab = 4;  // tiles per grab: 64 rows, a contiguous stream for the prefetcher
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    float dots[4][kMaxNR];
    std::vector<int8_t> scratch(UNPACK ? kRowTile * K : 0);
    for (int64_t g = next.fetch_add(kGrab); g < tiles; g = next.fetch_add(kGrab)) {
      for (int64_t t = g; t < std::min(tiles, g + kGrab); ++t) {
        const int64_t n0 = t * kRowTile, n1 = std::min(N, n0 + kRowTile);
        const int8_t* base = w + n0 * row_bytes;
        if constexpr (UNPACK) {
          for (int64_t n = n0; n < n1; ++n) unpack_int4_row(base + (n - n0) * row_bytes, K, scratch.data() + (n - n0) * K);
          base = scratch.data();
        }
        for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
          const int64_t mc = std::min<int64_t>(kMaxM, M - m0);
          const int64_t step = KB == 8 && mc == 1 ? 4 : 2;  // register budget: 4 int8 rows only for one x row
          for (int64_t n = n0; n < n1; n += nr_taken(step, n, n1)) {
            const int nr = nr_taken(step, n, n1);
            const int8_t* wr = base + (n - n0) * krow;
            switch (mc) {
              case 4: rows_dispatch<KB, KB == 8 ? 4 : 2>(nr, wr, krow, qx, m0, K, dots); break;
              case 3: rows_dispatch<KB, KB == 8 ? 3 : 2>(nr, wr, krow, qx, m0, K, dots); break;
              case 2: rows_dispatch<KB, 2>(nr, wr, krow, qx, m0, K, dots); break;
              default: rows_dispatch<KB, 1>(nr, wr, krow, qx, m0, K, dots); break;
            }
            for (int64_t i = 0; i < mc; ++i)
              for (int r = 0; r < nr; ++r)
                y[(m0 + i) * N + n + r] = dots[i][r] * wscale[n + r] + (bias ? bias[n + r] : 0.f);
          }
        }
      }
    }
  });
}

// One activation row, int8 weights: NR consecutive rows at a time, each 32-column slice of x loaded
// once for all of them. Measured on this kind of VM (docs/benchmarks.md, "int8 GEMV"): 8 interleaved
// rows stream ~20 % faster than one row at a time and than 2, 4 or 16 rows, and the hardware prefetcher
// does better alone than with software prefetches. Integer sums are exact and each block is rescaled
// as in rows_dots, so every row count gives the same bits.
template <int NR>
inline void gemv8_rows(const int8_t* w0, int64_t K, const QuantizedX& qx, float* dots) {
  const int16_t* x = qx.q.data();
  const float* sc = qx.s.data();
  __m256 accf[NR];
  for (int r = 0; r < NR; ++r) accf[r] = _mm256_setzero_ps();
  auto span = [&](int64_t k0, int64_t len, int64_t b) {  // len: a multiple of 16, at most kBlock
    __m256i a[NR];
    for (int r = 0; r < NR; ++r) a[r] = _mm256_setzero_si256();
    int64_t c = k0;
    for (; c + 32 <= k0 + len; c += 32) {
      const __m256i x0 = load256(x + c), x1 = load256(x + c + 16);
      for (int r = 0; r < NR; ++r) {
        const int8_t* wr = w0 + r * K + c;
        a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr))), x0));
        a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + 16))), x1));
      }
    }
    if (c < k0 + len) {
      const __m256i x0 = load256(x + c);
      for (int r = 0; r < NR; ++r)
        a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w0 + r * K + c))), x0));
    }
    const __m256 sb = _mm256_broadcast_ss(sc + b);
    for (int r = 0; r < NR; ++r) accf[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r]), sb, accf[r]);
  };
  for (int64_t b = 0; b < qx.full; ++b) span(b * kBlock, kBlock, b);
  int64_t k0 = qx.full * kBlock;
  const int64_t vec = (K - k0) & ~int64_t{15};
  if (vec > 0) span(k0, vec, qx.full), k0 += vec;
  for (int r = 0; r < NR; ++r) {
    int32_t t = 0;
    for (int64_t k = k0; k < K; ++k) t += w0[r * K + k] * x[k];
    dots[r] = hsum(accf[r]) + (k0 < K ? static_cast<float>(t) * sc[k0 / kBlock] : 0.f);
  }
}

void gemv8(const QuantizedX& qx, const int8_t* w, const float* wscale, const float* bias, float* y,
           int64_t N, int64_t K) {
  constexpr int kNR = 8;
  constexpr int64_t kRowsPerGrab = 64;
  const int64_t threads = at::get_num_threads();
  std::atomic<int64_t> next{0};
  // Runs of 64 rows while plenty remain, then shorter ones (down to kNR): the threads finish within a
  // few rows of each other instead of one idling through the other's last 64 (~40 us a call here).
  auto grab = [&](int64_t& n0, int64_t& n1) {
    int64_t cur = next.load(std::memory_order_relaxed);
    for (;;) {
      if (cur >= N) return false;
      const int64_t left = N - cur;
      const int64_t take = std::min(left, std::clamp<int64_t>(left / (4 * threads) / kNR * kNR, kNR, kRowsPerGrab));
      if (next.compare_exchange_weak(cur, cur + take, std::memory_order_relaxed)) {
        n0 = cur, n1 = cur + take;
        return true;
      }
    }
  };
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    float dots[kNR];
    for (int64_t n0 = 0, n1 = 0; grab(n0, n1);) {
      for (int64_t n = n0; n < n1;) {
        const int nr = n1 - n >= kNR ? kNR : 1;
        if (nr == kNR) gemv8_rows<kNR>(w + n * K, K, qx, dots);
        else gemv8_rows<1>(w + n * K, K, qx, dots);
        for (int r = 0; r < nr; ++r) y[n + r] = dots[r] * wscale[n + r] + (bias ? bias[n + r] : 0.f);
        n += nr;
      }
    }
  });
}

constexpr int64_t kUnpackRows = 8;  // int4 with at least this many activation rows: unpack tiles

// x [M, K] float32/bfloat16; weight int8 [N, K*bits/8]; scale [N] float32; bias [N] float32 or None.
at::Tensor weight_only_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias, int64_t bits) {
  TORCH_CHECK(bits == 8 || bits == 4, "chatglm_quant::mm: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "chatglm_quant::mm: x and weight must be 2-D");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous(), "chatglm_quant::mm: weight must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), "chatglm_quant::mm: scale must be contiguous float32");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) * 8 == K * bits, "chatglm_quant::mm: weight has ", weight.size(1),
              " bytes per row, expected ", K * bits / 8, " for K=", K, " at ", bits, " bits");
  TORCH_CHECK(scale.numel() == N, "chatglm_quant::mm: scale must have ", N, " entries");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "chatglm_quant::mm: x must be float32 or bfloat16, got ", x.scalar_type());
  const at::Tensor xc = x.contiguous();
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    bf = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bf.numel() == N, "chatglm_quant::mm: bias must have ", N, " entries");
  }
  // The kernels write fp32; a bf16 result is rounded from that once, here, without another op call.
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor y = bf16 ? at::empty({M, N}, x.options().dtype(at::kFloat)) : out;
  const bool unpack = bits == 4 && M >= kUnpackRows;
  const int qbits = unpack ? 8 : static_cast<int>(bits);
  const QuantizedX qx = bf16 ? quantize_x(xc.data_ptr<at::BFloat16>(), M, K, qbits) : quantize_x(xc.data_ptr<float>(), M, K, qbits);
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  const int8_t* wp = weight.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  if (bits == 8 && M == 1) gemv8(qx, wp, scale.data_ptr<float>(), bp, yp, N, K);
  else if (bits == 8) gemm_impl<8, false>(qx, wp, scale.data_ptr<float>(), bp, yp, M, N, K);
  else if (unpack) gemm_impl<4, true>(qx, wp, scale.data_ptr<float>(), bp, yp, M, N, K);
  else gemm_impl<4, false>(qx, wp, scale.data_ptr<float>(), bp, yp, M, N, K);
  if (bf16) {
    at::BFloat16* op = out.data_ptr<at::BFloat16>();
    at::parallel_for(0, M * N, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) op[i] = static_cast<at::BFloat16>(yp[i]);
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(chatglm_quant, m) {
  m.def("mm(Tensor x, Tensor weight, Tensor scale, Tensor? bias, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatglm_quant, CPU, m) { m.impl("mm", &weight_only_mm); }
