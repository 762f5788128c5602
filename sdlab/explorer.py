"""Explorers: a picture that follows its controls, with a kernel and without one.

`explorer(render, controls)` draws `render(**values)` for every combination of the controls' values
and shows it in two ways at once, in one output:

- **with a kernel** (Jupyter, Colab): ipywidgets controls (a slider over a list of numbers, a
  drop-down for text; `live=` adds or replaces controls that only a kernel can serve, such as a
  free prompt box) redraw the picture on demand;
- **without one** (the rendered book): a small self-contained HTML scrubber over the precomputed
  frames, a few lines of JavaScript that swap the picture as a control moves, so that no control
  on a page is ever dead;
- on paper, the frame at the starting values (an `image/png` beside them).

A front end picks what it can show: Jupyter and Colab the widget view, the book (whose
`_config.yml` ranks `text/html` above widget views) the scrubber, LaTeX the PNG. Every frame is
checked when the explorer is made: moving any one control from the starting values must change
the picture (a control without effect is an error, not a dead slider).

```python
from sdlab.explorer import explorer
explorer(lambda cfg, seed: make_image(seed, cfg), {"cfg": [0, 1, 3, 7.5, 12], "seed": [1, 2, 3]},
         start={"cfg": 7.5})
```
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import math
from collections.abc import Callable, Sequence

import numpy as np

from .errors import ArgumentError

MAX_FRAMES = 96  # a static explorer stores every frame in the page: keep the page light
SHARPNESS = 1.6  # a frame is shown at most 1/1.6 of its width in pixels: sharp on high-density screens
MIN_SIDE = 512  # the kernel's and the printed picture: small ones (64 x 64) enlarged pixel for pixel to this


FORMATS = {"png": "PNG", "jpeg": "JPEG"}  # jpeg for noisy pictures, which PNG compresses badly


def encode(picture, image_format: str = "png", min_side: int = MIN_SIDE) -> bytes:
    """A matplotlib `Figure`, a PIL image, encoded bytes or an (H, W[, C]) array (uint8, or float in
    [0, 1]) as PNG or JPEG (quality 85) bytes; pictures smaller than `min_side` are enlarged by a whole
    factor without smoothing."""
    from PIL import Image

    if isinstance(picture, bytes):
        picture = Image.open(io.BytesIO(picture))
    elif hasattr(picture, "savefig"):  # a matplotlib figure: drawn, then closed (it lives on as the bytes)
        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        picture.savefig(buffer, format="png", dpi=160)
        plt.close(picture)
        picture = Image.open(buffer)
    elif not isinstance(picture, Image.Image):
        array = np.asarray(picture)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        picture = Image.fromarray(array)
    factor = math.ceil(min_side / max(picture.size))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format=FORMATS[image_format], quality=85)
    return buffer.getvalue()


def _width(data: bytes) -> int:
    from PIL import Image

    return Image.open(io.BytesIO(data)).width


def _label(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "(empty)"


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


class Explorer:
    """The frames of `render` over a grid of control values, shown live (ipywidgets) and static (HTML).
    Made by `explorer(...)`; see the module's docstring."""

    def __init__(self, render: Callable, controls: dict[str, Sequence], start: dict, live: dict, title: str,
                 width: int, image_format: str):
        self.render, self.controls, self.start, self.live = render, controls, start, live
        self.title, self.width, self.image_format = title, width, image_format
        self._cache: dict[tuple, tuple[bytes, str]] = {}
        self.grid = list(itertools.product(*controls.values()))  # row-major: the last control varies fastest
        self.frames = [self.frame(dict(zip(controls, values))) for values in self.grid]

    def frame(self, values: dict) -> tuple[bytes, str]:
        """(PNG bytes, caption) of the picture at `values`, drawn once."""
        key = tuple((name, values[name]) for name in sorted(values))
        if key not in self._cache:
            out = self.render(**values)
            picture, caption = out if isinstance(out, tuple) else (out, "")
            self._cache[key] = (encode(picture, self.image_format, min_side=1), str(caption))  # at its own size
        return self._cache[key]

    def index(self, values: dict) -> int:
        """The position in `frames` of the grid point `values`."""
        return self.grid.index(tuple(values[name] for name in self.controls))

    def check_every_control_moves_the_picture(self) -> None:
        """From the starting values, each step along one control must change the picture."""
        for name, options in self.controls.items():
            pictures = [self.frames[self.index({**self.start, name: value})][0] for value in options]
            for a, b, before, after in zip(options, options[1:], pictures, pictures[1:]):
                if before == after:
                    raise ArgumentError(f"explorer control {name!r}: {_label(a)} and {_label(b)} give the same "
                                        "picture, so the control would move without effect; choose other values")

    # --- without a kernel: the HTML scrubber ------------------------------------------------------
    def html(self) -> str:
        """The static explorer: controls over the stored frames, and a few lines of JavaScript."""
        uris = [f"data:image/{self.image_format};base64," + base64.b64encode(picture).decode("ascii")
                for picture, _ in self.frames]
        data = json.dumps({
            "frames": uris,
            "captions": [caption for _, caption in self.frames],
            "labels": [[_label(v) for v in options] for options in self.controls.values()],
            "strides": [math.prod(len(o) for o in list(self.controls.values())[k + 1:])
                        for k in range(len(self.controls))],
        })
        ident = "sdlab-explorer-" + hashlib.sha1(data.encode()).hexdigest()[:12]
        first = self.index(self.start)
        natural = max(_width(picture) for picture, _ in self.frames)
        if natural >= self.width * SHARPNESS:  # sharp at the width asked for
            shown, rendering = self.width, ""
        elif 2 * natural <= self.width:  # a small picture (64 x 64): enlarged by the browser, pixel for pixel
            shown, rendering = natural * (self.width // natural), "image-rendering:pixelated;"
        else:
            shown, rendering = int(natural / SHARPNESS), ""
        rows = []
        for name, options in self.controls.items():
            position = list(options).index(self.start[name])
            if len(options) == 1:  # nothing to move: a hidden input keeps the index arithmetic, no dead control
                rows.append('<input type="hidden" value="0" data-control><output hidden></output>')
                continue
            readout = html.escape(_label(self.start[name]))
            if all(_is_number(v) for v in options):  # a slider over the values, its value beside it
                widget = (f'<input type="range" min="0" max="{len(options) - 1}" step="1" value="{position}" '
                          f'data-control aria-label="{html.escape(name)}" style="width:150px;max-width:50vw">'
                          f"<output>{readout}</output>")
            else:  # a drop-down shows its own value
                widget = (f'<select data-control aria-label="{html.escape(name)}" style="min-width:0;max-width:100%;flex:0 1 auto">' + "".join(
                    f'<option value="{k}"{" selected" if k == position else ""}>{html.escape(_label(v))}</option>'
                    for k, v in enumerate(options)) + f"</select><output hidden>{readout}</output>")
            rows.append('<label style="display:flex;align-items:center;gap:6px;min-width:0;max-width:100%">'
                        f'<span class="sdlab-explorer-name">{html.escape(name)}</span> {widget}</label>')
        extra = [html.escape(name) for name in self.live if name not in self.controls or len(self.controls[name]) == 1]
        only_live = (f'<p class="sdlab-explorer-note">With a running kernel you can also change: {", ".join(extra)}.</p>'
                     if extra else "")
        return f"""<div class="sdlab-explorer" id="{ident}">
<p class="sdlab-explorer-title" style="font-weight:bold;margin:0 0 4px">{html.escape(self.title)}</p>
<div class="sdlab-explorer-controls" style="display:flex;flex-wrap:wrap;gap:4px 18px">{"".join(rows)}</div>
<img src="{uris[first]}" alt="{html.escape(self.title)}" style="width:{shown}px;max-width:100%;height:auto;{rendering}">
<p class="sdlab-explorer-caption" style="margin:2px 0">{html.escape(self.frames[first][1])}</p>{only_live}
<script>(function () {{
  var root = document.getElementById("{ident}"), data = {data};
  var inputs = root.querySelectorAll("[data-control]"), outputs = root.querySelectorAll("output");
  function update() {{
    var i = 0;
    inputs.forEach(function (input, k) {{
      var j = parseInt(input.value, 10);
      i += j * data.strides[k];
      outputs[k].textContent = data.labels[k][j];
    }});
    root.querySelector("img").src = data.frames[i];
    root.querySelector(".sdlab-explorer-caption").textContent = data.captions[i];
  }}
  inputs.forEach(function (input) {{ input.addEventListener("input", update); input.addEventListener("change", update); }});
}})();</script>
</div>"""

    # --- with a kernel: ipywidgets ------------------------------------------------------------------
    def widget(self):
        """The live explorer: ipywidgets controls (the grid's, then `live`'s), the picture and its caption."""
        import ipywidgets as widgets

        controls = {}
        for name, options in self.controls.items():
            if name in self.live:
                continue
            if all(_is_number(v) for v in options):
                controls[name] = widgets.SelectionSlider(options=[(_label(v), v) for v in options], value=self.start[name],
                                                         description=name, continuous_update=False)
            else:
                controls[name] = widgets.Dropdown(options=[(_label(v), v) for v in options], value=self.start[name],
                                                  description=name)
        controls.update(self.live)
        png, caption = self.frame(self.start)
        image = widgets.Image(value=encode(png, self.image_format), format=self.image_format, layout=widgets.Layout(width=f"{self.width}px", max_width="100%"))
        text = widgets.HTML(html.escape(caption))

        def redraw(_change=None):
            png, caption = self.frame({name: control.value for name, control in controls.items()})
            image.value, text.value = encode(png, self.image_format), html.escape(caption)

        for control in controls.values():
            control.observe(redraw, names="value")
        layout = widgets.Layout(flex_flow="row wrap")
        return widgets.VBox([widgets.HTML(f"<b>{html.escape(self.title)}</b>"),
                             widgets.HBox(list(controls.values()), layout=layout), image, text])

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"text/plain": f"<explorer: {self.title}, {len(self.frames)} frames>", "text/html": self.html(),
                  f"image/{self.image_format}": base64.b64encode(encode(self.frame(self.start)[0], self.image_format))
                  .decode("ascii")}
        try:
            bundle.update({k: v for k, v in self.widget()._repr_mimebundle_().items() if k != "text/plain"})
        except ImportError:  # no ipywidgets: the static explorer works in any front end that runs JavaScript
            pass
        return bundle


