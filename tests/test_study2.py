"""Study II (issue 11, results/study2-vits-cifar10/): the committed arms file is the issue's design, every run it
describes is a valid configuration with one shared recipe, and `fclora sweep --arms` lays the runs out as
<arm>-seed<seed>. Runs already finished must match the file."""
import json, re
from pathlib import Path

import pytest

from conftest import fclora, prose
from fclora.cli import load_arms, sweep_runs
from fclora.core import Config
from fclora.experiment import make_config, validate_config
from fclora.allocation import check_budget

STUDY = Path(__file__).resolve().parents[1]/"results/study2-vits-cifar10"
RECIPE = dict(train_subset=2000, test_subset=5000, image_size=112, epochs=2, batch_size=32, score_batches=20, rank_budget=82,
              precision="bf16", model_name="../shared/models/vit-small-patch14-imgfocus", dataset="../shared/data/cifar10")
ARM_KEYS = {"method", "metric_weights", "rank_budget", "lr", "seeds"}   # what an arm may change; the rest is the shared recipe


@pytest.fixture(scope="module")
def arms():
    return load_arms(STUDY/"arms.json")


def test_arms_are_the_issue_design(arms):
    settings, arms = arms
    assert {k: settings[k] for k in RECIPE} == RECIPE
    assert all(set(a) <= ARM_KEYS for a in arms.values())
    budget = lambda a: a.get("rank_budget", settings["rank_budget"])
    by = {(a["method"], tuple(a.get("metric_weights", Config.metric_weights)), budget(a)): len(a["seeds"]) for a in arms.values()}
    for m in ("fclora", "lora", "eva"): assert by[m, Config.metric_weights, 82] >= 10, m
    assert by["random", Config.metric_weights, 82] >= 5
    for w in ((1, 0, 0), (0, 1, 0), (0, 0, 1)): assert by["fclora", w, 82] >= 5, w
    for m in ("fclora", "lora"): assert by[m, Config.metric_weights, 144] >= 5, m
    for b in {budget(a) for a in arms.values()}: check_budget(3 * 12, b, Config.r_min, Config.r_max)  # ViT-S/14: 12 blocks x q/k/v


def test_seeds_pair_up(arms):
    "Every arm's seeds are 0..n-1, so each arm pairs seed by seed with uniform LoRA at its budget."
    _, arms = arms
    for name, a in arms.items(): assert a["seeds"] == list(range(len(a["seeds"]))), name
    for name, a in arms.items():
        lora = next(b for b in arms.values() if b["method"] == "lora" and b.get("rank_budget") == a.get("rank_budget"))
        assert set(a["seeds"]) <= set(lora["seeds"]), name


def test_every_run_is_a_valid_config(arms):
    settings, arms = arms
    runs = sweep_runs(arms, [0])
    assert len(runs) == sum(len(a["seeds"]) for a in arms.values())
    for arm, seed, over in runs:
        validate_config(make_config("paper", "cifar10", **{**settings, **over}, seed=seed, arm=arm))


def test_sweep_dry_run_lists_every_run(arms, tmp_path):
    _, arms = arms
    p = fclora("sweep", "cifar10", "--arms", STUDY/"arms.json", "--out-dir", tmp_path, "--dry-run")
    assert p.returncode == 0, p.stderr[-2000:]
    listed = [l.split(":")[0] for l in p.stdout.splitlines() if ": to run" in l]
    assert listed == [str(tmp_path/f"{a}-seed{s}") for a, s, _ in sweep_runs(arms, [0])]
    assert not list(tmp_path.iterdir())                                   # a dry run writes nothing


