"""README.md, run as written: every fenced block in order (bash commands one by one, python blocks whole), servers
started by a block serve the blocks after it, and every inline command or flag in the prose is checked too.

What a reader has and this machine lacks has a stand-in, and nothing else is changed in the text:
  http://127.0.0.1:8000          -> the server the last server block started, on a free port (CHATGLM_PORT)
  /models/chatglm2-6b            -> the chatglm2-tiny fixture (THUDM's own code made it, published layout)
  /models/ptuning/output/...     -> the fixture's THUDM P-Tuning v2 checkpoint, in train.sh's output layout
  docker                         -> no engine here: build args, ports, volumes and the container command are checked
                                    against the Dockerfile and `python -m server`'s parser instead of run
`make test` is not run from inside the tests (`make -n` shows its recipe); `make serve` runs for real when .venv is
set up (as in CI, after `make test` built it), else its recipe's `python -m server` does."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from server.settings import parse_settings
from tests.conftest import REPO_ROOT
from tests.live_server import free_port, live_server

README = REPO_ROOT / "README.md"
DOCKERFILE = REPO_ROOT / "Dockerfile"
README_URL = "http://127.0.0.1:8000"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
THUDM_RUN = "adgen-chatglm2-6b-pt-128-2e-2/checkpoint-3000"


def fenced_blocks() -> list[tuple[str, str]]:
    return FENCE.findall(README.read_text(encoding="utf-8"))


def commands(block: str) -> list[str]:
    """Complete shell commands: lines joined across `\\` continuations and open quotes; comments dropped."""
    out, pending = [], ""
    for line in block.splitlines():
        pending += line + "\n"
        if line.endswith("\\"):
            continue
        try:
            words = words_of(pending)
        except ValueError:  # an open quote: the command goes on
            continue
        if words:
            out.append(pending.strip())
        pending = ""
    assert not pending.strip(), f"unterminated command in README: {pending}"
    return out


def words_of(command: str) -> list[str]:
    return shlex.split(command.replace("\\\n", " "), comments=True)


class Reader:
    """Runs the README's blocks in order in a scratch folder that has the repository's checkpoints/."""

    def __init__(self, work: Path, standins: dict[str, str], stack: ExitStack):
        self.work, self.standins, self.stack = work, dict(standins), stack
        self.server = None
        self.server_stack: ExitStack | None = None
        self.images: dict[str, dict[str, str]] = {}
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.ran: list[str] = []

    def substitute(self, text: str) -> str:
        for old, new in self.standins.items():
            text = text.replace(old, new)
        return text

    # -- servers --
    def start_server(self, command: str, argv: list[str] | None = None) -> None:
        if self.server_stack is not None:
            self.server_stack.close()
        port = free_port()
        self.server_stack = self.stack.enter_context(ExitStack())
        log = self.work / f"server-{port}.log"
        if argv is None:
            argv = words_of(self.substitute(command))
        self.server = self.server_stack.enter_context(
            live_server([], log, command=argv, port=port, env={**self.env, "CHATGLM_PORT": str(port)},
                        cwd=REPO_ROOT if argv[0] == "make" else self.work))
        self.standins[README_URL] = self.server.url
        self.ran.append(command)

    # -- blocks --
    def bash(self, block: str) -> None:
        cmds = commands(block)
        if [words_of(c)[0] for c in cmds] == ["make", "make"]:
            return self.quick_start(cmds)
        for command in cmds:
            head = words_of(command)
            if head[:3] == ["python", "-m", "server"]:
                assert len(cmds) == 1, "a block that starts a server holds only that command"
                self.start_server(command)
            elif head[0] == "docker":
                self.docker(head)
            else:
                self.run(command)

    def quick_start(self, cmds: list[str]) -> None:
        assert [words_of(c) for c in cmds] == [["make", "serve"], ["make", "test"]]
        stamp_fresh = subprocess.run(["make", "-q", ".venv/.installed"], cwd=REPO_ROOT).returncode == 0
        if stamp_fresh:  # exactly `make serve`
            self.start_server("make serve", ["make", "serve"])
        else:  # .venv not built here: what its recipe runs after setup
            self.start_server("make serve", [sys.executable, "-m", "server"])
        models = {m["id"]: m for m in http_json(self.server.url + "/v1/models")["data"]}
        assert models["demo-base"]["kind"] == "base" and models["demo-adgen"]["kind"] == "adapter", models
        self.ran.append("make test (see test_make_recipes)")

    def run(self, command: str) -> None:
        text = self.substitute(command)
        out = subprocess.run(["bash", "-o", "pipefail", "-c", text], cwd=self.work, env=self.env, text=True,
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
        assert out.returncode == 0, f"{command}\nexit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        check_output(words_of(text), out.stdout, self.work)
        self.ran.append(command)

    def python(self, block: str) -> None:
        out = subprocess.run([sys.executable, "-c", self.substitute(block)], cwd=self.work, env=self.env, text=True,
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
        assert out.returncode == 0, f"{block}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        lines = [line for line in out.stdout.splitlines() if line.strip()]
        assert lines and all(len(line.split(":", 1)[-1].strip()) > 0 for line in lines), out.stdout
        self.ran.append(block.splitlines()[0])

    # -- docker (no engine: checked against the Dockerfile and the server's parser) --
    def docker(self, words: list[str]) -> None:
        args, declared = dockerfile()
        if words[1] == "build":
            tag, build_args, i = None, {}, 2
            while words[i].startswith("-"):
                if words[i] == "-t":
                    tag = words[i + 1]
                else:
                    assert words[i] == "--build-arg", words[i]
                    name, _, value = words[i + 1].partition("=")
                    assert name in declared, f"--build-arg {name} is not an ARG in the Dockerfile"
                    build_args[name] = value
                i += 2
            assert words[i:] == ["."] and tag
            self.images[tag] = build_args
        else:
            assert words[1] == "run"
            i, mounts, ports = 2, {}, {}
            while words[i].startswith("-"):
                if words[i] in ("--rm",):
                    i += 1
                    continue
                flag, value = words[i], words[i + 1]
                if flag == "-p":
                    host, container = value.split(":")
                    ports[int(host)] = int(container)
                elif flag == "-v":
                    host, container = value.split(":")
                    mounts[container] = host
                else:
                    assert (flag, value) == ("--gpus", "all"), flag
                i += 2
            image, cmd = words[i], words[i + 1:] or args["CMD"]
            assert image in self.images, f"docker run {image}: not built by an earlier README command"
            assert cmd[:3] == ["python", "-m", "server"], cmd
            settings = parse_settings(cmd[3:], env=args["ENV"])
            assert settings.host == "0.0.0.0" and list(ports.values()) == [settings.port] == [args["EXPOSE"]]
            for path in (settings.model, settings.checkpoints if "--checkpoints" in cmd else None):
                if path is not None:
                    assert any(str(path).startswith(c + "/") for c in mounts), f"{path} is not on a mounted volume"
        self.ran.append(" ".join(words))


def dockerfile() -> tuple[dict, set[str]]:
    text = DOCKERFILE.read_text()
    declared = set(re.findall(r"^ARG (\w+)", text, re.M))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    env_line = re.search(r"^ENV (.*?)(?<!\\)$", text, re.M | re.S).group(1).replace("\\\n", " ")
    env = dict(w.split("=", 1) for w in shlex.split(env_line))
    expose = int(re.search(r"^EXPOSE (\d+)$", text, re.M).group(1))
    return {"CMD": cmd, "ENV": env, "EXPOSE": expose}, declared


def http_json(url: str) -> dict:
    import httpx

    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def check_output(words: list[str], stdout: str, work: Path) -> None:
    """What each kind of README command must show beyond exit status 0."""
    if words[0] == "curl":
        body = json.loads(words[words.index("-d") + 1]) if "-d" in words else None
        if body and body.get("stream"):
            events = [line[6:] for line in stdout.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", stdout[-2000:]
            chunks = [json.loads(e) for e in events[:-1]]
            assert all("error" not in c and c["model"] == body["model"] for c in chunks), stdout[-2000:]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            assert text.strip() and len(chunks) > 2, stdout[-2000:]  # streamed: several chunks, not one
            if body.get("stream_options", {}).get("include_usage"):
                assert chunks[-1]["usage"]["completion_tokens"] > 0
        elif body:
            reply = json.loads(stdout)
            assert reply["model"] == body["model"] and reply["choices"][0]["message"]["content"].strip(), stdout
        else:
            assert json.loads(stdout)["object"] == "list", stdout
    elif words[:3] == ["python", "-m", "training.gen_data"]:
        out = work / words[words.index("--out") + 1]
        assert sum(1 for _ in (out / "train.json").open()) == int(words[words.index("--train") + 1])
    elif words[:3] == ["python", "-m", "training.run"]:
        run = work / words[words.index("--output_dir") + 1]
        ckpt = run / f"checkpoint-{words[words.index('--max_steps') + 1]}"
        assert (ckpt / "ptuning_manifest.json").is_file() and (run / "trainer_state.json").is_file(), list(run.iterdir())
    elif "python" in words and "chatglm" in words:
        if words[0] == "echo":  # one query from a pipe: one answer
            assert stdout.strip(), "python -m chatglm printed no answer"


@pytest.fixture
def standins(fixture_dir, tmp_path):
    output = tmp_path / "models" / "ptuning" / "output"
    shutil.copytree(fixture_dir / "ptuning-pre8", output / THUDM_RUN)
    return {"/models/chatglm2-6b": str(fixture_dir / "model"), "/models/ptuning/output": str(output)}


def test_every_readme_block_runs(standins, tmp_path):
    if not (REPO_ROOT / "checkpoints" / "demo-base" / "config.json").is_file():
        pytest.fail("checkpoints/demo-base is missing: the README's demo needs it (scripts/build_demo.py)")
    work = tmp_path / "work"
    work.mkdir()
    (work / "checkpoints").symlink_to(REPO_ROOT / "checkpoints")
    blocks = fenced_blocks()
    assert [lang for lang, _ in blocks if lang not in ("bash", "python")] == [], "untested block language"
    with ExitStack() as stack:
        reader = Reader(work, standins, stack)
        for lang, code in blocks:
            started = time.monotonic()
            reader.bash(code) if lang == "bash" else reader.python(code)
            print(f"{time.monotonic() - started:6.1f} s  {code.splitlines()[0][:90]}")  # shown with -s / on failure
    assert reader.ran[0] == "make serve" and len(reader.ran) >= 20, reader.ran


def make_dry_run(*args):
    """`make -n` as a user types it: no "Entering directory" lines even when pytest itself runs under make."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    cmd = ["make", "--no-print-directory", "-n", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env).stdout


