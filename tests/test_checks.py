"""agentrm.checks.differing_fields: what the one-line refusals of resumed outputs (search, precompute) name."""

from agentrm.checks import differing_fields


def test_names_the_first_differing_fields_in_order_and_counts_the_rest():
    old = {"a": 1, "b": [1], "c": "x", "d": 4, "e": 5, "same": 0}
    new = {"a": 2, "b": [2], "c": "y", "d": 5, "e": 5, "same": 0, "extra": 1}
    assert differing_fields(old, new, ["e", "a", "b", "same"]) == "a: 1 there, 2 now; b: [1] there, [2] now"
    assert differing_fields(old, new, sorted(set(old) | set(new)), limit=2) == (
        "a: 1 there, 2 now; b: [1] there, [2] now and 3 more")
    assert differing_fields(old, old, old) == ""
    long = differing_fields({"k": "x" * 100}, {"k": "y"}, ["k"], width=10)
    assert long == "k: 'xxxxxx... there, 'y' now"
