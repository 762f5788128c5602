"""Slides for every chapter, made from its executed notebook: reveal.js decks that work offline.

    python tools/build_slides.py [OUT]        # default OUT: book/_build/html/slides

Run after the HTML book is built (`tools/build_book.sh` does): each `book/NN_name.ipynb` becomes
`OUT/NN_name.slides.html`, converted by `jupyter nbconvert`'s slides exporter (reveal.js), and
every script, style sheet and font it loads is the book's vendored copy, `OUT/../_static/vendor`
(`tools/vendor_assets.py`: reveal.js, require.js, MathJax 3). Pictures are embedded.

The chapters carry no slide markup; the deck is derived from each notebook by one rule
(`slide_notebook`):

- the title slide: the chapter's title, its first paragraph, what it teaches and needs, its time;
- one slide per `##` section (a vertical sub-slide per `###`): its heading, its first paragraph
  and its first display equation;
- every figure of the section (a cell's picture, a widget's or an animation's still, as the PDF
  prints them) on a sub-slide of its own, under the section's heading, without its code;
- the section's first short code cell (at most `SHORT_CODE` lines, text output only), with its
  output cut to `SHORT_OUTPUT` lines;
- a cell tagged `slide` is shown whole on a slide of its own, whatever the rule says.

MyST that only Sphinx reads is turned into plain Markdown: glued numbers are filled in from the
notebook's own glue outputs (as the book shows them), admonitions become a bold title, roles their
text, links to other chapters point at the HTML book.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
DEFAULT_OUT = BOOK / "_build" / "html" / "slides"
VENDOR = "../_static/vendor"  # from OUT: the book's vendored scripts (html_static_path)
SHORT_CODE = 8
SHORT_OUTPUT = 10
PICTURES = ("image/png", "image/jpeg", "image/svg+xml")
GLUE_RECORD = "application/papermill.record/text/plain"

sys.path.insert(0, str(BOOK / "_ext"))
from print_book import add_static_pictures  # noqa: E402  (the PDF's stills for widgets and players)

# The reveal template of nbconvert, with every URL local and MathJax 3 (the template's own code
# is for MathJax 2, whose `MathJax.Hub` MathJax 3 does not have).
TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{%- block html_head_js_jquery -%}{%- endblock html_head_js_jquery -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}
<script>
window.MathJax = {tex: {inlineMath: [['$', '$'], ['\\(', '\\)']], displayMath: [['$$', '$$'], ['\\[', '\\]']],
                        processEscapes: true, tags: 'ams'}};
</script>
<script src="{{ resources.mathjax_url }}" defer></script>
<style type="text/css">
.reveal img { max-height: 520px; width: auto; }
.reveal .slides section { overflow-y: auto; max-height: 100%; }
.reveal pre { font-size: 0.55em; }
.reveal .jp-OutputArea-output pre { font-size: 0.5em; }
.reveal p, .reveal li { font-size: 0.8em; }
</style>
{%- endblock html_head_js_mathjax -%}
{% block footer_js %}
<script>
require({waitSeconds: 15}, ["{{ reveal_url_prefix }}/dist/reveal.js", "{{ reveal_url_prefix }}/plugin/notes/notes.js"],
  function (Reveal, RevealNotes) {
    window.Reveal = Reveal;  // for the keyboard's console and the tests
    Reveal.initialize({controls: true, progress: true, history: true, transition: "{{ reveal_transition }}",
                       slideNumber: "c/t", plugins: [RevealNotes], width: {{ reveal_width }}, height: {{ reveal_height }}});
  });
</script>
{% endblock footer_js %}
"""


def glued_values(nb: nbformat.NotebookNode) -> dict[str, str]:
    """name -> the text/plain a cell glued under that name (what `{glue:text}` shows)."""
    values = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name and GLUE_RECORD in output.get("data", {}):
                values[name] = output["data"][GLUE_RECORD]
    return values


def plain_markdown(text: str, glued: dict[str, str]) -> str:
    """MyST -> the Markdown nbconvert reads: glue roles filled in, admonitions as a bold title,
    other roles as their text, chapter links to the HTML book."""
    from myst_nb.core.variables import format_plain_text

    def paste(match: re.Match) -> str:
        name, _, spec = match["key"].partition(":")
        return format_plain_text(glued[name], spec or "s") if name in glued else match[0]

    text = re.sub(r"\{glue(?::(?:text|md))?\}`(?P<key>[^`]+)`", paste, text)
    text = re.sub(r"(?m)^:{3,}\{[\w-]+\}\s*(.*)$", lambda m: f"\n**{m[1]}**\n" if m[1] else "", text)
    text = re.sub(r"(?m)^:{3,}\s*$", "", text)
    text = re.sub(r"\{[\w:-]+\}`([^`<]*?)\s*(?:<[^`>]*>)?`", r"\1", text)  # {ref}`text <target>` -> text
    text = re.sub(r"\]\((\d\d_\w+)\.ipynb", r"](../book/\1.html", text)
    return text.strip()


def blocks(markdown: str) -> list[str]:
    """The paragraphs, lists, equations and code blocks of `markdown`, in order."""
    out, current, fence = [], [], None
    for line in markdown.split("\n"):
        opening = re.match(r"^(`{3,}|\$\$)", line.strip())
        if fence is None and not line.strip():
            if current:
                out.append("\n".join(current))
            current = []
            continue
        current.append(line)
        if fence is None and opening and not (opening[1] == "$$" and line.strip().endswith("$$") and len(line.strip()) > 2):
            fence = opening[1]
        elif fence is not None and line.strip().startswith(fence) and len(current) > 1:
            fence = None
    if current:
        out.append("\n".join(current))
    return out


