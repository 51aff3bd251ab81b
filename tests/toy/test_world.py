"""The synthetic world: deterministic, disjoint splits, answerable questions."""

import hashlib

import numpy as np
import pytest

from vtprune.toy import make_dataset, world


def image_digest(item) -> str:
    return hashlib.sha256(item.image.tobytes()).hexdigest()


def test_same_seed_gives_identical_items():
    first = make_dataset("test", 12, seed=3)
    second = make_dataset("test", 12, seed=3)
    assert [image_digest(i) for i in first] == [image_digest(i) for i in second]
    assert [(i.question, i.answer, i.qtype, i.caption) for i in first] == [
        (i.question, i.answer, i.qtype, i.caption) for i in second
    ]


def test_other_seed_and_other_split_differ():
    test = make_dataset("test", 12, seed=0)
    assert {image_digest(i) for i in test}.isdisjoint(image_digest(i) for i in make_dataset("test", 12, seed=1))
    assert {image_digest(i) for i in test}.isdisjoint(image_digest(i) for i in make_dataset("train", 50, seed=0))


def test_items_have_the_documented_fields():
    items = make_dataset("val", 8, seed=0)
    assert len(items) == 8
    for item in items:
        assert item.image.size == (336, 336) and item.image.mode == "RGB"
        assert item["question"] == item.question and item.question.endswith("?")
        assert item.answer and " " not in item.answer
        assert item.qtype in world.QTYPES
        assert item.caption
    assert {i.qtype for i in items} == set(world.QTYPES)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError):
        make_dataset("dev", 1)


def test_every_scene_has_a_small_object_and_no_overlaps():
    for scene in world.make_scenes("train", 40, seed=0):
        assert any(o.size == "small" for o in scene.objects)
        assert len({o.color for o in scene.objects}) == len(scene.objects)
        for a in scene.objects:
            for b in scene.objects:
                if a is not b:
                    assert (
                        a.x + a.width <= b.x or b.x + b.width <= a.x or a.y + a.width <= b.y or b.y + b.width <= a.y
                    )


def test_objects_sit_on_the_patch_grid_and_small_ones_cover_2x2_patches():
    for scene in world.make_scenes("val", 40, seed=0):
        for obj in scene.objects:
            assert obj.x % world.PATCH_PX == 0 and obj.y % world.PATCH_PX == 0 and obj.width % world.PATCH_PX == 0
            assert world.PATCH_PX <= min(obj.x, obj.y) and max(obj.x, obj.y) + obj.width <= 336 - world.PATCH_PX
            assert obj.width // world.PATCH_PX in world.SIZE_PATCHES[obj.size]
        patches = world.object_map(scene).reshape(24, 14, 24, 14).transpose(0, 2, 1, 3).reshape(576, 196)
        for index, obj in enumerate(scene.objects):
            touched = (patches == 1 + index).any(1).reshape(24, 24).nonzero()
            rows, cols = sorted(set(touched[0].tolist())), sorted(set(touched[1].tolist()))
            assert rows == list(range(obj.y // 14, (obj.y + obj.width) // 14))  # the bounding box's patch rows
            assert cols == list(range(obj.x // 14, (obj.x + obj.width) // 14))
            if obj.size == "small":
                assert len(touched[0]) == 4


def test_answers_match_the_scene():
    rng = np.random.default_rng(0)
    for scene in world.make_scenes("val", 20, seed=0):
        for qa in world.all_questions(scene, rng):
            if qa.question.startswith("what shape is the "):
                color = qa.question.split()[4]
                assert [o.shape for o in scene.objects if o.color == color] == [qa.answer]
            elif qa.question == "how many objects are there?":
                assert qa.answer == str(len(scene.objects))


def test_small_objects_are_drawn_where_the_scene_says():
    scene = world.make_scenes("test", 1, seed=5)[0]
    pixels = np.asarray(world.render(scene)).astype(int)
    for obj in scene.objects:
        cx, cy = (int(c) for c in obj.center)
        assert np.abs(pixels[cy, cx] - np.array(obj.rgb)).max() < 30  # object colour, up to pixel noise
