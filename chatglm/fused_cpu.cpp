// Fused CPU versions of the small per-layer ops of a ChatGLM2 block, for inference (no autograd).
//
// At one or a few tokens a decode step's norms, rotary and SwiGLU are dozens of tiny eager ops a layer
// (dtype casts, pow, mean, rsqrt, stacks, cats), each a dispatcher round trip that costs more than its
// arithmetic. Each op here is one call doing the same fp32 arithmetic as the eager code in
// chatglm/model.py, in the same order and with one rounding to the activation dtype at the same places,
// so results match it up to the order of the RMSNorm sum (and exp's last bit in SwiGLU). The extension
// is built with -ffp-contract=off: no fused multiply-adds where the eager code rounds twice.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline float load(const T* p, int64_t i) { return static_cast<float>(p[i]); }
template <typename T>
inline void store(T* p, int64_t i, float v) { p[i] = static_cast<T>(v); }  // round to nearest even

// An fp32 product the compiler may not fuse with a later add: GCC's vectorizer forms fmaddsub even
// under -ffp-contract=off.
inline float product(float a, float b) {
  float p = a * b;
  asm("" : "+x"(p));
  return p;
}

void check_act(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "chatglm_fused: ", what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "chatglm_fused: ", what,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

// THUDM's RMSNorm: out = (w * (x * rsqrt(mean(x^2) + eps))) in fp32, rounded once to x's dtype.
template <typename T, typename W>
void rms_norm_rows(const T* x, const W* w, T* out, int64_t rows, int64_t n, double eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      T* orow = out + r * n;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= n; k += 8)
        for (int j = 0; j < 8; ++j) { const float v = load(xr, k + j); acc[j] += v * v; }
      float ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; k < n; ++k) { const float v = load(xr, k); ss += v * v; }
      const float var = ss / static_cast<float>(n);
      const float inv = 1.f / std::sqrt(var + static_cast<float>(eps));
      for (int64_t i = 0; i < n; ++i) store(orow, i, load(w, i) * (load(xr, i) * inv));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_act(x, "x");
  check_act(weight, "weight");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.numel() == n, "chatglm_fused::rms_norm: weight must be [", n, "]");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  // Output dtype follows eager type promotion of weight * fp32 -> .to(x.dtype): x's dtype.
  at::Tensor out = at::empty_like(xc);
  const int64_t rows = n ? xc.numel() / n : 0;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xc.scalar_type(), "rms_norm_x", [&] {
    using X = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, wc.scalar_type(), "rms_norm_w", [&] {
      rms_norm_rows<X, scalar_t>(xc.data_ptr<X>(), wc.data_ptr<scalar_t>(), out.data_ptr<X>(), rows, n, eps);
    });
  });
  return out;
}

// In place on qkv [T, (H + 2G) * D]: the first H + G heads (q, then k) rotate their first 2 * R2
// channels in interleaved pairs, (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); rope [T, R2, 2] fp32.
template <typename T>
void rotary_rows(T* qkv, const float* rope, int64_t tokens, int64_t row, int64_t heads, int64_t d, int64_t r2) {
  at::parallel_for(0, tokens, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* cs = rope + t * r2 * 2;
      for (int64_t h = 0; h < heads; ++h) {
        T* x = qkv + t * row + h * d;
        for (int64_t i = 0; i < r2; ++i) {
          const float x0 = load(x, 2 * i), x1 = load(x, 2 * i + 1), c = cs[2 * i], s = cs[2 * i + 1];
          const float a = product(x0, c), b = product(x1, s), e = product(x1, c), f = product(x0, s);
          store(x, 2 * i, a - b);
          store(x, 2 * i + 1, e + f);
        }
      }
    }
  });
}

at::Tensor rotary_(at::Tensor qkv, const at::Tensor& rope, int64_t rotated_heads, int64_t head_dim) {
  check_act(qkv, "qkv");
  TORCH_CHECK(qkv.is_contiguous(), "chatglm_fused::rotary_: qkv must be contiguous");
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.size(-1) == 2, "chatglm_fused::rotary_: rope must be float32 [..., R/2, 2]");
  const int64_t row = qkv.size(-1), tokens = row ? qkv.numel() / row : 0, r2 = rope.size(-2);
  TORCH_CHECK(rope.numel() == tokens * r2 * 2, "chatglm_fused::rotary_: rope has ", rope.numel() / (2 * r2),
              " positions for ", tokens, " tokens");
  TORCH_CHECK(rotated_heads * head_dim <= row && 2 * r2 <= head_dim, "chatglm_fused::rotary_: bad head layout");
  const at::Tensor rc = rope.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "rotary_", [&] {
    rotary_rows<scalar_t>(qkv.data_ptr<scalar_t>(), rc.data_ptr<float>(), tokens, row, rotated_heads, head_dim, r2);
  });
  return qkv;
}

// SwiGLU on h [*, 2F] (gate first, then up): silu(gate) rounded to h's dtype, times up, rounded again.
template <typename T>
void swiglu_rows(const T* h, T* out, int64_t rows, int64_t f) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = h + r * 2 * f;
      const T* u = g + f;
      T* o = out + r * f;
      for (int64_t i = 0; i < f; ++i) {
        const float x = load(g, i);
        const T act = static_cast<T>(x / (1.f + std::exp(-x)));
        store(o, i, static_cast<float>(act) * load(u, i));
      }
    }
  });
}

