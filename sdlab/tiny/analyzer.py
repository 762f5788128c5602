"""Read a Shapes image back into attributes, to score how well a picture follows its prompt.

A text-to-image model is only useful if the picture matches the text. On the Shapes
dataset (`sdlab.tiny.data`) we can measure this exactly: the caption fixes every
attribute, and this module recovers the attributes from the pixels with a small,
deterministic pipeline (no learned model, so it cannot share the generator's biases):

1. **Background.** The median colour of the image border.
2. **Segmentation.** Pixels whose (lightly smoothed) colour differs from the background
   by more than `DETECTION_THRESHOLD` are grouped into connected components; tiny
   components are noise and are dropped.
3. **Per object**, from the component and its soft *alpha matte* (how much of each
   pixel is covered by the object's colour):
   - **colour**: hue and saturation of the object's core; white if unsaturated,
     otherwise the palette colour of nearest hue;
   - **size**: side of the bounding box of the pixels above half the object's peak
     contrast, compared with the geometric mean of the "small" and "large" sizes;
   - **position**: centre of that bounding box, mapped to the 3x3 grid;
   - **shape**: two moment statistics of the alpha matte (see `shape_statistics`):
     a triangle is bottom-heavy, a square has its mass in the corners, a circle is
     neither. With `novel=True` (`detect`, `read_scene`, `describe`; `score` sets it when the
     prompt names a shape of `data.NOVEL_SHAPES`) a shape with its mass along the axes
     instead of in the corners (squareness below `DIAMOND_THRESHOLD`) is a **diamond**, the
     shape fine-tuning teaches (`sdlab.tiny.finetune`); without it the analyzer's readings
     are those of the three trained shapes only.

Generated images are blurry and noisy, so the statistics are chosen to be robust:
cumulants of order three and four are left unchanged by a Gaussian blur, and `degrade`
lets us check the whole analyzer on artificially damaged renders.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .data import (
    NOVEL_SHAPES,
    PALETTE,
    RELATIONS,
    SIZE_EXTENT,
    Scene,
    ShapeSpec,
    caption,
    grid_to_position,
    parse_caption,
)

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")

DETECTION_THRESHOLD = 0.2  # colour distance from the background, in [0, 1] units
SMOOTHING_SIGMA = 0.5  # pixels; a light blur that tames noise before thresholding
MIN_AREA_FRACTION = 0.003  # components smaller than this fraction of the image are noise
WHITE_SATURATION = 0.35  # cores less saturated than this are "white"
# Size boundary: geometric mean of the small and large extents (a fraction of the side).
SIZE_THRESHOLD = float(np.sqrt(SIZE_EXTENT["small"] * SIZE_EXTENT["large"]))
TRIANGLE_THRESHOLD = 0.5  # on `triangleness`: 0 for symmetric shapes, ~1 for a triangle
SQUARE_THRESHOLD = 0.3  # on `squareness`: 0 for round shapes, ~1 for a square
# On `squareness`, with `novel=True`: a diamond (a square turned by 45 degrees) scores -0.3 to -0.55 as
# drawn and -0.13 to -0.3 through the tiny VAE; the tiny model's generated circles score -0.1 or more.
DIAMOND_THRESHOLD = -0.15


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image.

    The four attributes use the vocabulary of `sdlab.tiny.data`; the measurements behind
    them are kept for inspection: `centre` `(x, y)` and `extent` are fractions of the
    image side, `area` a fraction of the image, `rgb` the estimated object colour.
    """

    shape: str
    colour: str
    size: str
    position: str
    centre: tuple[float, float]
    extent: float
    area: float
    rgb: tuple[int, int, int]
    triangleness: float
    squareness: float

    def spec(self) -> ShapeSpec:
        """The object as a `ShapeSpec` (for comparison with a scene)."""
        return ShapeSpec(self.shape, self.colour, self.size, self.position)


# --------------------------------------------------------------------------------------
# Image helpers (plain numpy, to avoid a dependency on scipy)
# --------------------------------------------------------------------------------------


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Blur the two spatial axes of an `H x W` or `H x W x C` float array.

    A separable Gaussian kernel (radius `3 sigma`), with mirrored edges.
    """
    if sigma <= 0:
        return image.astype(np.float64)
    radius = max(int(np.ceil(3 * sigma)), 1)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        length = out.shape[axis]
        out = sum(
            weight * np.take(padded, np.arange(i, i + length), axis=axis)
            for i, weight in enumerate(kernel)
        )
    return out


def dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a boolean mask by one pixel in all eight directions."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    grown = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy : dy + height, dx : dx + width]
    return grown


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a boolean mask, as a list of boolean masks.

    A plain flood fill: fine for the few hundred foreground pixels of a Shapes image.
    """
    height, width = mask.shape
    unvisited = mask.copy()
    components = []
    for start in zip(*np.nonzero(mask)):
        if not unvisited[start]:
            continue
        component = np.zeros_like(mask)
        unvisited[start] = False
        stack = [start]
        while stack:
            y, x = stack.pop()
            component[y, x] = True
            for ny in range(max(y - 1, 0), min(y + 2, height)):
                for nx in range(max(x - 1, 0), min(x + 2, width)):
                    if unvisited[ny, nx]:
                        unvisited[ny, nx] = False
                        stack.append((ny, nx))
        components.append(component)
    return components


