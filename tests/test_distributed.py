"""Several processes for real (torchrun, gloo on CPU): importance statistics are combined exactly, and a
2-process run writes one results.json whose plan equals the 1-process plan."""
import json, os, subprocess, sys, textwrap

import numpy as np
import pandas as pd

from conftest import fclora, results

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


def test_two_process_run_writes_one_result_with_the_one_process_plan(tmp_path):
    args = ["run", "cifar10", "--preset", "quick", "--method", "fclora", "--epochs", "1", "--no-progress"]
    assert fclora(*args, "--nproc", "2", "--out-dir", tmp_path/"two").returncode == 0
    assert fclora(*args, "--out-dir", tmp_path/"one").returncode == 0
    two, one = results(tmp_path/"two"), results(tmp_path/"one")
    assert two["nproc"] == 2 and one["nproc"] == 1
    assert two["ranks"] == one["ranks"]                     # same batches scored, split over two processes
    for m in one["importance"]:
        for k in ("fisher", "grad", "cov", "score"):
            assert abs(two["importance"][m][k] - one["importance"][m][k]) <= 1e-6 * max(1.0, abs(one["importance"][m][k]))
    assert len(list((tmp_path/"two").rglob("results.json"))) == 1
    assert not list((tmp_path/"two").rglob("*.tmp")) and not (tmp_path/"two"/"last.pt").exists()
