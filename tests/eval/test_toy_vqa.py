"""The offline task's documents, images and metric."""

from __future__ import annotations

import json

import pytest

from vtprune import VTPruneError
from vtprune.eval.toy_vqa import (
    DATA_FILE,
    doc_to_text,
    doc_to_visual,
    process_results,
    rows,
)


def test_shipped_documents_are_what_the_toy_world_draws():
    shipped = [json.loads(line) for line in DATA_FILE.read_text().splitlines()]
    assert len(shipped) == 400
    assert shipped[:48] == rows(n=48)


def test_images_are_drawn_again_and_checked_against_the_document():
    doc = json.loads(DATA_FILE.read_text().splitlines()[5])
    (image,) = doc_to_visual(doc)
    assert image.size == (336, 336)
    assert list(doc_to_visual(doc)[0].getdata())[:50] == list(image.getdata())[:50]
    with pytest.raises(VTPruneError, match="no longer draws document 5"):
        doc_to_visual(doc | {"question": "how many dragons are there?"})


def test_exact_match_is_normalised_and_reported_per_question_type():
    doc = {"question": "how many circles are there?", "answer": "2", "qtype": "count"}
    assert process_results(doc, ["Two."]) == {"exact_match": 1.0, "exact_match_count": 1.0}
    assert process_results(doc, ["2 circles"]) == {"exact_match": 0.0, "exact_match_count": 0.0}
    assert doc_to_text(doc, {"pre_prompt": "", "post_prompt": " Answer with one word."}).endswith("? Answer with one word.")
