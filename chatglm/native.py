"""The C++ CPU extension (built on first use with torch's cpp_extension, ~30 s, cached afterwards).

One library from four sources: quant_cpu.cpp (AVX2 weight-only int8/int4 matmul,
`chatglm_quant::mm`), gemv_cpu.cpp (bf16/fp32-weight matrix-vector product for decode steps,
`chatglm_gemv::mv`), fused_cpu.cpp (inference versions of the per-layer small ops,
`chatglm_fused::*`) and block_cpu.cpp (a decode step's block around attention in two calls,
`chatglm_block::pre/post`).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name(n) for n in ("quant_cpu.cpp", "gemv_cpu.cpp", "fused_cpu.cpp", "block_cpu.cpp")]


@functools.cache
def native_unavailable_reason() -> str | None:
    """None once the extension is loaded, else why it is not (then callers use the eager/aten paths)."""
    if os.environ.get("CHATGLM_QUANT_NATIVE", "1") == "0":
        return "disabled by CHATGLM_QUANT_NATIVE=0"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"torch reports CPU capability {cap}; the kernels need AVX2"
    try:
        from torch.utils import cpp_extension

        flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]  # OpenMP: torch's libgomp
        cpp_extension.load(name="chatglm_cpu_ext", sources=[str(s) for s in SOURCES], extra_cflags=flags,
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as exc:  # compiler missing or failing: any of several exception types
        log.warning("C++ CPU kernels unavailable, falling back to aten/eager ops: %s", exc)
        return f"building {', '.join(s.name for s in SOURCES)} failed: {exc}"

    @torch.library.register_fake("chatglm_quant::mm")
    def _mm_shape(x, weight, scale, bias, bits):  # lets torch.compile / meta tracing see the op
        return x.new_empty(x.shape[0], weight.shape[0])

    return None