def section_summary(markdown: str) -> str:
    """The heading, the first paragraph and the first display equation of a section's cell."""
    parts = blocks(markdown)
    heading, rest = parts[0], parts[1:]
    prose = [b for b in rest if not b.startswith(("```", "$$", "|", "#"))]
    equations = [b for b in rest if b.startswith("$$")]
    chosen = [b for b in rest if b in prose[:1] or b in equations[:1]]
    return "\n\n".join([heading, *chosen])


def title_summary(markdown: str) -> str:
    """The chapter's title slide: title, first paragraph, what it teaches and needs, its time."""
    parts = blocks(markdown)
    keep = [parts[0], *[b for b in parts[1:2] if not b.startswith("**")]]
    keep += [b for b in parts if b.startswith(("**You will learn**", "**You need**", "**Time:**"))]
    return "\n\n".join(keep)


def _markdown_cell(source: str, slide_type: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(source, metadata={"slideshow": {"slide_type": slide_type}})


def _figure_cell(cell, heading: str) -> list[nbformat.NotebookNode]:
    """A sub-slide with the heading and the cell's pictures alone."""
    outputs = []
    for output in cell.outputs:
        data = {m: v for m, v in output.get("data", {}).items() if m in PICTURES}
        if data:
            outputs.append(nbformat.v4.new_output("display_data", data=data,
                                                  metadata={m: v for m, v in output.get("metadata", {}).items() if m in data}))
    code = nbformat.v4.new_code_cell("", outputs=outputs, metadata={"slideshow": {"slide_type": "-"}})
    code.metadata["tags"] = ["remove-input"]
    return [_markdown_cell(f"### {heading}" if heading else "", "subslide"), code]


def _is_short(cell) -> bool:
    tags = cell.metadata.get("tags", [])
    lines = cell.source.strip().split("\n")
    kinds = {output.output_type for output in cell.outputs}
    texts = all(set(o.get("data", {})) <= {"text/plain"} for o in cell.outputs if "data" in o)
    return (bool(cell.source.strip()) and len(lines) <= SHORT_CODE and "hide-input" not in tags
            and kinds <= {"stream", "execute_result"} and texts and bool(cell.outputs))


def _short_code_cell(cell) -> nbformat.NotebookNode:
    """The cell with its text output cut to SHORT_OUTPUT lines."""
    outputs = []
    for output in copy.deepcopy(cell.outputs):
        key = "text" if output.output_type == "stream" else None
        text = output[key] if key else output.data["text/plain"]
        lines = text.split("\n")
        cut = "\n".join(lines[:SHORT_OUTPUT]) + ("\n…" if len(lines) > SHORT_OUTPUT else "")
        if key:
            output[key] = cut
        else:
            output.data = {"text/plain": cut}
        outputs.append(output)
    return nbformat.v4.new_code_cell(cell.source, outputs=outputs, metadata={"slideshow": {"slide_type": "fragment"}})


def slide_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The deck of an executed chapter, by the rule of this module's docstring."""
    nb = copy.deepcopy(nb)
    add_static_pictures(nb)
    glued = glued_values(nb)
    cells, heading, short_shown = [], "", True
    for i, cell in enumerate(nb.cells):
        tags = cell.metadata.get("tags", [])
        if cell.cell_type == "markdown":
            text = plain_markdown(cell.source, glued)
            if "slide" in tags:
                cells.append(_markdown_cell(text, "slide"))
            elif i == 0:
                cells.append(_markdown_cell(title_summary(text), "slide"))
            elif re.match(r"^#{2,3} ", text):
                level = len(text.split(" ", 1)[0])
                heading, short_shown = text.split("\n", 1)[0].lstrip("#").strip(), False
                cells.append(_markdown_cell(section_summary(text), "slide" if level == 2 else "subslide"))
            continue
        if "slide" in tags:
            whole = copy.deepcopy(cell)
            whole.metadata = {"slideshow": {"slide_type": "slide"}}
            cells.append(whole)
        elif any(m in o.get("data", {}) for o in cell.outputs for m in PICTURES):
            cells += _figure_cell(cell, heading)
        elif not short_shown and _is_short(cell):
            cells.append(_short_code_cell(cell))
            short_shown = True
    return nbformat.v4.new_notebook(cells=cells, metadata={"language_info": {"name": "python"}})


def exporter():
    """nbconvert's slides exporter with the offline template and the vendored reveal.js."""
    from jinja2 import DictLoader
    from nbconvert import SlidesExporter
    from traitlets.config import Config

    config = Config()
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_input_tags = {"remove-input"}
    config.SlidesExporter.reveal_url_prefix = f"{VENDOR}/reveal.js"
    config.SlidesExporter.reveal_theme = "white"  # its fonts are in the vendored copy (simple's come from Google)
    config.SlidesExporter.require_js_url = f"{VENDOR}/require.min.js"
    config.SlidesExporter.mathjax_url = f"{VENDOR}/mathjax/tex-chtml.js"
    config.SlidesExporter.exclude_input_prompt = True
    config.SlidesExporter.exclude_output_prompt = True
    return SlidesExporter(config=config, extra_loaders=[DictLoader({"sdlab_slides.html.j2": TEMPLATE})],
                          template_file="sdlab_slides.html.j2")


def chapters() -> list[Path]:
    return sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))


def build(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    slides, written = exporter(), []
    for path in chapters():
        deck = slide_notebook(nbformat.read(path, as_version=4))
        html, _ = slides.from_notebook_node(deck, resources={"metadata": {"name": path.stem}})
        target = out / f"{path.stem}.slides.html"
        target.write_text(html, encoding="utf-8")
        written.append(target)
        print(f"{target.relative_to(out.parent)}: {sum(c.metadata['slideshow']['slide_type'] in ('slide', 'subslide') for c in deck.cells)} slides")
    return written


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
