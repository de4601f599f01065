"""The web page of `irkit serve`, driven in Debian's Chromium through Playwright (no downloaded browser).

Starts a live server subprocess on a free loopback port over a tiny model's store, uploads a query,
draws a crop box, toggles re-ranking and opens a match explanation; saves a screenshot to
tests/artifacts/serve_browser.png. Skips when /usr/bin/chromium or playwright is missing.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
HERE = Path(__file__).resolve().parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


def _requirements() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's browser with `apt-get install -y chromium`")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright for Python is not installed: `pip install playwright` "
                    "(do not run `playwright install`; the test uses /usr/bin/chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(tmp_path):
    _requirements()
    sys.path.insert(0, str(HERE))
    import serve_tiny

    store = serve_tiny.build_store(tmp_path, n=10)
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(HERE / "serve_tiny.py"), "serve", "--store", str(store),
                             "--host", "127.0.0.1", "--port", str(port), "--token", "browser-token"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("server did not start:\n" + (tmp_path / "server.log").read_text())
            time.sleep(0.2)
        yield url, tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_search_page_end_to_end(live_server):
    from playwright.sync_api import expect, sync_playwright

    url, tmp = live_server
    query = tmp / "images" / "img004.png"
    artifacts = HERE / "artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp / "profile"), executable_path=CHROMIUM,
                                                    headless=True, args=FLAGS,
                                                    viewport={"width": 1200, "height": 800})
        try:
            page = ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            expect(page.locator("#stats")).to_contain_text("10 images", timeout=15000)
            # upload -> automatic search -> ranked grid with scores and thumbnails
            page.set_input_files("#file", str(query))
            expect(page.locator("#results li")).to_have_count(10, timeout=20000)
            first_thumb = page.locator("#results li img").first
            expect(first_thumb).to_have_attribute("src", "/images/img004/thumbnail")
            page.wait_for_function("() => document.querySelector('#results li img').naturalWidth > 0")
            assert page.locator("#results li .score").first.inner_text().strip()
            # draw a crop box on the query
            box = page.locator("#overlay").bounding_box()
            page.mouse.move(box["x"] + 5, box["y"] + 5)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.7, steps=5)
            page.mouse.up()
            expect(page.locator("#box-info")).to_contain_text("crop box")
            # toggle re-ranking: the grid is re-ranked
            page.check("#rerank")
            expect(page.locator("#summary")).to_have_attribute("data-reranked", "true", timeout=20000)
            expect(page.locator("#summary")).to_contain_text("re-ranked")
            # open an explanation of the top result
            page.locator("#results li").first.click()
            expect(page.locator("#modal")).to_be_visible()
            expect(page.locator("#explain-image")).to_be_visible(timeout=20000)
            page.wait_for_function("() => document.querySelector('#explain-image').naturalWidth > 0")
            shot = artifacts / "serve_browser.png"
            page.screenshot(path=str(shot), full_page=True)
            shutil.copy(shot, tmp / "serve_browser.png")
            assert shot.stat().st_size > 5000
            assert not errors, errors
        finally:
            ctx.close()
