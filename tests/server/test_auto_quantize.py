"""`--quantize auto`: a stored-quantized base loads as stored; otherwise the adapters' training quantization."""
import json
import subprocess
import sys

from server.adapter_files import trained_quantization_bit as trained_bits
from server.auto_quantize import choose_quantize
from server.settings import Quantize, parse_settings
from tests.conftest import REPO_ROOT


def write_adapter(folder, manifest_bits=None, config_bits=None):
    folder.mkdir(parents=True)
    (folder / "pytorch_model.bin").write_bytes(b"")
    if manifest_bits is not None or config_bits is None:
        (folder / "ptuning_manifest.json").write_text(json.dumps({"quantization_bit": manifest_bits}))
    if config_bits is not None:
        (folder / "config.json").write_text(json.dumps({"pre_seq_len": 8, "quantization_bit": config_bits}))
    return folder


def base(tmp_path, bits=None):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_layers": 2, **({"quantization_bit": bits} if bits else {})}))
    return folder


def test_default_is_auto_and_help_shows_values():
    assert parse_settings([]).quantize is Quantize.AUTO
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert "{auto,none,int8,int4}" in out.stdout and "Quantize.NONE" not in out.stdout


def test_trained_bits_reads_the_manifest_then_thudm_config(tmp_path):
    assert trained_bits(write_adapter(tmp_path / "a", manifest_bits=8)) == 8
    assert trained_bits(write_adapter(tmp_path / "b", config_bits=4)) == 4  # THUDM's checkpoint config.json
    assert trained_bits(write_adapter(tmp_path / "c", manifest_bits=None)) == 0
    broken = write_adapter(tmp_path / "d", config_bits=0)
    (broken / "ptuning_manifest.json").write_text("{not json")
    assert trained_bits(broken) == 0


def test_adapters_that_agree_choose_the_quantization(tmp_path):
    ckpts = tmp_path / "ckpts"
    write_adapter(ckpts / "ads", manifest_bits=8)
    write_adapter(ckpts / "run" / "checkpoint-10", config_bits=8)
    choice = choose_quantize(base(tmp_path), ckpts, {})
    assert choice.quantize == "int8" and "ads" in choice.reason and "run" in choice.reason


def test_disagreement_none_and_stored_quantized_base(tmp_path):
    ckpts = tmp_path / "ckpts"
    write_adapter(ckpts / "a8", manifest_bits=8)
    extra = write_adapter(tmp_path / "elsewhere" / "a4", config_bits=4)
    choice = choose_quantize(base(tmp_path), ckpts, {"a4": extra})
    assert choice.quantize is None and "--quantize" in choice.reason and "a4" in choice.reason
    assert choose_quantize(tmp_path / "base", tmp_path / "empty", {}).quantize is None
    stored = tmp_path / "stored"
    stored.mkdir()
    (stored / "config.json").write_text(json.dumps({"quantization_bit": 4}))
    choice = choose_quantize(stored, ckpts, {})
    assert choice.quantize is None and "stored int4" in choice.reason  # loads as stored


def test_adapters_of_another_architecture_do_not_count(tmp_path):
    ckpts = tmp_path / "ckpts"
    write_adapter(ckpts / "mine", manifest_bits=4)
    other = write_adapter(ckpts / "other", config_bits=8)
    (other / "config.json").write_text(json.dumps({"pre_seq_len": 8, "quantization_bit": 8, "num_layers": 28}))
    assert choose_quantize(base(tmp_path), ckpts, {}).quantize == "int4"  # the base has 2 layers


def test_thudm_fixture_checkpoints_mean_unquantized(fixture_dir):
    choice = choose_quantize(fixture_dir / "model", fixture_dir, {})
    assert choice.quantize is None and "unquantized" in choice.reason
