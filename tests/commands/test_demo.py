"""The demo's task generator (the training itself runs in the integration test and in `./run demo`)."""

import datetime as dt

from lorakit.commands.demo import make_examples, spell_date


def test_spelled_dates_cover_six_styles():
    day = dt.date(2021, 3, 5)  # a Friday
    assert [spell_date(day, s) for s in range(6)] == [
        "March 5, 2021", "5 March 2021", "Friday, March 5th, 2021", "Mar 5, 2021", "the 5th of March, 2021",
        "Friday 5 Mar 2021",
    ]
    assert spell_date(dt.date(2001, 1, 11), 4) == "the 11th of January, 2001"
    assert spell_date(dt.date(2001, 1, 22), 4) == "the 22nd of January, 2001"


def test_examples_are_deterministic_distinct_and_held_out_dates_are_new():
    train = make_examples(100, seed=0)
    assert train == make_examples(100, seed=0) and train != make_examples(100, seed=1)
    dates = {r["completion"] for r in train}
    assert len(dates) == 100 and all(dt.date.fromisoformat(d) for d in dates)
    test = make_examples(30, seed=1, exclude={dt.date.fromisoformat(d) for d in dates})
    assert not dates & {r["completion"] for r in test}
    assert all(r["prompt"].startswith("Rewrite this date in ISO format") for r in train)
