"""Reading and writing THUDM's folders: base weights (bin or safetensors, sharded or not) and
P-Tuning v2 prefix checkpoints. The folder's `.py` files are never read or executed."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors
from torch import nn

from .config import ChatGLMConfig, ConfigError
from .model import ChatGLM
from .prefix import PrefixEncoder, PrefixKV

PREFIX_KEY = "transformer.prefix_encoder."
IGNORED_KEYS = ("transformer.rotary_pos_emb.inv_freq",)
VOCAB_WEIGHT_KEYS = ("transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight")
HALF_DTYPES = (torch.float16, torch.bfloat16)
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A model or adapter folder that cannot be loaded, with the reason."""


def weight_files(folder: Path) -> list[Path]:
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{folder / index} names shards that are missing: {', '.join(missing)}")
            return files
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_INDEXES + WEIGHT_FILES)}")


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from one weight file, one tensor at a time where the format allows."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
        return
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # old (non-zip) pickles cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    for key in list(sd):
        yield key, sd.pop(key)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    module_name, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise CheckpointError(f"unexpected weight {key!r}: no such module in a ChatGLM2 model") from None
    current = module._parameters.get(name, module._buffers.get(name))
    if current is None and name not in module._parameters:
        raise CheckpointError(f"unexpected weight {key!r}: no such parameter in a ChatGLM2 model")
    if tuple(current.shape) != tuple(tensor.shape):
        raise CheckpointError(f"shape mismatch for {key}: checkpoint has {list(tensor.shape)}, "
                              f"config.json implies {list(current.shape)}")
    # Always copy: the source may be a memory map of a file that can change under a running server.
    if tensor.is_floating_point() and current.is_floating_point():
        target = current.dtype if name == "weight_scale" else dtype  # THUDM's fp16 scales stay exact
        tensor = tensor.to(dtype=target, memory_format=torch.contiguous_format, copy=True)
    else:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    module._parameters[name] = nn.Parameter(tensor, requires_grad=False)


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               quantize: str | int | None = None, half_vocab_weights: bool = False) -> ChatGLM:
    """Load a ChatGLM2 folder as published (config.json + weights), optionally quantizing to int8/int4.

    The model is built on the meta device and each tensor is assigned as it is read, so peak
    memory stays close to the final weights (quantization happens shard by shard).

    `half_vocab_weights` (inference): with fp32 `dtype`, the embedding table and output layer, if stored
    in fp16/bf16, stay so. Looked-up rows are widened exactly; the output layer's linear widens its
    weight as it multiplies in fp32 (chatglm/cpu_matmul.py). Logits are an fp32 copy's up to summation
    order (the same bits for fp16 at decode), while the model takes 1.07 GB less memory on chatglm2-6b
    and a decode step reads 0.53 GB less.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    try:
        config = ChatGLMConfig.from_json(folder)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    from .quant_format import QuantMode

    quantizing = QuantMode.parse(quantize) is not QuantMode.NONE or bool(config.quantization_bit)
    q = _quantization(quantize, config, folder) if quantizing else None
    with torch.device("meta"):
        model = ChatGLM(config)
    if q is not None:
        q.before_load(model)
    for shard in weight_files(folder):
        for key, tensor in iter_tensors(shard):
            if key in IGNORED_KEYS or key.startswith(PREFIX_KEY):
                continue
            if q is not None and q.assign(model, key, tensor):  # quantized straight from the file
                continue
            keep = half_vocab_weights and key in VOCAB_WEIGHT_KEYS and dtype == torch.float32
            _assign(model, key, tensor, tensor.dtype if keep and tensor.dtype in HALF_DTYPES else dtype)
        if q is not None:
            q.after_shard(model)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} weights, e.g. {', '.join(missing[:3])}")
    model.to(device)
    if q is not None:
        q.after_load(model, torch.device(device))
    return model.eval()


def _quantization(quantize: str | int | None, config: ChatGLMConfig, folder: Path):
    from .quant_load import LoadQuantizer  # quantization is optional machinery on top of the model

    return LoadQuantizer.for_folder(quantize, config, folder)


# ---- P-Tuning v2 prefixes ---------------------------------------------------------------------

def read_prefix_state(folder: Path) -> dict[str, torch.Tensor]:
    """The `prefix_encoder.*` tensors of a THUDM checkpoint folder (keys without `transformer.`)."""
    for name in ("pytorch_model.bin", "model.safetensors"):
        f = folder / name
        if f.is_file():
            try:
                sd = (load_safetensors(str(f)) if f.suffix == ".safetensors"
                      else torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - damaged files raise many exception types
                raise CheckpointError(f"cannot read {f}: {type(e).__name__}: {e}") from e
            out = {k[len(PREFIX_KEY):]: v for k, v in sd.items() if k.startswith(PREFIX_KEY)}
            if not out:
                raise CheckpointError(f"{f} holds no {PREFIX_KEY}* tensors; is it a P-Tuning v2 checkpoint?")
            return out
    raise CheckpointError(f"no pytorch_model.bin or model.safetensors in {folder}")


def check_prefix_fits(folder: Path, state: dict[str, torch.Tensor], config: ChatGLMConfig) -> tuple[int, bool]:
    """Validate a prefix against the base; returns (pre_seq_len, prefix_projection)."""
    emb = state.get("embedding.weight")
    if emb is None or emb.dim() != 2:
        raise CheckpointError(f"{folder}: missing or malformed prefix_encoder.embedding.weight")
    saved = {}
    if (folder / "config.json").is_file():
        saved = json.loads((folder / "config.json").read_text())
    for field in ("num_layers", "multi_query_group_num", "kv_channels"):
        found = saved.get(field)
        expected = getattr(config, field)
        if found is not None and found != expected:
            raise CheckpointError(f"{folder} was trained for a different base: {field} expected {expected}, found {found}")
    if emb.shape[1] != config.kv_size:
        raise CheckpointError(
            f"{folder}: prefix width {emb.shape[1]} does not fit the base: expected "
            f"num_layers {config.num_layers} x 2 x kv groups {config.num_kv_groups} x kv_channels "
            f"{config.kv_channels} = {config.kv_size}")
    projection = any(k.startswith("trans.") for k in state)
    pre_seq_len = saved.get("pre_seq_len") or emb.shape[0]
    if pre_seq_len != emb.shape[0]:
        raise CheckpointError(f"{folder}: config.json says pre_seq_len {pre_seq_len}, embedding has {emb.shape[0]} rows")
    if "prefix_projection" in saved and bool(saved["prefix_projection"]) != projection:
        raise CheckpointError(f"{folder}: config.json says prefix_projection {saved['prefix_projection']}, "
                              f"weights say {projection}")
    return pre_seq_len, projection


def load_prefix_encoder(path: str | Path, config: ChatGLMConfig) -> PrefixEncoder:
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    state = read_prefix_state(folder)
    pre_seq_len, projection = check_prefix_fits(folder, state, config)
    encoder = PrefixEncoder(config, pre_seq_len, projection)
    try:
        encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: prefix encoder does not load: {e}") from e
    return encoder


def load_prefix(path: str | Path, config: ChatGLMConfig) -> PrefixKV:
    """Load a THUDM P-Tuning v2 checkpoint folder as per-layer K/V (fp32; cast by the user)."""
    encoder = load_prefix_encoder(path, config)
    with torch.no_grad():
        return PrefixKV.from_encoder(encoder, config)


def save_prefix(encoder: PrefixEncoder, folder: str | Path, config: ChatGLMConfig) -> None:
    """Write THUDM's layout: pytorch_model.bin with transformer.prefix_encoder.* and config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {PREFIX_KEY + k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}
    torch.save(sd, folder / "pytorch_model.bin")
    d = config.to_dict()
    d.update(pre_seq_len=encoder.pre_seq_len, prefix_projection=encoder.prefix_projection,
             architectures=["ChatGLMForConditionalGeneration"])
    (folder / "config.json").write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}, indent=2) + "\n")


def save_model(model: ChatGLM, folder: str | Path, *, safetensors: bool = True,
               max_shard_bytes: int | None = None) -> None:
    """Write the published layout: config.json plus weights (one file, or shards with an index)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ext, stem = (".safetensors", "model") if safetensors else (".bin", "pytorch_model")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n

    def write(tensors: dict[str, torch.Tensor], path: Path) -> None:
        if safetensors:
            save_file(tensors, str(path), metadata={"format": "pt"})
        else:
            torch.save(tensors, path)

    if len(shards) == 1:
        write(shards[0], folder / f"{stem}{ext}")
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}{ext}"
        write(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
