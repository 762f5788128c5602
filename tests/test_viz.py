"""The plotting helpers (`sdlab.viz`) draw what they are given, readably sized."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from sdlab import viz

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def readable(fig) -> None:
    """At most the column wide, and every text at least FONT_SIZE points."""
    assert fig.get_figwidth() <= viz.COLUMN_INCHES + 1e-9
    fig.canvas.draw()
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    assert texts and min(t.get_fontsize() for t in texts) >= viz.FONT_SIZE


def test_image_grid_wraps_rows_and_titles_every_image():
    images = [IMAGE, torch.rand(3, 64, 64), RNG.random((8, 8)), IMAGE, IMAGE, IMAGE]
    fig = viz.image_grid(images, [f"image {i}" for i in range(6)], suptitle="six")
    assert len(fig.axes) == 6
    assert [ax.get_title() for ax in fig.axes] == [f"image {i}" for i in range(6)]
    assert all(len(ax.images) == 1 for ax in fig.axes)
    assert fig.axes[1].images[0].get_array().shape == (64, 64, 3)  # (C, H, W) tensor shown as (H, W, C)
    fig.canvas.draw()  # the constrained layout is done at drawing
    rows = {round(ax.get_position().y0, 3) for ax in fig.axes}
    assert len(rows) == 2  # 4 + 2: wrapped, not a strip
    assert all(ax.get_window_extent().width >= 0.9 * viz.MIN_PANEL_INCHES * fig.dpi for ax in fig.axes)  # not tiny
    readable(fig)


def test_a_long_row_of_words_wraps_and_each_panel_stays_readable():
    maps = {f"word{i}": RNG.random((64, 64)) for i in range(9)}  # chapter 6's prompt: 9 words
    fig = viz.heatmap_overlay(IMAGE, maps)
    assert len(fig.axes) == 10
    fig.canvas.draw()
    assert all(ax.get_window_extent().width >= 0.9 * viz.MIN_PANEL_INCHES * fig.dpi for ax in fig.axes)
    readable(fig)


def test_heatmap_overlay_draws_each_word_over_the_image():
    maps = {"a": RNG.random((64, 64)), "red": RNG.random((64, 64)), "circle": np.zeros((64, 64))}
    fig = viz.heatmap_overlay(IMAGE, maps, suptitle="“a red circle”")
    assert [ax.get_title() for ax in fig.axes] == ["image", "a", "red", "circle"]
    assert [len(ax.images) for ax in fig.axes] == [1, 2, 2, 2]
    assert fig.axes[1].images[1].get_array().max() == pytest.approx(1.0)  # scaled to its maximum
    readable(fig)


def test_overlay_table_has_a_panel_per_row_and_column():
    table = {block: {f"step {s}": RNG.random((8, 8)) for s in (1, 10, 20)} for block in ("down.1", "up.3")}
    fig = viz.overlay_table(IMAGE, table)
    assert len(fig.axes) == 6
    assert [ax.get_title() for ax in fig.axes[:3]] == ["step 1", "step 10", "step 20"]
    assert [fig.axes[0].get_ylabel(), fig.axes[3].get_ylabel()] == ["down.1", "up.3"]
    readable(fig)


def test_schedule_curves_one_panel_per_quantity_one_line_per_schedule():
    betas = {"linear": np.linspace(1e-4, 0.02, 1000), "scaled linear": np.linspace(1e-2, 0.14, 1000) ** 2}
    alpha_bar = {name: np.cumprod(1 - b) for name, b in betas.items()}
    fig = viz.schedule_curves({"β_t": betas, "ᾱ_t": alpha_bar}, logy=("β_t",))
    assert [ax.get_title() for ax in fig.axes] == ["β_t", "ᾱ_t"]
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]
    assert fig.axes[0].get_yscale() == "log" and fig.axes[1].get_yscale() == "linear"
    assert np.allclose(fig.axes[1].lines[0].get_ydata(), alpha_bar["linear"])
    readable(fig)


def test_latent_channels_symmetric_scale_per_channel():
    latents = torch.randn(1, 4, 8, 8)
    fig = viz.latent_channels(latents, IMAGE)
    assert [ax.get_title() for ax in fig.axes] == ["image", "channel 0", "channel 1", "channel 2", "channel 3"]
    low, high = fig.axes[2].images[0].get_clim()
    assert low == -high == pytest.approx(-latents[0, 1].abs().max().item())
    readable(fig)


def test_x0_strip_titles_the_timesteps():
    fig = viz.x0_strip([(981, IMAGE), (torch.tensor(500), IMAGE), (1.0, IMAGE)])
    assert [ax.get_title() for ax in fig.axes] == ["x̂₀ at t = 981", "x̂₀ at t = 500", "x̂₀ at t = 1"]
    readable(fig)


def test_heat_blend_is_the_overlay_of_heatmap_overlay():
    """The figure-free blend equals what matplotlib draws for the same overlay (alpha over the image)."""
    heat = RNG.random((64, 64)) * 3
    blended = viz.heat_blend(IMAGE, heat, alpha=0.5)
    colours = matplotlib.colormaps["jet"](heat / heat.max())[..., :3]
    assert blended.shape == (64, 64, 3) and blended.dtype == np.uint8
    assert np.abs(blended - (0.5 * IMAGE / 255 + 0.5 * colours) * 255).max() <= 0.5 + 1e-9
    assert np.array_equal(viz.heat_blend(IMAGE, np.zeros((64, 64)), alpha=0.0), IMAGE)  # no heat, no alpha: the image
    as_tensor = viz.heat_blend(torch.from_numpy(IMAGE).permute(2, 0, 1).float() / 255, heat)  # (C, H, W) float32
    assert np.abs(as_tensor.astype(int) - blended).max() <= 1
