"""Faults a user meets: bad input (one line, exit 2, nothing but an error record), out_dir policies, a run
killed mid-epoch and resumed (bit-identical on CPU), the same seed twice, and fuzzed configurations."""
import os, signal, subprocess, time

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, HealthCheck, strategies as st

from conftest import BIN, THREADS, fclora, in_process, one_line_error, results, hang_guard, hung, slow

QUICK = ["run", "cifar10", "--preset", "quick", "--model-name", "random-deit-tiny", "--dataset", "digits", "--image-size", "16",
         "--no-progress"]   # the quick preset, its model pinned (the checks below name its patch size, its 12 projections)
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


def bad_inputs(tmp):
    """One bad input per place a run can find it: the command's own check (before any import of torch or papermill), the
    kernel loading the data, and the plan against the model in the kernel. Which values are bad, and the words of each error,
    are the notebooks' tests (00_core, 00_data, 01_lora, 02_importance, 03_allocation, 06_experiment; a model without
    attention: 02_importance and test_cli); here: that each place turns its error into one line and exit 2, and writes
    nothing but error.json."""
    return [
        (["--epochs", "0"], "epochs must be"),                              # fclora run's check, no kernel started
        (["--dataset", str(tmp/"missing")], "unknown dataset"),             # the kernel, loading the data
        (["--rank-budget", "1000"], "infeasible"),                          # the kernel, planning on the model
    ]


def test_bad_input_one_line_exit_2_nothing_written(tmp_path):
    for i, (args, words) in enumerate(bad_inputs(tmp_path)):
        out = tmp_path/f"run{i}"
        msg = one_line_error(fclora(*QUICK, *args, "--out-dir", out))
        assert words in msg, (args, msg)
        written = sorted(f.name for f in out.iterdir()) if out.exists() else []
        assert written in ([], ["error.json"]), (args, written)


@slow
def test_out_dir_policies(tmp_path):
    out = tmp_path/"run"
    in_process([*QUICK, "--epochs", "1"], out_dir=out)                  # a finished run (made here: its making is not the test)
    assert "--overwrite" in one_line_error(fclora(*QUICK, "--epochs", "1", "--out-dir", out))
    assert fclora(*QUICK, "--epochs", "1", "--out-dir", out, "--overwrite").returncode == 0
    (out/"results.json").unlink()                                       # now it looks unfinished
    assert "--resume" in one_line_error(fclora(*QUICK, "--epochs", "1", "--out-dir", out))


def _start(args, out):
    env = dict(os.environ, OMP_NUM_THREADS=THREADS)   # as `fclora()` does: same threads, same sums
    return subprocess.Popen([str(BIN/"fclora"), *QUICK, *args, "--out-dir", str(out)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, ckpt, min_step, timeout=600):
    "Wait until `ckpt` holds step `min_step` or later (`timeout`: a hang guard, ~10 s idle; scaled)."
    t, limit = time.monotonic(), hang_guard(timeout)
    while time.monotonic() - t < limit:
        if ckpt.exists():
            try:
                if torch.load(ckpt, weights_only=False)["step"] >= min_step: return
            except Exception: pass          # (never a torn file: writes are atomic; this guards a race on rename)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(hung(f"waiting for a checkpoint at step {min_step} in {ckpt}", limit, time.monotonic() - t), pytrace=False)


CUT = ["--method", "fclora", "--epochs", "8", "--train-subset", "500", "--ckpt-every-steps", "5"]   # 25 steps an epoch: the
# kill comes at step 10 or soon after, with ~190 steps (seconds, even on a fast machine) still to run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    "An uninterrupted run, made in the test's process on the commands' thread count: the reference for the interrupted one."
    return in_process([*QUICK, *CUT], out_dir=tmp_path_factory.mktemp("ref")/"run")


def _stop(proc, how):
    "Send `how` to the run's process group; return its (stdout, stderr) once it has ended (a second or two when idle)."
    os.killpg(proc.pid, how)
    try: return proc.communicate(timeout=hang_guard(300))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL); pytest.fail(hung(f"the run stopping on signal {how}", hang_guard(300), hang_guard(300)), pytrace=False)


@slow
def test_interrupted_run_resumes_to_identical_results(tmp_path, reference):
    """Killed hard (SIGKILL) at step 10, resumed, stopped by Ctrl-C (SIGINT) a few steps later, resumed again to the end: the same
    results as the run never interrupted, in other processes (so also: the same configuration twice gives the same run)."""
    cut = tmp_path/"cut"
    proc = _start(CUT, cut)
    _wait_for_checkpoint(proc, cut/"last.pt", 10)
    _stop(proc, signal.SIGKILL)
    assert not (cut/"results.json").exists()
    killed_at = torch.load(cut/"last.pt", weights_only=False)["step"]   # the checkpoint a hard kill left behind is intact
    assert "--resume" in one_line_error(fclora(*QUICK, *CUT, "--out-dir", cut))
    proc = _start([*CUT, "--resume"], cut)
    _wait_for_checkpoint(proc, cut/"last.pt", killed_at + 1)          # a checkpoint of the resumed run's own (the kill may
    # have come some steps after step 10, and a Ctrl-C before the command has started is ignored where the shell ignores it)
    out, err = _stop(proc, signal.SIGINT)
    assert "resume" in err and not (cut/"results.json").exists(), err[-2000:]
    assert fclora(*QUICK, *CUT, "--out-dir", cut, "--resume").returncode == 0
    same_results(results(cut), reference)


