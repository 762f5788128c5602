"""The book on paper: static figures for widgets and animations, chapters numbered once.

A widget or an animation needs a browser. In the HTML book they stay live; in the PDF
(`tools/build_pdf.sh`: Jupyter Book's LaTeX builder) each one becomes the picture it shows when
the page opens, with a line saying that it is interactive in the HTML book:

- an explorer (`sdlab.explorer`) stores that picture itself, beside its widget view and its static
  HTML (`image/png` or `image/jpeg` in the same output); the LaTeX builder prefers the image;
- matplotlib's JavaScript player (`Animation.to_jshtml`, a `text/html` output) prints its first
  frame, the one it shows before it plays: the picture is added to the output's mime bundle when
  the notebook is read, for every builder (in HTML myst-nb prefers the HTML to any image, so nothing
  there changes).

The chapters' titles carry their number ("1. Attention") for the HTML book, whose sidebar does
not number them; LaTeX numbers chapters itself ("Chapter 1"), so the PDF drops the title's own.
"""

from __future__ import annotations

import json
import re
from base64 import b64decode, b64encode

from docutils import nodes
from sphinx.transforms.post_transforms import SphinxPostTransform

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# what the LaTeX builder can print (not SVG: a chapter that draws SVG must store a PNG beside it)
STATIC = ("application/pdf", "image/png", "image/jpeg")
PLAYER_FRAME = re.compile(r'frames\[(\d+)\]\s*=\s*"data:(image/(?:png|jpeg));base64,([^"]*)"')
CHAPTER_NUMBER = re.compile(r"^\d+\.\s+(?=\S)")
NOTES = {
    "widget": "Interactive in the HTML book; printed here as a still.",
    "animation": "An animation in the HTML book; printed here as a still.",
}


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _is_player(data: dict) -> bool:
    return "text/html" in data and 'class="animation"' in _text(data["text/html"])


def _player_picture(html: str):
    """`(mime, base64, metadata)` of the first frame of matplotlib's JavaScript player, else None."""
    frames = sorted((int(m.group(1)), m.group(2), m.group(3)) for m in PLAYER_FRAME.finditer(html))
    if not frames:
        return None
    _, mime, data = frames[0]
    # matplotlib continues long base64 strings over lines with a backslash
    data = re.sub(r"\\\n|\s", "", data)
    return mime, b64encode(b64decode(data)).decode("ascii"), {}


def add_static_pictures(notebook: dict) -> int:
    """Give every animation output of `notebook` a static picture; returns how many got one."""
    added = 0
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if output.get("output_type") not in ("display_data", "execute_result") or any(m in data for m in STATIC):
                continue
            picture = _player_picture(_text(data["text/html"])) if _is_player(data) else None
            if picture:
                mime, content, metadata = picture
                data[mime] = content
                if metadata:
                    output.setdefault("metadata", {})[mime] = metadata
                added += 1
    return added


def _on_source_read(app, docname, source):
    if not str(app.env.doc2path(docname)).endswith(".ipynb"):
        return
    notebook = json.loads(source[0])
    if add_static_pictures(notebook):
        source[0] = json.dumps(notebook)


class PrintStaticPictures(SphinxPostTransform):
    """Print builders: a widget or an animation becomes its static picture and a note (before myst-nb picks a mime type)."""

    default_priority = 3  # myst-nb's SelectMimeType runs at 4

    def run(self, **kwargs):
        if self.app.builder.format == "html":
            return
        for bundle in list(self.document.findall(nodes.container)):
            if bundle.get("nb_element") != "mime_bundle":
                continue
            by_type = {child.get("mime_type"): child for child in bundle.children}
            kind = "widget" if WIDGET_VIEW in by_type else "animation" if self._is_player(by_type.get("text/html")) else None
            picture = next((by_type[m] for m in STATIC if m in by_type), None)
            if kind and picture is not None:
                note = nodes.paragraph("", "", nodes.emphasis("", NOTES[kind]), classes=["static-picture-note"])
                bundle.replace_self([*picture.children, note])

    @staticmethod
    def _is_player(container) -> bool:
        return container is not None and any('class="animation"' in raw.astext() for raw in container.findall(nodes.raw))


class ChaptersNumberedOnce(SphinxPostTransform):
    """Print builders: "1. Attention" becomes "Attention", which LaTeX prints as "Chapter 1 Attention"."""

    default_priority = 900

    def run(self, **kwargs):
        if self.app.builder.format == "html":
            return
        for start in self.document.findall(self._start_of_file):
            section = next(start.findall(nodes.section), None)
            if section is None or not section.children or not isinstance(section[0], nodes.title):
                continue
            title = section[0]
            first = title.children[0] if title.children else None
            if isinstance(first, nodes.Text) and CHAPTER_NUMBER.match(first.astext()):
                title.replace(first, nodes.Text(CHAPTER_NUMBER.sub("", first.astext(), count=1)))

    @staticmethod
    def _start_of_file(node) -> bool:
        return type(node).__name__ == "start_of_file"


def setup(app):
    app.connect("source-read", _on_source_read)
    app.add_post_transform(PrintStaticPictures)
    app.add_post_transform(ChaptersNumberedOnce)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
