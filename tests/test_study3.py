"""Study III (issue 22, results/study3-vits-*/): the committed design is the issue's, every run it describes is a
valid configuration with one recipe per dataset, the phases follow the rules fixed in advance (checked on
constructed runs), and the runs committed so far are the ones the design and the rules call for."""
import json, statistics, sys
from pathlib import Path

import pytest

from fclora.core import Config
from fclora.experiment import make_config, validate_config
from fclora.allocation import check_budget
from fclora.cli import sweep_runs
from conftest import prose, quoted

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/"tools"))
import study3   # noqa: E402

FOLDERS = {ds: ROOT/f for ds, f in study3.STUDIES.items()}
GRID = [1e-3, 3e-3, 6e-3, 1e-2]


def design(ds): return study3.design(FOLDERS[ds])


def test_designs_are_the_issue_design():
    c10, c100 = design("cifar10"), design("cifar100")
    for d, n_train, budget, data in [(c10, 2000, 82, "cifar10"), (c100, 4000, 129, "cifar100")]:
        s = d["settings"]
        assert (s["train_subset"], s["test_subset"], s["image_size"], s["rank_budget"]) == (n_train, 5000, 112, budget)
        assert s["dataset"] == f"../shared/data/{data}" and s["model_name"] == "../shared/models/vit-small-patch14-imgfocus"
        assert s["precision"] == "fp32"   # one precision for the whole study, never "auto" (it would follow the host)
        assert d["lr_grid"]["lora"] == d["lr_grid"]["fclora"] == GRID
        seeds = {s for a in d["arms"].values() for s in a["seeds"]}
        assert d["selection_seed"] not in seeds   # selection never uses an evaluation seed
        check_budget(36, budget, Config.r_min, Config.r_max)
    n = lambda d, arm: len(d["arms"][arm]["seeds"])
    assert n(c100, "lora") >= 10 and n(c100, "fclora") >= 10 and n(c100, "fclora-static") >= 5
    assert n(c100, "full") >= 3 and n(c100, "linear") >= 3 and len(c100["lr_grid"]["full"]) == len(c100["lr_grid"]["linear"]) == 3
    assert n(c10, "lora") >= 8 and n(c10, "fclora") >= 8 and set(c10["arms"]) == {"lora", "fclora"}
    assert c100["arms"]["fclora-static"]["method"] == "static" and c100["arms"]["fclora-static"]["lr_from"] == "fclora"
    for d in (c10, c100):   # seeds 0..n-1, each arm pairing with uniform LoRA seed by seed
        for a in d["arms"].values(): assert a["seeds"] == list(range(len(a["seeds"])))


def test_static_prior_is_study2_mean_fclora_ranks():
    prior = json.loads((FOLDERS["cifar100"]/"static-prior.json").read_text())
    runs = [json.loads(f.read_text()) for f in sorted((ROOT/"results/study2-vits-cifar10").glob("fclora-seed*/results.json"))]
    assert len(runs) == 10
    assert prior == pytest.approx({n: statistics.mean(r["ranks"][n] for r in runs) for n in runs[0]["ranks"]})


def test_every_phase_run_is_a_valid_config(tmp_path, monkeypatch):
    "Every run the rules can call for (any epochs, any rate of the grid) validates, in both datasets."
    monkeypatch.chdir(ROOT)   # rank_prior and data paths are relative to the repository root
    for ds in FOLDERS:
        d = design(ds)
        arms = {**study3.grid_arms(d, 3), **study3.eval_arms(d, 3, {a: g[0] for a, g in d["lr_grid"].items()})}
        for arm, seed, over in sweep_runs(arms, [d["selection_seed"]]):
            validate_config(make_config("paper", ds, **{**d["settings"], **over}, seed=seed, arm=arm))


def _fake_run(folder, arm, seed, val_acc):
    run = Path(folder)/f"{arm}-seed{seed}"; run.mkdir(parents=True)
    (run/"results.json").write_text(json.dumps(dict(history=[dict(epoch=e, val_acc=a) for e, a in enumerate(val_acc, 1)])))