at::Tensor swiglu(const at::Tensor& h) {
  check_act(h, "h");
  const int64_t two_f = h.size(-1);
  TORCH_CHECK(two_f % 2 == 0, "chatglm_fused::swiglu: last dimension must be even");
  const at::Tensor hc = h.contiguous();
  auto sizes = hc.sizes().vec();
  sizes.back() = two_f / 2;
  at::Tensor out = at::empty(sizes, hc.options());
  const int64_t rows = two_f ? hc.numel() / two_f : 0;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, hc.scalar_type(), "swiglu", [&] {
    swiglu_rows<scalar_t>(hc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, two_f / 2);
  });
  return out;
}

// One decode token per sequence against a slot KV cache [slots, capacity, G, D] (one layer's K or V):
// token i writes its k, v at (slots[i], rows[i]), then each of its H query heads attends over rows
// 0..rows[i] of its slot with KV group h / (H / G), softmax(q.k / sqrt(D)) in fp32. q, k, v may be
// strided views ([N, heads, D] with unit stride in D). Returns [N, H, D] in q's dtype.
template <typename T>
void decode_attention_rows(const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const int64_t* slots, const int64_t* rows, at::Tensor& out) {
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), G = kc.size(2), hq = H / G;
  T* kp = kc.data_ptr<T>();
  T* vp = vc.data_ptr<T>();
  const int64_t ss = kc.stride(0), rs = kc.stride(1), gs = kc.stride(2);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t g = 0; g < G; ++g) {
      T* kd = kp + slots[i] * ss + rows[i] * rs + g * gs;
      T* vd = vp + slots[i] * ss + rows[i] * rs + g * gs;
      const T* ks = k.data_ptr<T>() + i * k.stride(0) + g * k.stride(1);
      const T* vs = v.data_ptr<T>() + i * v.stride(0) + g * v.stride(1);
      for (int64_t d = 0; d < D; ++d) kd[d] = ks[d], vd[d] = vs[d];
    }
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p, acc(D), qf(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / H, h = t % H, g = h / hq, len = rows[i] + 1;
      const T* qh = qp + i * q.stride(0) + h * q.stride(1);
      for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(qh[d]);
      const T* kbase = kp + slots[i] * ss + g * gs;
      const T* vbase = vp + slots[i] * ss + g * gs;
      p.resize(len);
      float mx = -INFINITY;
      for (int64_t r = 0; r < len; ++r) {
        const T* kr = kbase + r * rs;
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += qf[d] * static_cast<float>(kr[d]);
        p[r] = dot * scale;
        mx = std::max(mx, p[r]);
      }
      float sum = 0.f;
      for (int64_t r = 0; r < len; ++r) sum += (p[r] = std::exp(p[r] - mx));
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t r = 0; r < len; ++r) {
        const T* vr = vbase + r * rs;
        for (int64_t d = 0; d < D; ++d) acc[d] += p[r] * static_cast<float>(vr[d]);
      }
      T* o = op + (i * H + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] / sum);
    }
  });
}

at::Tensor decode_attention_(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& slots, const at::Tensor& rows) {
  check_act(q, "q");
  const auto dt = q.scalar_type();
  TORCH_CHECK(k_cache.scalar_type() == dt && v_cache.scalar_type() == dt && k.scalar_type() == dt && v.scalar_type() == dt,
              "chatglm_fused::decode_attention_: q, k, v and the caches must share one dtype");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "chatglm_fused::decode_attention_: q, k, v [N, heads, D]; caches [slots, capacity, G, D]");
  TORCH_CHECK(k_cache.strides() == v_cache.strides() && k_cache.sizes() == v_cache.sizes() && k_cache.stride(3) == 1,
              "chatglm_fused::decode_attention_: caches must have one layout, unit stride in D");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), G = k_cache.size(2);
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "chatglm_fused::decode_attention_: unit stride in D");
  TORCH_CHECK(k.size(0) == n && v.size(0) == n && k.size(1) == G && v.size(1) == G && k.size(2) == D &&
              k_cache.size(3) == D && G > 0 && H % G == 0, "chatglm_fused::decode_attention_: shapes disagree");
  const at::Tensor sl = slots.to(at::kLong).contiguous(), rw = rows.to(at::kLong).contiguous();
  TORCH_CHECK(sl.numel() == n && rw.numel() == n, "chatglm_fused::decode_attention_: one slot and row per token");
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t* rp = rw.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < k_cache.size(0) && rp[i] >= 0 && rp[i] < k_cache.size(1),
                "chatglm_fused::decode_attention_: slot/row out of range");
  at::Tensor out = at::empty({n, H, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "decode_attention_", [&] {
    decode_attention_rows<scalar_t>(k_cache, v_cache, q, k, v, sp, rp, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(chatglm_fused, m) {
  m.def("decode_attention_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor q, Tensor k, Tensor v, Tensor slots, "
        "Tensor rows) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_(Tensor(a!) qkv, Tensor rope, int rotated_heads, int head_dim) -> Tensor(a!)");
  m.def("swiglu(Tensor h) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatglm_fused, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("swiglu", &swiglu);
  m.impl("decode_attention_", &decode_attention_);
}
