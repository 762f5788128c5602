"""The course kit: the quizzes' answers are what sdlab computes, the slides work offline, and the
Instructors page says what the data say.

- Quizzes (`book/quizzes/NN_name.json`): every question names its right choice, and `ANSWERS`
  below computes that answer with sdlab (a model built on the meta device, the tokenizer, the
  schedule, the bundled tiny model, the stored benchmark), so a quiz can never state a wrong one.
- Slides (`tools/build_slides.py`): built into a temporary folder laid out as the HTML book (its
  `_static` beside `slides/`); every script, style sheet, font and picture they load is local and
  present, and in headless Chromium (tests/test_book.py's browser: no host name resolves) each
  deck starts reveal.js, typesets its math, decodes its figures and logs no error.
- The Instructors page (`tools/chapters/instructors.py` -> `book/course/instructors.ipynb`): the
  stored notebook is what its source builds, its prose has no typed number, its glued numbers and
  its syllabus table are recomputed here from `tools/chapter_times.json` and the chapters, and it
  shows every quiz question as the data file has it now.
"""

from __future__ import annotations

import ast
import json
import re
import string
import sys
from html import escape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import build_notebooks  # noqa: E402
import build_slides  # noqa: E402
import lint_chapters  # noqa: E402
from test_book import browser  # noqa: E402,F401  (the fixture: Debian's chromium driven by Playwright)

from sdlab import attention, config, lora, model_loader, pipeline, samplers, tokenizer  # noqa: E402
from sdlab.diffusion import get_time_embedding  # noqa: E402
from sdlab.tiny import finetune  # noqa: E402

