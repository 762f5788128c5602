"""The book's plotting helpers: images, heat-map overlays, schedule curves, latent channels, x̂₀ strips.

Every function returns a matplotlib `Figure` (show it with `plt.show()` or `display(fig)`), sized
for the book's 720-pixel column at 100 dpi (`COLUMN_INCHES` wide at most) with panels of at least
`MIN_PANEL_INCHES`, so that they stay readable when a phone shrinks the column by half; long rows
wrap onto more rows instead of shrinking. Every label is at least `FONT_SIZE` points.
matplotlib is imported when a function is first called (the package itself does not need it).
"""

from __future__ import annotations

import math

import numpy as np

COLUMN_INCHES = 7.2  # the 720-pixel column at 100 dpi
MIN_PANEL_INCHES = 1.6  # a panel never gets narrower than this (a phone halves it)
PANEL_INCHES = 1.8  # the width a panel gets (4 fill the column)
FONT_SIZE = 9  # points, for every title, label and legend
MAX_COLUMNS = int(COLUMN_INCHES // MIN_PANEL_INCHES)  # 4 panels per row at most


def _as_array(image) -> np.ndarray:
    """A tensor or array -> numpy: (C, H, W) tensors with 1-4 channels are moved to (H, W, C)."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


def _panels(n: int, columns: int | None = None, extra_height: float = 0.5, aspect: float = 1.0):
    """A figure of `n` panels on rows of `columns` (at most `MAX_COLUMNS`), unused panels removed.
    Returns (figure, list of the `n` axes). `aspect`: panel height / width."""
    import matplotlib.pyplot as plt

    columns = max(1, min(columns or MAX_COLUMNS, MAX_COLUMNS, n))
    rows = math.ceil(n / columns)
    width = min(COLUMN_INCHES, max(columns * PANEL_INCHES, 3.0))
    panel = width / columns
    fig, axes = plt.subplots(rows, columns, figsize=(width, rows * (panel * aspect + extra_height)),
                             squeeze=False, layout="constrained")
    flat = list(axes.ravel())
    for ax in flat[n:]:
        fig.delaxes(ax)
    return fig, flat[:n]


def _title(ax, text: str | None) -> None:
    if text:
        ax.set_title(text, fontsize=FONT_SIZE)


def _suptitle(fig, text: str | None) -> None:
    if text:
        fig.suptitle(text, fontsize=FONT_SIZE + 1)


def image_grid(images, titles=None, *, columns: int | None = None, suptitle: str | None = None, cmap=None,
               vmin=None, vmax=None, colorbar: bool = False):
    """Images (uint8 H x W x 3, floats, tensors, or 2-D maps drawn with `cmap`) in a grid, each with
    its title; rows of `columns` panels (default as many as fit, at most 4)."""
    images = [_as_array(image) for image in images]
    titles = list(titles) if titles is not None else [None] * len(images)
    fig, axes = _panels(len(images), columns)
    for ax, image, title in zip(axes, images, titles):
        shown = ax.imshow(image, cmap=cmap if image.ndim == 2 else None, vmin=vmin, vmax=vmax)
        _title(ax, title)
        ax.axis("off")
        if colorbar and image.ndim == 2:
            fig.colorbar(shown, ax=ax, shrink=0.8).ax.tick_params(labelsize=FONT_SIZE)
    _suptitle(fig, suptitle)
    return fig


def heat_blend(image, heat, *, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """The image with a heat map (H, W, scaled to its maximum) blended over it, as (H, W, 3) uint8: the
    picture `heatmap_overlay` draws in each panel, without a figure (for explorers' frames)."""
    import matplotlib

    image = _as_array(image)
    image = image / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)  # (H, W, 3) in [0, 1]
    heat = _as_array(heat).astype(np.float64)
    colours = matplotlib.colormaps[cmap](heat / heat.max() if heat.max() > 0 else heat)[..., :3]  # (H, W, 3)
    blended = (1 - alpha) * image[..., :3] + alpha * colours
    return (blended.clip(0, 1) * 255).round().astype(np.uint8)


def heatmap_overlay(image, maps: dict, *, columns: int | None = None, suptitle: str | None = None,
                    cmap: str = "jet", alpha: float = 0.5, image_title: str = "image"):
    """The image, then one panel per word: the image with the word's heat map (H, W, scaled to its
    maximum) over it, titled with the word. `maps`: `{word: map}` (e.g. `sdlab.inspect.word_heatmaps`)."""
    image = _as_array(image)
    fig, axes = _panels(len(maps) + 1, columns)
    axes[0].imshow(image)
    _title(axes[0], image_title)
    for ax, (word, heat) in zip(axes[1:], maps.items()):
        heat = _as_array(heat).astype(np.float64)
        ax.imshow(image)
        ax.imshow(heat / heat.max() if heat.max() > 0 else heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1,
                  extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
        _title(ax, word)
    for ax in axes:
        ax.axis("off")
    _suptitle(fig, suptitle)
    return fig


def overlay_table(image, table: dict, *, suptitle: str | None = None, cmap: str = "jet", alpha: float = 0.5):
    """Heat maps over the image in a table: `{row label: {column label: map}}` (e.g. blocks x steps
    for one word). Rows wrap nowhere: keep the columns to 4 or fewer for a phone."""
    import matplotlib.pyplot as plt

    image = _as_array(image)
    rows, columns = list(table), list(next(iter(table.values())))
    width = min(COLUMN_INCHES, max(len(columns) * PANEL_INCHES, 3.0))
    panel = width / len(columns)
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(width, len(rows) * (panel + 0.4)), squeeze=False,
                             layout="constrained")
    for r, row in enumerate(rows):
        for c, column in enumerate(columns):
            ax, heat = axes[r, c], _as_array(table[row][column]).astype(np.float64)
            ax.imshow(image)
            ax.imshow(heat / heat.max() if heat.max() > 0 else heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1,
                      extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                _title(ax, str(column))
            if c == 0:
                ax.set_ylabel(str(row), fontsize=FONT_SIZE)
    _suptitle(fig, suptitle)
    return fig


def schedule_curves(panels: dict, x=None, *, xlabel: str = "timestep t", columns: int | None = None,
                    suptitle: str | None = None, logy=()):
    """One panel per quantity, one line per schedule: `{quantity: {schedule: values}}`, e.g.
    `{"β_t": {"linear": betas, "scaled linear": ...}, "ᾱ_t": {...}}`. `x`: shared x values (default
    0, 1, ...); `logy`: the quantities drawn on a log scale."""
    fig, axes = _panels(len(panels), columns or min(len(panels), 3), extra_height=0.6, aspect=0.75)
    for ax, (quantity, lines) in zip(axes, panels.items()):
        for name, values in lines.items():
            values = _as_array(values).astype(np.float64).ravel()
            ax.plot(np.arange(len(values)) if x is None else _as_array(x).ravel(), values, label=name)
        _title(ax, quantity)
        ax.set_xlabel(xlabel, fontsize=FONT_SIZE)
        ax.tick_params(labelsize=FONT_SIZE)
        if quantity in logy:
            ax.set_yscale("log")
        if len(lines) > 1:
            ax.legend(fontsize=FONT_SIZE)
    _suptitle(fig, suptitle)
    return fig


def latent_channels(latents, image=None, *, suptitle: str | None = None, cmap: str = "RdBu_r"):
    """The channels of one latent (C, h, w) (a batch's first item if (B, C, h, w)), each on a colour
    scale symmetric about 0 with its own limit, after the `image` they encode if given."""
    latents = latents.detach().float().cpu().numpy() if hasattr(latents, "detach") else np.asarray(latents)
    latents = latents[0] if latents.ndim == 4 else latents
    fig, axes = _panels(len(latents) + (image is not None), columns=min(len(latents) + (image is not None), 5))
    if image is not None:
        axes[0].imshow(_as_array(image))
        _title(axes[0], "image")
    for c, (ax, channel) in enumerate(zip(axes[image is not None:], latents)):
        limit = float(np.abs(channel).max()) or 1.0
        ax.imshow(channel, cmap=cmap, vmin=-limit, vmax=limit)
        _title(ax, f"channel {c}")
    for ax in axes:
        ax.axis("off")
    _suptitle(fig, suptitle)
    return fig


def x0_strip(frames, *, columns: int | None = None, suptitle: str | None = None, label: str = "x̂₀ at t"):
    """What the model believes at each step: `frames` as (timestep, image) pairs, e.g. decoded x̂₀,
    titled `x̂₀ at t = 981`; rows of `columns`."""
    frames = list(frames)
    titles = [f"{label} = {float(timestep):.0f}" for timestep, _ in frames]
    return image_grid([image for _, image in frames], titles, columns=columns, suptitle=suptitle)
