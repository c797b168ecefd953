import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xcomp_lab.data import scenes
from xcomp_lab.data.scenes import (
    HELD_OUT_SEED,
    PALETTE,
    VOCABULARY,
    Scene,
    Shape,
    caption,
    caption_order,
    held_out_dataset,
    make_dataset,
    make_scenes,
    relation,
    render,
    write_examples,
)

SAMPLES = Path(scenes.__file__).resolve().parent / "samples"
NOUN = r"a (small|large) (red|green|blue|yellow|purple|orange) (circle|square|triangle)"
GRAMMAR = re.compile(rf"{NOUN}( (left of|right of|above|below) {NOUN})?")


@pytest.fixture(scope="module")
def many_scenes() -> list[Scene]:
    return make_scenes(2000, seed=1000)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_same_seed_gives_identical_pixels_and_captions():
    first, second = make_dataset(8, seed=1000, image_size=112), make_dataset(8, seed=1000, image_size=112)
    assert [c for _, c in first] == [c for _, c in second]
    for (a, _), (b, _) in zip(first, second):
        assert np.array_equal(pixels(a), pixels(b))


def test_different_seed_gives_different_scenes():
    first, other = make_dataset(8, seed=1000, image_size=112), make_dataset(8, seed=1001, image_size=112)
    assert [c for _, c in first] != [c for _, c in other]
    assert not all(np.array_equal(pixels(a), pixels(b)) for (a, _), (b, _) in zip(first, other))


def test_held_out_is_fixed_and_differs_from_training():
    held_out = held_out_dataset(n=10, image_size=112)
    assert [c for _, c in held_out] == [c for _, c in held_out_dataset(n=10, image_size=112)]
    assert make_scenes(10, HELD_OUT_SEED) != make_scenes(10, 1000)
    assert len(held_out_dataset(n=3, image_size=56)) == 3


def test_training_refuses_the_held_out_seed():
    with pytest.raises(ValueError, match="reserved for held_out_dataset"):
        make_dataset(2, seed=HELD_OUT_SEED)


def test_images_are_rgb_of_the_requested_size():
    for size in (56, 112, 224, 490):
        image, _ = make_dataset(1, seed=1000, image_size=size)[0]
        assert image.mode == "RGB" and image.size == (size, size)


def test_every_caption_follows_the_grammar_and_describes_its_shapes(many_scenes):
    for scene in many_scenes:
        text = caption(scene)
        match = GRAMMAR.fullmatch(text)
        assert match, text
        described = [match.group(1, 2, 3)] + ([match.group(6, 7, 8)] if match.group(4) else [])
        assert described == [(s.size, s.colour, s.kind) for s in scene.shapes]


def test_relation_word_matches_positions_and_is_unambiguous(many_scenes):
    two_shape = [s for s in many_scenes if len(s.shapes) == 2]
    seen = set()
    for scene in two_shape:
        first, second = scene.shapes
        relation = GRAMMAR.fullmatch(caption(scene)).group(5)
        seen.add(relation)
        along, across = ("x", "y") if relation in ("left of", "right of") else ("y", "x")
        d_along = getattr(first, along) - getattr(second, along)
        d_across = getattr(first, across) - getattr(second, across)
        assert (d_along < 0) == (relation in ("left of", "above"))
        # No overlap along the relation axis, and the other axis is nearly aligned.
        assert abs(d_along) >= (first.extent + second.extent) / 2
        assert abs(d_across) < abs(d_along) / 2
    assert seen == {"left of", "right of", "above", "below"}
    assert 0.3 < len(two_shape) / len(many_scenes) < 0.7


def test_caption_names_the_larger_shape_first_then_the_left_or_upper_one(many_scenes):
    orders = set()
    for scene in (s for s in many_scenes if len(s.shapes) == 2):
        first, second = scene.shapes
        assert first.extent >= second.extent
        if first.extent == second.extent:
            assert relation(scene) in ("left of", "above")
        orders.add((first.size, second.size))
    assert orders == {("large", "small"), ("large", "large"), ("small", "small")}


def test_one_image_has_one_caption_whatever_order_the_shapes_are_listed_in():
    big = Shape("square", "blue", "large", 0.7, 0.5)
    small = Shape("circle", "red", "small", 0.25, 0.5)
    expected = "a large blue square right of a small red circle"
    for shapes in ((big, small), (small, big)):
        assert caption(Scene(caption_order(shapes))) == expected


def test_shapes_stay_inside_the_image(many_scenes):
    for scene in many_scenes:
        for shape in scene.shapes:
            half = shape.extent / 2
            assert 0 < shape.x - half and shape.x + half < 1
            assert 0 < shape.y - half and shape.y + half < 1