def explorer(render: Callable, controls: dict[str, Sequence], *, start: dict | None = None, live: dict | None = None,
             title: str = "", width: int = 320, image_format: str = "png") -> Explorer:
    """An explorer of `render(**values) -> picture or (picture, caption)` over `controls` (name -> the values
    a static page offers; every combination is drawn, `MAX_FRAMES` at most). `start`: the values shown
    first (default: each control's first). `live`: name -> ipywidgets control, used only with a kernel,
    in addition to the grid's controls or instead of one of them (a text box for a prompt list).
    `width`: the picture's width on the page, in CSS pixels; `image_format`: "png", or "jpeg" for noisy
    pictures (smaller pages)."""
    if not controls or any(len(options) == 0 for options in controls.values()):
        raise ArgumentError("explorer controls: give each control at least one value, e.g. {'cfg': [1, 7.5]}")
    count = math.prod(len(options) for options in controls.values())
    if count > MAX_FRAMES:
        raise ArgumentError(f"explorer controls: {count} combinations are more than the {MAX_FRAMES} frames a page "
                            "can store; offer fewer values (a kernel can still offer more through `live`)")
    start = {name: options[0] for name, options in controls.items()} | dict(start or {})
    for name, value in start.items():
        if name not in controls or value not in list(controls[name]):
            raise ArgumentError(f"explorer start: {name}={value!r} is not one of the controls' values "
                                f"{ {n: list(o) for n, o in controls.items()} }")
    if image_format not in FORMATS:
        raise ArgumentError(f"explorer image_format must be one of {sorted(FORMATS)}; got {image_format!r}")
    made = Explorer(render, {name: list(options) for name, options in controls.items()}, start, dict(live or {}),
                    title, width, image_format)
    made.check_every_control_moves_the_picture()
    return made
