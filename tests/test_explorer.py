"""Explorers: every frame drawn once, the static page's controls move its picture in a real browser,
the live widgets redraw, and a control without effect is refused."""

from __future__ import annotations

import base64
import os

import numpy as np
import pytest

from sdlab.errors import ArgumentError
from sdlab.explorer import MAX_FRAMES, encode, explorer

CHROMIUM = os.environ.get("SDLAB_CHROMIUM", "/usr/bin/chromium")


def bars(rows, colour):
    """A picture that depends on both controls: `rows` rows of red, a band of the named colour."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[: int(rows * 8), :, 0] = 255
    image[:, :8, {"green": 1, "blue": 2, "white": slice(None)}[colour]] = 200
    return image, f"{rows} rows, {colour}"


@pytest.fixture(scope="module")
def example():
    calls = []

    def render(rows, colour):
        calls.append((rows, colour))
        return bars(rows, colour)

    made = explorer(render, {"rows": [1, 2.5, 4], "colour": ["green", "blue", "white"]}, start={"rows": 2.5},
                    title="bars")
    return made, calls


def test_every_combination_is_drawn_once_in_row_major_order(example):
    made, calls = example
    assert len(calls) == len(made.frames) == 9 == len(set(calls))
    assert made.grid[:3] == [(1, "green"), (1, "blue"), (1, "white")]
    for values, (png, caption) in zip(made.grid, made.frames):
        assert (png, caption) == (encode(bars(*values)[0], min_side=1), bars(*values)[1])  # stored at 64 x 64
    made.frame({"rows": 4, "colour": "blue"})
    assert len(calls) == 9  # the live explorer reuses the stored frames


def test_small_pictures_are_enlarged_pixel_for_pixel():
    import io

    from PIL import Image

    image = bars(3, "blue")[0]
    png = Image.open(io.BytesIO(encode(image)))
    assert png.size == (512, 512)
    assert np.array_equal(np.asarray(png)[::8, ::8], image)
    assert encode(np.zeros((4, 4, 3))) == encode(np.zeros((4, 4, 3), np.uint8))  # float [0, 1] reads as uint8


def test_the_output_carries_widget_view_html_and_a_still(example):
    made, _ = example
    bundle = made._repr_mimebundle_()
    assert {"application/vnd.jupyter.widget-view+json", "text/html", "image/png", "text/plain"} <= set(bundle)
    assert base64.b64decode(bundle["image/png"]) == encode(made.frames[made.index({"rows": 2.5, "colour": "green"})][0])
    page = bundle["text/html"]
    assert page.count("data:image/png;base64,") == 10  # nine frames, and the first shown once more
    assert "2.5" in page and 'aria-label="colour"' in page and "http" not in page
    assert "width:320px" in page and "image-rendering:pixelated" in page  # 64 px frames, enlarged by the browser


def test_live_widgets_redraw_the_picture(example):
    import ipywidgets as widgets

    made, _ = example
    box = made.widget()
    sliders = [w for w in box.children[1].children]
    image, caption = box.children[2], box.children[3]
    assert isinstance(sliders[0], widgets.SelectionSlider) and isinstance(sliders[1], widgets.Dropdown)
    assert image.value == encode(made.frame({"rows": 2.5, "colour": "green"})[0])
    sliders[1].value = "white"
    assert image.value == encode(made.frame({"rows": 2.5, "colour": "white"})[0]) and "white" in caption.value
    sliders[0].value = 4
    assert image.value == encode(made.frame({"rows": 4, "colour": "white"})[0])


def test_live_only_controls_are_offered_with_a_kernel_and_named_on_the_page():
    import ipywidgets as widgets

    rows = widgets.IntSlider(value=2, min=1, max=8)
    made = explorer(lambda rows: bars(rows, "blue"), {"rows": [1, 2, 3]}, start={"rows": 2}, live={"rows": rows})
    box = made.widget()
    assert box.children[1].children == (rows,)
    rows.value = 7
    assert box.children[2].value == encode(bars(7, "blue")[0])
    other = explorer(lambda rows, note="": bars(rows, "blue"), {"rows": [1, 2]}, live={"note": widgets.Text()})
    assert "With a running kernel you can also change: note." in other.html()


@pytest.mark.parametrize(("controls", "options", "message"), [
    ({}, {}, "at least one value"),
    ({"rows": []}, {}, "at least one value"),
    ({"rows": list(range(1, 9)), "colour": ["green", "blue", "white"] * 5}, {}, f"more than the {MAX_FRAMES}"),
    ({"rows": [1, 2]}, {"start": {"rows": 3}}, "rows=3 is not one of"),
    ({"rows": [1, 2]}, {"start": {"size": 3}}, "size=3 is not one of"),
    ({"rows": [1, 2]}, {"image_format": "gif"}, "image_format must be one of"),
])
def test_bad_controls_are_refused_with_the_fix(controls, options, message):
    with pytest.raises(ArgumentError, match=message):
        explorer(lambda **values: bars(1, "blue"), controls, **options)


def test_a_control_without_effect_is_refused():
    with pytest.raises(ArgumentError, match="'colour': blue and white give the same picture"):
        explorer(lambda rows, colour: bars(rows, "green" if colour == "green" else "blue"),
                 {"rows": [1, 2], "colour": ["green", "blue", "white"]})


def test_static_controls_move_the_picture_in_a_browser(example, tmp_path):
    """The page without a kernel: moving each control (range and drop-down) to each value shows that
    value's frame and caption, and no request leaves the page."""
    from playwright.sync_api import sync_playwright

    made, _ = example
    page_file = tmp_path / "explorer.html"
    page_file.write_text(f"<!doctype html><html><body>{made.html()}</body></html>")
    uris = ["data:image/png;base64," + base64.b64encode(png).decode() for png, _ in made.frames]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(page_file.as_uri())
        state = {"rows": 2.5, "colour": "green"}
        assert page.eval_on_selector(".sdlab-explorer img", "i => i.src") == uris[made.index(state)]
        for k, (name, options) in enumerate(made.controls.items()):
            for position, value in enumerate(options):
                page.eval_on_selector_all("[data-control]", "(inputs, [k, v]) => { inputs[k].value = v; "
                                          "inputs[k].dispatchEvent(new Event('input')); }", [k, str(position)])
                state[name] = value
                shown = page.eval_on_selector(".sdlab-explorer img", "i => i.src")
                assert shown == uris[made.index(state)], (name, value)
                assert page.inner_text(".sdlab-explorer-caption") == made.frames[made.index(state)][1]
                label = f"{value:g}" if isinstance(value, float) else str(value)
                assert page.eval_on_selector_all("output", "(o, k) => o[k].textContent", k) == label
        browser.close()
    assert not errors


def test_a_single_value_is_no_control_on_the_page_but_live_with_a_kernel():
    """SD1.5 on a CPU: one stored picture, and the kernel's controls only (no dead slider on the page)."""
    import ipywidgets as widgets

    scale = widgets.FloatSlider(value=7.5, min=0, max=15)
    made = explorer(lambda rows, scale: bars(rows, "blue"), {"rows": [1, 3], "scale": [7.5]}, live={"scale": scale})
    page = made.html()
    assert page.count('type="range"') == 1 and 'aria-label="scale"' not in page
    assert "you can also change: scale." in page
    assert made.widget().children[1].children[-1] is scale


def test_jpeg_frames_for_noisy_pictures():
    noisy = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    made = explorer(lambda t: noisy // t, {"t": [1, 2]}, image_format="jpeg")
    assert made.frames[0][0][:2] == b"\xff\xd8" and len(made.frames[0][0]) < len(encode(noisy, min_side=1)) / 2
    bundle = made._repr_mimebundle_()
    assert "image/jpeg" in bundle and "image/png" not in bundle and "data:image/jpeg;base64," in bundle["text/html"]
