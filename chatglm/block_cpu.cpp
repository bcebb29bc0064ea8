// A ChatGLM2 block's decode step as two calls around attention, for CPU inference (no autograd).
//
// Around its attention a decode step of one layer is ~30 eager ops and ~10 module calls of Python. After
// the layer's weights have streamed through the caches that Python runs cache-cold: measured on the 6B
// shape at ~40 ms of a ~265 ms int8 step, against 11-20 ms with no weights streamed. These two ops make
// the same kernel calls in the same order (chatglm_fused::rms_norm / rotary_ / swiglu, chatglm_quant::mm
// or chatglm_gemv::mv, aten add), through the dispatcher from C++: the same bits, with no Python between.
//
//   block_pre:  qkv = rotary_(linear(rms_norm(x)))                            -> [*lead, (H + 2G) * D]
//   block_post: x1 = x + linear(attn); out = x1 + linear(swiglu(linear(rms_norm(x1))))
//
// Each linear is (weight, scale, bias, bits): bits 8/4 with an fp32 row scale is chatglm_quant::mm on
// THUDM's packed weight, bits 0 is chatglm_gemv::mv on a float weight (the callers check that these are
// the kernels the eager modules would pick).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

using OptTensor = c10::optional<at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// x [M, K] -> [M, N]
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& scale, const OptTensor& bias,
                  int64_t bits) {
  if (bits != 0) {
    TORCH_CHECK(scale.has_value(), "chatglm_fused::block: a quantized linear needs its scale");
    static const auto mm = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const OptTensor&, int64_t)>("chatglm_quant::mm");
    return mm.call(x, weight, *scale, bias, bits);
  }
  static const auto mv = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>("chatglm_gemv::mv");
  return mv.call(x, weight, bias);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("chatglm_fused::rms_norm");
  return op.call(x, weight, eps);
}

at::Tensor rows2d(const at::Tensor& x) { return x.contiguous().view({-1, x.size(-1)}); }

at::Tensor restore_lead(const at::Tensor& y, const at::Tensor& like) {
  auto sizes = like.sizes().vec();
  sizes.back() = y.size(-1);
  return y.view(sizes);
}

at::Tensor block_pre(const at::Tensor& x, const at::Tensor& ln_weight, double eps, const at::Tensor& qkv_weight,
                     const OptTensor& qkv_scale, const OptTensor& qkv_bias, int64_t qkv_bits, const at::Tensor& rope,
                     int64_t rotated_heads, int64_t head_dim) {
  static const auto rotary = find_op<at::Tensor(at::Tensor, const at::Tensor&, int64_t, int64_t)>("chatglm_fused::rotary_");
  at::Tensor qkv = linear(rows2d(rms_norm(x, ln_weight, eps)), qkv_weight, qkv_scale, qkv_bias, qkv_bits);
  qkv = rotary.call(qkv, rope, rotated_heads, head_dim);
  return restore_lead(qkv, x);
}

at::Tensor block_post(const at::Tensor& x, const at::Tensor& attn, const at::Tensor& dense_weight,
                      const OptTensor& dense_scale, const OptTensor& dense_bias, int64_t dense_bits,
                      const at::Tensor& ln_weight, double eps, const at::Tensor& up_weight, const OptTensor& up_scale,
                      const OptTensor& up_bias, int64_t up_bits, const at::Tensor& down_weight,
                      const OptTensor& down_scale, const OptTensor& down_bias, int64_t down_bits) {
  static const auto swiglu = find_op<at::Tensor(const at::Tensor&)>("chatglm_fused::swiglu");
  const at::Tensor x2 = rows2d(x);
  const at::Tensor x1 = x2 + linear(rows2d(attn), dense_weight, dense_scale, dense_bias, dense_bits);
  const at::Tensor h = linear(rms_norm(x1, ln_weight, eps), up_weight, up_scale, up_bias, up_bits);
  const at::Tensor out = x1 + linear(swiglu.call(h), down_weight, down_scale, down_bias, down_bits);
  return restore_lead(out, x);
}

}  // namespace

TORCH_LIBRARY(chatglm_block, m) {
  m.def("pre(Tensor x, Tensor ln_weight, float eps, Tensor qkv_weight, Tensor? qkv_scale, Tensor? qkv_bias, "
        "int qkv_bits, Tensor rope, int rotated_heads, int head_dim) -> Tensor");
  m.def("post(Tensor x, Tensor attn, Tensor dense_weight, Tensor? dense_scale, Tensor? dense_bias, int dense_bits, "
        "Tensor ln_weight, float eps, Tensor up_weight, Tensor? up_scale, Tensor? up_bias, int up_bits, "
        "Tensor down_weight, Tensor? down_scale, Tensor? down_bias, int down_bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatglm_block, CPU, m) {
  m.impl("pre", &block_pre);
  m.impl("post", &block_post);
}
