"""Several processes for real (torchrun, gloo on CPU): importance statistics are combined exactly; a run means
the same in 1 process, in 2 processes and on 2 "machines" (2 torchrun nodes on 127.0.0.1): with augmentation
off (no crops/flips, no CutMix) the plan, the per-epoch training loss and the test accuracy agree to float
tolerance, because `batch_size` is the global batch and DDP averages the per-process mean gradients."""
import json, os, socket, subprocess, sys, textwrap, time

import pytest

import numpy as np
import pandas as pd

from conftest import BIN, fclora, in_process, results, hang_guard, hung, slow

SCORE = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from fclora.data import load_data, preprocess, batch_indices
    from fclora.lora import load_model
    from fclora.importance import score_modules
    from fclora.training import world
    dist.init_process_group("gloo")
    rank, size = world()
    train, _ = load_data("digits")
    batches = [(preprocess(train.x[i], 16), train.y[i]) for i in batch_indices(len(train), 16)[:6]]
    model = load_model("random-vit-tiny", 10, image_size=16, seed=0)
    table = score_modules(model, batches[rank::size], progress=False)   # each process: its own share
    if rank == 0: json.dump(table.to_dict(), open(sys.argv[1], "w"))   # full float precision
    dist.destroy_process_group()
""")


def test_importance_of_two_processes_equals_one(tmp_path):
    (tmp_path/"score.py").write_text(SCORE)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path/"score.py"), str(tmp_path/"two.json")], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    two = pd.DataFrame(json.loads((tmp_path/"two.json").read_text()))
    from fclora.data import load_data, preprocess, batch_indices
    from fclora.lora import load_model
    from fclora.importance import score_modules
    train, _ = load_data("digits")
    batches = [(preprocess(train.x[i], 16), train.y[i]) for i in batch_indices(len(train), 16)[:6]]
    one = score_modules(load_model("random-vit-tiny", 10, image_size=16, seed=0), batches, progress=False)
    for col in ("fisher", "grad", "cov", "score"):
        a, b = one[col].to_numpy(), two.loc[one.index, col].to_numpy()
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * np.abs(a).max(), err_msg=col)


# the same recipe in any number of processes: augmentation off, a small subset, 2 epochs
RECIPE = ["run", "cifar10", "--preset", "quick", "--model-name", "random-deit-tiny", "--dataset", "digits", "--image-size", "16",
          "--epochs", "2", "--train-subset", "400", "--no-augment",
          "--cutmix-prob", "0", "--no-progress"]


def same_run(a, b, plan=True):
    "a and b (results.json) are the same run: plan, per-epoch losses, final test accuracy."
    assert a["ranks"] == b["ranks"]
    if plan:
        for m in a["importance"]:
            for k in ("fisher", "grad", "cov", "score"):
                assert abs(a["importance"][m][k] - b["importance"][m][k]) <= 1e-6 * max(1.0, abs(a["importance"][m][k]))
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]]
    np.testing.assert_allclose([h["train_loss"] for h in a["history"]], [h["train_loss"] for h in b["history"]], rtol=1e-5)
    np.testing.assert_allclose([h["val_loss"] for h in a["history"]], [h["val_loss"] for h in b["history"]], rtol=1e-5)
    assert abs(a["test_accuracy"] - b["test_accuracy"]) * a["n_test"] <= 1     # at most one image decided differently


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    "The reference runs, one process each (the test's own, on the commands' thread count): fclora and adalora."
    root = tmp_path_factory.mktemp("one")
    return {m: in_process([*RECIPE, "--method", m], out_dir=root/m) for m in ("fclora", "adalora")}


def test_two_processes_equal_one(one_process, tmp_path):
    "`--nproc 2` splits the global batch of 16 into 2 x 8: the same steps, the same plan, the same run."
    p = fclora(*RECIPE, "--method", "fclora", "--nproc", "2", "--out-dir", tmp_path/"two")
    assert p.returncode == 0, p.stderr[-3000:]
    two, one = results(tmp_path/"two"), one_process["fclora"]
    assert two["nproc"] == 2 and one["nproc"] == 1
    same_run(two, one)
    assert len(list((tmp_path/"two").rglob("results.json"))) == 1
    assert not list((tmp_path/"two").rglob("*.tmp")) and not (tmp_path/"two"/"last.pt").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@slow
def test_two_nodes_equal_one_process_adalora(one_process, tmp_path):
    """Two "machines" (torchrun nodes 0 and 1 on 127.0.0.1, one process each, their own out_dirs) train AdaLoRA:
    the same run as one process, and AdaLoRA's schedule fits the steps taken (its ranks reach the budget)."""
    port = str(_free_port())
    node = lambda r: subprocess.Popen([str(BIN/"fclora"), *RECIPE, "--method", "adalora", "--nnodes", "2", "--node-rank", str(r),
                                       "--master-addr", "127.0.0.1", "--master-port", port, "--out-dir", str(tmp_path/f"node{r}")],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1"))
    procs, t0, limit = [node(0), node(1)], time.monotonic(), hang_guard(1800)
    try: outs = [p.communicate(timeout=max(1, limit - (time.monotonic() - t0))) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs: p.kill()
        pytest.fail(hung("the two-node AdaLoRA run", limit, time.monotonic() - t0), pytrace=False)
    for p, (out, err) in zip(procs, outs): assert p.returncode == 0, err[-3000:]
    assert "node 1 of 2: done" in outs[1][0]
    assert not (tmp_path/"node1"/"results.json").exists()             # node 0 writes the results
    two, one = results(tmp_path/"node0"), one_process["adalora"]
    assert two["nproc"] == 2
    same_run(two, one, plan=False)
    assert sum(one["ranks"].values()) == one["rank_budget"]            # pruned to the budget by the end of the run
