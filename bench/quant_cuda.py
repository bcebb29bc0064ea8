"""GPU half of bench/quant.py: the CUDA kernels against the CPU dequantized path on the fixture, the
input gradient through a CUDA quantized linear, then bf16/int8/int4 speed on the chatglm2-6b shape.

    python bench/quant.py --cuda ../shared/fixtures/chatglm2-tiny/model [--decode 64]

Reference: the fixture model quantized at load from its fp16 weights and run on the CPU in fp32 through
the dequantize kernel (the path tests/chatglm/test_quantize.py holds to THUDM's logits within 1e-4).
Each CUDA kernel runs the same quantized weights in fp32, bf16 (the server's GPU default) and fp16
(THUDM's) activations: max |logit diff|, argmax agreement and 20 greedy tokens on two prompts.
Speed: eager PyTorch decode (one synchronize a step), a 128-token prefill, peak GPU memory, and the
bound from the device's measured read bandwidth; "kernel-busy" sums the GPU kernel time of one
profiled decode step, i.e. what the step would take with no launch gaps (e.g. under a CUDA graph).
"""
from __future__ import annotations

import statistics
import time

import torch

from chatglm.generation import iter_generate
from chatglm.quant_format import QuantMode
from chatglm.quant_kernels import QuantKernel, unsupported_reason
from chatglm.quantize import QuantizedLinear

PROMPTS = [[3001, 3003, 283, 288, 2703, 2731, 2740, 13, 13, 2729, 2724, 777, 13, 13, 2734, 2724],
           [3001, 3003, 916, 2806, 268, 2720, 677, 315]]
ACTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def use_kernel(model: torch.nn.Module, kernel: QuantKernel) -> set[str]:
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.prepare(kernel)
    return {m.kernel.name for m in model.modules() if isinstance(m, QuantizedLinear)}


def greedy(model, ids: torch.Tensor, n: int = 20) -> list[int]:
    return [int(t) for t in iter_generate(model, ids, max_new_tokens=n, eos_token_id=-1)]


