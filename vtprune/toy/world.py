"""A synthetic visual question answering world: shapes on a noisy background.

Every scene is a 336x336 RGB image with 2 to 5 non-overlapping objects. Each object has a
colour that is unique within its scene, one of four shapes, and a size: "small" objects are
28 px wide (2x2 of the vision tower's 14-px patches, 4 of its 576 tokens), "large" ones 56-84 px. Objects are
aligned to that patch grid, so each patch shows one of a few pieces of a shape: a 4-layer tower trained for minutes on
2 CPU cores did not learn the shapes of freely placed objects (its shape readout stayed at chance after 8000 images).
Every scene holds at least one small object, so that dropping the wrong visual tokens costs
accuracy.

Questions ask about colour, shape, position and count; answers are one word. Scenes, images
and questions are generated from numpy seed streams keyed by (seed, split, index), so a given
(split, n, seed) always gives the same items and the splits never share a stream.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (40, 170, 70),
    "blue": (45, 90, 225),
    "yellow": (235, 205, 40),
    "purple": (145, 65, 195),
    "orange": (240, 135, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES: tuple[str, ...] = ("small", "large")
PATCH_PX = 14  # the vision tower's patch size; objects are placed and sized in whole patches
GRID = IMAGE_SIZE // PATCH_PX  # 24 patches per side
SIZE_PATCHES: dict[str, tuple[int, ...]] = {"small": (2,), "large": (4, 5, 6)}
MIN_OBJECTS, MAX_OBJECTS = 2, 5
QTYPES: tuple[str, ...] = ("color", "shape", "position", "count")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

# A position question is only asked when the object is clearly on one side of the image.
POSITION_MARGIN_PX = 28
# Gap kept between the bounding boxes of two objects and between an object and the border.
OBJECT_GAP_PX = PATCH_PX
BACKGROUND_GRAY = (30, 60)  # dark: every colour stands out by brightness
NOISE_STD = 5.0
COLOR_JITTER = 15


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene; (x, y) is the top-left corner of its square bounding box."""

    color: str
    shape: str
    size: str
    x: int
    y: int
    width: int
    rgb: tuple[int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.width / 2, self.y + self.width / 2)


@dataclass(frozen=True)
class Scene:
    """The objects of one image, its background and the seed of its pixel noise."""

    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    noise_seed: int


@dataclass(frozen=True)
class QA:
    """A question about a scene with its one-word answer.

    `target_size` is the size of the object the question is about ("small" or "large"), or
    "" for count questions, which are about several objects.
    """

    question: str
    answer: str
    qtype: str
    target_size: str


@dataclass(frozen=True)
class VQAItem:
    """One evaluation item. Fields can also be read as item["image"], like a dict."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    target_size: str
    caption: str
    index: int

    def __getitem__(self, key: str):
        return getattr(self, key)


# ---------------------------------------------------------------------------------------------
# Scenes and images


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def scene_rng(split: str, seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The random generator of item `index` of a split; `stream` separates scene and question draws."""
    return np.random.default_rng([seed, _split_id(split), index, stream])


def _boxes_overlap(a: SceneObject, x: int, y: int, width: int) -> bool:
    gap = OBJECT_GAP_PX
    return not (
        x >= a.x + a.width + gap or a.x >= x + width + gap or y >= a.y + a.width + gap or a.y >= y + width + gap
    )


def _jittered_rgb(color: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.array(COLORS[color])
    rgb = np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255)
    return tuple(int(v) for v in rgb)


def random_scene(
    rng: np.random.Generator,
    min_objects: int = MIN_OBJECTS,
    max_objects: int = MAX_OBJECTS,
    require_small: bool = True,
) -> Scene:
    """Draw a scene: 2-5 objects with unique colours, at least one of them small.

    The defaults define the world; training may also draw simpler scenes (fewer objects, no small one).
    """
    n_objects = int(rng.integers(min_objects, max_objects + 1))
    colors = [list(COLORS)[i] for i in rng.choice(len(COLORS), size=n_objects, replace=False)]
    sizes = [SIZES[int(rng.random() < 0.5)] for _ in range(n_objects)]
    if require_small and "small" not in sizes:
        sizes[int(rng.integers(n_objects))] = "small"
    # Place large objects first: they are the hard ones to fit.
    order = sorted(range(n_objects), key=lambda i: sizes[i] != "large")
    placed: list[SceneObject] = []
    for i in order:
        for _attempt in range(200):
            patches = int(rng.choice(SIZE_PATCHES[sizes[i]]))
            width = patches * PATCH_PX
            x, y = (PATCH_PX * int(rng.integers(1, GRID - patches)) for _ in range(2))  # a patch of border
            if not any(_boxes_overlap(other, x, y, width) for other in placed):
                break
        else:  # pragma: no cover - 5 objects always fit in 336 px
            continue
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        placed.append(SceneObject(colors[i], shape, sizes[i], x, y, width, _jittered_rgb(colors[i], rng)))
    gray = int(rng.integers(BACKGROUND_GRAY[0], BACKGROUND_GRAY[1] + 1))
    background = tuple(int(np.clip(gray + rng.integers(-8, 9), 0, 255)) for _ in range(3))
    return Scene(tuple(placed), background, int(rng.integers(2**31)))


