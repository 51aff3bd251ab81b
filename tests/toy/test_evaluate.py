"""Scoring per group: all, question type, small/large target object."""

from vtprune.toy import make_dataset
from vtprune.toy.evaluate import groups_of, score


def test_score_shares_per_group():
    items = make_dataset("val", 8, seed=0)
    predictions = [item.answer if i % 2 == 0 else "nothing" for i, item in enumerate(items)]
    accuracy = score(items, predictions)
    assert accuracy["all"] == 0.5
    for group in {g for item in items for g in groups_of(item)}:
        members = [i for i, item in enumerate(items) if group in groups_of(item)]
        assert accuracy[group] == sum(i % 2 == 0 for i in members) / len(members)
    assert all(groups_of(item)[:2] == ["all", item.qtype] for item in items)
