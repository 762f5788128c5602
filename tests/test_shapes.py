"""Tests for the Shapes dataset (`sdlab.tiny.data`) and its analyzer (`sdlab.tiny.analyzer`)."""

import numpy as np
import pytest
import torch

from sdlab.tiny import analyzer
from sdlab.tiny.data import (
    COLOURS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_SHAPE_POSITION,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapesDataset,
    ShapeSpec,
    caption,
    caption_variants,
    heldout_prompts,
    is_heldout,
    parse_caption,
    render,
    sample_scenes,
    summary,
    to_image,
)


def combos(scenes):
    """All (colour, shape) and (shape, position) pairs used by some scenes."""
    colour_shape = {(o.colour, o.shape) for s in scenes for o in s.objects}
    shape_position = {(o.shape, o.position) for s in scenes for o in s.objects}
    return colour_shape, shape_position


def test_same_seed_gives_identical_data():
    a, b = ShapesDataset(40, seed=3), ShapesDataset(40, seed=3)
    assert a.captions == b.captions
    assert np.array_equal(a.images(), b.images())
    c = ShapesDataset(40, seed=4)
    assert a.captions != c.captions


def test_dataset_items():
    dataset = ShapesDataset(8, seed=0, size=64)
    image, text = dataset[5]
    assert isinstance(text, str) and text == caption(dataset.scenes[5])
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert -1.0 <= image.min() < image.max() <= 1.0
    # The tensor is the cached render, and converts back exactly.
    assert np.array_equal(to_image(image), render(dataset.scenes[5], 64))
    assert dataset.image(5) is dataset.image(5)
    assert len(dataset) == 8


def test_caption_round_trip():
    scenes = sample_scenes(500, seed=1, split=None)
    assert any(len(s.objects) == 2 for s in scenes)
    for scene in scenes:
        text = caption(scene)
        assert parse_caption(text) == scene
        assert caption(parse_caption(text)) == text
    assert caption(parse_caption("  A Small RED circle in the top left ")) == (
        "a small red circle in the top left"
    )