def test_finished_runs_follow_the_file(arms):
    "Each committed run used the file's recipe and its arm's values: one recipe, the arm's overrides, its seed."
    settings, arms = arms
    for f in sorted(STUDY.glob("*-seed*/results.json")):
        r = json.loads(f.read_text())
        arm = f.parent.name.rsplit("-seed", 1)[0]
        want = {**settings, **{k: v for k, v in arms[arm].items() if k != "seeds"}, "seed": int(f.parent.name.rsplit("-seed", 1)[1])}
        got = {k: r["config"][k] for k in want if k != "progress"}
        assert got == {k: v for k, v in want.items() if k != "progress"}, f
        assert r.get("arm", r["method"]) == arm and sum(r["ranks"].values()) == want["rank_budget"], f


def test_every_arm_has_its_seeds(arms):
    "The study is complete: every run of the design is committed with its config, plan and executed notebook, and nothing else."
    _, arms = arms
    want = {f"{arm}-seed{seed}" for arm, seed, _ in sweep_runs(arms, [0])}
    assert {d.name for d in STUDY.glob("*-seed*")} == want
    for name in sorted(want):
        for f in ("results.json", "config.json", "plan.json", "10_cifar10.ipynb"): assert (STUDY/name/f).is_file(), (name, f)
        nb = json.loads((STUDY/name/"10_cifar10.ipynb").read_text())
        assert nb["metadata"]["papermill"]["end_time"] and not nb["metadata"]["papermill"].get("exception"), name


def test_committed_tables_are_the_runs_aggregated():
    """`runs.csv` and `aggregate.csv` (written by `fclora compare` whenever runs are committed, interim or final) are
    exactly what the report code computes from the committed runs: a run added without re-aggregating fails here."""
    import pandas as pd
    from fclora.report import load_results, aggregate, summary_table
    runs = load_results(STUDY)
    assert runs, "no committed study II run"
    committed = pd.read_csv(STUDY/"aggregate.csv", index_col="method")
    pd.testing.assert_frame_equal(aggregate(runs), committed, check_dtype=False, rtol=1e-9, atol=1e-12)
    table = pd.read_csv(STUDY/"runs.csv")
    assert sorted(zip(table.method, table.seed)) == sorted((r.get("arm", r["method"]), r["seed"]) for r in runs)
    assert committed["seeds"].sum() == len(runs) == len(list(STUDY.glob("*-seed*/results.json")))


def test_gpu_arms_are_the_cpu_study_at_224_px(arms):
    "benchmarks/gpu_study.sh runs the same arms (same overrides) and recipe, at 224 px on CUDA, with fewer seeds."
    settings, cpu_arms = arms
    gpu_settings, gpu_arms = load_arms(STUDY.parent/"study2-gpu-vits-cifar10"/"arms.json")
    assert gpu_settings == {**settings, "image_size": 224, "device": "cuda"}
    assert {a: {k: v for k, v in o.items() if k != "seeds"} for a, o in gpu_arms.items()} == \
           {a: {k: v for k, v in o.items() if k != "seeds"} for a, o in cpu_arms.items()}
    for arm, seed, over in sweep_runs(gpu_arms, [0]):
        validate_config(make_config("paper", "cifar10", **{**gpu_settings, **over}, seed=seed, arm=arm))


def test_the_pages_quote_the_runs():
    "The headline numbers written in prose (README, results page, results/README) are the committed runs' paired difference."
    from fclora.report import load_results, decision_table
    row = decision_table(load_results(STUDY), [("fclora", "lora"), ("eva", "lora"), ("random", "lora")]).set_index("A")
    fc = row.loc["fclora"]
    interval = f"{fc['CI low']:+.2f} .. {fc['CI high']:+.2f}"
    headline = re.compile(rf"{abs(fc['A - B']):.2f}.{{0,60}}{re.escape(interval)}")   # the mean, then its CI, in one sentence
    root = STUDY.parents[1]
    pages = {p: prose(root/p) for p in ("README.md", "nbs/12_results.ipynb", "results/README.md")}
    for p, text in pages.items():
        assert headline.search(text), (p, headline.pattern)
        for arm in ("eva", "random"):   # the bounds on any gain, as the pages state them
            assert f"below {row.loc[arm, 'gain of A below']:.2f} points" in text, (p, arm)
