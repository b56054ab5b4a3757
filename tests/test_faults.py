"""Faults a user meets: bad input (one line, exit 2, nothing but an error record), out_dir policies, a run
killed mid-epoch and resumed (bit-identical on CPU), the same seed twice, and fuzzed configurations."""
import os, signal, subprocess, time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, HealthCheck, strategies as st

from conftest import BIN, fclora, one_line_error, results

QUICK = ["run", "cifar10", "--preset", "quick", "--no-progress"]
VOLATILE = {"wall_clock_s", "peak_memory_mb", "path", "config"}   # what may differ between identical runs


def same_results(a, b):
    a, b = ({k: v for k, v in r.items() if k not in VOLATILE} for r in (a, b))
    assert a.keys() == b.keys()
    for k in a: assert a[k] == b[k], k


def _npz(folder, x, y, xt=None, yt=None):
    folder.mkdir(parents=True)
    np.savez(folder/"train.npz", x=x, y=y, classes=np.array([str(i) for i in range(10)]))
    np.savez(folder/"test.npz", x=x if xt is None else xt, y=y if yt is None else yt)
    return folder


@pytest.fixture(scope="module")
def no_qkv_model(tmp_path_factory):
    "A tiny image classifier with no attention (ResNet), saved locally."
    from transformers import ResNetConfig, ResNetForImageClassification
    d = tmp_path_factory.mktemp("resnet")
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=10)).save_pretrained(d)
    return d


def bad_inputs(tmp, no_qkv):
    x = np.zeros((40, 8, 8, 3), np.uint8); y = np.arange(40) % 10
    return [
        (["--rank-budget", "1000"], "infeasible"),
        (["--r-min", "5", "--r-max", "2"], "r_min <= r_max"),
        (["--metric-weights", "0.5,0.5,0.5"], "summing to 1"),
        (["--metric-weights", "1.2,-0.1,-0.1"], "non-negative"),
        (["--method", "qlora"], "method must be one of"),
        (["--model-name", str(no_qkv)], "no query/key/value"),
        (["--dataset", str(tmp/"missing")], "unknown dataset"),
        (["--dataset", str(_npz(tmp/"bad-shape", x[..., 0], y))], "shape (N, H, W, 3)"),
        (["--dataset", str(_npz(tmp/"bad-labels", x, y, yt=y + 5))], "labels must lie in"),
        (["--train-subset", "99999"], "train_subset=99999"),
        (["--image-size", "18"], "not divisible by the model's patch size"),
        (["--epochs", "0"], "epochs must be"),
        (["--model-name", str(tmp/"no-such-model")], "cannot load model"),
    ]


def test_bad_input_one_line_exit_2_nothing_written(tmp_path, no_qkv_model):
    for i, (args, words) in enumerate(bad_inputs(tmp_path, no_qkv_model)):
        out = tmp_path/f"run{i}"
        msg = one_line_error(fclora(*QUICK, *args, "--out-dir", out))
        assert words in msg, (args, msg)
        written = sorted(f.name for f in out.iterdir()) if out.exists() else []
        assert written in ([], ["error.json"]), (args, written)


def test_out_dir_policies(tmp_path):
    out = tmp_path/"run"
    assert fclora(*QUICK, "--epochs", "1", "--out-dir", out).returncode == 0
    assert "--overwrite" in one_line_error(fclora(*QUICK, "--epochs", "1", "--out-dir", out))
    assert fclora(*QUICK, "--epochs", "1", "--out-dir", out, "--overwrite").returncode == 0
    (out/"results.json").unlink()                                       # now it looks unfinished
    assert "--resume" in one_line_error(fclora(*QUICK, "--epochs", "1", "--out-dir", out))


def _start(args, out):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))   # as `fclora()` does: same threads, same sums
    return subprocess.Popen([str(BIN/"fclora"), *QUICK, *args, "--out-dir", str(out)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, ckpt, min_step, timeout=300):
    t = time.time()
    while time.time() - t < timeout:
        if ckpt.exists():
            try:
                if torch.load(ckpt, weights_only=False)["step"] >= min_step: return
            except Exception: pass          # (never a torn file: writes are atomic; this guards a race on rename)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    raise TimeoutError(ckpt)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_identical_results(tmp_path, how):
    args = ["--method", "lora", "--epochs", "3", "--ckpt-every-steps", "5"]
    assert fclora(*QUICK, *args, "--out-dir", tmp_path/"ref").returncode == 0
    proc = _start(args, tmp_path/"cut")
    _wait_for_checkpoint(proc, tmp_path/"cut/last.pt", 10)
    os.killpg(proc.pid, how)
    out, err = proc.communicate(timeout=120)
    if how == signal.SIGINT: assert "resume" in err, err[-2000:]
    assert not (tmp_path/"cut/results.json").exists()
    torch.load(tmp_path/"cut/last.pt", weights_only=False)             # the checkpoint left behind is intact
    assert "--resume" in one_line_error(fclora(*QUICK, *args, "--out-dir", tmp_path/"cut"))
    assert fclora(*QUICK, *args, "--out-dir", tmp_path/"cut", "--resume").returncode == 0
    same_results(results(tmp_path/"cut"), results(tmp_path/"ref"))


def test_same_config_twice_is_identical(tmp_path):
    for name in ("a", "b"): assert fclora(*QUICK, "--method", "fclora", "--epochs", "1", "--out-dir", tmp_path/name).returncode == 0
    same_results(results(tmp_path/"a"), results(tmp_path/"b"))


# ---- fuzzing the public configuration: every value either validates or fails with FcloraError

from fclora.data import FcloraError
from fclora.experiment import make_config, validate_config, run_experiment

junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=6), st.tuples(st.floats(-1, 2), st.floats(-1, 2), st.floats(-1, 2)))
FIELDS = ["method", "epochs", "batch_size", "eval_batch_size", "lr", "warmup_frac", "weight_decay", "label_smoothing",
          "cutmix_alpha", "cutmix_prob", "image_size", "rank_budget", "r_min", "r_max", "metric_weights",
          "score_batches", "val_fraction", "train_subset", "test_subset", "seed", "precision", "device", "nproc"]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(FIELDS), junk, max_size=4))
def test_fuzzed_configs_validate_or_fail_clearly(overrides):
    try: validate_config(make_config("quick", **overrides))
    except FcloraError as e: assert str(e) and "\n" not in str(e)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["fclora", "lora", "linear"]), budget=st.integers(1, 200), r_max=st.integers(1, 20),
       bs=st.integers(1, 64), subset=st.integers(20, 400))
def test_fuzzed_small_runs_run_or_fail_clearly(tmp_path_factory, method, budget, r_max, bs, subset):
    out = tmp_path_factory.mktemp("fuzz")
    cfg = make_config("quick", method=method, rank_budget=budget, r_max=r_max, batch_size=bs, train_subset=subset,
                      epochs=1, out_dir=str(out/"run"), progress=False, score_batches=2)
    try: r = run_experiment(cfg)
    except FcloraError as e: assert str(e); return
    if method != "linear": assert sum(r["ranks"].values()) == budget
