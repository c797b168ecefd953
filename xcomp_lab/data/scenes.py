"""Synthetic scenes of one or two coloured shapes, each with its one true caption.

The tiny captioner of the course is trained on these, so a change in its captions after FP16/INT8/NF4
is a change the learner can check against the truth.

Grammar (every caption is one of these two forms):

    a <size> <colour> <kind>
    a <size> <colour> <kind> <relation> a <size> <colour> <kind>

where <relation> is "left of", "right of", "above" or "below" and says where the first shape is
relative to the second. The larger shape is named first; of two equal sizes, the left or upper one
(see `caption_order`), so each image has exactly one true caption. Two-shape scenes are built so the relation is unambiguous: the shapes do not
overlap along the relation's axis and are nearly aligned on the other one.

Seeds: training sets use `make_dataset` with seeds >= TRAIN_SEED_START (1000, 1001, ...);
`held_out_dataset` uses HELD_OUT_SEED (7), which `make_dataset` refuses, so a held-out image can
only come from the same distribution through different random draws.

Regenerate the sample images in xcomp_lab/data/samples/ with `python -m xcomp_lab.tools.samples`.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PATCH_SIZE = 14
MIN_IMAGE_SIZE = 56
MAX_IMAGE_SIZE = 490
DEFAULT_IMAGE_SIZE = 224
TRAIN_SEED_START = 1000
HELD_OUT_SEED = 7

KINDS = ("circle", "square", "triangle")
# Far apart in hue and brightness so they stay distinct after resizing and for most colour vision.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 0),
    "purple": (130, 40, 170),
    "orange": (250, 130, 0),
}
# Shape side as a fraction of the image side: small >= 1/5, large >= 1/3, as the brief asks,
# so a small shape still covers about 2x2 patches of 14 px at 112 px.
SIZE_FRACTION = {"small": 0.22, "large": 0.36}
RELATIONS = {"x": ("left of", "right of"), "y": ("above", "below")}

# Empty border kept around every shape, and the least gap between two shapes along the relation axis.
_MARGIN = 0.04
_GAP = 0.05
# Most the two centres may differ on the axis that is not the relation's.
_MAX_CROSS_OFFSET = 0.08

VOCABULARY: list[str] = sorted(
    {"a"}
    | set(KINDS)
    | set(PALETTE)
    | set(SIZE_FRACTION)
    | {word for pair in RELATIONS.values() for phrase in pair for word in phrase.split()}
)


@dataclass(frozen=True)
class Shape:
    """One shape; x, y are its centre as fractions of the image side (y grows downwards)."""

    kind: str
    colour: str
    size: str
    x: float
    y: float

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("kind", self.kind, KINDS),
            ("colour", self.colour, tuple(PALETTE)),
            ("size", self.size, tuple(SIZE_FRACTION)),
        ):
            if value not in allowed:
                raise ValueError(f"Shape {field} must be one of {list(allowed)}, got {value!r}.")

    @property
    def extent(self) -> float:
        """Side of the shape's bounding box as a fraction of the image side."""
        return SIZE_FRACTION[self.size]

    @property
    def words(self) -> str:
        """The shape's noun phrase, e.g. "a small red circle"."""
        return f"a {self.size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """One or two shapes on a light grey background (grey level 0-255)."""

    shapes: tuple[Shape, ...]
    background: int = 240

    def __post_init__(self) -> None:
        if len(self.shapes) not in (1, 2):
            raise ValueError(f"A Scene holds 1 or 2 shapes, got {len(self.shapes)}.")


def check_image_size(image_size: int) -> None:
    """Raise ValueError unless image_size is an int, a multiple of 14, between 56 and 490."""
    valid = (
        isinstance(image_size, int)
        and not isinstance(image_size, bool)
        and MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
        and image_size % PATCH_SIZE == 0
    )
    if valid:
        return
    hint = "e.g. 112, 168 or 224"
    if isinstance(image_size, (int, float)) and not isinstance(image_size, bool):
        nearest = min(max(round(image_size / PATCH_SIZE) * PATCH_SIZE, MIN_IMAGE_SIZE), MAX_IMAGE_SIZE)
        hint = f"the nearest allowed value is {nearest}"
    raise ValueError(
        f"image_size must be an int multiple of the patch size {PATCH_SIZE} between "
        f"{MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}, got {image_size!r}; pass such a size ({hint})."
    )


def relation(scene: Scene) -> str | None:
    """Where the first shape is relative to the second ("left of", "above", ...); None for one shape."""
    if len(scene.shapes) == 1:
        return None
    first, second = scene.shapes
    dx, dy = first.x - second.x, first.y - second.y
    if abs(dx) >= abs(dy):
        return RELATIONS["x"][0] if dx < 0 else RELATIONS["x"][1]
    return RELATIONS["y"][0] if dy < 0 else RELATIONS["y"][1]


def caption(scene: Scene) -> str:
    """The scene's true caption, e.g. "a small red circle left of a large blue square"."""
    if len(scene.shapes) == 1:
        return scene.shapes[0].words
    first, second = scene.shapes
    return f"{first.words} {relation(scene)} {second.words}"