# --------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------


def _hue_saturation(rgb: np.ndarray) -> tuple[float, float]:
    """Hue (degrees) and HSV saturation of one RGB colour with components in [0, 1]."""
    r, g, b = np.clip(rgb, 0.0, None)
    high, low = max(r, g, b), min(r, g, b)
    if high <= 0:
        return 0.0, 0.0
    spread = high - low
    if spread == 0:
        return 0.0, 0.0
    if high == r:
        hue = 60 * ((g - b) / spread % 6)
    elif high == g:
        hue = 60 * ((b - r) / spread + 2)
    else:
        hue = 60 * ((r - g) / spread + 4)
    return float(hue), float(spread / high)


_PALETTE_HUES = {
    name: _hue_saturation(np.array(rgb) / 255)[0]
    for name, rgb in PALETTE.items()
    if name != "white"
}


def classify_colour(rgb: np.ndarray) -> str:
    """Name of the palette colour closest to `rgb` (components in [0, 1]).

    Unsaturated colours are white; otherwise the palette colour with the nearest hue
    wins. Hue and saturation do not change when a colour is darkened (for example, a
    small object blurred into the black background), which makes them robust.
    """
    hue, saturation = _hue_saturation(rgb)
    if saturation < WHITE_SATURATION:
        return "white"
    def hue_distance(name: str) -> float:
        delta = abs(hue - _PALETTE_HUES[name]) % 360
        return min(delta, 360 - delta)

    return min(_PALETTE_HUES, key=hue_distance)


# --------------------------------------------------------------------------------------
# Shape
# --------------------------------------------------------------------------------------


def shape_statistics(alpha: np.ndarray, extent: float) -> tuple[float, float]:
    """`(triangleness, squareness)` of an object from its alpha matte.

    Treat `alpha` as a distribution of mass over the pixels and take its cumulants
    around the centroid (`k_ij` mixes order `i` in x and order `j` in y):

    - **triangleness** `= -k_03 / (0.0074 s^3)`: the third cumulant along y, the
      skewness of the vertical profile. Our triangles point up, so their mass sits
      low: an ideal triangle of side `s` scores 1, any up-down symmetric shape 0.
    - **squareness** `= (3 k_22 - (k_40 + k_04) / 2) / (s^4 / 120)`: any round
      (isotropic) blob, even a blurred one, has `k_40 = k_04 = 3 k_22`; a square
      breaks the symmetry because its mass reaches into the corners. An ideal square
      scores 1, a disc 0.

    The normalisations are the values for an ideal triangle and square of side `s`
    (`extent`, in pixels). Blurring with a Gaussian adds to cumulants of order two
    only, so both statistics survive the blur of a generated image.
    """
    ys, xs = np.indices(alpha.shape, dtype=np.float64)
    mass = alpha.sum()
    dx = xs - (alpha * xs).sum() / mass
    dy = ys - (alpha * ys).sum() / mass

    def moment(px: int, py: int) -> float:
        return float((alpha * dx**px * dy**py).sum() / mass)

    var_x, var_y = moment(2, 0), moment(0, 2)
    k03 = moment(0, 3)
    k40 = moment(4, 0) - 3 * var_x**2
    k04 = moment(0, 4) - 3 * var_y**2
    k22 = moment(2, 2) - var_x * var_y - 2 * moment(1, 1) ** 2
    triangleness = -k03 / (0.0074 * extent**3)
    squareness = (3 * k22 - (k40 + k04) / 2) / (extent**4 / 120)
    return triangleness, squareness


def classify_shape(triangleness: float, squareness: float, novel: bool = False) -> str:
    """Shape name from the two statistics of `shape_statistics`; `novel=True` also names diamonds."""
    if triangleness > TRIANGLE_THRESHOLD:
        return "triangle"
    if squareness > SQUARE_THRESHOLD:
        return "square"
    if novel and squareness < DIAMOND_THRESHOLD:
        return "diamond"
    return "circle"


