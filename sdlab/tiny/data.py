"""A procedural, captioned toy dataset: **Shapes**.

Training a real Stable Diffusion needs billions of captioned photos. To study the
*same* machinery on a laptop CPU we replace them with tiny synthetic pictures whose
caption **fully describes** the image:

> "a small red circle in the top left"
> "a large blue square to the left of a small yellow triangle"

Every image is drawn from a `Scene`: one or two `ShapeSpec` objects, each with

| attribute  | values                                                                |
|------------|-----------------------------------------------------------------------|
| `shape`    | circle, square, triangle                                              |
| `colour`   | red, yellow, green, blue, purple, white                               |
| `size`     | small, large                                                          |
| `position` | a 3x3 grid: top left, top, top right, left, center, right, bottom ... |

Training also says each scene in other words (`paraphrase`: "a red circle", "two big squares",
"a tiny blue triangle under a circle"): true to the picture, but maybe incomplete, so that a word
left out means "any". `parse_caption` reads both forms.

Because the caption determines every attribute it names, a generated image can be *read back*
by a deterministic analyzer (`sdlab.tiny.analyzer`) and compared with its prompt: this is
how we measure whether the model follows the text.

The module also defines a **held-out split**: a few attribute *combinations* (e.g. a
"red square", or a "circle in the top right") never appear in training, although every
individual attribute does. Generating them tests compositional generalisation.

Everything is deterministic (seeded `numpy` generators) and uses only `numpy`; shapes
are rendered with 4x4 supersampling for smooth, anti-aliased edges.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import Dataset

# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Shapes that `render` can draw but that no training scene or caption uses: the concepts that
# fine-tuning (`sdlab.tiny.finetune`) teaches the finished model: a diamond, a square turned by 45
# degrees. (A star or a ring is drawn fine too, but the tiny VAE's 8x8 latents cannot hold one: it
# decodes a star as a pentagon and a small ring as a disc.)
NOVEL_SHAPES: tuple[str, ...] = ("diamond",)
# No new *colour* can be taught the finished model: its VAE decodes every colour as one of the six
# above (orange (250, 140, 20) as yellow, cyan (40, 220, 220) as red, grey as purple).

# Strongly separated hues (roughly 0, 55, 125, 230, 290 degrees) plus an achromatic
# white, so that colours survive the blur and colour drift of a small VAE.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "yellow": (240, 220, 40),
    "green": (40, 200, 60),
    "blue": (40, 70, 240),
    "purple": (200, 50, 230),
    "white": (235, 235, 235),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)

SIZES: tuple[str, ...] = ("small", "large")
# Side length of the shape's bounding box, as a fraction of the image side.
SIZE_EXTENT: dict[str, float] = {"small": 0.15, "large": 0.30}

# A 3x3 grid of positions, named (row, column) -> words used in the caption.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# Fractional coordinates of the three grid lines used as object centres.
GRID_CENTRES: tuple[float, float, float] = (0.2, 0.5, 0.8)

# How each position is said: the caption's phrase first ("in the top left", "at the top", ...), then
# the synonyms `paraphrase` also uses.
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "at the top left", "in the top left corner"),
    "top": ("at the top", "at the top center"),
    "top right": ("in the top right", "at the top right", "in the top right corner"),
    "left": ("on the left", "to the left", "at the left"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "to the right", "at the right"),
    "bottom left": ("in the bottom left", "at the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom", "at the bottom center"),
    "bottom right": ("in the bottom right", "at the bottom right", "in the bottom right corner"),
}
POSITION_PHRASES: dict[str, str] = {name: words[0] for name, words in POSITION_WORDS.items()}

# Two-object scenes: the caption names a spatial relation, which fixes the positions
# of the first and the second object.
RELATIONS: dict[str, tuple[str, str]] = {
    "to the left of": ("left", "right"),
    "to the right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}

# Held-out attribute combinations: never rendered in the training split.
HELDOUT_COLOUR_SHAPE: frozenset[tuple[str, str]] = frozenset(
    {("red", "square"), ("green", "triangle"), ("blue", "circle")}
)
HELDOUT_SHAPE_POSITION: frozenset[tuple[str, str]] = frozenset(
    {("circle", "top right"), ("square", "bottom left"), ("triangle", "center")}
)

BACKGROUND_MAX = 24  # background grey level is drawn uniformly from [0, BACKGROUND_MAX]
OFFSET_MAX = 0.04  # positional jitter, as a fraction of the image side
SCALE_JITTER = 0.08  # relative jitter of the object size
SUPERSAMPLE = 4  # sub-pixels per pixel side used for anti-aliasing
IMAGE_SIZE = 64  # side of a Shapes image; the tiny model's VAE turns 64x64 pictures into 8x8x4 latents


def position_to_grid(position: str) -> tuple[int, int]:
    """Return the `(row, column)` of a named position in the 3x3 grid."""
    index = POSITIONS.index(position)
    return divmod(index, 3)


def grid_to_position(row: int, column: int) -> str:
    """Return the name of grid cell `(row, column)`, e.g. `(0, 2) -> "top right"`."""
    return POSITIONS[3 * row + column]


# --------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSpec:
    """One object of a scene.

    `shape`, `colour`, `size` and `position` are words of the vocabulary above; in a parsed prompt
    (`parse_caption`) all but the shape may be `None`, "any". The
    small random `offset` (fraction of the image side, `(dx, dy)`) and `scale` factor
    only add variety to the pixels: they are *not* part of the caption, so they are
    ignored when comparing two specs (`compare=False`).
    """

    shape: str
    colour: str | None
    size: str | None
    position: str | None
    offset: tuple[float, float] = field(default=(0.0, 0.0), compare=False)
    scale: float = field(default=1.0, compare=False)

    def __post_init__(self) -> None:
        if self.shape is None:
            raise ValueError("an object needs a shape")
        for value, vocabulary in (
            (self.shape, SHAPES + NOVEL_SHAPES),
            (self.colour, COLOURS),
            (self.size, SIZES),
            (self.position, POSITIONS),
        ):
            if value is not None and value not in vocabulary:
                raise ValueError(f"unknown attribute {value!r}; expected one of {vocabulary}")


@dataclass(frozen=True)
class Scene:
    """A whole picture: one or two objects on a plain dark background.

    `relation` is `None` for a single object, otherwise one of `RELATIONS` (the
    relation of `objects[0]` to `objects[1]`). `background` is the grey level of the
    backdrop; like the objects' jitter it is not part of the caption.
    """

    objects: tuple[ShapeSpec, ...]
    relation: str | None = None
    background: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if len(self.objects) == 1:
            if self.relation is not None:
                raise ValueError("a single-object scene has no relation")
        elif len(self.objects) == 2:
            actual = (self.objects[0].position, self.objects[1].position)
            if self.relation is None and actual == (None, None):  # "two circles": placed either way
                return
            if self.relation not in RELATIONS:
                raise ValueError(f"two objects need a relation in {tuple(RELATIONS)}")
            expected = RELATIONS[self.relation]
            if actual != expected:
                raise ValueError(f"relation {self.relation!r} needs positions {expected}")
        else:
            raise ValueError("a scene holds one or two objects")


def is_heldout(scene: Scene) -> bool:
    """`True` if any object of `scene` uses a held-out attribute combination."""
    return any(
        (obj.colour, obj.shape) in HELDOUT_COLOUR_SHAPE
        or (obj.shape, obj.position) in HELDOUT_SHAPE_POSITION
        for obj in scene.objects
    )


def _sample_object(rng: np.random.Generator, position: str) -> ShapeSpec:
    return ShapeSpec(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=COLOURS[rng.integers(len(COLOURS))],
        size=SIZES[rng.integers(len(SIZES))],
        position=position,
        offset=(
            float(rng.uniform(-OFFSET_MAX, OFFSET_MAX)),
            float(rng.uniform(-OFFSET_MAX, OFFSET_MAX)),
        ),
        scale=float(rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)),
    )


def sample_scene(
    rng: np.random.Generator, split: str | None = None, two_object_prob: float = 0.25
) -> Scene:
    """Draw a random scene.

    With probability `two_object_prob` the scene holds two objects linked by a random
    relation, otherwise one object at a random grid position. `split="train"` rejects
    scenes that use a held-out combination, `split="heldout"` keeps only those, and
    `split=None` keeps everything.
    """
    if split not in (None, "train", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    while True:
        if rng.random() < two_object_prob:
            relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
            first, second = RELATIONS[relation]
            objects = (_sample_object(rng, first), _sample_object(rng, second))
        else:
            relation = None
            objects = (_sample_object(rng, POSITIONS[rng.integers(len(POSITIONS))]),)
        scene = Scene(objects, relation, background=int(rng.integers(BACKGROUND_MAX + 1)))
        if split is None or is_heldout(scene) == (split == "heldout"):
            return scene


def sample_scenes(n: int, seed: int = 0, split: str | None = "train", **kwargs) -> list[Scene]:
    """`n` scenes from a generator seeded by `(seed, split)`: same arguments, same scenes."""
    split_id = {None: 0, "train": 1, "heldout": 2}[split]
    rng = np.random.default_rng([seed, split_id])
    return [sample_scene(rng, split, **kwargs) for _ in range(n)]


# --------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------


def _noun_phrase(obj: ShapeSpec) -> str:
    return " ".join(w for w in ("a", obj.size, obj.colour, obj.shape) if w)


def caption(scene: Scene) -> str:
    """The canonical caption of a scene, e.g. `"a small red circle in the top left"` (attributes that
    are `None` left out)."""
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        return " ".join(w for w in (_noun_phrase(obj), POSITION_PHRASES.get(obj.position)) if w)
    first, second = scene.objects
    if scene.relation is None:
        return " ".join(w for w in ("two", first.size, first.colour, first.shape + "s") if w)
    return f"{_noun_phrase(first)} {scene.relation} {_noun_phrase(second)}"


# How else a reader says things. Training captions are drawn from these with attributes left out
# (`paraphrase`), so that the model also follows "a red circle" or "two big squares": a word left out
# means "any", and a singular noun means one object.
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "to the left of": ("to the left of", "left of", "on the left of"),
    "to the right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# How often `paraphrase` leaves an attribute out of a one-object caption (two-object: half as often).
OMIT = {"size": 0.5, "colour": 0.25, "position": 0.5}


def _say(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[rng.integers(len(words))]


def _paraphrase_noun(rng: np.random.Generator, obj: ShapeSpec, omit: float) -> str:
    words = [_say(rng, ("a", "a", "one", "the")) if rng.random() < 0.85 else ""]  # or no article
    if rng.random() >= OMIT["size"] * omit:
        words.append(_say(rng, SIZE_WORDS[obj.size]))
    if rng.random() >= OMIT["colour"] * omit:
        words.append(obj.colour)
    words.append(obj.shape)
    return " ".join(w for w in words if w)


def paraphrase(scene: Scene, rng: np.random.Generator) -> str:
    """A random way of saying `scene`, true to it but maybe incomplete: synonyms ("big", "in the
    middle", "under"), with or without an article, some attributes left out ("a red circle"), and
    "two/a pair of ... circles" for two objects of one shape. `caption(scene)` is the full form."""
    if scene.relation is None:
        obj = scene.objects[0]
        text = _paraphrase_noun(rng, obj, 1.0)
        if rng.random() >= OMIT["position"]:
            text += " " + _say(rng, POSITION_WORDS[obj.position])
        return text
    first, second = scene.objects
    if first.shape == second.shape and rng.random() < 0.5:  # "two (large) (red) circles": the shared words only
        words = [_say(rng, ("two", "two", "a pair of"))]
        if first.size == second.size and rng.random() < 0.5:
            words.append(_say(rng, SIZE_WORDS[first.size]))
        if first.colour == second.colour and rng.random() < 0.75:
            words.append(first.colour)
        return " ".join(words + [first.shape + "s"])
    relation = _say(rng, RELATION_WORDS[scene.relation])
    return f"{_paraphrase_noun(rng, first, 0.5)} {relation} {_paraphrase_noun(rng, second, 0.5)}"


def caption_variants(scenes, n: int, seed: int = 0) -> list[list[str]]:
    """For each scene, `n` captions: the full `caption` first, then `n - 1` paraphrases drawn from a
    generator seeded by `(seed, 4)`."""
    rng = np.random.default_rng([seed, 4])
    return [[caption(scene)] + [paraphrase(scene, rng) for _ in range(n - 1)] for scene in _scene_list(scenes)]


def _alternatives(words) -> str:
    # Longest first, so that "top left" is tried before "top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _lookup(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {word: name for name, words in table.items() for word in words}


_SIZE_OF, _POSITION_OF, _RELATION_OF = _lookup(SIZE_WORDS), _lookup(POSITION_WORDS), _lookup(RELATION_WORDS)
_NOUN = (rf"(?:(?:an?|one|the) )?(?:({_alternatives(_SIZE_OF)}) )?(?:({_alternatives(COLOURS)}) )?"
         rf"({_alternatives(SHAPES + NOVEL_SHAPES)})")
_SINGLE_RE = re.compile(rf"{_NOUN}(?: ({_alternatives(_POSITION_OF)}))?")
_PAIR_RE = re.compile(rf"{_NOUN} ({_alternatives(_RELATION_OF)}) {_NOUN}")
_TWO_RE = re.compile(rf"(?:two|a pair of) (?:({_alternatives(_SIZE_OF)}) )?(?:({_alternatives(COLOURS)}) )?"
                     rf"({_alternatives(SHAPES + NOVEL_SHAPES)})s")


def _spec(size, colour, shape, position) -> ShapeSpec:
    return ShapeSpec(shape, colour, _SIZE_OF.get(size), position)


def parse_caption(text: str) -> Scene:
    """Inverse of `caption` and `paraphrase`: turn a prompt back into a `Scene` (without jitter). An
    attribute the prompt leaves out is `None` ("any"): "a red circle" is one red circle of any size,
    anywhere; "two squares" are two squares side by side or one above the other.

    Case and surrounding whitespace are ignored; anything that is not a prompt of the grammar above
    raises `ValueError`.
    """
    text = " ".join(text.lower().split())
    if match := _SINGLE_RE.fullmatch(text):
        size, colour, shape, phrase = match.groups()
        return Scene((_spec(size, colour, shape, _POSITION_OF.get(phrase)),))
    if match := _PAIR_RE.fullmatch(text):
        size1, colour1, shape1, relation, size2, colour2, shape2 = match.groups()
        relation = _RELATION_OF[relation]
        position1, position2 = RELATIONS[relation]
        return Scene((_spec(size1, colour1, shape1, position1), _spec(size2, colour2, shape2, position2)), relation)
    if match := _TWO_RE.fullmatch(text):
        obj = _spec(*match.groups(), None)
        return Scene((obj, obj))
    raise ValueError(f"not a Shapes caption: {text!r}")


def is_complete(scene: Scene) -> bool:
    """`True` if the scene fixes every attribute of every object (it can be rendered)."""
    return all(None not in (o.shape, o.colour, o.size, o.position) for o in scene.objects)


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def object_geometry(obj: ShapeSpec, size: int) -> tuple[float, float, float]:
    """Centre `(cx, cy)` and bounding-box side `s` of an object, in pixels."""
    row, column = position_to_grid(obj.position)
    cx = (GRID_CENTRES[column] + obj.offset[0]) * size
    cy = (GRID_CENTRES[row] + obj.offset[1]) * size
    side = SIZE_EXTENT[obj.size] * obj.scale * size
    return cx, cy, side


def _inside(shape: str, x: np.ndarray, y: np.ndarray, side: float) -> np.ndarray:
    """Boolean mask of the points `(x, y)` (relative to the centre) inside a shape."""
    half = side / 2
    if shape == "circle":
        return x**2 + y**2 <= half**2
    if shape == "square":
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    if shape == "triangle":
        # Isosceles, pointing up: apex at (0, -half), base from (-half, half) to (half, half).
        return (y <= half) & (np.abs(x) <= (y + half) / 2)
    if shape == "diamond":  # a square turned by 45 degrees, its corners on the box's sides
        return np.abs(x) + np.abs(y) <= half
    raise ValueError(f"unknown shape {shape!r}")


def coverage(obj: ShapeSpec, size: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Anti-aliased coverage (fraction in [0, 1]) of an object on its pixel window.

    Only the small window around the object is evaluated, on a grid of
    `SUPERSAMPLE x SUPERSAMPLE` sub-pixels per pixel which is then averaged.
    Returns the coverage array and the `(rows, cols)` slices where it belongs.
    """
    cx, cy, side = object_geometry(obj, size)
    x0, x1 = max(int(np.floor(cx - side / 2)), 0), min(int(np.ceil(cx + side / 2)), size)
    y0, y1 = max(int(np.floor(cy - side / 2)), 0), min(int(np.ceil(cy + side / 2)), size)
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (np.arange(x0, x1)[:, None] + sub).ravel() - cx
    ys = (np.arange(y0, y1)[:, None] + sub).ravel() - cy
    mask = _inside(obj.shape, xs[None, :], ys[:, None], side)
    h, w = y1 - y0, x1 - x0
    cover = mask.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))
    return cover, (slice(y0, y1), slice(x0, x1))


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a scene as an `(size, size, 3)` `uint8` RGB image."""
    if not is_complete(scene):
        raise ValueError(f"cannot draw {caption(scene)!r}: it leaves out a size, colour or position")
    image = np.full((size, size, 3), float(scene.background), dtype=np.float32)
    for obj in scene.objects:
        cover, window = coverage(obj, size)
        colour = np.array(PALETTE[obj.colour], dtype=np.float32)
        alpha = cover[..., None]
        image[window] = (1 - alpha) * image[window] + alpha * colour
    return np.round(image).astype(np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    r"""`uint8` images (..., H, W, 3) -> float tensor (..., 3, H, W) in [-1, 1] (the diffusion
    convention), $x = v / 127.5 - 1$: one image HxWx3 -> CHW, or a batch (N, H, W, 3) -> (N, 3, H, W)."""
    return torch.from_numpy(images).movedim(-1, -3).float().div(127.5).sub(1.0)


def to_image(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of `to_tensor`: float CHW tensor in [-1, 1] -> `uint8` HxWx3 image."""
    array = tensor.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round()
    return array.byte().permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