def _random_look(rng: np.random.Generator) -> tuple[str, str, str]:
    return (
        KINDS[rng.integers(len(KINDS))],
        list(PALETTE)[rng.integers(len(PALETTE))],
        list(SIZE_FRACTION)[rng.integers(len(SIZE_FRACTION))],
    )


def _inside(rng: np.random.Generator, half: float) -> float:
    """A centre coordinate that keeps a shape of half-extent `half` inside the margins."""
    return float(rng.uniform(_MARGIN + half, 1 - _MARGIN - half))


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene: one shape or two, equally likely; two shapes are laid out so the relation is clear."""
    background = int(rng.integers(225, 251))
    if rng.random() < 0.5:
        kind, colour, size = _random_look(rng)
        half = SIZE_FRACTION[size] / 2
        return Scene((Shape(kind, colour, size, _inside(rng, half), _inside(rng, half)),), background)

    looks = [_random_look(rng), _random_look(rng)]
    halves = [SIZE_FRACTION[look[2]] / 2 for look in looks]
    # Along the relation axis: margin, shape, gap, shape, margin, with the spare room split at random
    # among the three free spaces, so the shapes never overlap on that axis.
    spare = 1 - 2 * _MARGIN - 2 * sum(halves) - _GAP
    before, between, _ = (float(share) for share in spare * rng.dirichlet([1.0, 1.0, 1.0]))
    lower = _MARGIN + before + halves[0]
    upper = lower + halves[0] + _GAP + between + halves[1]
    # Across it: both centres near a shared line, so the other axis never competes for the relation.
    largest = max(halves)
    reach = largest + _MAX_CROSS_OFFSET / 2
    line = float(rng.uniform(_MARGIN + reach, 1 - _MARGIN - reach))
    across = [line + float(rng.uniform(-_MAX_CROSS_OFFSET / 2, _MAX_CROSS_OFFSET / 2)) for _ in looks]
    if rng.random() < 0.5:
        centres = [(lower, across[0]), (upper, across[1])]
    else:
        centres = [(across[0], lower), (across[1], upper)]
    shapes = tuple(Shape(*look, x, y) for look, (x, y) in zip(looks, centres))
    return Scene(caption_order(shapes), background)


def caption_order(shapes: tuple[Shape, ...]) -> tuple[Shape, ...]:
    """The shapes in the order the caption names them: the larger first, for equal sizes the left or upper one.

    The order must follow from the image alone: if it were drawn at random, the same picture would have
    two true captions and even a perfect captioner would match the truth only half the time.
    """
    return tuple(sorted(shapes, key=lambda shape: (-shape.extent, shape.x + shape.y)))


def render(scene: Scene, image_size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """Draw the scene as an RGB image of image_size x image_size pixels."""
    check_image_size(image_size)
    image = Image.new("RGB", (image_size, image_size), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        side = shape.extent * image_size
        left, top = (shape.x * image_size - side / 2), (shape.y * image_size - side / 2)
        right, bottom = left + side, top + side
        fill = PALETTE[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)
    return image


def _check_count_and_seed(n: int, seed: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int (number of examples), got {n!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(
            f"seed must be a non-negative int, got {seed!r}; training uses seeds >= {TRAIN_SEED_START}."
        )


def make_scenes(n: int, seed: int) -> list[Scene]:
    """n scenes drawn from numpy's default_rng(seed); the same seed always gives the same scenes."""
    _check_count_and_seed(n, seed)
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def _dataset(scenes: list[Scene], image_size: int) -> list[tuple[Image.Image, str]]:
    check_image_size(image_size)
    return [(render(scene, image_size), caption(scene)) for scene in scenes]


def make_dataset(n: int, seed: int, image_size: int = DEFAULT_IMAGE_SIZE) -> list[tuple[Image.Image, str]]:
    """n (image, caption) pairs, deterministic from seed. Seed 7 is reserved for held_out_dataset."""
    if seed == HELD_OUT_SEED:
        raise ValueError(
            f"seed {HELD_OUT_SEED} is reserved for held_out_dataset(); "
            f"use a training seed >= {TRAIN_SEED_START} instead."
        )
    return _dataset(make_scenes(n, seed), image_size)


def held_out_dataset(n: int = 200, image_size: int = DEFAULT_IMAGE_SIZE) -> list[tuple[Image.Image, str]]:
    """The fixed evaluation set: same distribution as training, drawn from seed HELD_OUT_SEED."""
    return _dataset(make_scenes(n, HELD_OUT_SEED), image_size)


def write_examples(
    directory: str | Path, n: int = 6, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE
) -> list[tuple[Path, str]]:
    """Write scene-0.png ... scene-{n-1}.png and scenes.json (captions and shapes) to directory."""
    check_image_size(image_size)
    scenes = make_scenes(n, seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written, records = [], []
    for index, scene in enumerate(scenes):
        path = directory / f"scene-{index}.png"
        render(scene, image_size).save(path)
        written.append((path, caption(scene)))
        records.append({"file": path.name, "caption": caption(scene), "scene": asdict(scene)})
    manifest = {"seed": seed, "image_size": image_size, "examples": records}
    (directory / "scenes.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return written
