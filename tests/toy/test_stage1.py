"""Stage 1's auxiliary targets: the object under each patch, and each object's pooled patches."""

import torch

from vtprune.toy import world


def test_patch_targets_mark_the_patches_each_object_covers():
    from vtprune.toy.stage1 import PATCH_ATTRIBUTES, patch_targets

    scene = world.make_scenes("val", 1, seed=0)[0]
    targets = patch_targets([scene])
    for obj in scene.objects:
        cx, cy = (int(c) // 14 for c in obj.center)  # the patch under the object's centre is covered
        for attribute, values in PATCH_ATTRIBUTES.items():
            assert targets[attribute][0, cy * 24 + cx] == 1 + values.index(getattr(obj, attribute))
    assert (targets["color"][0, :] == 0).sum() > 400  # most patches are background
    assert all(0 <= int(t.max()) <= len(PATCH_ATTRIBUTES[a]) for a, t in targets.items())


def test_object_targets_pool_each_object_over_the_patches_it_covers():
    from vtprune.toy.stage1 import PATCH_ATTRIBUTES, object_targets

    scenes = world.make_scenes("val", 3, seed=0)
    targets = object_targets(scenes)
    assert targets.coverage.shape == (3, world.MAX_OBJECTS, 576)
    for row, scene in enumerate(scenes):
        n = len(scene.objects)
        torch.testing.assert_close(targets.coverage[row, :n].sum(-1), torch.ones(n))
        assert (targets.coverage[row, n:] == 0).all() and (targets.labels["shape"][row, n:] == -100).all()
        for i, obj in enumerate(scene.objects):
            covered = targets.coverage[row, i].reshape(24, 24).nonzero()
            assert covered[:, 0].min() == obj.y // 14 and covered[:, 1].min() == obj.x // 14
            for attribute, values in PATCH_ATTRIBUTES.items():
                assert targets.labels[attribute][row, i] == values.index(getattr(obj, attribute))
