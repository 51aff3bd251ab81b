"""The demo's requests without a browser: answers, token counts, costs and heatmaps on three model families, the video
path, and a readable error for every kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vtprune.core.errors import VTPruneError
from vtprune.demo.backend import Demo, Request, parse_budget, parse_option_text
from vtprune.viz import BOTTOM, TOP

SIDE = 336  # heatmap panel side: three panels and two 10 px gaps
QUICK = dict(max_new_tokens=3, repeats=1)


@pytest.fixture(scope="module")
def demo():
    return Demo()


def test_one_method_reports_answers_tokens_costs_and_a_heatmap_per_image(demo, saved_model, screenshots):
    report = demo.run(Request(files=screenshots.files, question="w1 w2", model=str(saved_model), methods=["vtc-cls"],
                              budget="0.25", options="start_layer=0", **QUICK))
    run = report.runs[0]
    assert run.error is None
    assert report.dense.answer and run.answer
    assert report.dense.visual == (48, 48)  # three screenshots of 4x4 patches
    assert run.visual == (48, 12)
    assert report.dense.seconds > 0 and run.seconds > 0 and run.time_ratio > 0
    assert 0 < run.peak_bytes < report.dense.peak_bytes  # a quarter of the visual tokens: less activation memory
    assert [caption for _, caption in run.heatmaps] == [f"screen_{i}.png: 4 of 16 patches kept" for i in (1, 2, 3)]
    assert all(image.size == (3 * SIDE + 20, TOP + SIDE + BOTTOM) for image, _ in run.heatmaps)


def test_compare_goes_on_past_a_method_the_adapter_refuses(demo, saved_qwen, screenshots):
    report = demo.run(Request(files=screenshots.files, question="click", model=str(saved_qwen),
                              methods=["vtc-cls", "pool"], budget="0.25", **QUICK))
    refused, pooled = report.runs
    assert "[CLS]" in refused.error and "qwen2-vl" in refused.error
    assert pooled.error is None and pooled.answer
    before, after = pooled.visual
    assert before == report.dense.visual[0] and after < before
    assert len(pooled.heatmaps) == 3


def test_qwen3_vl_runs_its_methods_and_refuses_cls_methods(demo, saved_qwen3, screenshots):
    report = demo.run(Request(files=screenshots.files, question="click", model=str(saved_qwen3),
                              methods=["pool", "vtc-cls"], budget="0.25", **QUICK))
    pooled, refused = report.runs
    assert pooled.error is None and pooled.answer
    before, after = pooled.visual
    assert before == report.dense.visual[0] and after == 3 * (before // 3 // 4)  # a quarter of each screenshot
    assert "[CLS]" in refused.error and "qwen3-vl" in refused.error


def test_internvl_heatmaps_show_each_image_on_its_thumbnail(demo, saved_internvl, screenshots):
    report = demo.run(Request(files=screenshots.files, question="click", model=str(saved_internvl),
                              methods=["vtc-cls"], budget="0.25", **QUICK))
    run = report.runs[0]
    assert run.error is None and isinstance(run.answer, str)  # random weights: maybe only special tokens
    assert run.visual == (report.dense.visual[0], report.dense.visual[0] // 4)
    # three 4x4-token tiles per screenshot (two tiles and the thumbnail): the heatmap is the thumbnail's grid
    assert [caption.split(":")[0] for _, caption in run.heatmaps] == [f"screen_{i}.png (thumbnail)" for i in (1, 2, 3)]
    assert all(caption.endswith("of 16 patches kept") for _, caption in run.heatmaps)


def test_a_video_goes_through_the_video_path_of_a_model_that_takes_videos(demo, saved_onevision, video):
    report = demo.run(Request(files=video.files, question="w1", model=str(saved_onevision), methods=["pool"],
                              budget="0.25", frames=4, **QUICK))
    run = report.runs[0]
    assert report.notes == []
    assert report.dense.visual == (4 * 9 + 1,) * 2  # four frames pooled to 3x3, one newline token
    assert run.error is None
    assert len(run.heatmaps) == 4 and all("of 9 patches kept" in caption for _, caption in run.heatmaps)
    assert [caption.split(" (")[0] for _, caption in run.heatmaps] == [
        f"moving_circle.mp4 frame {i}" for i in (0, 5, 10, 15)
    ]


def test_a_model_without_videos_gets_the_frames_as_images(demo, saved_model, video):
    report = demo.run(Request(files=video.files, question="w1", model=str(saved_model), methods=["random"],
                              budget="4", frames=3, **QUICK))
    assert report.notes == ["this model takes no videos: its 3 frames go in as 3 images"]
    assert report.dense.visual == (48, 48) and report.runs[0].visual == (48, 12)


def test_a_budget_larger_than_the_visual_tokens_is_the_methods_error(demo, saved_model, screenshots):
    report = demo.run(Request(files=screenshots.files, question="w1", model=str(saved_model), methods=["vtc-cls"],
                              budget="100", **QUICK))
    assert report.runs[0].answer == ""
    assert "keep=100 is more than the 16 visual tokens" in report.runs[0].error


def test_methods_without_a_budget_say_they_use_their_own(demo, saved_model, screenshots):
    """The visual-token budget goes to every method whose budget counts visual tokens (progressive ones included);
    a method whose budget counts something else runs at its own, and a note says what it counts."""
    report = demo.run(Request(files=screenshots.files[:1], question="w1", model=str(saved_model),
                              methods=["transprune", "zipvl"], budget="8", **QUICK))
    assert [run.error for run in report.runs] == [None, None]
    assert report.runs[0].visual == (16, 8)
    assert report.notes == ["zipvl's budget counts a share of attention mass; it runs at its own keep=0.975"]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(files=["notes.txt"]), "notes.txt is neither an image nor a video"),
        (dict(files=[]), "upload an image"),
        (dict(question="   "), "the question box is empty"),
        (dict(model="/no/such/model"), "model path '/no/such/model' does not exist"),
        (dict(budget="lots"), "budget 'lots': give visual tokens per image"),
        (dict(budget="0"), "keep at least one visual token"),
        (dict(options="nonsense"), "options are name=value pairs"),
        (dict(options="depth=3"), "method 'vtc-cls' has no option depth"),
        (dict(methods=[]), "choose at least one method"),
        (dict(files=["scene.png", "clip.mp4"]), "upload either images or one video"),
    ],
)
def test_bad_input_is_a_readable_error(demo, saved_model, video, tmp_path, change, message):
    (tmp_path / "notes.txt").write_text("not a picture")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "scene.png")
    (tmp_path / "clip.mp4").write_bytes(open(video.files[0], "rb").read())
    fields = dict(files=["scene.png"], question="w1", model=str(saved_model), methods=["vtc-cls"], budget="4")
    fields.update(change)
    fields["files"] = [str(tmp_path / name) for name in fields["files"]]
    with pytest.raises(VTPruneError, match=message.replace("(", r"\(").replace("[", r"\[")):
        demo.run(Request(**fields, **QUICK))


def test_a_folder_without_a_model_is_a_readable_error(demo, tmp_path, screenshots):
    with pytest.raises(VTPruneError, match="has no config.json; give a folder written by save_pretrained"):
        demo.run(Request(files=screenshots.files, question="w1", model=str(tmp_path), methods=["pool"], **QUICK))


def test_a_hub_id_typed_by_a_visitor_is_refused_without_allow_hub(demo, screenshots, monkeypatch):
    import vtprune.loading

    monkeypatch.setattr(vtprune.loading, "hub_reachable", lambda *a, **k: pytest.fail("no hub call expected"))
    with pytest.raises(VTPruneError, match="only when started with --allow-hub"):
        demo.run(Request(files=screenshots.files, question="w1", model="someone/some-model", methods=["pool"], **QUICK))


def test_budget_and_options_parse_like_the_command_line():
    assert parse_budget("64") == 64 and parse_budget("0.25") == 0.25 and parse_budget(" ") is None
    assert parse_option_text("start_layer=2, scope=sample keep_ratios=(0.5, 0.2) alpha = 0.1") == {
        "start_layer": 2, "scope": "sample", "keep_ratios": (0.5, 0.2), "alpha": 0.1,
    }
    assert parse_option_text("") == {}
