"""The text experiment as users run it: `fclora sweep sst2` and `fclora run sst2` (papermill runs `nbs/13_sst2.ipynb`)
on a tiny random BERT and a few sentences, its one-line errors, the real MiniLM where its package is installed, and
the MiniLM/SST-2 study's design (results/study-minilm-sst2/arms.json) against issue 23."""
import json

import numpy as np
import pytest

from conftest import ROOT, fclora, one_line_error, prose, quoted, results, slow

ALL = "query,key,value,attention.output.dense,intermediate.dense,output.dense"   # every linear layer of a BERT encoder
KEYS = ["method", "arm", "dataset", "model_name", "seed", "config", "test_accuracy", "test_loss", "ece", "ece_scaled", "mce",
        "temperature", "class_acc_mean", "class_acc_std", "params", "wall_clock_s", "peak_memory_mb", "ranks", "rank_budget",
        "importance", "history", "host", "predictions", "n_train", "n_val", "n_test"]
WORDS = ["good film", "great film", "a fine film", "awful film", "bad", "not good"]


def tsv(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder/name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "(model folder, data folder): a tiny random-init BERT with a word-level tokenizer, 48 + 6 sentences."
    from fclora.text import tiny_text_model
    root = tmp_path_factory.mktemp("text")
    tsv(root/"data", "train.tsv", [(w, int(i % 6 < 3)) for i, w in enumerate(WORDS * 8)])
    tsv(root/"data", "dev.tsv", [(w, int(i < 3)) for i, w in enumerate(WORDS)])
    return tiny_text_model(root/"model"), root/"data"


def small(model, data):
    return ["--preset", "quick", "--model-name", model, "--dataset", data, "--train-subset", "48", "--test-subset", "6",
            "--batch-size", "8", "--score-batches", "2", "--epochs", "2", "--no-progress"]


@pytest.fixture(scope="module")
def sweep(tiny, tmp_path_factory):
    "Two arms through `fclora sweep sst2 --arms` (papermill): fclora on q/k/v, and uniform LoRA on every layer at a parameter budget."
    model, data = tiny
    root = tmp_path_factory.mktemp("sweep")
    cost = 2 * (4 * (32 + 32) + 2 * (32 + 64))   # r (d_in + d_out) per unit of rank, summed over the tiny BERT's 12 layers
    (root/"arms.json").write_text(json.dumps({"settings": {"rank_budget": 8}, "arms": {
        "fclora": {"method": "fclora"},
        "lora-all": {"method": "lora", "targets": ALL, "budget_unit": "params", "rank_budget": 2 * cost}}}))
    p = fclora("sweep", "sst2", "--arms", root/"arms.json", "--seeds", "0", "--out-dir", root/"runs", *small(model, data))
    assert p.returncode == 0, p.stderr[-3000:]
    return root/"runs", p.stdout


def test_sweep_writes_results_the_report_reads(sweep):
    runs, stdout = sweep
    for arm in ("fclora", "lora-all"):
        r = results(runs/f"{arm}-seed0")
        assert all(k in r for k in KEYS), set(KEYS) - set(r)
        assert (r["arm"], r["n_train"], r["n_val"], r["n_test"]) == (arm, 38, 10, 6)
        assert [h["epoch"] for h in r["history"]] == [1, 2] and set(r["history"][0]) >= {"train_loss", "val_loss", "val_acc"}
        assert set(r["wall_clock_s"]) == {"scoring", "training", "eval", "total"}
        p = r["params"]
        assert p["trainable"] == p["adapter"] + p["head"] and p["head"] == 32 * 2 + 2   # the new classifier
        pred = np.load(runs/f"{arm}-seed0"/"predictions.npz")
        assert sorted(pred["index"].tolist()) == list(range(6)) and np.isclose((pred["pred"] == pred["label"]).mean(), r["test_accuracy"])
        assert (runs/f"{arm}-seed0"/"13_sst2.ipynb").is_file() and (runs/f"{arm}-seed0"/"adapter"/"adapter_config.json").is_file()
    f, u = results(runs/"fclora-seed0"), results(runs/"lora-all-seed0")
    assert sum(f["ranks"].values()) == 8 and len(f["ranks"]) == 6 and sorted(f["importance"]) == sorted(f["ranks"])
    assert len(u["ranks"]) == 12 and set(u["ranks"].values()) == {2} and u["params"]["adapter"] == u["config"]["rank_budget"]
    assert u["config"]["targets"] == ALL and u["config"]["budget_unit"] == "params"
    assert "fclora" in stdout and "lora" in stdout   # the sweep's comparison table


def test_compare_reads_text_runs(sweep, tmp_path):
    runs, _ = sweep
    p = fclora("compare", runs, "--csv", tmp_path/"runs.csv")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path/"runs.csv").read_text().count("\n") == 3