# ---- fuzzing the public configuration: every value either validates or fails with FcloraError, and every
# ---- valid configuration validates

from fclora.core import FcloraError, METHODS
from fclora.experiment import make_config, validate_config, run_experiment

junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=6), st.tuples(st.floats(-1, 2), st.floats(-1, 2), st.floats(-1, 2)))
FIELDS = ["method", "epochs", "batch_size", "eval_batch_size", "lr", "warmup_frac", "weight_decay", "label_smoothing",
          "cutmix_alpha", "cutmix_prob", "image_size", "rank_budget", "r_min", "r_max", "metric_weights",
          "score_batches", "val_fraction", "train_subset", "test_subset", "seed", "precision", "device", "nproc",
          "nnodes", "node_rank", "master_addr", "master_port", "augment", "ckpt_every_steps"]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(FIELDS), junk, max_size=4))
def test_fuzzed_configs_validate_or_fail_clearly(overrides):
    try: validate_config(make_config("quick", **overrides))
    except FcloraError as e: assert str(e) and "\n" not in str(e)


@st.composite
def valid_configs(draw):
    "Every field drawn from its valid values (as the docs state them), the cross-field rules respected."
    i = lambda lo, hi: draw(st.integers(lo, hi))
    f = lambda lo, hi: draw(st.floats(lo, hi))
    maybe = lambda s: draw(st.one_of(st.none(), s))
    nproc, nnodes, r_min = i(1, 4), i(1, 3), i(1, 8)
    return dict(method=draw(st.sampled_from(METHODS)), epochs=i(1, 100), batch_size=nproc * nnodes * i(1, 64),
                eval_batch_size=i(1, 1024), lr=maybe(st.floats(1e-8, 1)), warmup_frac=maybe(st.floats(0, 0.99)),
                weight_decay=f(0, 1), label_smoothing=f(0, 1), augment=draw(st.booleans()), cutmix_alpha=f(0, 10),
                cutmix_prob=f(0, 1), image_size=i(1, 1024), rank_budget=i(1, 1000), r_min=r_min, r_max=i(r_min, 64),
                metric_weights=draw(st.sampled_from([(0.6, 0.2, 0.2), (1.0, 0.0, 0.0), (0.0, 0.5, 0.5), (0.25, 0.25, 0.5)])),
                score_batches=i(nproc * nnodes, 500), val_fraction=f(0.01, 0.99), train_subset=maybe(st.integers(1, 10**5)),
                test_subset=maybe(st.integers(1, 10**5)), seed=i(0, 2**31), precision=draw(st.sampled_from(["auto", "fp32", "bf16"])),
                device=draw(st.sampled_from(["auto", "cpu", "cuda"])), nproc=nproc, nnodes=nnodes, node_rank=i(0, nnodes - 1),
                master_addr="127.0.0.1" if nnodes > 1 else maybe(st.just("10.0.0.1")), master_port=maybe(st.integers(1, 65535)),
                ckpt_every_steps=i(0, 1000), compile=draw(st.booleans()), allow_emulated_bf16=draw(st.booleans()))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(valid_configs())
def test_valid_configs_validate(values):
    prior = dict(rank_prior="prior.json") if values["method"] == "static" else {}   # static's one cross-field rule
    validate_config(make_config("quick", **values, **prior))   # must not raise


N_QKV = 12   # random-deit-tiny: 4 blocks x q/k/v


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@example(method="lora", budget=24, r_max=4, bs=16, subset=100)      # feasible: must run
@example(method="fclora", budget=100, r_max=4, bs=8, subset=60)     # budget above 12 x 4: must be refused
@given(method=st.sampled_from(["fclora", "lora", "linear"]), budget=st.integers(1, 200), r_max=st.integers(1, 20),
       bs=st.integers(1, 16), subset=st.integers(20, 400))
def test_fuzzed_small_runs_run_or_fail_clearly(tmp_path_factory, method, budget, r_max, bs, subset):
    "A run succeeds exactly when the rank budget is feasible (12 projections, ranks in [1, r_max]); else one clear error."
    out = tmp_path_factory.mktemp("fuzz")
    cfg = make_config("quick", model_name="random-deit-tiny", dataset="digits", image_size=16, method=method,
                      rank_budget=budget, r_max=r_max, batch_size=bs, train_subset=subset, epochs=1, out_dir=str(out/"run"),
                      progress=False, score_batches=2)
    feasible = N_QKV <= budget <= N_QKV * r_max
    try: r = run_experiment(cfg)
    except FcloraError as e:
        assert not feasible and "infeasible" in str(e), (feasible, str(e)); return
    assert feasible, "an infeasible budget was accepted"
    if method != "linear":
        assert sum(r["ranks"].values()) == budget and len(r["ranks"]) == N_QKV
        assert all(1 <= v <= r_max for v in r["ranks"].values())