def test_phases_follow_the_rules(tmp_path, monkeypatch):
    "On constructed selection runs: the epochs from the schedule curve, each arm's rate from the grid, arms.json from both."
    monkeypatch.chdir(tmp_path)
    for ds, f in study3.STUDIES.items():
        Path(f).mkdir(parents=True); (Path(f)/"design.json").write_text((FOLDERS[ds]/"design.json").read_text())
    folder, d = Path(study3.STUDIES["cifar100"]), design("cifar100")
    assert [p for p, _, _ in study3.phases(folder)] == ["schedule"]
    name, over = study3.schedule_arm(d)
    assert over == dict(method="lora", lr=3e-3, epochs=8)
    _fake_run(folder, name, 100, [.30, .40, .45, .48, .496, .50, .499, .50])   # within 0.5 points of .50 from epoch 5
    assert study3.chosen_epochs(folder, d) == 5
    assert [p for p, _, _ in study3.phases(folder)] == ["schedule", "lr grid"]
    best = {"lora": 6e-3, "fclora": 3e-3, "full": 5e-5, "linear": 1e-2}
    for arm in ("lora", "fclora"):   # the primary pair's grids first: its arms (and fclora-static, at fclora's rate) can start
        for lr in d["lr_grid"][arm]: _fake_run(folder, f"select-{arm}-lr{lr:g}", 100, [.1, .6 if lr == best[arm] else .5])
    assert study3.chosen_lrs(folder, d, 5) == {"lora": 6e-3, "fclora": 3e-3}
    assert set(study3.phases(folder)[2][2]) == {"lora", "fclora", "fclora-static"}
    for arm in ("full", "linear"):
        for lr in d["lr_grid"][arm]: _fake_run(folder, f"select-{arm}-lr{lr:g}", 100, [.1, .6 if lr == best[arm] else .5])
    assert study3.chosen_lrs(folder, d, 5) == best
    ph = study3.phases(folder)
    assert [p for p, _, _ in ph] == ["schedule", "lr grid", "evaluation"]
    arms = json.loads((folder/"arms.json").read_text())["arms"]
    assert arms == ph[2][2]
    assert {a: (o["epochs"], o["lr"]) for a, o in arms.items()} == {
        "lora": (5, 6e-3), "fclora": (5, 3e-3), "fclora-static": (5, 3e-3), "full": (5, 5e-5), "linear": (5, 1e-2)}
    assert all(o["test_subset"] == d["selection_test_subset"] for _, s, _ in ph[:2] for o in [s])   # selection: few test images
    todo = study3.pending(".")
    assert todo[0][0] == "cifar10" and todo[0][2] == name              # the other dataset's schedule run comes first
    primary = [study3._primary(d, t[2]) for t in todo]
    assert primary == sorted(primary, reverse=True) and primary.count(False) == 5 + 3 + 3   # then every primary run, then the rest
    c100 = [t for t in todo if t[0] == "cifar100"]
    assert [(t[2], t[3]) for t in c100[:4]] == [("lora", 0), ("fclora", 0), ("lora", 1), ("fclora", 1)]   # seed by seed


def test_committed_runs_follow_the_design():
    "Each committed run is one the design and the rules call for, in fp32 with one thread, its arms.json the rules' own."
    for ds, folder in FOLDERS.items():
        runs = sorted(folder.glob("*-seed*/results.json"))
        if not runs: continue
        wanted = {f"{a}-seed{s}": (settings, over) for _, settings, arms in study3.phases(folder)
                  for a, s, over in sweep_runs(arms, [0])}
        for f in runs:
            r = json.loads(f.read_text())
            settings, over = wanted[f.parent.name]
            cfg = r["config"]
            assert all(cfg[k] == v for k, v in {**settings, **over}.items() if k != "seeds"), f.parent.name
            assert r["host"]["precision"] == "fp32" and r["host"]["threads"] == 1, f.parent.name
            assert (f.parent/"predictions.npz").exists() and (f.parent/"config.json").exists()


