"""Quantization against THUDM's reference fixture: bytes, kernels, gradients, model logits and greedy runs."""
import hashlib

import pytest
import torch
import torch.nn.functional as F

import chatglm
from chatglm import checkpoint
from chatglm.generation import generate
from chatglm.model import ChatGLM
from chatglm.quant_kernels import native_unavailable_reason
from chatglm.quant_load import LoadQuantizer
from chatglm.quantize import (THUDM_QUANTIZED_SUFFIXES, QuantizedLinear, QuantKernel, QuantKernelError, QuantMode,
                              check_kernel, default_kernel, dequantize_weight, empty_quantized_linear, int_weight,
                              pack_int4, quantize_linear, quantize_model, quantize_weight, save_quantized,
                              tinygemm_bytes, unpack_int4)

BITS = (8, 4)
LAYERS = [(layer, suffix) for layer in range(3) for suffix in THUDM_QUANTIZED_SUFFIXES]
needs_native = pytest.mark.skipif(native_unavailable_reason() is not None,
                                  reason=f"AVX2 kernel unavailable: {native_unavailable_reason()}")
# (kernel, bits, activation dtype, tolerance as a fraction of max |y|) vs the DEQUANT reference.
# fp32 kernels differ from it only by THUDM's fp16 rounding of q*scale (~2e-4); bf16 rounds x and y.
FAST = [(QuantKernel.CPU_AVX2, 8, torch.float32, 1e-3), (QuantKernel.CPU_AVX2, 4, torch.float32, 1e-3),
        (QuantKernel.CPU_AVX2, 8, torch.bfloat16, 1.5e-2), (QuantKernel.CPU_AVX2, 4, torch.bfloat16, 1.5e-2),
        (QuantKernel.CPU_INT8, 8, torch.bfloat16, 1.5e-2), (QuantKernel.CPU_INT8, 8, torch.float32, 1.5e-2),
        (QuantKernel.CPU_INT4, 4, torch.float32, 1e-3), (QuantKernel.CPU_INT4, 4, torch.bfloat16, 1.5e-2)]


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def raw_sd(fixture_dir):
    return torch.load(fixture_dir / "model" / "pytorch_model.bin", weights_only=True)


def _rec(expected, bits, layer, suffix):
    return expected["quantization"]["bits"][str(bits)]["layers"][f"layer{layer}"][suffix]


def _linear(raw_sd, layer, suffix) -> torch.nn.Linear:
    key = f"transformer.encoder.layers.{layer}.{suffix}"
    w, b = raw_sd[key + ".weight"], raw_sd.get(key + ".bias")
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


def test_quant_mode_parsing():
    assert QuantMode.parse("int8") is QuantMode.INT8 and QuantMode.parse(4) is QuantMode.INT4
    assert QuantMode.parse(None) is QuantMode.NONE and QuantMode.parse("INT4") is QuantMode.INT4
    assert QuantMode.INT8.bits == 8 and QuantMode.INT4.bits == 4
    for bad in ("int3", 16, 2.5, True):
        with pytest.raises(ValueError, match="'int8', 'int4'"):
            QuantMode.parse(bad)


@pytest.mark.parametrize("bits", BITS)
def test_packed_weights_and_scales_are_byte_exact(raw_sd, expected, expected_tensors, bits):
    for layer, suffix in LAYERS:
        rec = _rec(expected, bits, layer, suffix)
        q, scale = quantize_weight(raw_sd[f"transformer.encoder.layers.{layer}.{suffix}.weight"], bits)
        assert q.dtype == torch.int8 and scale.dtype == torch.float16
        assert list(q.shape) == rec["weight_shape"]
        assert torch.equal(q, expected_tensors[rec["weight_tensor"]]), (layer, suffix)
        assert torch.equal(scale, expected_tensors[rec["scale_tensor"]]), (layer, suffix)
        assert sha(q) == rec["weight_sha256"] and sha(scale) == rec["scale_sha256"]
        assert sha(dequantize_weight(q, scale, bits)) == rec["dequant_fp16_sha256"]
        if layer == 0:
            assert q[0].tolist() == rec["weight_row0"] and scale.tolist() == rec["weight_scale"]