def test_make_recipes():
    recipe = make_dry_run("-B", "serve")
    lines = recipe.splitlines()
    assert any(re.search(r'pip install -q "torch==2\.13\.0"\s*$', line) for line in lines), recipe
    assert lines[-1] == ".venv/bin/python -m server", recipe
    cpu = make_dry_run("-B", "serve", "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert 'pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu' in cpu, cpu
    test = make_dry_run("test")
    assert test.splitlines()[-1] == ".venv/bin/python -m pytest", test
    assert (REPO_ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "make test"
    text = DOCKERFILE.read_text()  # the README's Docker prose
    assert "FROM ${BASE}" in text and "ARG BASE=python:3.11-slim" in text and "ARG TORCH=torch==2.13.0" in text
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text and 'pip install ".${EXTRAS}"' in text


def help_text(*module: str) -> str:
    out = subprocess.run([sys.executable, *module, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=180, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_inline_commands_and_flags_exist():
    """`code` spans in the prose: each flag is in the help of the command it belongs to, each command is one of
    those checked here or by the tests above."""
    prose = FENCE.sub("", README.read_text(encoding="utf-8"))
    spans = re.findall(r"`([^`\n]+)`", prose)
    helps = {"server": help_text("-m", "server"), "training.run": help_text("-m", "training.run"),
             "chatglm": help_text("-m", "chatglm")}
    cmd = dockerfile()[0]["CMD"]
    known = {
        "make serve": None, "make test": None, "python -m pytest": None,  # test_make_recipes
        "make serve TORCH_INDEX=https://download.pytorch.org/whl/cpu": None,  # test_make_recipes
        "pip install .": None, "python -m server --host 0.0.0.0": None,  # the Dockerfile: test_make_recipes, below
        "python -m server": None,  # the blocks start it, with and without flags
        "python -m server --help": None, "python -m training.run --help": None,  # helps above
        "pip install openai": None,  # the SDK block ran with it
        "python scripts/build_demo.py": lambda: "Rebuild the bundled demo model" in help_text("scripts/build_demo.py"),
        "python scripts/web_screenshot.py": lambda: "docs/web-chat.png" in help_text("scripts/web_screenshot.py"),
    }
    assert " ".join(cmd) == "python -m server --host 0.0.0.0"
    for span in spans:
        words = span.split()
        if span.startswith("--"):
            flag = words[0].split("=")[0]
            owners = [name for name, text in helps.items() if re.search(rf"{re.escape(flag)}\b", text)]
            assert owners, f"README mentions {span}, which no command's --help lists"
        elif words[0] in ("python", "make", "pip", "docker", "curl", "torchrun"):
            assert span in known, f"inline command `{span}` has no check in tests/test_readme.py"
            if known[span] is not None:
                assert known[span](), span
        elif span.startswith("CHATGLM_"):
            assert span == "CHATGLM_<OPTION>" and "CHATGLM_<OPTION>" in helps["server"].replace("\n", "")
    assert any(s.startswith("--quantize") for s in spans) and any(s.startswith("python") for s in spans)


def test_readme_images_exist():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text(encoding="utf-8"))
    assert images, "the README shows the chat page"
    for image in images:
        path = REPO_ROOT / image
        assert path.is_file() and path.stat().st_size < 400_000, f"{image}: missing or over 400 kB"
