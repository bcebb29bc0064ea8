"""docs/web-chat.png: the chat page answering an attribute list with the demo adapter, on the bundled demo (`python -m server`
with no arguments). One turn: the demo model was trained on single-round prompts only, so a second turn (which carries the
first as history) is not something it answers well. Needs what the browser test needs (Debian chromium + chromium-driver, selenium) and a CJK font for the
text (Debian fonts-wqy-microhei). Run from the repository root: `python scripts/web_screenshot.py`."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.live_server import live_server  # noqa: E402
from tests.server.browser import start_chrome  # noqa: E402

PROMPTS = ("类型#裤*颜色#黑色*风格#休闲*裤长#九分裤",)


def set_value(chrome, element_id: str, value) -> None:
    chrome.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));",
                          element_id, str(value))


def ask(chrome, model: str, text: str) -> None:
    set_value(chrome, "model", model)
    chrome.find_element("id", "prompt").send_keys(text + "\n")
    deadline = time.monotonic() + 120
    time.sleep(0.3)
    while chrome.execute_script("return !!document.querySelector('.msg.assistant[data-state=streaming]')"):
        assert time.monotonic() < deadline, "no answer in 120 s"
        time.sleep(0.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "web-chat.png")
    p.add_argument("--model", default="demo-adgen", help="the model id to chat with (default demo-adgen)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, live_server(["--torch-threads", "1"], Path(tmp) / "server.log") as s:
        chrome = start_chrome(Path(tmp) / "profile")
        try:
            chrome.set_window_size(1100, 760)
            chrome.get(s.url + "/")
            deadline = time.monotonic() + 60
            while chrome.execute_script("return document.getElementById('model').options.length") < 2:
                assert time.monotonic() < deadline, "the model list did not load"
                time.sleep(0.2)
            set_value(chrome, "temperature", 0)
            set_value(chrome, "max_tokens", 96)
            for prompt in PROMPTS:
                ask(chrome, a.model, prompt)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            chrome.save_screenshot(str(a.out))
        finally:
            chrome.quit()
    print(f"wrote {a.out} ({a.out.stat().st_size // 1024} kB)")


if __name__ == "__main__":
    main()