def test_a_seeds_allocation_does_not_depend_on_the_rate():
    "FC-LoRA scores before training: every committed run of one seed trains the same ranks, whatever its rate or phase."
    for ds, folder in FOLDERS.items():
        by_seed = {}
        for f in sorted(folder.glob("*-seed*/results.json")):
            r = json.loads(f.read_text())
            if r["method"] == "fclora": by_seed.setdefault(r["seed"], []).append((f.parent.name, r["ranks"]))
        for seed, runs in by_seed.items():
            assert all(sum(ranks.values()) == design(ds)["settings"]["rank_budget"] for _, ranks in runs)
            assert all(ranks == runs[0][1] for _, ranks in runs), [name for name, _ in runs]


def test_committed_tables_are_the_evaluation_runs_aggregated():
    "`runs.csv` and `aggregate.csv` (`tools/study3.py tables`) are what the report code computes from the committed evaluation runs."
    import pandas as pd
    from fclora.report import load_results, aggregate
    for ds, folder in FOLDERS.items():
        runs = [r for r in load_results(folder) if not r["arm"].startswith("select-")]
        if not runs: continue
        pd.testing.assert_frame_equal(aggregate(runs), pd.read_csv(folder/"aggregate.csv", index_col="method"),
                                      check_dtype=False, rtol=1e-9, atol=1e-12)
        assert sorted(zip(*pd.read_csv(folder/"runs.csv")[["method", "seed"]].T.values)) == sorted((r["arm"], r["seed"]) for r in runs)


def grid_tables(text) -> dict:
    "{(dataset, arm): {rate: cell}} of results/README's rate-grid tables (header `| CIFAR-10 rate | 1e-3 | ... |`)."
    import re
    out = {}
    for m in re.finditer(r"^ *\| (CIFAR-10+) rate \|(.*)\|\n *\|[-| ]+\|\n((?: *\| `.*\n)+)", text, re.M):
        rates = [float(c) for c in m[2].split("|")]
        for row in m[3].strip().splitlines():
            arm, *cells = [c.strip() for c in row.strip().strip("|").split("|")]
            out[(m[1].lower().replace("-", ""), arm.strip("`"))] = dict(zip(rates, cells, strict=True))
    return out


def test_results_readme_quotes_the_rate_grid():
    """results/README's rate-grid tables hold every committed grid run's final validation accuracy (%, two decimals),
    bold for the rate the rule chose; a rate not run yet reads `next`."""
    tables = grid_tables((ROOT/"results"/"README.md").read_text())
    for ds, folder in FOLDERS.items():
        d = design(ds); epochs = study3.chosen_epochs(folder, d)
        if epochs is None: continue
        chosen = study3.chosen_lrs(folder, d, epochs)
        for arm, lrs in d["lr_grid"].items():
            done = {lr: r for lr in lrs if (r := study3._results(folder, f"select-{arm}-lr{lr:g}", d["selection_seed"]))}
            if not done: continue
            cells = tables[(ds, arm)]
            assert sorted(cells) == sorted(lrs), (ds, arm)
            for lr in lrs:
                if lr not in done: assert cells[lr] == "next", (ds, arm, lr); continue
                acc = f"{100*done[lr]['history'][-1]['val_acc']:.2f}"
                want = f"**{acc}**" if chosen.get(arm) == lr else acc
                assert cells[lr] == want, (ds, arm, lr, cells[lr], want)