def test_int4_pack_unpack_round_trip(expected, expected_tensors):
    q = torch.randint(-8, 8, (37, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (37, 32) and torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed[0, 0], ((q[0, 0] & 0xF) << 4 | (q[0, 1] & 0xF)).to(torch.uint8).view(torch.int8))
    for layer, suffix in LAYERS:  # every reference byte decodes to [-7, 7] and re-packs identically
        ref = expected_tensors[_rec(expected, 4, layer, suffix)["weight_tensor"]]
        assert unpack_int4(ref).abs().max() <= 7 and torch.equal(pack_int4(unpack_int4(ref)), ref)
        u = tinygemm_bytes(ref)  # CUDA int4pack input: (q+8) high/low nibbles
        assert torch.equal(torch.stack([(u >> 4), u & 0xF], -1).flatten(-2).to(torch.int8) - 8, unpack_int4(ref))


@pytest.mark.parametrize("kernel,bits,dtype,tol", FAST, ids=lambda v: getattr(v, "name", str(v)))
def test_fast_kernels_agree_with_dequant_on_every_layer(raw_sd, kernel, bits, dtype, tol):
    if kernel is QuantKernel.CPU_AVX2 and native_unavailable_reason():
        pytest.skip(native_unavailable_reason())
    gen = torch.Generator().manual_seed(bits)
    for layer, suffix in LAYERS:
        fast = quantize_linear(_linear(raw_sd, layer, suffix), bits).prepare(kernel)
        exact = (int_weight(fast.weight, bits).double() * fast.weight_scale.double()[:, None])
        for m in (1, 5):
            x = torch.randn(2, m, fast.in_features, generator=gen).to(dtype)
            with torch.no_grad():
                got = fast(x)
                ref = fast.prepare(QuantKernel.DEQUANT)(x.float())
                fast.prepare(kernel)
            assert got.dtype == dtype and got.shape == (2, m, fast.out_features)
            err = (got.float() - ref).abs().max() / ref.abs().max()
            assert err <= tol, (kernel, layer, suffix, m, err.item())
            if dtype == torch.float32 and kernel is not QuantKernel.CPU_INT8:  # vs exact q*scale, no fp16 rounding
                ref64 = F.linear(x.double(), exact, None if fast.bias is None else fast.bias.double())
                assert (got.double() - ref64).abs().max() / ref64.abs().max() <= 1e-4


@pytest.mark.parametrize("bits", BITS)
def test_thudm_quantized_state_dict_loads_directly(raw_sd, expected, expected_tensors, bits):
    rec = _rec(expected, bits, 1, "self_attention.query_key_value")
    bias = raw_sd["transformer.encoder.layers.1.self_attention.query_key_value.bias"].half()
    layer = empty_quantized_linear(128, 256, bias=True, mode=f"int{bits}", dtype=torch.float16)
    sd = {"weight": expected_tensors[rec["weight_tensor"]], "weight_scale": expected_tensors[rec["scale_tensor"]],
          "bias": bias}
    layer.load_state_dict(sd, strict=True)
    assert set(layer.state_dict()) == {"weight", "weight_scale", "bias"}
    assert all(not p.requires_grad for p in layer.parameters())
    x = torch.randn(3, 128)
    w = dequantize_weight(sd["weight"], sd["weight_scale"], bits).float()
    with torch.no_grad():
        torch.testing.assert_close(layer.prepare(QuantKernel.DEQUANT)(x), F.linear(x, w, bias.float()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kernel", [QuantKernel.DEQUANT, QuantKernel.CPU_AVX2])
def test_input_gradient_equals_dequantized_fp32_linear(raw_sd, bits, kernel):
    if kernel is QuantKernel.CPU_AVX2 and native_unavailable_reason():
        pytest.skip(native_unavailable_reason())
    layer = quantize_linear(_linear(raw_sd, 0, "mlp.dense_4h_to_h"), bits).prepare(kernel)
    w = dequantize_weight(layer.weight, layer.weight_scale, bits).float().requires_grad_(False)
    x = torch.randn(2, 4, layer.in_features, requires_grad=True)
    g = torch.randn(2, 4, layer.out_features)
    layer(x).backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, w).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-5)
    assert layer.weight.grad is None and layer.weight_scale.grad is None


def test_unsupported_combinations_fail_with_a_clear_message():
    with pytest.raises(QuantKernelError, match=r"CPU_INT4 cannot run mode INT8 on device cpu"):
        check_kernel(QuantKernel.CPU_INT4, QuantMode.INT8, "cpu")
    with pytest.raises(QuantKernelError, match=r"CPU_INT8 cannot run mode INT4 on device cpu"):
        quantize_linear(torch.nn.Linear(64, 32), "int4").prepare(QuantKernel.CPU_INT8)
    with pytest.raises(QuantKernelError, match=r"CUDA_TORCH cannot run mode INT4 on device cpu: it is a CUDA kernel"):
        check_kernel(QuantKernel.CUDA_TORCH, QuantMode.INT4, "cpu")
    with pytest.raises(QuantKernelError, match=r"CPU_AVX2 cannot run mode INT8 on device cuda.*CPU kernel"):
        check_kernel(QuantKernel.CPU_AVX2, QuantMode.INT8, torch.device("cuda"))
    with pytest.raises(QuantKernelError, match=r"CUDA_TORCH cannot run mode INT8 on device cpu.*CUDA kernel"):
        check_kernel(QuantKernel.CUDA_TORCH, QuantMode.INT8, torch.device("cpu"))
    with pytest.raises(QuantKernelError, match="NONE"):
        check_kernel(QuantKernel.DEQUANT, QuantMode.NONE, "cpu")
    with pytest.raises(ValueError, match="even"):
        quantize_weight(torch.randn(4, 7), 4)
    assert default_kernel(QuantMode.INT4, "cpu") in (QuantKernel.CPU_AVX2, QuantKernel.CPU_INT4)
    assert default_kernel(QuantMode.INT8, "meta") is QuantKernel.DEQUANT
    assert default_kernel(QuantMode.INT8, torch.device("cuda")) is QuantKernel.CUDA_TORCH


def test_scale_stays_fp16_through_dtype_casts():
    layer = quantize_linear(torch.nn.Linear(64, 32), "int8")
    scale = layer.weight_scale.clone()
    layer.to(torch.bfloat16).float()
    assert layer.weight_scale.dtype == torch.float16 and torch.equal(layer.weight_scale, scale)
    assert layer.bias.dtype == torch.float32 and layer.weight.dtype == torch.int8


@pytest.fixture(scope="module")
def fp32_model(fixture_dir):
    return chatglm.load_model(fixture_dir / "model", dtype=torch.float32)


def test_quantize_model_swaps_thudm_layers_in_place(fixture_dir):
    model = chatglm.load_model(fixture_dir / "model", dtype=torch.float32)
    quantize_model(model, "int8")
    swapped = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert swapped == {f"transformer.encoder.layers.{i}.{s}" for i, s in LAYERS}
    assert isinstance(model.transformer.output_layer, torch.nn.Linear) and model.config.quantization_bit == 8
    quantize_model(model, QuantMode.INT8)  # idempotent
    with pytest.raises(ValueError, match="already quantized as INT8"):
        quantize_model(model, "int4")
    quantize_model(model, "int8", include_output_layer=True)
    assert isinstance(model.transformer.output_layer, QuantizedLinear)


def _quantized(fixture_dir, bits, kernel):
    model = chatglm.load_model(fixture_dir / "model", dtype=torch.float16, quantize=bits).float()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.prepare(kernel)
    return model


@pytest.mark.parametrize("bits", BITS)
def test_dequantized_fp32_model_matches_reference(fixture_dir, expected, expected_tensors, bits):
    # The reference: every parameter of the quantized fp16 model cast to fp32, dequant rounded to fp16.
    sec = expected["quantization"]["bits"][str(bits)]
    model = _quantized(fixture_dir, bits, QuantKernel.DEQUANT)
    kernel = default_kernel(QuantMode.parse(bits), "cpu")
    fast = _quantized(fixture_dir, bits, kernel)
    # CPU_AVX2 keeps fp32-level activations (~5e-3 seen); the aten fallbacks round them to bf16 (~5e-2)
    fast_tol = 2e-2 if kernel is QuantKernel.CPU_AVX2 else 1e-1
    with torch.no_grad():
        for name, rec in sec["logits_dequant_fp32"].items():
            ids = torch.tensor(rec["input_ids"])
            ref = expected_tensors[rec["tensor"]]
            assert (model(ids) - ref).abs().max() <= 1e-4, name
            assert (fast(ids) - ref).abs().max() <= fast_tol, (name, kernel)
            assert (model(ids) - expected_tensors[sec["logits_fp16_cpu"][name]["tensor"]]).abs().max() <= 5e-2
    for name, g in sec["generate_dequant_fp32"].items():
        for s in g["sequences"]:
            args = [torch.tensor([s[k]]) for k in ("input_ids", "attention_mask", "position_ids")]
            got = generate(model, *args, max_new_tokens=g["params"]["max_new_tokens"])[0]
            assert got == s["new_ids"], name
            assert generate(fast, *args, max_new_tokens=g["params"]["max_new_tokens"])[0] == got, name


@pytest.mark.parametrize("bits", BITS)
def test_saved_quantized_folder_reloads_as_thudm_layout(fixture_dir, expected, expected_tensors, tmp_path, bits):
    save_quantized(fixture_dir / "model", tmp_path / "q", bits)
    cfg = (tmp_path / "q" / "config.json").read_text()
    assert f'"quantization_bit": {bits}' in cfg and (tmp_path / "q" / "tokenizer.model").is_file()
    sd = torch.load(tmp_path / "q" / "pytorch_model.bin", weights_only=True)
    for layer, suffix in LAYERS:
        rec = _rec(expected, bits, layer, suffix)
        key = f"transformer.encoder.layers.{layer}.{suffix}"
        assert torch.equal(sd[key + ".weight"], expected_tensors[rec["weight_tensor"]])
        assert torch.equal(sd[key + ".weight_scale"], expected_tensors[rec["scale_tensor"]])
    for dtype in (torch.float32, torch.float16):  # a pre-quantized folder loads as such
        model = chatglm.load_model(tmp_path / "q", dtype=dtype)
        qkv = model.transformer.encoder.layers[2].self_attention.query_key_value
        assert isinstance(qkv, QuantizedLinear) and qkv.weight_scale.dtype == torch.float16
        assert torch.equal(qkv.weight, sd["transformer.encoder.layers.2.self_attention.query_key_value.weight"])
    with pytest.raises(ValueError, match="cannot be loaded as"):
        chatglm.load_model(tmp_path / "q", quantize=12 - bits)


def test_load_quantizer_assign_quantizes_raw_tensors_exactly(fixture_dir, raw_sd, expected, expected_tensors):
    # The per-tensor hook: quantizing from the checkpoint tensor keeps THUDM bytes even for a bf16 model.
    config = chatglm.ChatGLMConfig.from_json(fixture_dir / "model")
    lq = LoadQuantizer.for_folder("int4", config, fixture_dir / "model")
    with torch.device("meta"):
        model = ChatGLM(config)
    lq.before_load(model)
    for key, tensor in raw_sd.items():
        if key not in checkpoint.IGNORED_KEYS and not lq.assign(model, key, tensor):
            checkpoint._assign(model, key, tensor, torch.bfloat16)
    lq.after_load(model, torch.device("cpu"))
    for layer, suffix in LAYERS:
        mod = model.get_submodule(f"transformer.encoder.layers.{layer}.{suffix}")
        assert torch.equal(mod.weight, expected_tensors[_rec(expected, 4, layer, suffix)["weight_tensor"]])
    assert not any(p.is_meta for p in model.parameters())


@needs_native
@pytest.mark.parametrize("rows", [7, 9])  # 9 >= 8: int4 takes the unpack-to-int8 path
@pytest.mark.parametrize("bits", BITS)
def test_avx2_kernel_is_deterministic_across_thread_counts(bits, rows):
    # Rows are handed out dynamically to threads; each output must not depend on who computed it.
    layer = quantize_linear(torch.nn.Linear(392, 1003), bits).prepare(QuantKernel.CPU_AVX2)
    x = torch.randn(rows, 392)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            one = layer(x)
            torch.set_num_threads(2)
            two = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_cuda_torch_int8_arithmetic_on_cpu_tensors(raw_sd):
    """The CPU-checkable part of CUDA_TORCH int8: with bf16 activations it multiplies the int8 values
    (exact in bf16) and applies the row scale after; fp32 activations take the dequantize reference."""
    from chatglm.quant_kernels import prepare, run

    gen = torch.Generator().manual_seed(3)
    for layer, suffix in LAYERS:
        lin = quantize_linear(_linear(raw_sd, layer, suffix), 8)
        packed = prepare(QuantKernel.CUDA_TORCH, lin.weight, lin.weight_scale, 8)
        x = torch.randn(3, lin.in_features, generator=gen)
        bias = None if lin.bias is None else lin.bias.float()
        ref = F.linear(x, dequantize_weight(lin.weight, lin.weight_scale, 8).float(), bias)
        got32 = run(QuantKernel.CUDA_TORCH, x, lin.weight, lin.weight_scale, lin.bias, 8, packed)
        torch.testing.assert_close(got32, ref, rtol=0, atol=1e-5)
        got16 = run(QuantKernel.CUDA_TORCH, x.bfloat16(), lin.weight, lin.weight_scale, lin.bias, 8, packed)
        assert got16.dtype == torch.bfloat16
        assert (got16.float() - ref).abs().max() / ref.abs().max() <= 1.5e-2
