"""Experiments as users run them: `fclora run` (papermill) per method with the quick preset, papermill directly,
`fclora compare`, and the saved adapter reloaded by stock peft in a fresh process."""
import json, subprocess, sys

import pytest

from conftest import BIN, ROOT, fclora, in_process, one_line_error, results, slow

METHODS = ["fclora", "lora", "adalora", "full", "linear", "random", "eva", "static"]
QUICK = ["run", "cifar10", "--preset", "quick", "--model-name", "random-deit-tiny", "--dataset", "digits", "--image-size", "16",
         "--epochs", "2", "--train-subset", "600", "--no-progress"]   # the model pinned: the checks below use its shapes
KEYS = ["method", "dataset", "model_name", "seed", "config", "test_accuracy", "test_loss", "ece", "ece_scaled", "mce",
        "temperature", "class_acc_mean", "class_acc_std", "params", "wall_clock_s", "peak_memory_mb", "ranks", "importance"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One quick-preset run per method. FC-LoRA's goes the user's way, `fclora run` (papermill, a kernel of its own); the
    others call what that notebook calls, `run_experiment`, here in the test's process: the path through papermill is the
    same for every method (08_cli), and a kernel costs ~15 s of imports on 2 cores, most of such a run. The notebook's path
    for other methods and presets (the slow tier): test_papermill_directly_runs_cifar100_notebook, the sweep test, test_bf16_emulated_when_the_user_insists (lora)."""
    root = tmp_path_factory.mktemp("runs")
    p = fclora(*QUICK, "--method", "fclora", "--out-dir", root/"fclora")
    assert p.returncode == 0, p.stderr[-3000:]
    (root/"prior.json").write_text(json.dumps(results(root/"fclora")["ranks"]))   # static's prior: the fclora run's ranks
    for m in METHODS[1:]:
        in_process(QUICK, out_dir=root/m, method=m, rank_prior=str(root/"prior.json") if m == "static" else None)
    return root


@pytest.mark.parametrize("method", METHODS)
def test_results_complete_and_consistent(runs, method):
    r = results(runs/method)
    assert all(k in r for k in KEYS), set(KEYS) - set(r)
    assert set(r["wall_clock_s"]) == {"scoring", "training", "eval", "total"}
    assert set(r["params"]) == {"adapter", "head", "trainable", "total"}
    assert r["method"] == method and r["config"]["epochs"] == 2 and r["config"]["model_name"] == "random-deit-tiny"
    assert [h["epoch"] for h in r["history"]] == [1, 2] and r["n_train"] == 480
    assert r["history"][1]["train_loss"] < r["history"][0]["train_loss"]     # it learns (04_training's slow cell: 10 epochs)
    assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["ece"] <= 1 and r["temperature"] > 0
    p = r["params"]
    assert p["trainable"] == p["adapter"] + p["head"] or method == "full"
    if method in ("fclora", "lora", "random", "adalora", "eva", "static"):
        assert sum(r["ranks"].values()) == r["config"]["rank_budget"] == 24
    if method in ("fclora", "lora", "random", "eva", "static"):
        assert p["adapter"] == sum(rank * (64 + 64) for rank in r["ranks"].values())   # r (d_in + d_out)
    if method == "fclora": assert sorted(r["importance"]) == sorted(r["ranks"])
    if method == "eva": assert r["importance"] == {} and min(r["ranks"].values()) >= r["config"]["r_min"]   # EVA: ranks, no scores
    if method == "eva":   # the settings peft was given, as the saved adapter says
        saved = json.loads((runs/method/"adapter"/"adapter_config.json").read_text())["eva_config"]
        assert r["eva"] == {"rho": saved["rho"], "whiten": saved["whiten"]}
    else: assert "eva" not in r
    assert sorted(f.name for f in (runs/method).iterdir()) == sorted(["config.json", "plan.json", "results.json", "predictions.npz"]
        + (["adapter"] if method not in ("full", "linear") else []) + (["10_cifar10.ipynb"] if method == "fclora" else []))   # + the executed notebook
    if method == "linear": assert p["adapter"] == 0 and p["trainable"] == p["head"] == 650


def test_fclora_ranks_are_its_own_scores_allocated(runs):
    "End to end: results.json's ranks are allocate_ranks of results.json's own importance scores, and not uniform."
    import pandas as pd
    from fclora.allocation import allocate_ranks, uniform_ranks
    r = results(runs/"fclora")
    scores = pd.Series({n: v["score"] for n, v in r["importance"].items()})
    assert r["ranks"] == allocate_ranks(scores, r["rank_budget"], r["config"]["r_min"], r["config"]["r_max"]).to_dict()
    assert r["ranks"] != uniform_ranks(list(r["ranks"]), r["rank_budget"], r["config"]["r_min"], r["config"]["r_max"]).to_dict()


def test_static_follows_its_prior(runs):
    "A prior of another run's ranks at the same budget gives back exactly those ranks (proportional to themselves)."
    assert results(runs/"static")["ranks"] == results(runs/"fclora")["ranks"]
    assert results(runs/"static")["importance"] == {}


@pytest.mark.parametrize("method", ["fclora", "full"])
def test_predictions_match_the_results(runs, method):
    "predictions.npz: one row per test image, naming distinct images of the test file, giving back the reported accuracy and loss."
    import numpy as np
    r, pr = results(runs/method), np.load(runs/method/"predictions.npz")
    assert len(pr["index"]) == r["n_test"] == len(set(pr["index"].tolist())) and pr["index"].max() < 297  # digits' test file
    assert abs((pr["pred"] == pr["label"]).mean() - r["test_accuracy"]) < 1e-9
    assert abs(-np.log(pr["p_true"].astype(float)).mean() - r["test_loss"]) < 5e-3
    assert r["host"]["precision"] == "fp32" and r["host"]["threads"] >= 1 and r["host"]["cpu_capability"]


def test_uniform_lora_is_uniform(runs):
    assert sorted(set(results(runs/"lora")["ranks"].values())) == [2]   # 24 over 12 projections


@pytest.mark.parametrize("method", ["fclora", pytest.param("eva", marks=slow)])
def test_adapter_reloads_with_stock_peft(runs, tmp_path, method):
    "A fresh process, no fclora model code: transformers + peft rebuild the model and reproduce the test accuracy."
    r = results(runs/method)
    script = f"""
import json, torch
from transformers import DeiTConfig, DeiTForImageClassification
from peft import PeftModel, PeftConfig
from fclora.data import load_data, preprocess          # the same images, preprocessed the same way
torch.manual_seed(0)                                   # the base's random init (seed 0), as fclora's load_model made it
cfg = DeiTConfig(num_labels=10, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                 patch_size=4, image_size=16)
base = DeiTForImageClassification(cfg)
model = PeftModel.from_pretrained(base, "{runs/method/'adapter'}").eval()
ranks = {{n: m.r["default"] for n, m in model.named_modules() if isinstance(getattr(m, "r", None), dict)}}   # each LoRA layer's rank
_, test = load_data("digits")
with torch.no_grad(): acc = (model(pixel_values=preprocess(test.x, 16)).logits.argmax(1) == test.y).float().mean().item()
print(json.dumps(dict(acc=acc, n_ranks=len(ranks), total=sum(ranks.values()))))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["n_ranks"] == 12 and got["total"] == 24
    assert round(got["acc"] * r["n_test"]) == round(r["test_accuracy"] * r["n_test"])   # the same images right


def test_compare_prints_every_run(runs):
    p = fclora("compare", runs)
    assert p.returncode == 0, p.stderr
    for m in METHODS: assert m in p.stdout


def test_unreachable_download_says_what_to_do(tmp_path):
    "No network here: the CIFAR download fails with one line that says how to use local data (skip if it worked)."
    p = fclora("plan", "--model", "random-deit-tiny", "--dataset", "cifar10", "--data-root", tmp_path, "--score-batches", "1",
               "--image-size", "32", "--quiet", timeout=300)
    if p.returncode == 0: pytest.skip("CIFAR-10 could be downloaded here")
    assert "pass a local folder" in one_line_error(p)


@slow
def test_papermill_directly_runs_cifar100_notebook(tmp_path):
    out = tmp_path/"c100"
    p = subprocess.run([str(BIN/"papermill"), str(ROOT/"nbs/11_cifar100.ipynb"), str(tmp_path/"out.ipynb"), "-p", "preset", "quick",
                        "-p", "method", "lora", "-p", "epochs", "1", "-p", "out_dir", str(out), "--no-progress-bar"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r = results(out)
    assert r["method"] == "lora" and r["config"]["epochs"] == 1 and sum(r["ranks"].values()) == r["rank_budget"]


@slow
def test_sweep_runs_methods_by_seeds_and_compare_aggregates(tmp_path):
    out = tmp_path/"sweep"
    p = fclora("sweep", "cifar10", "--preset", "quick", "--methods", "lora,linear", "--seeds", "0,1", "--epochs", "1",
               "--train-subset", "400", "--out-dir", out, "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(d.name for d in out.iterdir()) == ["linear-seed0", "linear-seed1", "lora-seed0", "lora-seed1"]
    assert "across seeds (mean, std, 95% CI half-width)" in p.stdout
    again = fclora("sweep", "cifar10", "--preset", "quick", "--methods", "lora,linear", "--seeds", "0,1", "--epochs", "1",
                   "--train-subset", "400", "--out-dir", out, "--no-progress")
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 4     # a sweep continues, never redoes
    p = fclora("compare", out, "--agg-csv", tmp_path/"agg.csv")
    import pandas as pd
    agg = pd.read_csv(tmp_path/"agg.csv", index_col="method")
    assert agg.loc["lora", "seeds"] == 2 and agg.loc["lora", "test_accuracy ci95"] > 0
    accs = [results(out/f"lora-seed{s}")["test_accuracy"] for s in (0, 1)]
    assert abs(agg.loc["lora", "test_accuracy mean"] - sum(accs) / 2) < 1e-12


def emulating_bf16():
    from fclora.training import native_bf16
    if native_bf16("cpu"): pytest.skip("this CPU multiplies bf16 natively: nothing to refuse here (04_training tests the rule itself)")


def test_bf16_on_a_cpu_that_would_emulate_it_is_refused(tmp_path):
    """Issue 20: bf16 on a CPU without native bf16 (emulated, ~15x slower than float32) is refused in one line before any work, by
    `fclora run` and `fclora plan`, naming the fix."""
    emulating_bf16()
    tiny = ["--model-name", "random-deit-tiny", "--dataset", "digits", "--image-size", "16"]
    for args in ([*QUICK, "--out-dir", tmp_path/"refused"], ["plan", *tiny, "--quiet"]):
        line = one_line_error(fclora(*args, "--precision", "bf16"))
        assert "no native bf16" in line and "slower than float32" in line and 'precision="fp32"' in line and "--allow-emulated-bf16" in line, line
    assert not (tmp_path/"refused").exists()                           # refused before anything was written


@slow
def test_bf16_emulated_when_the_user_insists(tmp_path):
    "`--allow-emulated-bf16` insists: the run goes through (the notebook, in bf16), and records the CPU it ran on."
    emulating_bf16()
    p = fclora(*QUICK, "--method", "lora", "--epochs", "1", "--train-subset", "100", "--test-subset", "32", "--precision", "bf16",
               "--allow-emulated-bf16", "--out-dir", tmp_path/"insisted")   # lora: no scoring; a few emulated steps suffice
    assert p.returncode == 0, p.stderr[-3000:]
    host = results(tmp_path/"insisted")["host"]
    assert host["precision"] == "bf16" and host["native_bf16_cpu"] is False and host["cpu"] and host["cpu_capability"]