def vary_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """A near-duplicate of `scene` with one object (small ones preferred) changed in colour or shape.

    Used as a hard negative in contrastive training, so that the vision tower must see small objects.
    """
    objects = list(scene.objects)
    small = [i for i, o in enumerate(objects) if o.size == "small"]
    i = int(rng.choice(small)) if small and rng.random() < 0.7 else int(rng.integers(len(objects)))
    target = objects[i]
    unused_colors = [c for c in COLORS if c not in {o.color for o in objects}]
    if unused_colors and rng.random() < 0.5:
        color = unused_colors[int(rng.integers(len(unused_colors)))]
        objects[i] = dataclasses.replace(target, color=color, rgb=_jittered_rgb(color, rng))
    else:
        other_shapes = [s for s in SHAPES if s != target.shape]
        objects[i] = dataclasses.replace(target, shape=other_shapes[int(rng.integers(len(other_shapes)))])
    return dataclasses.replace(scene, objects=tuple(objects), noise_seed=int(rng.integers(2**31)))


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x0, y0, w = obj.x, obj.y, obj.width
    x1, y1 = x0 + w - 1, y0 + w - 1
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=obj.rgb)
    elif obj.shape == "square":
        inset = round(w * 0.08)  # a square of equal width looks bigger than a circle: shrink it a bit
        draw.rectangle([x0 + inset, y0 + inset, x1 - inset, y1 - inset], fill=obj.rgb)
    elif obj.shape == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x1, y1), (x0, y1)], fill=obj.rgb)
    elif obj.shape == "cross":
        arm = max(2, round(w / 3))
        lo = x0 + (w - arm) // 2
        draw.rectangle([lo, y0, lo + arm - 1, y1], fill=obj.rgb)
        lo = y0 + (w - arm) // 2
        draw.rectangle([x0, lo, x1, lo + arm - 1], fill=obj.rgb)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 336x336 RGB image with mild pixel noise."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj)
    noise = np.random.default_rng(scene.noise_seed).standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    pixels = np.clip(np.asarray(image, dtype=np.float32) + NOISE_STD * noise, 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels)


def object_map(scene: Scene) -> np.ndarray:
    """[336, 336] uint8: 1 + the index of the object drawn at each pixel, 0 for the background."""
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(image)
    for index, obj in enumerate(scene.objects):
        _draw_object(draw, dataclasses.replace(obj, rgb=index + 1))
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------
# Captions and questions