# --------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------


def background_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the 1-pixel border of a float image (objects never touch it)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0)


def detect(image: np.ndarray, novel: bool = False) -> list[DetectedObject]:
    """Find the objects of an RGB `uint8` image (`H x W x 3`, any size).

    Returns the objects in reading order (top to bottom, then left to right, by grid
    cell); an empty list means that nothing stands out from the background. `novel=True`
    also recognises the shapes of `data.NOVEL_SHAPES` (see `classify_shape`).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    height, width = image.shape[:2]
    pixels = image.astype(np.float64) / 255
    difference = pixels - background_colour(pixels)
    difference = gaussian_blur(difference, SMOOTHING_SIGMA)
    contrast = np.abs(difference).max(axis=2)

    objects = []
    for component in connected_components(contrast > DETECTION_THRESHOLD):
        if component.sum() < MIN_AREA_FRACTION * height * width:
            continue
        objects.append(_measure(component, difference, contrast, width, height, novel))
    objects.sort(key=lambda obj: (int(obj.centre[1] * 3), int(obj.centre[0] * 3), obj.centre))
    return objects


def _measure(component, difference, contrast, width, height, novel: bool = False) -> DetectedObject:
    """Attributes of one connected component (see the module docstring)."""
    peak = np.percentile(contrast[component], 90)

    # Colour: the mean colour difference of the core, where the object is brightest.
    core = component & (contrast >= 0.8 * peak)
    colour_vector = difference[core].mean(axis=0)
    rgb = np.clip(colour_vector, 0, 1)

    # Size and position: bounding box of the pixels above half the peak contrast.
    half = component & (contrast >= 0.5 * peak)
    ys, xs = np.nonzero(half)
    box_width, box_height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    extent = max(box_width, box_height)
    centre_x = (xs.min() + xs.max() + 1) / 2 / width
    centre_y = (ys.min() + ys.max() + 1) / 2 / height
    row = min(int(centre_y * 3), 2)
    column = min(int(centre_x * 3), 2)
    relative_extent = extent / max(width, height)

    # Shape: the alpha matte projects each pixel's colour difference onto the
    # object's colour, on the component grown by one pixel to include blurred edges.
    region = dilate(component)
    alpha = np.where(region, difference @ colour_vector / (colour_vector @ colour_vector), 0.0)
    triangleness, squareness = shape_statistics(alpha, extent)

    return DetectedObject(
        shape=classify_shape(triangleness, squareness, novel),
        colour=classify_colour(rgb),
        size="small" if relative_extent < SIZE_THRESHOLD else "large",
        position=grid_to_position(row, column),
        centre=(float(centre_x), float(centre_y)),
        extent=float(relative_extent),
        area=float(half.sum() / (width * height)),
        rgb=tuple(int(round(255 * v)) for v in rgb),
        triangleness=float(triangleness),
        squareness=float(squareness),
    )


def read_scene(image: np.ndarray, novel: bool = False) -> Scene | None:
    """The `Scene` an image shows, or `None` if it is not a valid Shapes scene.

    Valid means one object, or two objects on the left and right (or top and bottom)
    of the middle row (column). Two objects are described from left to right (top to
    bottom), e.g. "... to the left of ...". `novel`: as for `detect`.
    """
    objects = [obj.spec() for obj in detect(image, novel)]
    if len(objects) == 1:
        return Scene(tuple(objects))
    if len(objects) == 2:
        for relation in ("to the left of", "above"):
            first, second = RELATIONS[relation]
            for a, b in (objects, objects[::-1]):
                if (a.position, b.position) == (first, second):
                    return Scene((a, b), relation)
    return None


def describe(image: np.ndarray, novel: bool = False) -> str | None:
    """Caption an image with the analyzer: `caption(read_scene(image, novel))`, or `None`."""
    scene = read_scene(image, novel)
    return None if scene is None else caption(scene)


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


def _agreement(expected: ShapeSpec, found: DetectedObject) -> int:
    return sum(getattr(expected, name) == getattr(found, name) for name in ATTRIBUTES)


def match(
    expected: tuple[ShapeSpec, ...], found: list[DetectedObject]
) -> list[DetectedObject | None]:
    """Pair every expected object with a distinct detection (or `None` if too few).

    Among all assignments, pick the one that agrees on the most attributes; ties go
    to the larger detections. Only the six largest detections are considered.
    """
    candidates = sorted(found, key=lambda obj: -obj.area)[:6]
    k = min(len(expected), len(candidates))
    best, best_key = [], None
    for chosen in itertools.permutations(range(len(candidates)), k):
        agreement = sum(_agreement(e, candidates[i]) for e, i in zip(expected, chosen))
        key = (agreement, -sum(chosen))
        if best_key is None or key > best_key:
            best, best_key = [candidates[i] for i in chosen], key
    return best + [None] * (len(expected) - k)


def score(prompt_or_scene: str | Scene, image: np.ndarray) -> dict[str, float]:
    """How well `image` follows a prompt (a caption string or a `Scene`).

    Returns values in [0, 1]:

    - `count`: 1 if the image holds exactly as many objects as the prompt;
    - `colour`, `shape`, `size`, `position`: the fraction of the prompt's objects
      whose matched detection has the right value (a missing object counts as wrong),
      over the objects whose prompt names that attribute (absent if none does: "a red
      circle" is scored on count, colour and shape);
    - `relation` (two-object prompts only): 1 if both objects are found and stand in
      the right left/right or above/below order;
    - `all`: 1 if the count and every attribute of every object are right.

    A prompt (a `Scene`) with a shape of `data.NOVEL_SHAPES` is read with `novel=True`.
    """
    expected = prompt_or_scene
    if isinstance(expected, str):
        expected = parse_caption(expected)
    found = detect(image, novel=any(obj.shape in NOVEL_SHAPES for obj in expected.objects))
    matched = match(expected.objects, found)
    result = {"count": float(len(found) == len(expected.objects))}
    for name in ATTRIBUTES:
        hits = [
            found_obj is not None and getattr(found_obj, name) == getattr(wanted, name)
            for wanted, found_obj in zip(expected.objects, matched)
            if getattr(wanted, name) is not None  # an attribute the prompt leaves out is not scored
        ]
        if hits:
            result[name] = float(np.mean(hits))
    if expected.relation is not None:
        first, second = matched
        ok = False
        if first is not None and second is not None:
            axis = 0 if expected.relation in ("to the left of", "to the right of") else 1
            before = first.centre[axis] < second.centre[axis]
            ok = before == (expected.relation in ("to the left of", "above"))
        result["relation"] = float(ok)
    result["all"] = float(all(value == 1.0 for key, value in result.items() if key != "relation"))
    return result


def verdict(prompt: str, image: np.ndarray) -> str:
    """One line for a picture: what the analyzer reads in it, after ✓ (every attribute of `prompt`
    right) or ✗, or without a mark when `prompt` is not a caption of the Shapes grammar. A prompt
    that names a shape of `data.NOVEL_SHAPES` is read with `novel=True`."""
    try:
        expected = parse_caption(prompt)
    except ValueError:  # not a Shapes caption: nothing to check it against
        return f"reads: {describe(image) or 'nothing recognisable'}"
    novel = any(obj.shape in NOVEL_SHAPES for obj in expected.objects)
    reading = f"reads: {describe(image, novel=novel) or 'nothing recognisable'}"
    return f"{'✓' if score(expected, image)['all'] == 1 else '✗'} {reading}"


def evaluate(prompts, images) -> dict[str, float]:
    """Average `score` over pairs of prompts and images.

    Each key is averaged over the prompts that have it (`relation` only over the
    two-object prompts); `n` is the number of pairs.
    """
    totals: dict[str, list[float]] = {}
    for prompt, image in zip(prompts, images, strict=True):
        for key, value in score(prompt, image).items():
            totals.setdefault(key, []).append(value)
    summary = {key: float(np.mean(values)) for key, values in totals.items()}
    summary["n"] = float(len(prompts))
    return summary


# --------------------------------------------------------------------------------------
# Robustness check
# --------------------------------------------------------------------------------------


def degrade(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Damage an image the way a small generative model might, to test the analyzer.

    At `strength=1` ("moderate"): Gaussian blur with sigma up to 1.2 px, a colour cast
    (per-channel gain up to +-15 % and offset up to +-12 levels), Gaussian noise with
    a standard deviation up to 10 levels, then JPEG compression at quality 30-70.
    Larger `strength` scales blur, cast and noise.
    """
    pixels = image.astype(np.float64)
    sigma = rng.uniform(0.3, 1.2) * strength
    pixels = gaussian_blur(pixels, sigma)
    gain = rng.uniform(1 - 0.15 * strength, 1 + 0.15 * strength, size=3)
    offset = rng.uniform(-12, 12, size=3) * strength
    pixels = pixels * gain + offset
    pixels = pixels + rng.normal(0, rng.uniform(2, 10) * strength, size=pixels.shape)
    pixels = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(rng.integers(30, 71)))
    return np.array(Image.open(buffer).convert("RGB"))

