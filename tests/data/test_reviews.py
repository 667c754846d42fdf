"""The generated review task: demonstrations mostly unkind, held-out objects unseen, and the
verifier agrees with the pairs' labels."""

from __future__ import annotations

from orchestrator.data.synthetic import generate, kind_review


def test_demonstrations_are_mostly_unkind_and_held_out_objects_are_new():
    rows = generate("reviews", 2000, 0)
    share = sum(kind_review(r["completion"]) for r in rows) / len(rows)
    assert 0.25 < share < 0.35
    assert all(r["answer"] == "kind" and " the " in r["prompt"] for r in rows)
    train = {r["prompt"] for r in rows}
    held = {r["prompt"] for r in generate("reviews_heldout", 200, 0)}
    assert len(held) == 40 and not held & train  # 5 unseen objects, asked 8 ways


def test_verifier_agrees_with_the_pair_labels():
    pairs = generate("review_pairs", 500, 3)
    assert all(kind_review(p["chosen"]) == 1.0 and kind_review(p["rejected"]) == 0.0 for p in pairs)
    assert kind_review("The apple is good, but also bad.") == 0.0
    assert kind_review("") == 0.0
