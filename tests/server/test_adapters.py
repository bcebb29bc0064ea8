"""AdapterRegistry: discovery, validation with reasons, versions, hot reload, LRU, manifest."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from chatglm.checkpoint import load_prefix, save_prefix
from chatglm.config import ChatGLMConfig
from chatglm.prefix import PrefixEncoder
from server.adapter_files import MANIFEST_FILE, discover
from server.adapters import AdapterRegistry
from server.client import LoadState
from server.errors import AdapterUnavailable, ModelNotFound

torch.set_num_threads(1)


@pytest.fixture
def config(fixture_dir) -> ChatGLMConfig:
    return ChatGLMConfig.from_json(fixture_dir / "model")


@pytest.fixture
def ckpts(tmp_path, fixture_dir) -> Path:
    root = tmp_path / "checkpoints"
    root.mkdir()
    shutil.copytree(fixture_dir / "ptuning-pre8", root / "plain")
    shutil.copytree(fixture_dir / "ptuning-pre8-proj", root / "proj")
    (root / "base").symlink_to(fixture_dir / "model")  # a base model folder is not an adapter
    return root


def registry(config, root=None, **kw) -> AdapterRegistry:
    kw.setdefault("max_prefix_len", 16)
    kw.setdefault("base_model_id", "tiny")
    return AdapterRegistry(config, dtype=torch.float32, device="cpu", checkpoints_dir=root, **kw)


def write_prefix(folder: Path, config: ChatGLMConfig, pre_seq_len=4, seed=0, projection=False) -> PrefixEncoder:
    torch.manual_seed(seed)
    enc = PrefixEncoder(config, pre_seq_len, projection)
    save_prefix(enc, folder, config)
    return enc


def bump(folder: Path) -> None:
    """Make sure the rewrite is visible to an mtime check even on coarse clocks."""
    for f in folder.iterdir():
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))


def test_discovery_of_folders_and_checkpoints(ckpts, config):
    write_prefix(ckpts / "run" / "checkpoint-2", config, seed=1)
    write_prefix(ckpts / "run" / "checkpoint-10", config, seed=2)
    found = discover(ckpts)
    assert set(found) == {"plain", "proj", "run", "run/checkpoint-2", "run/checkpoint-10"}
    assert found["run"] == ckpts / "run" / "checkpoint-10"  # the bare name serves the latest step
    reg = registry(config, ckpts)
    assert set(reg.names()) == set(found)
    assert all(i.state is LoadState.AVAILABLE and i.parent == "tiny" for i in reg.infos())
    with pytest.raises(ModelNotFound):
        reg.entry("base")


def test_lazy_load_folds_the_prefix_once(ckpts, config, fixture_dir):
    reg = registry(config, ckpts)
    assert reg.num_resident == 0
    v = reg.acquire("proj")
    ref = load_prefix(fixture_dir / "ptuning-pre8-proj", config)
    assert torch.equal(v.prefix.kv, ref.kv) and v.pre_seq_len == 8 and v.prefix_projection
    assert len(v.version) == 12 and reg.acquire("proj") is v
    info = reg.info("proj")
    assert info.state is LoadState.LOADED and info.version == v.version and info.fingerprint
    assert reg.num_resident == 1 and reg.resident_bytes == v.prefix.num_bytes


def test_refusals_have_reasons_and_do_not_disturb_others(ckpts, config):
    other = ChatGLMConfig.from_dict({**config.to_dict(), "num_layers": config.num_layers + 1})
    write_prefix(ckpts / "wrong_shape", other)
    (ckpts / "corrupt").mkdir()
    (ckpts / "corrupt" / "pytorch_model.bin").write_bytes(b"not a checkpoint at all")
    (ckpts / "corrupt" / "config.json").write_text(json.dumps({"pre_seq_len": 4}))
    write_prefix(ckpts / "too_long", config, pre_seq_len=32)
    reg = registry(config, ckpts)
    reg.load_all()  # eager loading records failures, raises nothing
    reasons = {n: reg.info(n) for n in ("wrong_shape", "corrupt", "too_long")}
    assert all(i.state is LoadState.FAILED for i in reasons.values())
    assert "num_layers" in reasons["wrong_shape"].error
    assert "cannot read" in reasons["corrupt"].error
    assert "max_prefix_len" in reasons["too_long"].error
    with pytest.raises(AdapterUnavailable, match="num_layers"):
        reg.acquire("wrong_shape")
    assert reg.info("plain").state is LoadState.LOADED and reg.acquire("plain").pre_seq_len == 8


def test_rewritten_checkpoint_becomes_a_new_version(tmp_path, config):
    folder = tmp_path / "ad"
    write_prefix(folder, config, seed=1)
    reg = registry(config, adapters={"ad": str(folder)})
    v1 = reg.acquire("ad")
    kv1 = v1.prefix.kv.clone()
    write_prefix(folder, config, seed=2)
    bump(folder)
    assert reg.peek("ad") is None  # the change is noticed without loading
    v2 = reg.acquire("ad")
    assert v2.version != v1.version and v2.cache_key != v1.cache_key
    assert not torch.equal(v2.prefix.kv, kv1) and torch.equal(v1.prefix.kv, kv1)  # old holders unaffected
    assert reg.info("ad").version == v2.version


def test_bad_rewrite_keeps_serving_the_old_version(tmp_path, config):
    folder = tmp_path / "ad"
    write_prefix(folder, config)
    reg = registry(config, adapters={"ad": str(folder)})
    v1 = reg.acquire("ad")
    (folder / "pytorch_model.bin").write_bytes(b"\x00" * 10)
    bump(folder)
    assert reg.acquire("ad") is v1
    assert "reload failed" in reg.info("ad").error
    assert reg.peek("ad") is v1  # the refused files are not re-read on every request
    write_prefix(folder, config, seed=5)
    bump(folder)
    assert reg.acquire("ad").version != v1.version and reg.info("ad").error is None


def test_failed_adapter_loads_once_fixed(tmp_path, config):
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"garbage")
    (folder / "config.json").write_text(json.dumps({"pre_seq_len": 4}))
    reg = registry(config, adapters={"ad": str(folder)})
    with pytest.raises(AdapterUnavailable):
        reg.acquire("ad")
    write_prefix(folder, config)
    bump(folder)
    assert reg.acquire("ad").pre_seq_len == 4 and reg.info("ad").state is LoadState.LOADED


def test_lru_bound_and_unload(ckpts, config):
    reg = registry(config, ckpts, max_resident=1)
    a = reg.acquire("plain")
    reg.acquire("proj")
    assert reg.num_resident == 1 and reg.info("plain").state is LoadState.AVAILABLE
    assert a.prefix.kv.numel() > 0  # evicted versions stay valid for whoever holds them
    assert reg.acquire("plain").version == a.version  # reloads on demand, same content, same version
    reg.unload("plain")
    assert reg.num_resident == 0 and reg.info("plain").state is LoadState.AVAILABLE


def test_manifest_is_exposed_checked_and_warns_on_quantization(tmp_path, config):
    folder = tmp_path / "ad"
    write_prefix(folder, config, pre_seq_len=4)
    manifest = {"base_model": "THUDM/chatglm2-6b", "quantization_bit": 4, "source_prefix": "广告：",
                "max_source_length": 64, "max_target_length": 128, "pre_seq_len": 4, "prefix_projection": False}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    reg = registry(config, adapters={"ad": str(folder)})
    info = reg.info("ad")
    assert info.manifest == manifest
    assert any("int4" in w for w in info.warnings) and any("chatglm2-6b" in w for w in info.warnings)
    v = reg.acquire("ad")
    assert v.manifest.source_prefix == "广告："
    int4 = registry(config, adapters={"ad": str(folder)}, quantization_bit=4, base_model_id="chatglm2-6b")
    assert int4.info("ad").warnings == []
    (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, "pre_seq_len": 5}))
    bump(folder)
    with pytest.raises(AdapterUnavailable):
        registry(config, adapters={"ad": str(folder)}).acquire("ad")


def test_unknown_names(config):
    reg = registry(config)
    with pytest.raises(ModelNotFound):
        reg.acquire("nope")
    with pytest.raises(ValueError):
        reg.add("tiny", "/x")  # the base model's name is not an adapter name


def test_safetensors_adapter(tmp_path, config, fixture_dir):
    from safetensors.torch import save_file

    folder = tmp_path / "st"
    folder.mkdir()
    sd = torch.load(fixture_dir / "ptuning-pre8" / "pytorch_model.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    shutil.copy(fixture_dir / "ptuning-pre8" / "config.json", folder / "config.json")
    v = registry(config, adapters={"st": str(folder)}).acquire("st")
    assert torch.equal(v.prefix.kv, load_prefix(fixture_dir / "ptuning-pre8", config).kv)
