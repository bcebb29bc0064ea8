"""`python -m chatglm` reads one query per line when stdin is not a terminal."""
import subprocess
import sys


def test_cli_answers_each_line_and_clear_resets_history(fixture_dir, expected):
    cmd = [sys.executable, "-m", "chatglm", "--model", str(fixture_dir / "model"), "--greedy", "--max-new-tokens", "20"]
    out = subprocess.run(cmd, input="你好\nclear\n你好\nstop\nnever asked\n", capture_output=True, text=True,
                         timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    want = expected["base"]["chat_no_history"]["response"]
    # after "clear" the same question gets the same first-turn answer; "stop" ends before the last line
    assert lines == [want, want]