@pytest.mark.parametrize("case", [pytest.param("no folder", marks=slow), "bad row"])   # a bad label, a missing file: 09_text's tests
def test_bad_data_one_line(tiny, tmp_path, case):
    model, data = tiny
    folder = tmp_path/"data"
    if case == "no folder": folder, words = tmp_path/"bad/folder", "unknown text dataset"
    else:
        rows = [(w, i % 2) for i, w in enumerate(WORDS * 8)]
        tsv(folder, "dev.tsv", rows[:6])
        tsv(folder, "train.tsv", rows)
        text = (folder/"train.tsv").read_text().splitlines()
        text[5] = "a row without its label" if case == "bad row" else "fine film\tpositive"
        (folder/"train.tsv").write_text("\n".join(text) + "\n")
        words = "line 6: 1 tab-separated field(s)" if case == "bad row" else "line 6: label 'positive' is not an integer"
    line = one_line_error(fclora("run", "sst2", *small(model, folder), "--out-dir", tmp_path/"out"))
    assert words in line, line
    assert not (tmp_path/"out"/"13_sst2.ipynb").exists()


@pytest.fixture
def minilm():
    from fclora.text import text_model_path
    path = text_model_path("minilm-l6")
    if path.startswith("sentence-transformers/"): pytest.skip('minilm-l6 is not installed (pip install -e ".[text]")')
    return path


def test_minilm_anatomy(minilm):
    "The real model: 18 q/k/v projections, 36 linear layers in ALL, uniform rank 2 on them = the study's parameter budget."
    from fclora.text import load_text_model
    from fclora.core import parse_targets
    from fclora.importance import find_target_modules, layer_shape
    model, tok = load_text_model("minilm-l6", 2)
    assert sum(p.numel() for p in model.base_model.parameters()) == 22_713_216
    assert len(find_target_modules(model)) == 18
    names = find_target_modules(model, parse_targets(ALL))
    assert len(names) == 36 and 2 * sum(sum(layer_shape(model.get_submodule(n))) for n in names) == 82_944
    assert tok("a gripping film")["input_ids"][0] == tok.cls_token_id


STUDY = ROOT/"results"/"study-minilm-sst2"


def test_study_design_is_the_issues():
    "arms.json is issue 23's design: the arms, their seeds, one recipe, the density 41 over 18, the GoRA setting's budget."
    from fclora.cli import load_arms
    from fclora.core import make_config, validate_config
    settings, arms = load_arms(STUDY/"arms.json")
    assert set(arms) == {"fclora", "lora", "eva", "fclora-all", "lora-all"}
    seeds = {a: o["seeds"] for a, o in arms.items()}
    assert len(seeds["fclora"]) >= 10 and seeds["fclora"] == seeds["lora"] and len(seeds["eva"]) >= 5
    assert set(seeds["eva"]) <= set(seeds["fclora"]) and seeds["fclora-all"] == seeds["lora-all"] and len(seeds["lora-all"]) >= 5
    cfgs = {a: make_config("paper", "sst2", **settings, **{k: v for k, v in o.items() if k != "seeds"}, seed=0) for a, o in arms.items()}
    for a, c in cfgs.items():
        validate_config(c)
        assert c.method == a.split("-")[0] and c.model_name == "minilm-l6" and c.test_subset is None   # all 872 dev.tsv sentences
    recipe = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("method", "arm", "lr", "targets", "budget_unit", "rank_budget")}
    assert len({json.dumps(recipe(c), sort_keys=True) for c in cfgs.values()}) == 1     # one recipe; the arms differ only as designed
    assert all(cfgs[a].rank_budget == 41 and cfgs[a].budget_unit == "rank" and cfgs[a].targets is None for a in ("fclora", "lora", "eva"))
    for a in ("fclora-all", "lora-all"):
        assert (cfgs[a].targets, cfgs[a].budget_unit, cfgs[a].rank_budget) == (ALL, "params", 82_944)
    design = json.loads((STUDY/"design.json").read_text())
    assert design["settings"] == settings and {a: {k: v for k, v in o.items() if k != "lr"} for a, o in arms.items()} == design["arms"]
    assert set(design["lr_grid"]) == set(arms) and all(len(g) >= 2 for g in design["lr_grid"].values())
    assert all(o.get("lr") in (None, *design["lr_grid"][a]) for a, o in arms.items())   # each rate, once chosen, from its grid
    assert design["selection_seed"] not in {s for ss in seeds.values() for s in ss}
    sel_settings, sel = load_arms(STUDY/"select-arms.json")   # phase 1: each arm at each rate of its grid, on the selection seed
    assert sel_settings == settings
    assert sel == {f"select-{a}-lr{lr:g}": dict({k: v for k, v in arms[a].items() if k not in ("seeds", "lr")}, lr=lr, seeds=[design["selection_seed"]])
                   for a, lrs in design["lr_grid"].items() for lr in lrs}


