"""The committed equal-budget study (results/): the aggregation code reads the committed runs and reproduces
the committed table. (The study itself is a benchmark that CI does not run: see results/README.md.)"""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fclora.report import load_results, aggregate, paired_difference

STUDY = Path(__file__).resolve().parents[1]/"results/study-vits-cifar10"


@pytest.fixture
def runs():
    if not (STUDY/"aggregate.csv").exists(): pytest.skip("no committed study results")
    return load_results(STUDY)


def test_aggregate_reproduces_committed_table(runs):
    committed = pd.read_csv(STUDY/"aggregate.csv", index_col="method")
    fresh = aggregate(runs)
    assert list(fresh.index) == list(committed.index)
    pd.testing.assert_frame_equal(fresh, committed, check_dtype=False, rtol=1e-9, atol=1e-12)


def test_study_is_complete_and_fair(runs):
    seeds = {(r["method"], r["seed"]) for r in runs}
    methods = {m for m, _ in seeds}
    assert {"fclora", "lora"} <= methods
    for m in methods: assert {s for mm, s in seeds if mm == m} >= {0, 1, 2}, m     # at least 3 seeds each
    for r in runs:                                                                # one recipe, one budget
        assert r["config"]["rank_budget"] == 82 and r["config"]["image_size"] == 112 and r["config"]["epochs"] == 2
        if r["method"] in ("fclora", "lora", "adalora"): assert sum(r["ranks"].values()) == 82
    d = paired_difference(runs, "fclora", "lora")
    assert len(d["seeds"]) >= 3 and np.isfinite(d["mean"])
