"""Make the README's picture of the status page: `vllm-chill serve --backend sim` on two
simulated GPUs, two models loaded and a third loading in its place, in headless Chromium.

    python scripts/status_page_screenshot.py docs/images/status-page.png

Needs Playwright (`pip install playwright`) and Debian's `chromium`; nothing is downloaded.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parent.parent


def main(out: str) -> None:
    chromium = shutil.which("chromium") or sys.exit("no chromium on PATH")
    command = [
        *(sys.executable, "-m", "vllm_chill", "serve", "--backend", "sim"),
        *("--models", str(REPO / "manifests" / "examples"), "--host", "127.0.0.1"),
        *("--port", "0", "--gpus", "0,1", "--sim-load-time", "2s", "--log-level", "info"),
    ]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        for line in server.stderr:
            match = re.search(r"Uvicorn running on (http://\S+)", line)
            if match:
                base = match.group(1)
                break
        else:
            sys.exit("the server did not start")
        admin = httpx.Client(base_url=base, timeout=10)
        for model in ("deepseek-r1-fp8", "llama-3.1-8b-instruct"):
            admin.post("/proxy/models/switch", json={"model": model})
            while admin.get(f"/v1/models/{model}").json()["state"] != "loaded":
                time.sleep(0.1)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 640})
            page.goto(base + "/proxy/ui")
            page.wait_for_selector('#connection[data-state="live"]')
            # A request for the third model: the least recently used one gives way.
            admin.post("/v1/chat/completions", json={"model": "qwen3-coder-30b-fp8"})
            page.wait_for_selector(
                '#models tr[data-model="qwen3-coder-30b-fp8"][data-state="loading"]'
            )
            time.sleep(1.2)
            page.screenshot(path=out, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "status-page.png")