def test_expected_time_comes_from_like_runs_on_this_cpu(tmp_path, monkeypatch):
    "`run --until` starts a run only if runs like it on this CPU say it ends in time: the estimate, by hand, and a deadline that nothing fits."
    import torch
    cpu = torch.backends.cpu.get_cpu_capability()
    def fake(folder, name, method, n_test, total, ev, capability=cpu):
        run = tmp_path/folder/name; run.mkdir(parents=True)
        (run/"results.json").write_text(json.dumps(dict(method=method, config=dict(test_subset=n_test), host=dict(cpu_capability=capability),
                                                        wall_clock_s=dict(total=total, eval=ev))))
    fake("study3-a", "select-lora-seed100", "lora", 500, 1000, 50)
    fake("study3-a", "select-fclora-seed100", "fclora", 500, 1300, 50)
    fake("study3-a", "select-lora-x-seed100", "lora", 500, 9000, 50, capability="another CPU")   # another host's time is no guide
    fake("study3-b", "lora-seed0", "lora", 5000, 1500, 300)                                      # another study, 5,000 test images
    folder = tmp_path/"study3-a"
    assert study3.expected_s(folder, dict(method="lora"), dict(test_subset=500)) == pytest.approx(1.1*(950 + 50) + 120)
    assert study3.expected_s(folder, dict(method="lora"), dict(test_subset=5000)) == pytest.approx(1.1*(950 + 300) + 120)
    assert study3.expected_s(folder, dict(method="full", test_subset=1000), dict(test_subset=5000)) == \
           pytest.approx(1.1*((950 + 1250)/2 + 1000*50/500) + 120)   # no run of its method: its dataset's; per image: median of .1, .1, .06
    assert study3.expected_s(tmp_path/"study3-c", dict(method="lora"), dict(test_subset=500)) is None
    monkeypatch.chdir(ROOT)
    started = []
    monkeypatch.setattr("fclora.cli.sweep", lambda *a, **k: started.append(a) or [])
    past = __import__("datetime").datetime.now().isoformat(timespec="seconds")   # a deadline that no run can meet
    study3.run(until=past)
    assert started == []


def test_the_pages_lead_with_a_primary_pair_once_it_is_in():
    """Once a dataset's primary pair has all its evaluation seeds, the README, the results page and results/README quote
    its paired difference and CI (`+x.xx points (95% CI a .. b`) as the committed runs compute them."""
    from fclora.report import load_results, decision_table
    for ds, folder in FOLDERS.items():
        arms = design(ds)["arms"]
        runs = [r for r in load_results(folder) if not r["arm"].startswith("select-")]
        if any({r["seed"] for r in runs if r["arm"] == a} != set(arms[a]["seeds"]) for a in study3.PRIMARY): continue
        row = decision_table(runs, [("fclora", "lora")]).iloc[0]
        assert row["seeds"] == len(arms["lora"]["seeds"])
        for page in ("README.md", "nbs/12_results.ipynb", "results/README.md"):
            assert quoted(row).search(prose(ROOT/page)), (ds, page, quoted(row).pattern)


FAMILY = [("cifar100", "fclora", "lora"), ("cifar10", "fclora", "lora"),   # the analysis plan's family of four
          ("cifar100", "fclora", "fclora-static"), ("cifar100", "lora", "full")]


def test_the_pages_quote_the_whole_family_once_it_is_in():
    """Once every arm of the plan's four comparisons has all its evaluation seeds, the results page and results/README
    quote each comparison's paired difference and CI, and its Holm-adjusted p over the four (`Holm ... 0.047`)."""
    import re
    from fclora.report import load_results, decision_table, holm
    runs = {ds: [r for r in load_results(f) if not r["arm"].startswith("select-")] for ds, f in FOLDERS.items()}
    if any({r["seed"] for r in runs[ds] if r["arm"] == a} != set(design(ds)["arms"][a]["seeds"])
           for ds, *pair in FAMILY for a in pair): pytest.skip("the family is not complete yet")
    rows = [decision_table(runs[ds], [(a, b)]).iloc[0] for ds, a, b in FAMILY]
    adjusted = holm([row["p"] for row in rows])
    assert all(q >= row["p"] for q, row in zip(adjusted, rows))
    for page in ("nbs/12_results.ipynb", "results/README.md"):
        text = prose(ROOT/page)
        for (ds, a, b), row, q in zip(FAMILY, rows, adjusted):
            assert quoted(row).search(text), (page, ds, a, b, quoted(row).pattern)
            assert re.search(r"Holm.{0,80}" + re.escape(f"{q:.3f}"), text), (page, ds, a, b, f"Holm {q:.3f}")
