"""Decode/prefill speed, memory and bandwidth efficiency of bf16, int8 and int4 on a chatglm2-6b-shaped model.

    python bench/quant.py [--modes bf16,int8,int4] [--threads 2] [--decode 24] [--block 4] [--prefill 128]
                          [--act auto|bf16|fp32]
    python bench/quant.py --cuda ../shared/fixtures/chatglm2-tiny/model   # GPU: kernels vs CPU dequant, speed

The real ChatGLM class with random weights, built on meta and materialized in place in its final
dtype (bf16, or int8/int4 THUDM-format linears via swap_in_empty_quantized): never a 6B fp32 copy.
Activations are in the server's dtype for the mode (`--act auto`: bf16 for the bf16 model, fp32 for
int8/int4 on the AVX2 kernel, with the embedding and output layer kept bf16 as the server keeps them).
Each mode runs in a fresh subprocess so its resident memory is its own. The bandwidth bound is
measured read bandwidth / bytes of weights read per decoded token (all layers + output layer). The
weights sit on transparent huge pages as in the server, and the bandwidth is the better of normal
and huge-page memory. Besides the median and best step against the best read of the run, "paired" holds
each block of `--block` decode steps against reads made right before it (see `paired_ratios`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from chatglm.config import ChatGLMConfig
from chatglm.generation import iter_generate
from chatglm.huge_pages import huge_page_arena, huge_pages_unavailable_reason, move_to_huge_pages
from chatglm.model import ChatGLM
from chatglm.quantize import QuantizedLinear, QuantMode, swap_in_empty_quantized

SHAPE_6B = dict(num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696, kv_channels=128,
                num_attention_heads=32, seq_length=32768, multi_query_attention=True, multi_query_group_num=2,
                add_qkv_bias=True)


def rss_gb() -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return (int(status["VmRSS"].split()[0]) / 2**20, int(status["VmHWM"].split()[0]) / 2**20)


def bandwidth_gbs(threads: int, gib: int = 1, runs: int = 7) -> tuple[float, float]:
    """Best and median read bandwidth: torch sum of a `gib` GiB fp32 array, on normal pages and on
    transparent huge pages (where the OS has them; the weights live there too), whichever reads faster."""
    results = []
    for huge in (False, True):
        if huge and huge_pages_unavailable_reason() is not None:
            continue
        probe = ReadProbe(threads, gib, huge=huge)
        ts = probe.read_times(runs)
        results.append((probe.nbytes / min(ts) / 1e9, probe.nbytes / statistics.median(ts) / 1e9))
        del probe
    return max(results)


class ReadProbe:
    """One torch sum over a `gib` GiB fp32 array kept allocated (on huge pages where the OS has them, as
    the weights are, unless `huge` says otherwise), so that read bandwidth can be sampled between decode
    steps."""

    def __init__(self, threads: int, gib: int = 1, huge: bool | None = None):
        torch.set_num_threads(threads)
        if huge is None:
            huge = huge_pages_unavailable_reason() is None
        self.a = huge_page_arena(gib << 30).view(torch.float32) if huge else torch.empty(gib * 2**28)
        self.nbytes = self.a.numel() * 4
        self.a.fill_(1.0)
        self.a.sum()

    def read_times(self, runs: int) -> list[float]:
        """Seconds of each of `runs` reads."""
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            self.a.sum()
            times.append(time.perf_counter() - t)
        return times

    def read_gbs(self, runs: int = 3) -> float:
        """Best of `runs` reads, GB/s."""
        return self.nbytes / min(self.read_times(runs)) / 1e9


def paired_ratios(rounds: list[tuple[float, list[float]]], gb_per_token: float) -> list[float]:
    """Per round of (read GB/s taken just before it, its decode step times in s): median step speed as
    a fraction of that round's bound. The host's bandwidth drifts by a third within minutes, so each
    block of steps is held against reads made next to it rather than against the best read of the run."""
    return [gb_per_token / statistics.median(steps) / bw for bw, steps in rounds]


def _fill(flat: torch.Tensor, pool: torch.Tensor, offset: int) -> None:
    """Tile a random pool over `flat` (random values only need to look like weights, not be i.i.d.)."""
    for start in range(0, flat.numel(), pool.numel()):
        chunk = flat[start:start + pool.numel()]
        chunk.copy_(pool.roll(offset + start // 7)[: chunk.numel()])


@torch.no_grad()
def build(mode: QuantMode, seed: int = 0, include_output_layer: bool = False,
          device: torch.device | str = "cpu") -> ChatGLM:
    cfg = ChatGLMConfig(**SHAPE_6B)
    with torch.device("meta"):
        model = ChatGLM(cfg)
    model.to(torch.bfloat16)
    swap_in_empty_quantized(model, mode, dtype=torch.bfloat16, device="meta", include_output_layer=include_output_layer)
    model.to_empty(device=device)
    g = torch.Generator().manual_seed(seed)
    qmax = 127 if mode is QuantMode.INT8 else 7
    floats = (torch.randn(1 << 24, generator=g) * 0.02).bfloat16()
    if mode is QuantMode.INT4:  # two random nibbles a byte, each in [-7, 7]
        hi, lo = (torch.randint(-7, 8, (1 << 24,), generator=g, dtype=torch.int8) for _ in range(2))
        ints = (hi << 4) | (lo & 0xF)
    else:
        ints = torch.randint(-qmax, qmax + 1, (1 << 24,), generator=g, dtype=torch.int8)
    floats, ints = floats.to(device), ints.to(device)
    for i, (name, p) in enumerate(model.named_parameters()):
        if p.dtype == torch.int8:  # uniform q in [-qmax, qmax]: weight std = scale * qmax / sqrt(3)
            _fill(p.view(-1), ints, 7919 * i)
        elif name.endswith("weight_scale"):
            p.fill_(0.02 * 3**0.5 / qmax)
        elif "layernorm" in name:
            p.fill_(1.0)
        else:
            _fill(p.view(-1), floats, 7919 * i)
    return model.requires_grad_(False).eval()


def bytes_per_token(model: ChatGLM) -> int:
    """Weights read to decode one token: every layer, final norm and output layer; one embedding row."""
    total = 0
    for name, p in model.named_parameters():
        if "word_embeddings" in name:
            total += p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def activation_dtype(mode: QuantMode, act: str) -> torch.dtype:
    """`auto`: what the server picks on this CPU for a bf16 checkpoint (server/engine_config.py)."""
    if act != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[act]
    from server.engine_config import auto_dtype

    return auto_dtype(None if mode is QuantMode.NONE else mode.value, "cpu", "bfloat16")


def to_serving_dtype(model: ChatGLM, dtype: torch.dtype) -> None:
    """Put a `build` model (bf16) in activation dtype `dtype` as the server loads it: under fp32
    activations the embedding and an unquantized output layer keep their stored bf16
    (`load_model(half_vocab_weights=True)`)."""
    model.to(dtype)
    if dtype == torch.float32:
        model.transformer.embedding.to(torch.bfloat16)
        if not isinstance(model.transformer.output_layer, QuantizedLinear):
            model.transformer.output_layer.to(torch.bfloat16)


def run_mode(mode_name: str, threads: int, decode: int, block: int, prefill: int, output_layer: bool,
             act: str) -> dict:
    mode = QuantMode.parse(None if mode_name == "bf16" else mode_name)
    dtype = activation_dtype(mode, act)
    t0 = time.perf_counter()
    model = build(mode, include_output_layer=output_layer)
    to_serving_dtype(model, dtype)
    move_to_huge_pages(model)  # as the server does on CPU
    build_s = time.perf_counter() - t0
    kernels = sorted({m.kernel.name for m in model.modules() if isinstance(m, QuantizedLinear)})
    bw_now = bandwidth_gbs(threads, runs=3)[0]  # contention on a shared VM drifts: measure next to the run
    torch.set_num_threads(threads)
    long_prompt = torch.randint(100, 60000, (1, prefill), generator=torch.Generator().manual_seed(2))
    t = time.perf_counter()
    with torch.no_grad():
        model(long_prompt, last_only=True)
    prefill_s = time.perf_counter() - t
    rss, peak = rss_gb()  # before the bandwidth probe below adds its 1 GiB
    probe = ReadProbe(threads)
    prompt = torch.randint(100, 60000, (1, 16), generator=torch.Generator().manual_seed(1))
    rounds, steps = [], []
    with torch.no_grad():
        tokens = iter_generate(model, prompt, max_new_tokens=decode + 2, eos_token_id=-1)
        next(tokens), next(tokens)  # the 16-token prefill and a first decode step: not timed
        bw, last = probe.read_gbs(3), time.perf_counter()
        for _ in tokens:
            steps.append(time.perf_counter() - last)
            if len(steps) == block:  # a block of steps held against the reads made just before it
                rounds.append((bw, steps))
                steps, bw = [], probe.read_gbs(3)
            last = time.perf_counter()
    step_s = [s for _, b in rounds for s in b] + steps
    return dict(mode=mode_name, act=str(dtype).removeprefix("torch."), kernels=kernels, threads=threads,
                build_s=build_s,
                bandwidth_gbs=max(bw_now, *(b for b, _ in rounds)), rounds=rounds,
                decode_tok_s_median=1 / statistics.median(step_s), decode_tok_s_best=1 / min(step_s),
                prefill_tok_s=prefill / prefill_s, prefill_s=prefill_s, rss_gb=rss, peak_rss_gb=peak,
                weight_gb_per_token=bytes_per_token(model) / 1e9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="bf16,int8,int4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode", type=int, default=24, help="decode steps timed per mode")
    p.add_argument("--block", type=int, default=4, help="decode steps between bandwidth reads")
    p.add_argument("--prefill", type=int, default=128, help="prompt length of the prefill timing")
    p.add_argument("--quantize-output-layer", action="store_true",
                   help="also quantize transformer.output_layer (THUDM leaves it in float)")
    p.add_argument("--act", default="auto", choices=["auto", "bf16", "fp32"],
                   help="activation dtype; auto: the server's choice on this CPU (int8/int4 with the AVX2 kernel: fp32)")
    p.add_argument("--cuda", metavar="FIXTURE_MODEL", help="GPU check against the fixture's model folder instead")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cuda:
        from quant_cuda import cuda_check  # bench/ is on sys.path when this file runs as a script

        cuda_check(args.cuda, args.decode, build, bytes_per_token)
        return
    if args.child:
        print(json.dumps(run_mode(args.child, args.threads, args.decode, args.block, args.prefill,
                                  args.quantize_output_layer, args.act)))
        return
    bw_best, bw_med = bandwidth_gbs(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"memory read bandwidth (torch sum, 1 GiB, {args.threads} threads): best {bw_best:.1f} GB/s, "
          f"median {bw_med:.1f} GB/s; each mode's bound uses the best of this and its own reads")
    print("paired: decode runs in blocks of --block steps, each right after three reads; the median block's")
    print("        speed as a fraction of the bound from its own reads (RSS is read before the 1 GiB probe)")
    print(f"{'mode':5} {'act':8} {'kernel':9} {'GB/tok':>7} {'decode tok/s med/best':>22} {'BW GB/s':>7} {'bound':>6} "
          f"{'% bound med/best':>17} {'paired':>7} {'prefill tok/s':>13} {'RSS GB':>7} {'peak':>6}")
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode, "--threads", str(args.threads),
               "--decode", str(args.decode), "--block", str(args.block), "--prefill", str(args.prefill),
               "--act", args.act]
        cmd += ["--quantize-output-layer"] if args.quantize_output_layer else []
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        bw = max(bw_best, r["bandwidth_gbs"])
        bound = bw / r["weight_gb_per_token"]
        paired = statistics.median(paired_ratios(r["rounds"], r["weight_gb_per_token"]))
        best_pct = f"{100 * r['decode_tok_s_best'] / bound:.0f}%"
        print(f"{mode:5} {r['act']:8} {','.join(r['kernels']) or 'F.linear':9} {r['weight_gb_per_token']:7.2f} "
              f"{r['decode_tok_s_median']:10.2f} / {r['decode_tok_s_best']:<9.2f} {bw:7.1f} {bound:6.2f} "
              f"{100 * r['decode_tok_s_median'] / bound:7.0f}% / {best_pct:<6} "
              f"{100 * paired:6.0f}% {r['prefill_tok_s']:13.2f} {r['rss_gb']:7.2f} {r['peak_rss_gb']:6.2f}", flush=True)


if __name__ == "__main__":
    main()