def _grid_position(obj: SceneObject) -> tuple[int, int]:
    """Row and column (0-2) of the object's centre in a 3x3 grid."""
    cx, cy = obj.center
    return min(2, int(cy * 3 // IMAGE_SIZE)), min(2, int(cx * 3 // IMAGE_SIZE))


_GRID_WORDS = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}


def _caption_parts(scene: Scene) -> list[dict[str, str]]:
    objects = sorted(scene.objects, key=lambda o: (_grid_position(o), o.center[0]))
    return [
        {"size": o.size, "color": o.color, "shape": o.shape, "where": _GRID_WORDS[_grid_position(o)]} for o in objects
    ]


def _caption_text(parts: list[dict[str, str]]) -> str:
    described = [f"a {p['size']} {p['color']} {p['shape']} {p['where']}" for p in parts]
    return f"{len(parts)} objects : " + " , ".join(described) + " ."


def caption(scene: Scene) -> str:
    """A description of every object, in reading order, for contrastive training of the vision tower."""
    return _caption_text(_caption_parts(scene))


def negative_captions(scene: Scene, rng: np.random.Generator, k: int) -> list[tuple[str, str]]:
    """`k` (attribute, wrong caption) pairs: one attribute of one object changed (small objects preferred).

    Hard negatives for contrastive training (as in NegCLIP): to tell the caption from these, the
    vision tower must see the shape, colour, size and place of every object, small ones included.
    """
    parts = _caption_parts(scene)
    small = [i for i, p in enumerate(parts) if p["size"] == "small"]
    negatives = []
    while len(negatives) < k:
        changed = [dict(p) for p in parts]
        i = int(rng.choice(small)) if small and rng.random() < 0.5 else int(rng.integers(len(parts)))
        attribute = rng.choice(["shape", "color", "size", "where"], p=[0.5, 0.2, 0.15, 0.15])
        if attribute == "shape":
            choices = [s for s in SHAPES if s != parts[i]["shape"]]
        elif attribute == "color":
            choices = [c for c in COLORS if c not in {p["color"] for p in parts}]
        elif attribute == "size":
            choices = [s for s in SIZES if s != parts[i]["size"]]
        else:
            choices = [w for w in _GRID_WORDS.values() if w != parts[i]["where"]]
        if choices:
            changed[i][attribute] = choices[int(rng.integers(len(choices)))]
            negatives.append((str(attribute), _caption_text(changed)))
    return negatives


def all_questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """Every unambiguous question about the scene; `rng` picks among equivalent phrasings."""
    objects = scene.objects
    qas: list[QA] = []
    for obj in objects:
        # Colour: refer to the object by its shape, adding its size when the shape alone is ambiguous.
        same_shape = [o for o in objects if o.shape == obj.shape]
        same_shape_and_size = [o for o in same_shape if o.size == obj.size]
        if len(same_shape) == 1 and rng.random() < 0.5:
            qas.append(QA(f"what color is the {obj.shape}?", obj.color, "color", obj.size))
        elif len(same_shape_and_size) == 1:
            qas.append(QA(f"what color is the {obj.size} {obj.shape}?", obj.color, "color", obj.size))
        # Shape: colours are unique within a scene.
        qas.append(QA(f"what shape is the {obj.color} object?", obj.shape, "shape", obj.size))
        # Position, on each axis where the object is clearly off the middle line.
        cx, cy = obj.center
        middle = IMAGE_SIZE / 2
        if abs(cx - middle) >= POSITION_MARGIN_PX:
            options = "the left or the right" if rng.random() < 0.5 else "the right or the left"
            side = "left" if cx < middle else "right"
            qas.append(QA(f"is the {obj.color} {obj.shape} on {options}?", side, "position", obj.size))
        if abs(cy - middle) >= POSITION_MARGIN_PX:
            options = "the top or the bottom" if rng.random() < 0.5 else "the bottom or the top"
            side = "top" if cy < middle else "bottom"
            qas.append(QA(f"is the {obj.color} {obj.shape} at {options}?", side, "position", obj.size))
    for shape in SHAPES:
        count = sum(o.shape == shape for o in objects)
        qas.append(QA(f"how many {PLURALS[shape]} are there?", str(count), "count", ""))
    qas.append(QA("how many objects are there?", str(len(objects)), "count", ""))
    qas.append(QA("how many small objects are there?", str(sum(o.size == "small" for o in objects)), "count", ""))
    return qas


def pick_question(qas: list[QA], qtype: str, rng: np.random.Generator) -> QA | None:
    """One question of the given type (None if the scene has none).

    Questions about a single object are about a small one half the time, when both sizes are possible.
    """
    candidates = [qa for qa in qas if qa.qtype == qtype]
    if not candidates:
        return None
    sizes = sorted({qa.target_size for qa in candidates})
    if len(sizes) > 1:
        size = sizes[int(rng.integers(len(sizes)))]
        candidates = [qa for qa in candidates if qa.target_size == size]
    return candidates[int(rng.integers(len(candidates)))]


def make_scenes(split: str, n: int, seed: int = 0) -> list[Scene]:
    """The first `n` scenes of a split's seed stream."""
    return [random_scene(scene_rng(split, seed, i)) for i in range(n)]


def make_dataset(split: str, n: int, seed: int = 0) -> list[VQAItem]:
    """`n` (image, question, answer) items; question types cycle through color, shape, position, count.

    Item i uses scene i of `make_scenes(split, n, seed)`, so each item has its own image. In the rare
    scene that has no question of the item's type, the next type in the cycle is asked instead.
    """
    items = []
    for i, scene in enumerate(make_scenes(split, n, seed)):
        rng = scene_rng(split, seed, i, stream=1)
        qas = all_questions(scene, rng)
        for shift in range(len(QTYPES)):
            qa = pick_question(qas, QTYPES[(i + shift) % len(QTYPES)], rng)
            if qa is not None:
                break
        items.append(VQAItem(render(scene), qa.question, qa.answer, qa.qtype, qa.target_size, caption(scene), i))
    return items


def vocabulary() -> list[str]:
    """Every word the world's questions, answers and captions use, plus the chat template's words."""
    words = {"user", "assistant", ":", "?", ",", "."}
    words |= set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(SIZES)
    words |= {str(d) for d in range(10)}
    words |= {"what", "color", "shape", "is", "the", "object", "how", "many", "are", "there", "objects"}
    words |= {"on", "at", "or", "in", "a", "left", "right", "top", "bottom", "center"}
    return sorted(words)