@pytest.mark.parametrize(
    "text",
    [
        "a huge red circle in the center",
        "a red shape",
        "two circles above a square",
        "a red circle in the top",
        "a red circle near a blue square",
        "",
    ],
)
def test_parse_caption_rejects_other_text(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_paraphrases_are_true_to_their_scene():
    scenes = sample_scenes(400, seed=2, split=None)
    variants = caption_variants(scenes, 4, seed=2)
    assert [texts[0] for texts in variants] == [caption(scene) for scene in scenes]
    said = [text for texts in variants for text in texts[1:]]
    assert len(set(said)) > 600  # variety, not a handful of templates
    for scene, texts in zip(scenes, variants):
        for text in texts:
            parsed = parse_caption(text)  # every paraphrase is in the grammar ...
            assert len(parsed.objects) == len(scene.objects), text
            for wanted, said_obj in zip(scene.objects, parsed.objects):  # ... and says nothing false
                for name in ("shape", "colour", "size", "position"):
                    assert getattr(said_obj, name) in (None, getattr(wanted, name)), (text, name)
    assert caption_variants(scenes[:20], 4, seed=2) == variants[:20]
    parsed = [parse_caption(text) for text in said]
    plain = [p for p in parsed if len(p.objects) == 1 and p.objects[0].size is None and p.objects[0].position is None]
    assert len(plain) > 100  # "a red circle": what a reader types first
    assert sum(len(p.objects) == 2 and p.relation is None for p in parsed) > 10  # "two circles"
    assert any(" big " in f" {text} " for text in said) and any("in the middle" in text for text in said)


def test_plain_prompts_parse_with_unsaid_attributes_as_any():
    assert parse_caption("a red circle") == Scene((ShapeSpec("circle", "red", None, None),))
    assert parse_caption("One BIG square in the middle") == Scene((ShapeSpec("square", None, "large", "center"),))
    two = parse_caption("two tiny green triangles")
    assert two.relation is None and two.objects == (ShapeSpec("triangle", "green", "small", None),) * 2
    pair = parse_caption("the blue circle under a big square")
    assert pair.relation == "below" and pair.objects[1] == ShapeSpec("square", None, "large", "top")
    with pytest.raises(ValueError, match="leaves out"):
        render(parse_caption("a red circle"))


def test_score_counts_only_what_the_prompt_says():
    image = render(parse_caption("a large red circle in the center"))
    plain = analyzer.score("a red circle", image)
    assert set(plain) == {"count", "colour", "shape", "all"} and plain["all"] == 1.0
    assert analyzer.score("a blue circle", image)["all"] == 0.0
    assert analyzer.score("two circles", image) == {"count": 0.0, "shape": 0.5, "all": 0.0}
    pair = render(parse_caption("a large red circle to the left of a small red circle"))
    assert analyzer.score("two red circles", pair)["all"] == 1.0
    assert analyzer.score("a red circle", pair)["count"] == 0.0  # a singular noun is one object


def test_scene_validation():
    left = ShapeSpec("circle", "red", "small", "left")
    right = ShapeSpec("square", "blue", "large", "right")
    Scene((left, right), "to the left of")
    with pytest.raises(ValueError):
        Scene((left, right), "above")  # positions do not fit the relation
    with pytest.raises(ValueError):
        ShapeSpec("hexagon", "red", "small", "left")


def test_heldout_split():
    train = sample_scenes(3000, seed=0, split="train")
    heldout = sample_scenes(300, seed=0, split="heldout")
    assert not any(is_heldout(s) for s in train)
    assert all(is_heldout(s) for s in heldout)

    train_colour_shape, train_shape_position = combos(train)
    held_colour_shape, held_shape_position = combos(heldout)
    assert not train_colour_shape & HELDOUT_COLOUR_SHAPE
    assert not train_shape_position & HELDOUT_SHAPE_POSITION
    assert HELDOUT_COLOUR_SHAPE <= held_colour_shape
    assert HELDOUT_SHAPE_POSITION <= held_shape_position

    # Every individual attribute value is still seen during training.
    objects = [o for s in train for o in s.objects]
    vocabularies = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
    for name, vocabulary in vocabularies.items():
        assert {getattr(o, name) for o in objects} == set(vocabulary)

    prompts = heldout_prompts(50, seed=0)
    assert prompts == heldout_prompts(50, seed=0)
    assert all(is_heldout(parse_caption(p)) for p in prompts)


def test_summary_counts(capsys):
    counts = summary(ShapesDataset(100, seed=0))
    assert sum(counts["objects"].values()) == 100
    assert sum(counts["colour"].values()) == sum(counts["shape"].values())
    assert "100 scenes" in capsys.readouterr().out


def accuracy(scenes, images):
    result = analyzer.evaluate(scenes, images)
    return {key: result[key] for key in ("count", *analyzer.ATTRIBUTES, "relation")}


def test_analyzer_reads_clean_renders():
    scenes = sample_scenes(300, seed=11, split=None)
    result = accuracy(scenes, [render(s) for s in scenes])
    assert min(result.values()) >= 0.99, result


def test_analyzer_reads_degraded_renders():
    scenes = sample_scenes(300, seed=12, split=None)
    rng = np.random.default_rng(0)
    images = [analyzer.degrade(render(s), rng) for s in scenes]
    result = accuracy(scenes, images)
    assert min(result.values()) >= 0.95, result


def test_analyzer_describes_an_image():
    scene = parse_caption("a small blue square to the right of a large yellow triangle")
    image = render(scene)
    assert analyzer.describe(image) == "a large yellow triangle to the left of a small blue square"
    assert analyzer.read_scene(image) == Scene(scene.objects[::-1], "to the left of")


def test_score_flags_wrong_attributes():
    image = render(parse_caption("a large red circle in the center"))
    assert analyzer.score("a large red circle in the center", image)["all"] == 1.0
    wrong_colour = analyzer.score("a large green circle in the center", image)
    assert wrong_colour["colour"] == 0.0 and wrong_colour["shape"] == 1.0
    wrong_shape = analyzer.score("a large red triangle in the center", image)
    assert wrong_shape["shape"] == 0.0 and wrong_shape["all"] == 0.0
    wrong_place = analyzer.score("a small red circle in the top left", image)
    assert wrong_place["size"] == 0.0 and wrong_place["position"] == 0.0
    two = analyzer.score("a large red circle to the left of a small blue square", image)
    assert two["count"] == 0.0 and two["colour"] == 0.5 and two["relation"] == 0.0


def test_analyzer_flags_empty_images():
    for image in (np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 90, np.uint8)):
        assert analyzer.detect(image) == []
        assert analyzer.read_scene(image) is None
        result = analyzer.score("a small red circle in the top left", image)
        assert result["count"] == 0.0 and result["all"] == 0.0
        assert all(result[name] == 0.0 for name in analyzer.ATTRIBUTES)


def test_verdict_marks_a_picture_against_its_prompt():
    image = render(parse_caption("a large red circle in the center"))
    assert analyzer.verdict("a large red circle in the center", image) == "✓ reads: a large red circle in the center"
    assert analyzer.verdict("a large blue circle in the center", image) == "✗ reads: a large red circle in the center"
    assert analyzer.verdict("a red shape", image) == "reads: a large red circle in the center"  # no caption to check
    assert analyzer.verdict("a large red circle in the center", np.zeros((64, 64, 3), np.uint8)) == \
        "✗ reads: nothing recognisable"
