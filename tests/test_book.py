"""The built book works in a real browser, offline, on a phone and on a desktop screen.

Opens every chapter of the built HTML (`book/_build/html`, made by `bash tools/build_book.sh`) in
headless Chromium at 1280 px and at 390 px (a phone), both from a local web server (127.0.0.1, an
ephemeral port) and straight from the files (`file://`, as a reader who opens `index.html` does),
and checks that

- the page renders: a title, its text, every figure decoded, its math typeset by the vendored
  MathJax without TeX errors; no widget view is stored for a page without a kernel (explorers show
  their static twins, `sdlab/explorer.py`), and every static explorer control moves its picture;
- nothing leaves the machine (no request to any other host; Chromium resolves no name at all),
  no local file is missing, and the console logs no error at all (JavaScript errors included);
- the page is never wider than the window, and nothing sticks out of the text column unless it
  scrolls inside its own box (display math, code, wide outputs); explorers' and players' controls
  are all within the column, with no scrolling needed to reach them;
- every image has at least 1.5 device pixels per displayed CSS pixel of width (natural width
  >= 1.5x displayed width), so figures are sharp on today's screens (vector images excepted, and
  small pictures the browser enlarges pixel for pixel, `image-rendering: pixelated`).

Each page is loaded once per (scheme, width); the three kinds of checks are separate tests that
share that visit. Two more: `index.html` opened from the disk lands on the first chapter, and every
chapter's launch buttons (Colab, Binder, JupyterHub once set) open its notebook at `repository.url`. Needs Debian's `chromium` (`apt-get install -y chromium`) and Playwright's Python
package (`pip install playwright`; no `playwright install`: we drive the system browser). The book
is built first (`tools/build_book.sh`, warnings as errors) when it is missing or older than its
sources (`SDLAB_BOOK_HTML=dir` tests a book built there instead, as it is).
`SDLAB_BOOK_SCREENSHOTS=dir` saves a screenshot of each visit.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
# SDLAB_BOOK_HTML=dir tests a book already built there, as it is (no rebuild)
PREBUILT = os.environ.get("SDLAB_BOOK_HTML")
HTML = Path(PREBUILT).resolve() if PREBUILT else ROOT / "book" / "_build" / "html"
CHROMIUM = os.environ.get("SDLAB_CHROMIUM", "/usr/bin/chromium")
# no name resolves (127.0.0.1 needs none): even a request the page tried would not leave the machine
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
VIEWPORTS = {"1280px": {"width": 1280, "height": 900}, "390px": {"width": 390, "height": 844}}
SCHEMES = ("http", "file")
SHARPNESS = 1.5  # natural width / displayed width, at least
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
SIDE_BY_SIDE = 3  # pages loading at once (the browser's processes share the machine's cores)


def _config() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "_config.yml").read_text())


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


def stored_notebook(page: str) -> dict:
    """The executed notebook of a page of `chapters()` (e.g. "book/05_samplers"), as JSON."""
    return json.loads((ROOT / f"{page}.ipynb").read_text())


BOOK_SOURCES = ("_config.yml", "_toc.yml", "book/*.ipynb", "book/course/*.ipynb", "book/_ext/*.py", "sdlab/**/*.py")


def build_unless_fresh(output: Path, script: str, extra_sources: tuple[str, ...], timeout: int) -> None:
    """Run `tools/<script>` unless `output` is newer than every source of the book (and `extra_sources`,
    globs from the repository's root)."""
    sources = [p for pattern in (*BOOK_SOURCES, *extra_sources) for p in ROOT.glob(pattern)]
    if output.exists() and max(p.stat().st_mtime for p in sources) <= output.stat().st_mtime:
        return
    done = subprocess.run(["bash", str(ROOT / "tools" / script)], env=_same_python(), check=False,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"tools/{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _same_python() -> dict:
    """The environment for the build script: this Python's `python` and `jupyter-book` first on PATH."""
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


@pytest.fixture(scope="module")
def built_book() -> Path:
    """The HTML book, built now (`jupyter-book build -W`, vendored JavaScript) unless it is up to date."""
    index = HTML / "index.html"
    if not PREBUILT:
        build_unless_fresh(index, "build_book.sh", ("book/_static/*",), timeout=1200)
    assert index.exists()
    return HTML


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def server(built_book):
    """The built book served on 127.0.0.1 at an ephemeral port, stopped after the module's tests."""
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api

    assert Path(CHROMIUM).exists() or shutil.which(CHROMIUM), f"no browser at {CHROMIUM}: apt-get install -y chromium"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


# What a visit measures once everything has rendered. "column" is the article's text column (its
# content box: the page's margins are not room for content).
MEASURE = """() => {
  const article = document.querySelector('article.bd-article');
  const outer = article.getBoundingClientRect(), style = getComputedStyle(article);
  const col = {left: outer.left + parseFloat(style.paddingLeft), right: outer.right - parseFloat(style.paddingRight)};
  const inColumn = r => r.left >= col.left - 1 && r.right <= col.right + 1;
  const label = el => {
    const heading = el.closest('section') && el.closest('section').querySelector('h1, h2, h3');
    const where = heading ? ` in "${heading.textContent.replace(/[#¶]/g, '').trim()}"` : '';
    const cls = typeof el.className === 'string' && el.className.trim() ? '.' + el.className.trim().split(/\\s+/).slice(0, 3).join('.') : '';
    return el.tagName.toLowerCase() + cls + where;
  };
  const box = r => `${Math.round(r.left)}..${Math.round(r.right)} px (column ${Math.round(col.left)}..${Math.round(col.right)})`;

  // what sticks out of the column without scrolling inside a box of its own that fits the column
  const sticksOut = [];
  for (const el of article.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height || inColumn(r) || el.closest('mjx-assistive-mml')) continue;
    let scroller = el.parentElement;
    while (scroller !== article && getComputedStyle(scroller).overflowX === 'visible') scroller = scroller.parentElement;
    const mode = getComputedStyle(scroller).overflowX;
    if (scroller !== article && (mode === 'auto' || mode === 'scroll') && inColumn(scroller.getBoundingClientRect())) continue;
    sticksOut.push(`${label(el)}: ${box(r)}` + (scroller !== article ? `, clipped by ${label(scroller)} (overflow ${mode})` : ''));
  }
  // every control of an explorer or of an animation player is in the column (no scrolling to reach it)
  const controls = article.querySelectorAll(
    '.sdlab-explorer input:not([type=hidden]), .sdlab-explorer select, .sdlab-explorer output:not([hidden]), ' +
    '.animation input, .animation button');
  const unreachable = [...controls].filter(c => { const r = c.getBoundingClientRect(); return r.width && !inColumn(r); })
    .map(c => `${label(c)}: ${box(c.getBoundingClientRect())}`);
  const images = [...article.querySelectorAll('img')].map(i => ({
    src: i.currentSrc || i.src, label: label(i), natural: i.naturalWidth, shown: i.getBoundingClientRect().width,
    pixelated: getComputedStyle(i).imageRendering === 'pixelated',
  }));
  return {
    scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
    titles: article.querySelectorAll('h1').length, text: article.innerText.length,
    math: article.querySelectorAll('.math').length, typeset: article.querySelectorAll('mjx-container').length,
    texErrors: article.querySelectorAll('mjx-merror').length,
    widgets: article.querySelectorAll('.jupyter-widgets').length, explorers: article.querySelectorAll('.sdlab-explorer').length,
    players: article.querySelectorAll('.animation').length,
    sticksOut: sticksOut.slice(0, 20), unreachable: unreachable.slice(0, 20), images,
  };
}"""

# everything the page will draw has been drawn: figures decoded, math typeset
SETTLED = """() => {
  const mathDone = !document.querySelector('.math') ||
    !!(window.MathJax && MathJax.startup && MathJax.startup.promise && MathJax.startup.promise.then);
  const imagesDone = [...document.querySelectorAll('img')].every(i => i.complete);
  return mathDone && imagesDone;
}"""


class _Visit:
    """One page load: started now, measured by `finish()` (several load side by side meanwhile)."""

    def __init__(self, context, url: str):
        self.outside, self.failed, self.errors = [], [], []
        self.page = page = context.new_page()
        page.on("request", self._on_request)
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url[:120]} ({r.failure})"))
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text[:300]}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.response = page.goto(url, wait_until="commit")

    def _on_request(self, request):
        parsed = urlparse(request.url)
        if parsed.scheme not in ("data", "blob", "file", "about") and parsed.hostname != "127.0.0.1":
            self.outside.append(request.url)

    def finish(self, shot: Path | None) -> dict:
        """Wait until the page has drawn everything, measure it, close it."""
        page = self.page
        try:
            page.wait_for_load_state("load", timeout=60000)
            page.wait_for_function(SETTLED, timeout=30000)
            if page.evaluate("() => !!document.querySelector('.math')"):
                page.evaluate("() => MathJax.startup.promise")
            page.wait_for_function("() => [...document.querySelectorAll('img')].every(i => i.complete)", timeout=20000)
            page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
            measured = page.evaluate(MEASURE)
            if shot is not None:
                page.screenshot(path=str(shot), full_page=False)
        finally:
            page.close()
        status = self.response.status if self.response is not None else None
        return {**measured, "status": status, "outside": sorted(set(self.outside)), "failed": self.failed, "errors": self.errors}