def test_vocabulary_is_sorted_small_and_exactly_covers_the_captions(many_scenes):
    assert VOCABULARY == sorted(set(VOCABULARY)) and len(VOCABULARY) <= 40
    used = {word for scene in many_scenes for word in caption(scene).split()}
    assert used == set(VOCABULARY)


def test_render_draws_the_right_colour_where_each_shape_is():
    scene = Scene(
        (Shape("square", "red", "large", 0.25, 0.5), Shape("circle", "blue", "small", 0.75, 0.5)),
        background=240,
    )
    assert caption(scene) == "a large red square left of a small blue circle"
    image = pixels(render(scene, 112))
    assert tuple(image[56, 28]) == PALETTE["red"]
    assert tuple(image[56, 84]) == PALETTE["blue"]
    assert tuple(image[5, 5]) == (240, 240, 240)
    red_side = (np.all(image == PALETTE["red"], axis=-1)).any(axis=0).sum()
    blue_side = (np.all(image == PALETTE["blue"], axis=-1)).any(axis=0).sum()
    assert red_side >= 112 / 3 and blue_side >= 112 / 5


def test_triangle_points_up():
    image = pixels(render(Scene((Shape("triangle", "green", "large", 0.5, 0.5),)), 224))
    green = np.all(image == PALETTE["green"], axis=-1)
    rows = green.sum(axis=1)
    top, bottom = np.nonzero(rows)[0][[0, -1]]
    assert rows[bottom] > 5 * rows[top]


@pytest.mark.parametrize("relation,first,second", [
    ("right of", (0.75, 0.5), (0.25, 0.5)),
    ("above", (0.5, 0.2), (0.5, 0.8)),
    ("below", (0.45, 0.8), (0.5, 0.2)),
])
def test_caption_relation_from_hand_made_scenes(relation, first, second):
    scene = Scene((Shape("circle", "yellow", "small", *first), Shape("triangle", "orange", "large", *second)))
    assert caption(scene) == f"a small yellow circle {relation} a large orange triangle"


def test_one_shape_caption():
    assert caption(Scene((Shape("circle", "red", "small", 0.5, 0.5),))) == "a small red circle"


@pytest.mark.parametrize("bad", [100, 42, 504, 0, 112.0, "224", True])
def test_bad_image_size_is_refused_with_a_helpful_message(bad):
    with pytest.raises(ValueError, match=r"multiple of the patch size 14 between 56 and 490, got") as error:
        make_dataset(1, seed=1000, image_size=bad)
    assert repr(bad) in str(error.value)


def test_bad_image_size_message_suggests_the_nearest_allowed():
    with pytest.raises(ValueError, match="nearest allowed value is 98"):
        render(make_scenes(1, 1000)[0], 100)


@pytest.mark.parametrize("field,value", [("kind", "star"), ("colour", "pink"), ("size", "medium")])
def test_bad_shape_fields_are_refused(field, value):
    arguments = {"kind": "circle", "colour": "red", "size": "small", "x": 0.5, "y": 0.5, field: value}
    with pytest.raises(ValueError, match=f"Shape {field} must be one of"):
        Shape(**arguments)


def test_bad_count_and_seed_are_refused():
    with pytest.raises(ValueError, match="n must be"):
        make_dataset(-1, seed=1000)
    with pytest.raises(ValueError, match="seed must be"):
        make_dataset(1, seed=-3)


def test_write_examples_writes_pngs_and_captions(tmp_path):
    written = write_examples(tmp_path, n=3, seed=0, image_size=112)
    assert [path.name for path, _ in written] == ["scene-0.png", "scene-1.png", "scene-2.png"]
    manifest = json.loads((tmp_path / "scenes.json").read_text())
    assert [e["caption"] for e in manifest["examples"]] == [text for _, text in written]
    assert Image.open(written[0][0]).size == (112, 112)


def test_committed_sample_images_match_the_generator():
    manifest = json.loads((SAMPLES / "scenes.json").read_text())
    expected = make_scenes(len(manifest["examples"]), manifest["seed"])
    for entry, scene in zip(manifest["examples"], expected):
        assert entry["caption"] == caption(scene)
        on_disk = pixels(Image.open(SAMPLES / entry["file"]).convert("RGB"))
        assert np.array_equal(on_disk, pixels(render(scene, manifest["image_size"])))


def test_module_constants_are_consistent():
    assert scenes.TRAIN_SEED_START > HELD_OUT_SEED
    assert scenes.SIZE_FRACTION["small"] >= 1 / 5 and scenes.SIZE_FRACTION["large"] >= 1 / 3
