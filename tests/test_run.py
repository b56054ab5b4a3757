"""Experiments as users run them: `fclora run` (papermill) per method with the quick preset, papermill directly,
`fclora compare`, and the saved adapter reloaded by stock peft in a fresh process."""
import json, subprocess, sys

import pytest

from conftest import BIN, ROOT, fclora, one_line_error, results

METHODS = ["fclora", "lora", "adalora", "full", "linear", "random"]
KEYS = ["method", "dataset", "model_name", "seed", "config", "test_accuracy", "test_loss", "ece", "ece_scaled", "mce",
        "temperature", "class_acc_mean", "class_acc_std", "params", "wall_clock_s", "peak_memory_mb", "ranks", "importance"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "One quick-preset run per method, through `fclora run` (papermill)."
    root = tmp_path_factory.mktemp("runs")
    for m in METHODS:
        p = fclora("run", "cifar10", "--preset", "quick", "--method", m, "--epochs", "2", "--out-dir", root/m, "--no-progress")
        assert p.returncode == 0, (m, p.stderr[-3000:])
    return root


@pytest.mark.parametrize("method", METHODS)
def test_results_complete_and_consistent(runs, method):
    r = results(runs/method)
    assert all(k in r for k in KEYS), set(KEYS) - set(r)
    assert set(r["wall_clock_s"]) == {"scoring", "training", "eval", "total"}
    assert set(r["params"]) == {"adapter", "head", "trainable", "total"}
    assert r["method"] == method and r["config"]["epochs"] == 2 and r["config"]["model_name"] == "random-deit-tiny"
    assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["ece"] <= 1 and r["temperature"] > 0
    p = r["params"]
    assert p["trainable"] == p["adapter"] + p["head"] or method == "full"
    if method in ("fclora", "lora", "random", "adalora"):
        assert sum(r["ranks"].values()) == r["config"]["rank_budget"] == 24
    if method in ("fclora", "lora", "random"):
        assert p["adapter"] == sum(rank * (64 + 64) for rank in r["ranks"].values())   # r (d_in + d_out)
    if method == "fclora": assert sorted(r["importance"]) == sorted(r["ranks"])
    if method == "linear": assert p["adapter"] == 0 and p["trainable"] == p["head"] == 650
    assert (runs/method/"10_cifar10.ipynb").exists()          # the executed notebook beside results.json
    assert not (runs/method/"last.pt").exists()                # a finished run keeps no checkpoint


def test_uniform_lora_is_uniform(runs):
    assert sorted(set(results(runs/"lora")["ranks"].values())) == [2]   # 24 over 12 projections


def test_adapter_reloads_with_stock_peft(runs, tmp_path):
    "A fresh process, no fclora model code: transformers + peft rebuild the model and reproduce the test accuracy."
    r = results(runs/"fclora")
    script = f"""
import json, torch
from transformers import DeiTConfig, DeiTForImageClassification
from peft import PeftModel, PeftConfig
from fclora.data import load_data, preprocess          # the same images, preprocessed the same way
torch.manual_seed(0)                                   # the base's random init (seed 0), as fclora's load_model made it
cfg = DeiTConfig(num_labels=10, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                 patch_size=4, image_size=16)
base = DeiTForImageClassification(cfg)
model = PeftModel.from_pretrained(base, "{runs/'fclora'/'adapter'}").eval()
ranks = {{k: v for k, v in model.peft_config["default"].rank_pattern.items()}}
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


def test_finished_run_is_refused(runs):
    p = fclora("run", "cifar10", "--preset", "quick", "--method", "fclora", "--out-dir", runs/"fclora")
    assert "already holds a finished run" in one_line_error(p)


def test_unreachable_download_says_what_to_do(tmp_path):
    "No network here: the CIFAR download fails with one line that says how to use local data (skip if it worked)."
    p = fclora("plan", "--model", "random-deit-tiny", "--dataset", "cifar10", "--data-root", tmp_path, "--score-batches", "1",
               "--image-size", "32", "--quiet", timeout=300)
    if p.returncode == 0: pytest.skip("CIFAR-10 could be downloaded here")
    assert "pass a local folder" in one_line_error(p)


def test_papermill_directly_runs_cifar100_notebook(tmp_path):
    out = tmp_path/"c100"
    p = subprocess.run([str(BIN/"papermill"), str(ROOT/"nbs/11_cifar100.ipynb"), str(tmp_path/"out.ipynb"), "-p", "preset", "quick",
                        "-p", "method", "lora", "-p", "epochs", "1", "-p", "out_dir", str(out), "--no-progress-bar"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r = results(out)
    assert r["method"] == "lora" and r["config"]["epochs"] == 1 and sum(r["ranks"].values()) == 24


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