class ShapesDataset(Dataset):
    """`n` captioned Shapes images: `dataset[i] -> (image, caption)`.

    `image` is a float tensor `(3, size, size)` in [-1, 1]. Scenes are drawn once, at
    construction, from `sample_scenes(n, seed, split)`; images are rendered on first
    access and kept in an in-memory cache.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        split: str = "train",
        size: int = IMAGE_SIZE,
        two_object_prob: float = 0.25,
    ) -> None:
        self.size = size
        self.split = split
        self.scenes = sample_scenes(n, seed, split, two_object_prob=two_object_prob)
        self.captions = [caption(scene) for scene in self.scenes]
        self._cache: list[np.ndarray | None] = [None] * n

    def __len__(self) -> int:
        return len(self.scenes)

    def image(self, index: int) -> np.ndarray:
        """The `uint8` HxWx3 image of item `index` (rendered once, then cached)."""
        if self._cache[index] is None:
            self._cache[index] = render(self.scenes[index], self.size)
        return self._cache[index]

    def images(self) -> np.ndarray:
        """All images as one `uint8` array `(n, size, size, 3)`."""
        return np.stack([self.image(i) for i in range(len(self))])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return to_tensor(self.image(index)), self.captions[index]


def concept_scenes(n: int, seed: int = 0, shape: str | None = None, colour: str | None = None,
                   size: str | None = None) -> list[Scene]:
    """`n` one-object scenes that fix some attributes (say a novel `shape="diamond"` and
    `size="large"`) and draw the others at random, with the usual jitter: fine-tuning data.
    Seeded by `(seed, 3)`, a stream of its own."""
    rng = np.random.default_rng([seed, 3])
    scenes = []
    for _ in range(n):
        obj = _sample_object(rng, POSITIONS[rng.integers(len(POSITIONS))])
        fixed = {name: value for name, value in (("shape", shape), ("colour", colour), ("size", size)) if value}
        scenes.append(Scene((replace(obj, **fixed),), background=int(rng.integers(BACKGROUND_MAX + 1))))
    return scenes


def heldout_prompts(n: int, seed: int = 0, two_object_prob: float = 0.25) -> list[str]:
    """`n` evaluation prompts that each use at least one held-out combination."""
    scenes = sample_scenes(n, seed, "heldout", two_object_prob=two_object_prob)
    return [caption(scene) for scene in scenes]


def train_prompts(n: int, seed: int = 0, two_object_prob: float = 0.25) -> list[str]:
    """`n` prompts drawn like the training split (for in-distribution evaluation)."""
    scenes = sample_scenes(n, seed, "train", two_object_prob=two_object_prob)
    return [caption(scene) for scene in scenes]


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def _scene_list(scenes) -> list[Scene]:
    return scenes.scenes if isinstance(scenes, ShapesDataset) else list(scenes)


def attribute_counts(scenes) -> dict[str, Counter]:
    """Count objects per attribute value (plus objects per scene) over some scenes.

    Accepts a list of `Scene`s or a `ShapesDataset`.
    """
    scenes = _scene_list(scenes)
    counts = {name: Counter() for name in ("objects", "shape", "colour", "size", "position")}
    for scene in scenes:
        counts["objects"][len(scene.objects)] += 1
        for obj in scene.objects:
            for name in ("shape", "colour", "size", "position"):
                counts[name][getattr(obj, name)] += 1
    return counts


def summary(scenes) -> dict[str, Counter]:
    """Print (and return) how often each attribute value occurs in some scenes."""
    scenes = _scene_list(scenes)
    counts = attribute_counts(scenes)
    n_objects = sum(counts["shape"].values())
    heldout = sum(is_heldout(scene) for scene in scenes)
    print(f"{len(scenes)} scenes, {n_objects} objects, {heldout} with a held-out combination")
    for name, counter in counts.items():
        cells = ", ".join(f"{key}: {value}" for key, value in sorted(counter.items(), key=str))
        print(f"  {name:>8}  {cells}")
    return counts
