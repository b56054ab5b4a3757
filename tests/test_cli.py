"""`fclora plan` and `fclora compare` as a user runs them: a separate process, exit codes, JSON files."""
import json, time

import numpy as np
import pytest

from conftest import fclora, one_line_error

TINY = ["--model", "random-deit-tiny", "--dataset", "digits", "--image-size", "16", "--quiet"]


def test_plan_prints_tables_and_writes_json(tmp_path):
    p = fclora("plan", *TINY, "--budget", "30", "--score-batches", "3", "--json", tmp_path/"plan.json")
    assert p.returncode == 0, p.stderr
    assert "ranks (block x projection)" in p.stdout and "trainable" in p.stdout
    plan = json.loads((tmp_path/"plan.json").read_text())
    assert sorted(plan) == ["budget", "importance", "params", "ranks"]
    assert sum(plan["ranks"].values()) == 30 == plan["budget"]
    assert all(1 <= r <= 16 for r in plan["ranks"].values())
    assert sorted(plan["importance"]) == sorted(plan["ranks"]) and len(plan["ranks"]) == 12
    # the tiny DeiT's projections are 64 x 64: one unit of rank costs 128 parameters; the head is 64 x 10 + 10
    assert plan["params"]["adapter"] == 128 * 30 and plan["params"]["head"] == 650
    assert plan["params"]["trainable"] == plan["params"]["adapter"] + plan["params"]["head"]
    for row in plan["importance"].values(): assert set(row) == {"fisher", "grad", "cov", "score"}


def test_plan_is_deterministic(tmp_path):
    for name in ("a", "b"): assert fclora("plan", *TINY, "--budget", "24", "--score-batches", "2", "--json", tmp_path/f"{name}.json").returncode == 0
    assert (tmp_path/"a.json").read_text() == (tmp_path/"b.json").read_text()


@pytest.mark.parametrize("args, words", [
    (["--budget", "500"], "infeasible"),
    (["--budget", "5"], "must lie in [12, 192]"),
    (["--weights", "0.5,0.5,0.5"], "summing to 1"),
    (["--r-min", "4", "--r-max", "2"], "r_min <= r_max"),
])
def test_plan_bad_numbers(args, words):
    assert words in one_line_error(fclora("plan", *TINY, "--score-batches", "1", *args))


def test_plan_bad_data_and_model(tmp_path):
    assert "unknown dataset" in one_line_error(fclora("plan", "--model", "random-deit-tiny", "--dataset", tmp_path/"nope"))
    (tmp_path/"bad").mkdir()
    np.savez(tmp_path/"bad/train.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4, int))
    np.savez(tmp_path/"bad/test.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, int))
    assert "shape (N, H, W, 3)" in one_line_error(fclora("plan", "--model", "random-deit-tiny", "--dataset", tmp_path/"bad"))
    assert "cannot load model" in one_line_error(fclora("plan", "--model", tmp_path/"no-model", "--dataset", "digits"))


def test_plan_on_real_pretrained_vit(shared, tmp_path):
    "The acceptance check: real ViT-S/14 and real CIFAR-10, 20 batches of 32 at 112 px, on CPU in under 2 minutes."
    t = time.time()
    p = fclora("plan", "--model", shared/"models/vit-small-patch14-imgfocus", "--dataset", shared/"data/cifar10",
               "--budget", "82", "--score-batches", "20", "--batch-size", "32", "--image-size", "112", "--quiet",
               "--json", tmp_path/"plan.json")
    elapsed = time.time() - t
    assert p.returncode == 0, p.stderr[-3000:]
    plan = json.loads((tmp_path/"plan.json").read_text())
    assert len(plan["ranks"]) == 36 and sum(plan["ranks"].values()) == 82
    assert plan["params"]["adapter"] == 82 * (384 + 384)
    print(f"plan on ViT-S/14: {elapsed:.1f} s\n{p.stdout}")
    assert elapsed < 120
