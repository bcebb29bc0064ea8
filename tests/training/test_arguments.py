"""THUDM's flags parse with transformers 5.x; the 4.30 flags newer transformers dropped still work."""
import pytest

from chatglm.quant_format import QuantMode
from training.arguments import build_parser, parse_args

THUDM_FLAGS = ("--model_name_or_path --ptuning_checkpoint --pre_seq_len --prefix_projection --quantization_bit "
               "--train_file --validation_file --test_file --prompt_column --response_column --history_column "
               "--source_prefix --max_source_length --max_target_length --val_max_target_length "
               "--max_train_samples --max_eval_samples --max_predict_samples --ignore_pad_token_for_loss "
               "--overwrite_cache --preprocessing_num_workers --num_beams --overwrite_output_dir "
               "--predict_with_generate --resume_from_checkpoint --gradient_accumulation_steps").split()


def test_help_lists_thudm_and_legacy_flags():
    text = build_parser().format_help()
    for flag in THUDM_FLAGS + ["--evaluation_strategy", "--logging_dir", "--no_cuda", "--warmup_ratio"]:
        assert flag in text, flag


def base(*extra):
    return ["--model_name_or_path", "m", "--output_dir", "o", "--train_file", "t.json", *extra]


def test_train_sh_values():
    m, d, t = parse_args(base("--do_train", "--overwrite_output_dir", "--max_source_length", "64",
                              "--pre_seq_len", "128", "--quantization_bit", "4", "--learning_rate", "2e-2",
                              "--gradient_accumulation_steps", "16", "--predict_with_generate"))
    assert m.quantization is QuantMode.INT4 and m.pre_seq_len == 128 and not m.prefix_projection
    assert d.max_source_length == 64 and d.val_max_target_length == d.max_target_length == 128
    assert d.ignore_pad_token_for_loss and d.source_prefix == ""
    assert t.overwrite_output_dir and t.do_train and t.predict_with_generate and t.learning_rate == 2e-2


def test_legacy_flags_map_to_their_new_names():
    _, _, t = parse_args(base("--evaluation_strategy", "steps", "--no_cuda", "--warmup_ratio", "0.1",
                              "--per_gpu_train_batch_size", "3", "--group_by_length"))
    assert t.eval_strategy.value == "steps" and t.use_cpu
    assert t.warmup_steps == 0.1 and t.per_device_train_batch_size == 3
    assert t.train_sampling_strategy == "group_by_length"


def test_defaults_follow_thudm():
    m, d, t = parse_args(base())
    assert m.quantization is QuantMode.NONE and m.pre_seq_len is None
    assert d.max_source_length == 1024 and d.max_target_length == 128
    assert t.seed == 42 and t.weight_decay == 0.0 and t.lr_scheduler_type.value == "linear"


def test_json_file_of_arguments(tmp_path):
    cfg = tmp_path / "args.json"
    cfg.write_text('{"model_name_or_path": "m", "output_dir": "o", "train_file": "t.json", "pre_seq_len": 8}')
    m, _, t = parse_args([str(cfg)])
    assert m.pre_seq_len == 8 and t.output_dir == "o"


@pytest.mark.parametrize("extra, message", [
    (["--quantization_bit", "3"], "invalid choice"),
])
def test_bad_values_are_rejected(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(base(*extra))
    assert message in capsys.readouterr().err


def test_data_files_must_be_json_lines():
    with pytest.raises(ValueError, match="expected a JSON-lines file"):
        parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--train_file", "t.csv"])
    with pytest.raises(ValueError, match="training/validation/test file"):
        parse_args(["--model_name_or_path", "m", "--output_dir", "o"])


def test_tensorboard_is_the_default_logger_when_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tensorboard" else real(name, *a))
    assert parse_args(base())[2].report_to == ["tensorboard"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert parse_args(base())[2].report_to == []
    assert parse_args(base("--report_to", "none"))[2].report_to == []