def test_committed_runs_follow_the_design():
    """Every committed run of the study (selection and evaluation): the design's one recipe, its arm's settings and rate
    (the chosen one, for an evaluation run), one of its seeds, fp32 on one thread, and its files (config, plan, per-sentence
    predictions, the executed notebook)."""
    from fclora.cli import load_arms
    settings, arms = load_arms(STUDY/"arms.json")
    phases = {**load_arms(STUDY/"select-arms.json")[1], **arms}
    done = sorted(STUDY.glob("*-seed*/results.json"))
    for f in done:
        arm, seed = f.parent.name.rsplit("-seed", 1)
        r, a = json.loads(f.read_text()), phases[arm]
        assert int(seed) in a["seeds"] and "lr" in a and r["arm"] == arm, f
        want = {**settings, **{k: v for k, v in a.items() if k != "seeds"}, "seed": int(seed)}
        assert {k: r["config"][k] for k in want if k != "progress"} == {k: v for k, v in want.items() if k != "progress"}, f
        assert r["host"]["precision"] == "fp32" and r["host"]["threads"] == 1 and r["n_test"] == 872, f
        for name in ("config.json", "plan.json", "predictions.npz", "13_sst2.ipynb"): assert (f.parent/name).is_file(), (f, name)


def test_every_arm_has_its_seeds():
    "The study is complete: each selection run and each evaluation arm's every seed is committed, and nothing else."
    from fclora.cli import load_arms
    want = {(arm, seed) for f in ("select-arms.json", "arms.json") for arm, o in load_arms(STUDY/f)[1].items() for seed in o["seeds"]}
    done = {tuple(f.parent.name.rsplit("-seed", 1)) for f in STUDY.glob("*-seed*/results.json")}
    assert {(a, int(s)) for a, s in done} == want


def test_the_host_check_matches_the_study_run():
    "The rerun of one AVX2 run on an AVX-512 host (its README): other vector code, the same predictions; float sums within 1e-5 (relative)."
    import numpy as np
    name = "select-lora-lr0.003-seed100"
    a, b = (ROOT/"results"/d/name for d in ("study-minilm-sst2", "study-minilm-sst2-host-check"))
    ra, rb = json.loads((a/"results.json").read_text()), json.loads((b/"results.json").read_text())
    assert (ra["host"]["cpu_capability"], rb["host"]["cpu_capability"]) == ("AVX2", "AVX512")
    assert ra["config"] == {**rb["config"], "out_dir": ra["config"]["out_dir"]}
    pa, pb = np.load(a/"predictions.npz"), np.load(b/"predictions.npz")
    assert pa.files == pb.files and all((pa[k] == pb[k]).all() for k in pa.files)
    assert ra["test_accuracy"] == rb["test_accuracy"] and [h["val_acc"] for h in ra["history"]] == [h["val_acc"] for h in rb["history"]]
    for k in ("test_loss", "ece_scaled", "temperature"): assert ra[k] == pytest.approx(rb[k], rel=1e-5), k