def device_read_gbs(dev: torch.device, gib: int = 4, runs: int = 10) -> float:
    """Best read bandwidth of a sum over `gib` GiB of bf16, timed with CUDA events."""
    a = torch.randn(gib << 29, dtype=torch.bfloat16, device=dev)
    best = float("inf")
    for _ in range(runs + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a.sum(dtype=torch.float32)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    n = a.numel() * a.element_size()
    del a
    torch.cuda.empty_cache()
    return n / best / 1e9


@torch.no_grad()
def fixture_check(fixture: str, dev: torch.device) -> list[str]:
    from chatglm.checkpoint import load_model

    lines = []
    for bits in (8, 4):
        mode = QuantMode.parse(bits)
        ref = load_model(fixture, dtype=torch.float16, quantize=bits).float()
        use_kernel(ref, QuantKernel.DEQUANT)
        refs = [(torch.tensor([p]), ref(torch.tensor([p])), greedy(ref, torch.tensor([p]))) for p in PROMPTS]
        for kernel in (QuantKernel.CUDA_TORCH, QuantKernel.DEQUANT):
            reason = unsupported_reason(kernel, mode, dev)
            if reason:
                lines.append(f"int{bits} {kernel.name:10}: not run ({reason})")
                continue
            for act_name, act in ACTS.items():
                gpu = load_model(fixture, dtype=torch.float16, quantize=bits, device=dev).to(act)
                use_kernel(gpu, kernel)
                diff, agree, same = 0.0, [], []
                for ids, ref_logits, ref_tokens in refs:
                    got = gpu(ids.to(dev)).float().cpu()  # [1, S, V]
                    diff = max(diff, (got - ref_logits).abs().max().item())
                    agree.append((got.argmax(-1) == ref_logits.argmax(-1)).float().mean().item())
                    same.append(greedy(gpu, ids.to(dev)) == ref_tokens)
                lines.append(f"int{bits} {kernel.name:10} {act_name}: max |logit diff| {diff:.2e}, argmax agree "
                             f"{min(agree):.3f}, 20 greedy tokens equal on {sum(same)}/{len(same)} prompts")
                del gpu
    return lines


def gradient_check(dev: torch.device, kernel: QuantKernel = QuantKernel.CUDA_TORCH) -> list[str]:
    """Input gradient through a CUDA quantized linear vs through its dequantized fp32 weight."""
    from chatglm.quant_format import dequantize_weight

    lines = []
    g = torch.Generator(device=dev).manual_seed(0)
    for bits in (8, 4):
        w = torch.randn(512, 1024, device=dev, generator=g, dtype=torch.float16) * 0.02
        layer = QuantizedLinear(1024, 512, bits, bias=True, dtype=torch.bfloat16, device=dev)
        layer.set_float_weight(w)
        layer.bias = torch.nn.Parameter(torch.randn(512, device=dev, generator=g).bfloat16(), requires_grad=False)
        layer.prepare(kernel)
        x = torch.randn(4, 1024, device=dev, generator=g).bfloat16().requires_grad_(True)
        gy = torch.randn(4, 512, device=dev, generator=g).bfloat16()
        layer(x).backward(gy)
        wf = dequantize_weight(layer.weight, layer.weight_scale, bits).float()
        xf = x.detach().float().requires_grad_(True)
        torch.nn.functional.linear(xf, wf, layer.bias.float()).backward(gy.float())
        err = ((x.grad.float() - xf.grad).norm() / xf.grad.norm()).item()
        lines.append(f"int{bits} {kernel.name} input gradient (bf16) vs dequantized fp32: relative error {err:.2e}")
    return lines


@torch.no_grad()
def kernel_busy_s(model, prompt: torch.Tensor) -> float | None:
    """GPU kernel time of one decode step (sum over the kernels of a profiled step)."""
    from torch.profiler import ProfilerActivity, profile

    tokens = iter_generate(model, prompt, max_new_tokens=4, eos_token_id=-1)
    next(tokens), next(tokens)
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            next(tokens)
            torch.cuda.synchronize()
    except Exception as exc:  # the profiler is a diagnostic here, not part of the measurement
        print(f"profiler unavailable: {exc}")
        return None
    from torch.autograd import DeviceType

    busy_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return busy_us / 1e6 if busy_us else None


@torch.no_grad()
def time_mode(mode_name: str, kernel: QuantKernel | None, dev: torch.device, decode: int, read_gbs: float,
              build, bytes_per_token) -> str:
    """`build(mode, device=)` and `bytes_per_token(model)` are bench/quant.py's."""
    mode = QuantMode.parse(None if mode_name == "bf16" else mode_name)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build(mode, device=dev)
    if kernel is not None:
        use_kernel(model, kernel)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    gb = bytes_per_token(model) / 1e9
    g = torch.Generator(device=dev).manual_seed(1)
    long_prompt = torch.randint(100, 60000, (1, 128), device=dev, generator=g)
    model(long_prompt, last_only=True)  # warm-up (cuBLAS handles, repacking)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model(long_prompt, last_only=True)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t
    rows = {}
    for batch in (1, 16):
        prompt = torch.randint(100, 60000, (batch, 16), device=dev, generator=g)
        steps, last = [], time.perf_counter()
        for _ in iter_generate(model, prompt, max_new_tokens=decode + 2, eos_token_id=-1):
            torch.cuda.synchronize()
            now = time.perf_counter()
            steps.append(now - last)
            last = now
        rows[batch] = statistics.median(steps[2:])
    busy = kernel_busy_s(model, torch.randint(100, 60000, (1, 16), device=dev, generator=g))
    kernels = ",".join(sorted({m.kernel.name for m in model.modules() if isinstance(m, QuantizedLinear)})) or "-"
    bound = read_gbs / gb
    busy_txt = f"{1 / busy:7.0f} ({1 / busy / bound:4.0%})" if busy else f"{'n/a':>14}"
    line = (f"{mode_name:5} {kernels:10} {gb:6.2f} {1 / rows[1]:8.1f} {1 / rows[1] / bound:7.1%} {busy_txt} "
            f"{16 / rows[16]:9.1f} {128 / prefill_s:9.0f} {torch.cuda.max_memory_allocated() / 1e9:7.2f} {build_s:5.1f}")
    del model
    torch.cuda.empty_cache()
    return line


def cuda_check(fixture: str, decode: int, build, bytes_per_token) -> None:
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"device {props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    print("== fixture: CUDA kernels vs CPU fp32 dequantized path (THUDM-format int8/int4 weights) ==")
    for line in fixture_check(fixture, dev):
        print(line, flush=True)
    for line in gradient_check(dev):
        print(line, flush=True)
    read_gbs = device_read_gbs(dev)
    print(f"== chatglm2-6b shape, random weights, eager PyTorch; device read bandwidth {read_gbs:.0f} GB/s ==")
    print(f"{'mode':5} {'kernel':10} {'GB/tok':>6} {'tok/s b1':>8} {'% bound':>7} {'kernel-busy tok/s':>14} "
          f"{'tok/s b16':>9} {'prefill':>9} {'GPU GB':>7} {'build':>5}")
    plan = [("bf16", None), ("int8", QuantKernel.CUDA_TORCH), ("int4", QuantKernel.CUDA_TORCH)]
    for mode_name, kernel in plan:
        if kernel is not None and unsupported_reason(kernel, QuantMode.parse(mode_name), dev):
            continue
        try:
            print(time_mode(mode_name, kernel, dev, decode, read_gbs, build, bytes_per_token), flush=True)
        except Exception as exc:  # one mode failing should not hide the others' numbers
            print(f"{mode_name} {kernel}: failed: {type(exc).__name__}: {exc}", flush=True)
            torch.cuda.empty_cache()
