"""`python -m server` settings: flags, CHATGLM_* environment fallbacks, key files, and the demo-model message."""
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from server.__main__ import main, model_problem
from server.engine_config import AdapterLoading
from server.settings import DEMO_MODEL, DType, Quantize, ServerSettings, build_parser, parse_settings
from tests.conftest import REPO_ROOT


def test_flags_map_onto_settings(tmp_path):
    s = parse_settings(["--model", str(tmp_path), "--quantize", "int8", "--dtype", "bfloat16", "--device", "cuda",
                        "--adapter", "a=/ck/a", "--adapter", "b=/ck/b/checkpoint-5", "--host", "0.0.0.0",
                        "--port", "9001", "--api-key", "k1", "--api-key", "k2", "--metrics-auth",
                        "--max-body-bytes", "1000", "--max-num-seqs", "8", "--max-model-len", "1024",
                        "--adapter-loading", "eager", "--max-waiting", "3"], env={})
    assert s.model == tmp_path and s.quantize is Quantize.INT8 and s.dtype is DType.BFLOAT16
    assert s.adapters == {"a": Path("/ck/a"), "b": Path("/ck/b/checkpoint-5")}
    assert (s.host, s.port, s.api_keys, s.metrics_auth, s.max_body_bytes) == ("0.0.0.0", 9001, ["k1", "k2"], True,
                                                                             1000)
    assert s.engine_limits() == {"max_model_len": 1024, "max_num_seqs": 8, "max_waiting": 3,
                                 "adapter_loading": AdapterLoading.EAGER}


def test_environment_fills_what_flags_leave_unset(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nkf1\n\n  kf2  \n")
    env = {"CHATGLM_PORT": "7000", "CHATGLM_HOST": "0.0.0.0", "CHATGLM_API_KEY": "e1,e2",
           "CHATGLM_ADAPTER": "x=/a,y=/b", "CHATGLM_QUANTIZE": "int4", "CHATGLM_METRICS_AUTH": "true",
           "CHATGLM_API_KEY_FILE": str(keys)}
    s = parse_settings(["--port", "7100"], env=env)
    assert s.port == 7100 and s.host == "0.0.0.0" and s.quantize is Quantize.INT4 and s.metrics_auth
    assert s.api_keys == ["e1", "e2", "kf1", "kf2"] and s.adapters == {"x": Path("/a"), "y": Path("/b")}
    assert parse_settings([], env={}) == ServerSettings()


@pytest.mark.parametrize("argv,env", [(["--adapter", "noequals"], {}), (["--quantize", "int3"], {}),
                                      (["--port", "x"], {}), ([], {"CHATGLM_PORT": "x"}),
                                      (["--max-num-seqs", "0"], {}), (["--api-key-file", "/no/such/file"], {})])
def test_bad_settings_exit_with_usage(argv, env, capsys):
    with pytest.raises(SystemExit) as e:
        parse_settings(argv, env=env)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_help_explains_every_option():
    text = build_parser().format_help()
    for option in ("--model", "--quantize", "--checkpoints", "--adapter", "--host", "--port", "--api-key",
                   "--api-key-file", "--dtype", "--device", "--metrics-auth", "--max-body-bytes", "--max-num-seqs",
                   "--max-model-len", "--drain-timeout", "CHATGLM_"):
        assert option in text
    for action in build_parser()._actions:
        assert action.help, action.dest


def test_missing_demo_model_is_a_clear_message(tmp_path, capsys):
    if (DEMO_MODEL / "config.json").is_file():
        assert model_problem(ServerSettings()) is None
    else:
        assert main([]) == 2
        err = capsys.readouterr().err
        assert "demo model" in err and str(DEMO_MODEL) in err and "--model" in err
    assert main(["--model", str(tmp_path)]) == 2
    assert "not a ChatGLM2 model folder" in capsys.readouterr().err


def test_python_dash_m_server_help_runs():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "usage: python -m server" in out.stdout


def test_engine_that_fails_to_load_exits_non_zero(tmp_path):
    (tmp_path / "config.json").write_text('{"num_layers": 2}')  # a folder with no weights
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "server", "--model", str(tmp_path), "--port", str(port),
                          "--torch-threads", "1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 1, out.stderr
    assert "engine failed to start: not a ChatGLM2 config" in out.stderr and "Traceback" not in out.stderr