def test_the_lr_check_follows_its_rule():
    """The after-study check (its README): the primary arms at 6e-3 and 1e-2 on the selection seed, each arm's rate
    re-chosen over the extended grid by the study's rule, and exactly the arms whose rate changed run on the ten
    evaluation seeds at it, with the study's settings, fp32, one thread."""
    from fclora.cli import load_arms
    from fclora.report import load_results, select_lr
    CHECK = ROOT/"results"/"study-minilm-sst2-lr-check"
    settings, arms = load_arms(STUDY/"arms.json")
    grid_settings, grid = load_arms(CHECK/"arms.json")
    eval_settings, reruns = load_arms(CHECK/"eval-arms.json")
    assert grid_settings == eval_settings == settings
    assert grid == {f"check-{a}-lr{lr:g}": dict(method=a, lr=lr, seeds=[100]) for a in ("fclora", "lora") for lr in (0.006, 0.01)}
    val = {(r["method"], r["config"]["lr"]): r["history"][-1]["val_acc"] for r in load_results(STUDY) + load_results(CHECK)
           if r["seed"] == 100 and r["config"].get("targets") is None}
    chosen = {a: select_lr({lr: v for (m, lr), v in val.items() if m == a}) for a in ("fclora", "lora")}
    assert {a: len([1 for m, _ in val if m == a]) for a in chosen} == {"fclora": 5, "lora": 5}
    assert reruns == {f"{a}-lr{lr:g}": dict(method=a, lr=lr, seeds=arms[a]["seeds"]) for a, lr in chosen.items() if lr != arms[a]["lr"]}
    for r in load_results(CHECK):
        o = {**grid, **reruns}[r["arm"]]
        assert r["seed"] in o["seeds"] and {k: r["config"][k] for k in settings if k != "progress"} == {k: v for k, v in settings.items() if k != "progress"}
        assert (r["config"]["method"], r["config"]["lr"], r["host"]["precision"], r["host"]["threads"]) == (o["method"], o["lr"], "fp32", 1)
    assert sorted((r["arm"], r["seed"]) for r in load_results(CHECK)) == sorted((a, s) for a, o in {**grid, **reruns}.items() for s in o["seeds"])


def test_committed_tables_are_the_evaluation_runs_aggregated():
    "`runs.csv` and `aggregate.csv` (`tools/study_sst2.py tables`) are what the report code computes from the committed evaluation runs."
    import pandas as pd
    from fclora.report import load_results, aggregate
    runs = [r for r in load_results(STUDY) if not r["arm"].startswith("select-")]
    if not runs: pytest.skip("no evaluation run committed yet")
    pd.testing.assert_frame_equal(aggregate(runs), pd.read_csv(STUDY/"aggregate.csv", index_col="method"), check_dtype=False, rtol=1e-9, atol=1e-12)
    assert sorted(zip(*pd.read_csv(STUDY/"runs.csv")[["method", "seed"]].T.values)) == sorted((r["arm"], r["seed"]) for r in runs)


def test_the_pages_quote_the_study():
    """The pages state each designed pair's paired difference and CI as the committed runs compute them: the primary pair
    on the README, the results page and results/README; EVA and the parameter-budget pair against uniform, and the
    after-study check (FC-LoRA against uniform LoRA at its re-chosen rate), on the last two."""
    from fclora.report import load_results, decision_table
    runs = [r for r in load_results(STUDY) if not r["arm"].startswith("select-")]
    check = [r for r in load_results(ROOT/"results"/"study-minilm-sst2-lr-check") if r["arm"] == "lora-lr0.006"]
    pairs = {("fclora", "lora"): ("README.md", "nbs/12_results.ipynb", "results/README.md"),
             ("eva", "lora"): ("nbs/12_results.ipynb", "results/README.md"),
             ("fclora-all", "lora-all"): ("nbs/12_results.ipynb", "results/README.md"),
             ("fclora", "lora-lr0.006"): ("nbs/12_results.ipynb", "results/README.md")}
    for (a, b), pages in pairs.items():
        row = decision_table(runs + check, [(a, b)]).iloc[0]
        assert row["seeds"] == (10 if a == "fclora" else 5), (a, b)
        for page in pages: assert quoted(row).search(prose(ROOT/page)), (page, quoted(row).pattern)