QUIZZES = ROOT / "book" / "quizzes"
PAGE = ROOT / "book" / "course" / "instructors.ipynb"
CHAPTERS = sorted(p.stem for p in (ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
REBUILD_PAGE = "rebuild the page: python tools/build_notebooks.py instructors"


def quiz(name: str) -> list[dict]:
    return json.loads((QUIZZES / f"{name}.json").read_text())["questions"]


QUESTIONS = [(name, q["id"]) for name in CHAPTERS if (QUIZZES / f"{name}.json").exists() for q in quiz(name)]


# ---- the right answers, computed ---------------------------------------------------------------

def _meta_parameters(preset) -> dict[str, int]:
    with torch.device("meta"):
        models = model_loader.build_models(preset)
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    return {"clip": counts["clip"], "vae": counts["encoder"] + counts["decoder"], "unet": counts["diffusion"]}


def _meta_clip():
    with torch.device("meta"):
        return model_loader.build_models(config.SD15)["clip"]


def _latent_shape(size: int) -> tuple[int, ...]:
    with torch.device("meta"):
        encoder = model_loader.build_models(config.SD15)["encoder"]
        image = torch.empty(1, 3, size, size)
        side = size // config.SD15.vae.downscale  # the encoder checks it: a wrong noise shape does not broadcast
        noise = torch.empty(1, config.SD15.vae.latent_channels, side, side)
        return tuple(encoder(image, noise).shape[1:])


def _attention_weights(length: int) -> torch.Tensor:
    q, k = torch.randn(1, 1, length, 16), torch.randn(1, 1, length, 16)
    return attention.attention_probabilities(q, k, causal=True)[0, 0]


def _tiny():
    return model_loader.preload_models_from_standard_weights(None, "cpu")


def _unet_batches(**generate) -> list[int]:
    """The batch size of every U-Net call while the tiny model generates one image."""
    models, batches = _tiny(), []
    hook = models["diffusion"].register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        pipeline.generate("a small red circle", models=models, seed=0, progress=False, **generate)
    finally:
        hook.remove()
    return batches


def _lora_numbers(rank: int, d_in: int, d_out: int) -> int:
    """The numbers a `lora.Adapter` of rank `rank` holds for a `d_in` -> `d_out` layer (A and B)."""
    layer = torch.nn.Linear(d_in, d_out)
    target = lora.Target("diffusion", "layer", None)
    adapter = lora.Adapter(target, torch.zeros(rank, layer.in_features), torch.zeros(layer.out_features, rank), 1.0)
    assert adapter.delta(layer.weight.shape).shape == layer.weight.shape
    return adapter.down.numel() + adapter.up.numel()


def _kohya_scalar_key() -> str:
    """The suffix of the one scalar per layer in the kohya file `lora.lora_state_dict` writes."""
    models = _tiny()
    adapters = finetune.attention_adapters(models, rank=2, alpha=2.0)
    state = lora.lora_state_dict(models, adapters)
    (suffix,) = {key.split(".", 1)[1] for key, value in state.items() if value.ndim == 0}
    return suffix


def _bench(component: str, impl: str) -> float:
    from sdlab import bench

    return bench.find_row(bench.stored_run(), impl, component or None)["seconds"]


def _ordinal(index: int) -> str:
    return ["the first", "the second", "the third", "the fourth (the lowest resolution)"][index]


def _sampler(name: str, steps: int):
    sampler = samplers.make_sampler(name, torch.Generator().manual_seed(0))
    sampler.set_inference_timesteps(steps)
    return sampler


NETWORK_NAMES = {"clip": "the CLIP text encoder", "unet": "the U-Net", "vae": "the VAE (encoder and decoder)"}

ANSWERS = {
    ("00_introduction", "latent-downscale"): lambda p: str(512 // _latent_shape(512)[-1]),
    ("00_introduction", "largest-network"): lambda p: NETWORK_NAMES[max(_meta_parameters(config.SD15).items(), key=lambda kv: kv[1])[0]],
    ("00_introduction", "latent-channels"): lambda p: str(_latent_shape(512)[0]),
    ("01_attention", "row-sum"): lambda p: f"{_attention_weights(8).sum(-1).mean().item():.0f}",
    ("01_attention", "causal-keys"): lambda p: str(int((_attention_weights(p["length"])[p["position"]] > 0).sum())),
    ("01_attention", "unet-head-width"): lambda p: str(config.SD15.unet.channels[0] // config.SD15.unet.n_head),
    ("02_clip", "positions"): lambda p: str(_meta_clip().embedding.position_embedding.shape[0]),
    ("02_clip", "prompt-tokens"): lambda p: str(len(tokenizer.load_tokenizer()(p["prompt"])["input_ids"])),
    ("02_clip", "width"): lambda p: str(_meta_clip()(torch.zeros(1, 77, dtype=torch.long, device="meta")).shape[-1]),
    ("03_vae", "latent-shape"): lambda p: "×".join(map(str, _latent_shape(p["size"]))),
    ("03_vae", "compression"): lambda p: str(p["size"] ** 2 * 3 // torch.Size(_latent_shape(p["size"])).numel()),
    ("03_vae", "scale-factor"): lambda p: str(config.SD15.vae.scale_factor),
    ("04_unet", "time-width"): lambda p: str(get_time_embedding(torch.tensor([500])).shape[-1]),
    ("04_unet", "no-attention"): lambda p: _ordinal(list(config.SD15.unet.attention_levels).index(False)),
    ("04_unet", "unet-share"): lambda p: f"{_meta_parameters(config.SD15)['unet'] / sum(_meta_parameters(config.SD15).values()):.0%}",
    ("05_samplers", "alpha-bar-last"): lambda p: f"{_sampler('ddim', 50).alphas_cumprod[p['t']].item():.4f}",
    ("05_samplers", "leading-first"): lambda p: str(int(_sampler("ddim", p["steps"]).timesteps[0])),
    ("05_samplers", "sigma-max"): lambda p: f"{_sampler('euler', 20).init_noise_sigma:.1f}",
    ("06_pipeline", "cfg-batch"): lambda p: str(set(_unet_batches(cfg_scale=p["cfg"], sampler_name="ddim", n_inference_steps=2)).pop()),
    ("06_pipeline", "cfg-one"): lambda p: str(set(_unet_batches(cfg_scale=1.0, sampler_name="ddim", n_inference_steps=2)).pop()),
    ("06_pipeline", "img2img-steps"): lambda p: str(len(_unet_batches(
        input_image=torch.rand(64, 64, 3).numpy(), strength=p["strength"], sampler_name="ddim", n_inference_steps=p["steps"]))),
    ("07_train", "tiny-parameters"): lambda p: f"{sum(v.numel() for m in _tiny().values() for v in m.parameters()) / 1e6:.1f} M",
    ("07_train", "tiny-size"): lambda p: "{0.height}×{0.width}".format(_tiny()["diffusion"].sampling),
    ("07_train", "tiny-sampler"): lambda p: _tiny()["diffusion"].sampling.sampler,
    ("08_speed", "bf16-step"): lambda p: f"{_bench('U-Net step', 'sdlab') / _bench('U-Net step', 'sdlab bf16'):.1f}×",
    ("08_speed", "faster-image"): lambda p: "sdlab" if _bench("", "sdlab") < _bench("", "diffusers") else "diffusers",
    ("08_speed", "default-backend"): lambda p: attention.current_backend()[0],
    ("09_finetune", "ti-numbers"): lambda p: f"{_meta_clip().embedding.token_embedding.embedding_dim:,}",
    ("09_finetune", "lora-numbers"): lambda p: f"{_lora_numbers(p['rank'], p['d_in'], p['d_out']):,}",
    ("09_finetune", "kohya-scale"): lambda p: _kohya_scalar_key(),
}


def test_every_chapter_has_a_quiz_and_every_question_a_computed_answer():
    assert sorted(p.stem for p in QUIZZES.glob("*.json")) == CHAPTERS
    assert set(QUESTIONS) == set(ANSWERS), "each quiz question needs its computation in ANSWERS, and only those"


@pytest.mark.parametrize("name", CHAPTERS)
def test_quiz_is_well_formed(name):
    data = json.loads((QUIZZES / f"{name}.json").read_text())
    assert data["chapter"] == name
    ids = [q["id"] for q in data["questions"]]
    assert len(ids) == len(set(ids)) >= 3
    for q in data["questions"]:
        fields = {f for _, f, _, _ in string.Formatter().parse(q["question"]) if f}
        assert fields == set(q.get("params", {})), f"{name}/{q['id']}: placeholders and params differ"
        assert len(q["choices"]) == len(set(q["choices"])) >= 2, f"{name}/{q['id']}: choices must differ"
        assert 0 <= q["answer"] < len(q["choices"])
        # an explanation states no number (the book's rule for prose): only the computed choice does
        assert not lint_chapters.prose_numbers(q["explanation"]), f"{name}/{q['id']}: a number in the explanation"


@pytest.mark.parametrize(("name", "question"), QUESTIONS, ids=[f"{n}-{q}" for n, q in QUESTIONS])
def test_quiz_answer_is_what_sdlab_computes(name, question):
    (q,) = [q for q in quiz(name) if q["id"] == question]
    computed = ANSWERS[name, question](q.get("params", {}))
    assert computed in q["choices"], f"{name}/{question}: sdlab computes {computed!r}, which is none of {q['choices']}"
    assert q["choices"][q["answer"]] == computed, \
        f"{name}/{question}: the quiz says {q['choices'][q['answer']]!r}, sdlab computes {computed!r}"


# ---- slides ------------------------------------------------------------------------------------

class _Resources(HTMLParser):
    """Every URL a page loads (scripts, style sheets, pictures, frames), and its inline CSS."""

    def __init__(self):
        super().__init__()
        self.urls, self.css, self._in_style = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "video", "audio", "embed") and attrs.get("src"):
            self.urls.append(attrs["src"])
        if tag == "link" and attrs.get("href"):
            self.urls.append(attrs["href"])
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.css.append(data)


def _css_urls(css: str) -> list[str]:
    css = re.sub(r"(?s)/\*.*?\*/", "", css)
    return [u.strip("'\" ") for u in re.findall(r"url\(([^)]*)\)", css)] + re.findall(r"@import\s+['\"]([^'\"]+)", css)


def _require_paths(html: str) -> list[str]:
    return re.findall(r'"([^"]+\.js)"', "".join(re.findall(r"(?s)require\(\s*\{.*?\]", html)))


@pytest.fixture(scope="module")
def decks(tmp_path_factory) -> list[Path]:
    """The decks, built now into a folder laid out as the HTML book (`_static` beside `slides/`)."""
    book = tmp_path_factory.mktemp("book-html")
    (book / "_static").symlink_to(ROOT / "book" / "_static")
    if not (ROOT / "book" / "_static" / "vendor" / "reveal.js" / "dist" / "reveal.js").exists():
        import vendor_assets  # as tools/build_book.sh does first (npm), when test_book.py has not yet

        assert vendor_assets.main() == 0, "could not vendor reveal.js: python tools/vendor_assets.py"
    return build_slides.build(book / "slides")


def test_a_deck_per_chapter(decks):
    assert [d.name for d in decks] == [f"{name}.slides.html" for name in CHAPTERS]


def test_decks_load_nothing_from_the_network(decks):
    for deck in decks:
        html = deck.read_text()
        parser = _Resources()
        parser.feed(html)
        urls = parser.urls + [u for css in parser.css for u in _css_urls(css)] + _require_paths(html)
        assert any("reveal.js" in u for u in urls) and any("mathjax" in u for u in urls)
        for url in urls:
            if url.startswith("data:"):
                continue
            assert not urlparse(url).scheme and not url.startswith("//"), f"{deck.name} loads {url} from the network"
            target = (deck.parent / url.split("?")[0].split("#")[0]).resolve()
            assert target.is_file(), f"{deck.name} loads {url}, which is not in the built book"
        # and what the vendored style sheets import is local too
        for sheet in [u for u in urls if u.endswith(".css")]:
            for inner in _css_urls((deck.parent / sheet).resolve().read_text()):
                assert inner.startswith("data:") or not urlparse(inner).scheme, f"{sheet} imports {inner}"
                assert inner.startswith("data:") or ((deck.parent / sheet).resolve().parent / inner).resolve().is_file()


@pytest.mark.parametrize("name", CHAPTERS)
def test_deck_follows_the_chapter_rule(name):
    nb = nbformat.read(ROOT / "book" / f"{name}.ipynb", as_version=4)
    deck = build_slides.slide_notebook(nb)
    kinds = [c.metadata["slideshow"]["slide_type"] for c in deck.cells]
    sections = [c for c in nb.cells if c.cell_type == "markdown" and re.match(r"^## ", c.source)]
    figures = [c for c in nb.cells if c.cell_type == "code"
               and any(m in o.get("data", {}) for o in c.outputs for m in build_slides.PICTURES)]
    title = re.search(r"^# (.+)$", nb.cells[0].source, re.M)[1]
    assert deck.cells[0].source.startswith(f"# {title}") and kinds[0] == "slide"
    if "**You will learn**" in nb.cells[0].source:
        assert "**You will learn**" in deck.cells[0].source
    assert kinds.count("slide") == 1 + len(sections)  # the title and one per section (no chapter tags `slide` yet)
    shown = [c for c in deck.cells if c.cell_type == "code" and c.outputs and "remove-input" in c.metadata.get("tags", [])]
    assert len(shown) >= len(figures)
    text = "\n".join(c.source for c in deck.cells)
    assert "{glue" not in text and ":::" not in text, f"{name}: MyST left in the slides"


def test_a_cell_tagged_slide_is_shown_whole():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# 9. Title\n\nFirst.\n\nSecond."),
        nbformat.v4.new_markdown_cell("A paragraph that the rule alone drops.", metadata={"tags": ["slide"]}),
        nbformat.v4.new_markdown_cell("## A section\n\nIts first paragraph.\n\nIts second.\n\n$$a = b$$\n\n$$c$$"),
        nbformat.v4.new_code_cell("x = 1\nx", outputs=[nbformat.v4.new_output("execute_result", data={"text/plain": "1"},
                                                                               execution_count=1)]),
    ])
    deck = build_slides.slide_notebook(nb)
    assert [c.source for c in deck.cells[:3]] == [
        "# 9. Title\n\nFirst.", "A paragraph that the rule alone drops.", "## A section\n\nIts first paragraph.\n\n$$a = b$$"]
    assert [c.metadata["slideshow"]["slide_type"] for c in deck.cells] == ["slide", "slide", "slide", "fragment"]


def _show(context, deck: Path) -> dict:
    """Open `deck`, wait for reveal.js and MathJax, and say what it drew, asked for and logged."""
    page, outside, errors = context.new_page(), [], []
    page.on("request", lambda r: outside.append(r.url) if urlparse(r.url).scheme not in ("file", "data", "about") else None)
    page.on("requestfailed", lambda r: errors.append(f"failed: {r.url[:120]}"))
    page.on("console", lambda m: errors.append(m.text[:200]) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    try:
        page.goto(deck.as_uri(), wait_until="load")
        page.wait_for_function("() => document.querySelector('.reveal.ready') !== null && !!window.Reveal", timeout=30000)
        page.wait_for_function("() => !document.querySelector('.reveal .slides').innerText.includes('$$') || "
                               "document.querySelectorAll('mjx-container').length > 0", timeout=30000)
        seen = page.evaluate("""() => ({
            slides: Reveal.getTotalSlides(), texErrors: document.querySelectorAll('mjx-merror').length,
            images: [...document.querySelectorAll('img')].map(i => i.complete && i.naturalWidth > 0)})""")
    finally:
        page.close()
    return {**seen, "outside": outside, "errors": errors}


def test_decks_work_offline_in_a_browser(decks, browser):  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        for deck in decks:
            seen = _show(context, deck)
            assert seen["slides"] >= 2, f"{deck.name}: reveal.js found {seen['slides']} slides"
            assert seen["texErrors"] == 0 and all(seen["images"]), f"{deck.name}: {seen}"
            assert not seen["outside"] and not seen["errors"], f"{deck.name}: requests {seen['outside']}, errors {seen['errors']}"
    finally:
        context.close()


# ---- the Instructors page ----------------------------------------------------------------------

def stored_page() -> nbformat.NotebookNode:
    return nbformat.read(PAGE, as_version=4)


def glued(nb) -> dict:
    """name -> the value the page glued (the repr of a number or a string)."""
    return {name: ast.literal_eval(text) for name, text in build_slides.glued_values(nb).items()}


def test_page_is_built_from_its_source():
    fresh, old = build_notebooks.chapter("instructors"), stored_page()
    assert [c.cell_type for c in old.cells] == [c.cell_type for c in fresh.cells], REBUILD_PAGE
    for i, (new, kept) in enumerate(zip(fresh.cells, old.cells)):
        assert kept.source == new.source, f"instructors cell {i} differs from tools/chapters/instructors.py: {REBUILD_PAGE}"
        assert kept.metadata.get("tags", []) == new.metadata.get("tags", [])
    assert not [c for c in old.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


def test_page_prose_has_no_typed_number_and_its_code_lints():
    done = lint_chapters.lint(["instructors"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_page_numbers_come_from_the_data():
    times = json.loads((ROOT / "tools" / "chapter_times.json").read_text())
    nbs = {name: nbformat.read(ROOT / "book" / f"{name}.ipynb", as_version=4) for name in CHAPTERS}
    minutes = {name: max(1, round(build_notebooks.reading_words(nb) / build_notebooks.WORDS_PER_MINUTE)) for name, nb in nbs.items()}
    values = glued(stored_page())
    expected = {
        "n_chapters": len(CHAPTERS), "n_weeks": len(CHAPTERS) + 1, "words_per_minute": build_notebooks.WORDS_PER_MINUTE,
        "reading_minutes": sum(minutes.values()), "run_minutes": sum(times[n]["seconds"] for n in CHAPTERS) / 60,
        "cpus": times[CHAPTERS[0]]["cpus"], "n_questions": len(QUESTIONS),
        "n_slides": sum(c.metadata["slideshow"]["slide_type"] in ("slide", "subslide")
                        for nb in nbs.values() for c in build_slides.slide_notebook(nb).cells),
        "longest_seconds": max(times[n]["seconds"] for n in CHAPTERS),
    }
    for name, value in expected.items():
        assert values[name] == pytest.approx(value), f"the page glued {name} = {values[name]}, the data say {value}: {REBUILD_PAGE}"
    # the syllabus table: one row per chapter, in order, with its measured numbers
    (table,) = [o.data["text/markdown"] for c in stored_page().cells if c.cell_type == "code" for o in c.outputs
                if "text/markdown" in o.get("data", {}) and o.data["text/markdown"].startswith("| week")]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    for week, (name, row) in enumerate(zip(CHAPTERS, rows), start=1):
        title = re.search(r"^# (.+)$", nbs[name].cells[0].source, re.M)[1].strip()
        assert [c.strip() for c in row[:5]] == [str(week), title, f"{minutes[name]} min", f"{times[name]['seconds']} s",
                                                row[4].strip()], f"week {week}: {row}; {REBUILD_PAGE}"
        assert row[6].strip() == str(len(quiz(name)))
    assert rows[-1][0].strip() == str(len(CHAPTERS) + 1) and "Project" in rows[-1][1]


def test_page_shows_every_quiz_as_its_data_file_has_it():
    outputs = "\n".join(o.data["text/html"] for c in stored_page().cells if c.cell_type == "code"
                        for o in c.outputs if "text/html" in o.get("data", {}))
    for name in CHAPTERS:
        assert f'id="sdlab-quiz-{name}"' in outputs, f"no quiz for {name} on the page: {REBUILD_PAGE}"
        for q in quiz(name):
            text = re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(q["question"].format(**q.get("params", {}))))
            assert f"{text}</legend>" in outputs, f"{name}/{q['id']}: the page shows another question: {REBUILD_PAGE}"
            assert json.dumps({"answer": q["answer"], "explanation": q["explanation"]}).replace("</", "<\\/") in outputs, \
                f"{name}/{q['id']}: the page shows an older version of the question: {REBUILD_PAGE}"