@pytest.fixture(scope="module")
def visit(browser, server):
    """`visit(chapter, scheme, viewport)`: the measurements of one page load, made once and shared by the tests.

    Pages load SIDE_BY_SIDE at a time, in the order the tests ask for them (CASES), each in the
    browser context of its (scheme, viewport): contexts share a cache, as a reader's tabs would.
    """
    cache: dict[tuple[str, str, str], dict] = {}
    contexts = {}
    shots = os.environ.get("SDLAB_BOOK_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
    order = [tuple(case.values) for case in CASES]

    def context_for(scheme: str, viewport: str):
        if (scheme, viewport) not in contexts:
            context = browser.new_context(viewport=VIEWPORTS[viewport])
            context.add_init_script("localStorage.clear()")  # every page starts as a first visit
            contexts[scheme, viewport] = context
        return contexts[scheme, viewport]

    def get(chapter: str, scheme: str, viewport: str) -> dict:
        key = (chapter, scheme, viewport)
        if key not in cache:
            later = order[order.index(key) + 1:] if key in order else []
            batch = [key, *[k for k in later if k not in cache][:SIDE_BY_SIDE - 1]]
            started = []
            for name, how, size in batch:
                path = HTML / f"{name}.html"
                assert path.exists(), f"{name} is in _toc.yml but was not built"
                url = f"{server}/{name}.html" if how == "http" else path.as_uri()
                started.append(((name, how, size), _Visit(context_for(how, size), url)))
            for (name, how, size), one in started:
                shot = Path(shots) / f"{Path(name).name}-{how}-{size}.png" if shots else None
                cache[name, how, size] = one.finish(shot)
        return cache[key]

    yield get
    for context in contexts.values():
        context.close()


CASES = [pytest.param(chapter, scheme, viewport, id=f"{Path(chapter).name}-{scheme}-{viewport}")
         for chapter in chapters() for scheme in SCHEMES for viewport in VIEWPORTS]


@pytest.mark.parametrize(("chapter", "scheme", "viewport"), CASES)
def test_page_works_offline(visit, chapter, scheme, viewport):
    seen = visit(chapter, scheme, viewport)
    where = f"{chapter} ({scheme}, {viewport})"
    if scheme == "http":
        assert seen["status"] == 200, f"{where}: HTTP {seen['status']}"
    assert seen["titles"] >= 1, f"{where}: no title"
    assert seen["text"] > 500, f"{where}: almost no text"
    broken = [image["src"][:120] for image in seen["images"] if not image["natural"]]
    assert not broken, f"{where}: images that did not load: {broken}"
    if seen["math"]:
        assert seen["typeset"] >= seen["math"], f"{where}: math was not typeset ({seen['typeset']} of {seen['math']})"
        assert seen["texErrors"] == 0, f"{where}: MathJax reported TeX errors"
    page = (HTML / f"{chapter}.html").read_text()
    assert WIDGET_VIEW not in page and not seen["widgets"], f"{where}: a widget view, dead without a kernel"
    assert seen["explorers"] == page.count('<div class="sdlab-explorer"'), f"{where}: an explorer did not render"
    assert seen["images"] or seen["math"], f"{where}: neither figures nor math"
    assert not seen["outside"], f"{where}: requests for other hosts: {seen['outside']}"
    assert not seen["failed"], f"{where}: requests that failed: {seen['failed']}"
    assert not seen["errors"], f"{where}: the console logged errors: {seen['errors']}"


@pytest.mark.parametrize(("chapter", "scheme", "viewport"), CASES)
def test_page_fits_its_viewport(visit, chapter, scheme, viewport):
    seen = visit(chapter, scheme, viewport)
    where = f"{chapter} ({scheme}, {viewport})"
    assert seen["scrollWidth"] <= seen["innerWidth"], \
        f"{where}: the page is {seen['scrollWidth']} px wide in a {seen['innerWidth']} px window"
    assert not seen["sticksOut"], f"{where}: outside the text column, and not in a scroll box:\n" + "\n".join(seen["sticksOut"])
    assert not seen["unreachable"], f"{where}: controls outside the text column:\n" + "\n".join(seen["unreachable"])


@pytest.mark.parametrize(("chapter", "scheme", "viewport"), CASES)
def test_images_are_sharp(visit, chapter, scheme, viewport):
    seen = visit(chapter, scheme, viewport)
    soft = []
    for image in seen["images"]:
        vector = image["src"].startswith("data:image/svg") or image["src"].endswith(".svg")
        if image["shown"] == 0 or vector or image["pixelated"] or image["natural"] >= SHARPNESS * image["shown"]:
            continue
        name = "" if image["src"].startswith("data:") else Path(urlparse(image["src"]).path).name[:16]
        soft.append(f"{image['label']}: {image['natural']} px shown {image['shown']:.0f} px wide "
                    f"({image['natural'] / image['shown']:.2f}x) {name}")
    assert not soft, f"{chapter} ({scheme}, {viewport}): images under {SHARPNESS}x their displayed width:\n" + "\n".join(soft)


def test_index_opens_the_book_from_a_file(browser, built_book):
    """`book/_build/html/index.html`, opened from the disk as the README says, lands on the introduction."""
    page = browser.new_page(viewport=VIEWPORTS["1280px"])
    try:
        page.goto((built_book / "index.html").as_uri(), wait_until="load")
        page.wait_for_url(f"**/{chapters()[0]}.html", timeout=10000)
        assert page.locator("article.bd-article h1").count() >= 1
    finally:
        page.close()


def test_launch_buttons_point_at_the_repository(built_book):
    """Every chapter offers Colab and Binder (and JupyterHub once its URL is set), all on `repository.url`."""
    config = _config()
    repo_url = config["repository"]["url"].rstrip("/")
    branch = config["repository"].get("branch", "main")
    owner_repo = urlparse(repo_url).path.strip("/")
    launch = config["launch_buttons"]
    hub = (launch.get("jupyterhub_url") or "").rstrip("/")
    for chapter in chapters():
        html = (built_book / f"{chapter}.html").read_text()
        notebook = f"{chapter}.ipynb"
        expected = {
            "Colab": f'{launch["colab_url"].rstrip("/")}/github/{owner_repo}/blob/{branch}/{notebook}',
            "Binder": f'{launch["binderhub_url"].rstrip("/")}/v2/gh/{owner_repo}/{branch}?urlpath=tree/{notebook}',
        }
        if hub:
            expected["JupyterHub"] = (f"{hub}/hub/user-redirect/git-pull?repo={quote(repo_url, safe='/')}"
                                      f"&urlpath=tree/{owner_repo.split('/')[-1]}/{notebook}&branch={branch}")
        for name, url in expected.items():
            assert f'href="{url}"' in html.replace("&amp;", "&"), f"{chapter}: no {name} launch button for {url}"


# Moves every control of every explorer on the page through all its values, in order, and says where
# the picture or the caption did not change (a control that moves without effect).
MOVE_EVERY_CONTROL = """() => {
  const dead = [];
  let moved = 0;
  document.querySelectorAll('.sdlab-explorer').forEach((root, e) => {
    const image = root.querySelector('img'), caption = root.querySelector('.sdlab-explorer-caption');
    root.querySelectorAll('[data-control]').forEach((input, k) => {
      if (input.type === 'hidden') return;
      const n = input.tagName === 'SELECT' ? input.options.length : Number(input.max) + 1;
      const start = input.value;
      if (!caption) dead.push(`explorer ${e}: no caption`);
      for (let j = 0; j < n; j++) {
        const before = image.src, previous = input.value;
        input.value = String(j);
        input.dispatchEvent(new Event('input'));
        moved++;
        const changed = image.src !== before;
        if (String(j) !== previous && !changed) dead.push(`explorer ${e} control ${k}: ${previous} -> ${j} left the picture`);
        if (String(j) === previous && changed) dead.push(`explorer ${e} control ${k}: the picture changed at ${j} unmoved`);
      }
      input.value = start;
      input.dispatchEvent(new Event('input'));
    });
  });
  return {dead, moved};
}"""


@pytest.mark.parametrize("chapter", chapters())
def test_static_explorers_follow_their_controls(browser, server, chapter):
    """In the page without a kernel, moving each explorer control to each of its values changes the
    picture (JavaScript over the stored frames): no control moves without effect."""
    page = browser.new_page(viewport=VIEWPORTS["390px"])
    try:
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{server}/{chapter}.html", wait_until="load")
        result = page.evaluate(MOVE_EVERY_CONTROL)
    finally:
        page.close()
    stored = sum("sdlab-explorer" in "".join(output.get("data", {}).get("text/html", ""))
                 for cell in stored_notebook(chapter)["cells"] for output in cell.get("outputs", []))
    assert not result["dead"] and not errors, f"{chapter}: {result['dead']} {errors}"
    assert (result["moved"] > 0) == (stored > 0), f"{chapter}: {stored} explorers stored, {result['moved']} moves made"
