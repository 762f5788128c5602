"""The built book works in a real browser, offline.

Opens every chapter of the built HTML (`book/_build/html`, made by
`python tools/vendor_assets.py && jupyter-book build . -W --path-output book`) in headless
Chromium and checks that the page renders, its figures load, its math is typeset by the vendored
MathJax, its stored widgets appear, and that no request leaves the machine.

Needs Debian's `chromium` (`apt-get install -y chromium`) and Playwright's Python package
(`pip install playwright`; no `playwright install`: we drive the system browser). The book is
built first (`tools/build_book.sh`, warnings as errors) when it is missing or older than its
sources. `SDLAB_BOOK_SCREENSHOTS=dir` saves a screenshot of each page.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "book" / "_build" / "html"
CHROMIUM = os.environ.get("SDLAB_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chapters() -> list[str]:
    """The pages of the book, in the order of `_toc.yml`."""
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for entry in toc.get("chapters", []):
        files.append(entry["file"])
    for part in toc.get("parts", []):
        files += [entry["file"] for entry in part.get("chapters", [])]
    return [str(Path(f).with_suffix("")) for f in files]


def _sources() -> list[Path]:
    return [ROOT / "_config.yml", ROOT / "_toc.yml", *ROOT.glob("book/*.ipynb"), *ROOT.glob("book/_static/*"),
            *ROOT.glob("book/_ext/*.py"), *ROOT.glob("sdlab/*.py")]


@pytest.fixture(scope="module")
def built_book() -> Path:
    """The HTML book, built now (`jupyter-book build -W`, vendored JavaScript) unless it is up to date."""
    index = HTML / "index.html"
    if not index.exists() or max(p.stat().st_mtime for p in _sources()) > index.stat().st_mtime:
        done = subprocess.run(["bash", str(ROOT / "tools" / "build_book.sh")], capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"the book did not build:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert index.exists()
    return HTML


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def server(built_book):
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api

    assert Path(CHROMIUM).exists() or shutil.which(CHROMIUM), f"no browser at {CHROMIUM}: apt-get install -y chromium"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.mark.parametrize("chapter", chapters())
def test_chapter_renders_offline(browser, server, chapter):
    page_path = HTML / f"{chapter}.html"
    assert page_path.exists(), f"{chapter} is in _toc.yml but was not built"
    html = page_path.read_text()

    outside, failed, errors = [], [], []
    page = browser.new_page(viewport={"width": 1280, "height": 900})

    def route(r):
        host = urlparse(r.request.url).hostname
        if r.request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    response = page.goto(f"{server}/{chapter}.html", wait_until="load")
    assert response is not None and response.ok, f"{chapter}: HTTP {response and response.status}"

    # it renders: a title and the chapter's text
    assert page.locator("main h1").count() >= 1, f"{chapter}: no title"
    assert len(page.locator("main").inner_text()) > 500, f"{chapter}: almost no text"

    # its figures load (every <img> decoded with a size)
    images = page.locator("main img")
    page.wait_for_function("() => [...document.querySelectorAll('main img')].every(i => i.complete)")
    broken = page.evaluate("() => [...document.querySelectorAll('main img')].filter(i => !i.naturalWidth).map(i => i.src)")
    assert not broken, f"{chapter}: images that did not load: {broken}"
    n_images = images.count()

    # math is typeset by MathJax (no raw TeX left, no TeX errors)
    n_math = page.locator("main .math").count()
    if n_math:
        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=20000)
        page.evaluate("() => MathJax.startup.promise")
        assert page.locator("main mjx-container").count() >= n_math, f"{chapter}: math was not typeset"
        assert page.locator("main mjx-merror").count() == 0, f"{chapter}: MathJax reported TeX errors"

    # stored widgets appear as live controls
    n_views = html.count("application/vnd.jupyter.widget-view+json")
    if n_views:
        page.wait_for_selector("main .jupyter-widgets", timeout=20000)
        assert page.locator("main .widget-slider, main .widget-dropdown, main .widget-toggle-buttons, "
                            "main .widget-radio, main .widget-play").count() >= 1, f"{chapter}: widgets did not render"

    if os.environ.get("SDLAB_BOOK_SCREENSHOTS"):
        out = Path(os.environ["SDLAB_BOOK_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out / f"{Path(chapter).name}.png"), full_page=False)
    page.close()

    assert not outside, f"{chapter}: requests left the machine: {sorted(set(outside))}"
    assert not [u for u in failed if "127.0.0.1" in u], f"{chapter}: local files failed to load: {failed}"
    assert not errors, f"{chapter}: JavaScript errors: {errors}"
    assert n_images or n_math, f"{chapter}: neither figures nor math"
