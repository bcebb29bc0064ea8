"""Convert a ChatGLM2 model (ours, THUDM's module tree) into transformers' `GlmForCausalLM`.

    python bench/glm_convert.py SRC_CHATGLM2_FOLDER DST_FOLDER [--dtype bfloat16]

transformers' GLM is ChatGLM2's architecture with separate q/k/v projections (cpu-performance.md §1):
`query_key_value` rows split into q [:H*D], k [H*D:H*D+G*D], v [H*D+G*D:]; the other weights are renamed
and copied unchanged (the fused SwiGLU `dense_h_to_4h` is gate-then-up, as GLM's `gate_up_proj`).
The destination also gets a `tokenizer.json` built from the folder's SentencePiece model
(bench/glm_tokenizer.py) so that `transformers serve` can load it without remote code.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatglm.config import ChatGLMConfig  # noqa: E402
from chatglm.model import ChatGLM  # noqa: E402

ROPE_THETA = 10000.0


def glm_config_dict(cfg: ChatGLMConfig, dtype: torch.dtype | None = None) -> dict:
    """GlmConfig keyword arguments for a ChatGLM2 config."""
    if cfg.add_bias_linear:
        raise ValueError("add_bias_linear=True: GLM has no bias on dense/MLP linears")
    if not cfg.rmsnorm or cfg.apply_residual_connection_post_layernorm or not cfg.post_layer_norm:
        raise ValueError("only pre-norm RMSNorm ChatGLM2 blocks map onto GLM")
    d = dict(
        model_type="glm",
        architectures=["GlmForCausalLM"],
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_groups,
        head_dim=cfg.kv_channels,
        hidden_act="silu",
        attention_bias=cfg.qkv_bias,
        attention_dropout=0.0,
        rms_norm_eps=cfg.layernorm_epsilon,
        max_position_embeddings=cfg.seq_length,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA, "partial_rotary_factor": 0.5},
        partial_rotary_factor=0.5,
        tie_word_embeddings=False,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
        bos_token_id=None,
        use_cache=True,
    )
    if dtype is not None:
        d["dtype"] = str(dtype).removeprefix("torch.")
    return d


def make_glm_config(cfg: ChatGLMConfig, dtype: torch.dtype | None = None):
    from transformers import GlmConfig

    d = glm_config_dict(cfg, dtype)
    for k in ("model_type", "architectures", "dtype"):
        d.pop(k, None)
    return GlmConfig(**d)


def convert_state_dict(sd: dict[str, torch.Tensor], cfg: ChatGLMConfig) -> dict[str, torch.Tensor]:
    """ChatGLM2 state dict (transformer.* keys) -> GlmForCausalLM state dict."""
    H, G, D = cfg.num_attention_heads, cfg.num_kv_groups, cfg.kv_channels
    splits = (H * D, G * D, G * D)
    out = {"model.embed_tokens.weight": sd["transformer.embedding.word_embeddings.weight"],
           "model.norm.weight": sd["transformer.encoder.final_layernorm.weight"],
           "lm_head.weight": sd["transformer.output_layer.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "self_attention.query_key_value.weight"].split(splits, dim=0)
        out |= {dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v}
        if cfg.qkv_bias:
            qb, kb, vb = sd[src + "self_attention.query_key_value.bias"].split(splits, dim=0)
            out |= {dst + "self_attn.q_proj.bias": qb, dst + "self_attn.k_proj.bias": kb,
                    dst + "self_attn.v_proj.bias": vb}
        out |= {
            dst + "self_attn.o_proj.weight": sd[src + "self_attention.dense.weight"],
            dst + "mlp.gate_up_proj.weight": sd[src + "mlp.dense_h_to_4h.weight"],
            dst + "mlp.down_proj.weight": sd[src + "mlp.dense_4h_to_h.weight"],
            dst + "input_layernorm.weight": sd[src + "input_layernorm.weight"],
            dst + "post_attention_layernorm.weight": sd[src + "post_attention_layernorm.weight"],
        }
    return {k: v.contiguous() for k, v in out.items()}


def convert_model(model: ChatGLM, dtype: torch.dtype | None = None):
    """An in-memory GlmForCausalLM with `model`'s weights (eager attention unless sdpa is asked later)."""
    from transformers import GlmForCausalLM

    dtype = dtype or model.dtype
    glm = GlmForCausalLM(make_glm_config(model.config)).to(dtype)
    sd = convert_state_dict(model.state_dict(), model.config)
    missing, unexpected = glm.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    return glm.eval()


def convert_folder(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a transformers GLM folder (config, generation config, safetensors, tokenizer) for `src`."""
    from safetensors.torch import save_file

    from bench.glm_tokenizer import write_tokenizer
    from chatglm.checkpoint import load_model

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model = load_model(src, dtype=dtype)
    sd = convert_state_dict(model.state_dict(), model.config)
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(glm_config_dict(model.config, dtype), indent=2) + "\n")
    gen = {"eos_token_id": model.config.eos_token_id, "pad_token_id": model.config.pad_token_id,
           "do_sample": False}
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_tokenizer(src / "tokenizer.model", dst)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    convert_folder(args.src, args.dst, getattr(torch, args.dtype))
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
