"""`fclora plan` and `fclora compare` as a user runs them: a separate process, exit codes, JSON files."""
import json

import numpy as np
import pytest

from conftest import fclora, one_line_error, slow

TINY = ["--model-name", "random-deit-tiny", "--dataset", "digits", "--image-size", "16", "--quiet"]


def test_plan_prints_tables_and_writes_json(tmp_path):
    p = fclora("plan", *TINY, "--rank-budget", "30", "--score-batches", "3", "--json", tmp_path/"plan.json")
    assert p.returncode == 0, p.stderr
    assert "ranks (block x projection)" in p.stdout and "trainable" in p.stdout
    plan = json.loads((tmp_path/"plan.json").read_text())
    assert sorted(plan) == ["budget", "budget_unit", "importance", "params", "ranks"] and plan["budget_unit"] == "rank"
    assert sum(plan["ranks"].values()) == 30 == plan["budget"]
    assert all(1 <= r <= 16 for r in plan["ranks"].values())
    assert sorted(plan["importance"]) == sorted(plan["ranks"]) and len(plan["ranks"]) == 12
    # the tiny DeiT's projections are 64 x 64: one unit of rank costs 128 parameters; the head is 64 x 10 + 10
    assert plan["params"]["adapter"] == 128 * 30 and plan["params"]["head"] == 650
    assert plan["params"]["trainable"] == plan["params"]["adapter"] + plan["params"]["head"]
    for row in plan["importance"].values(): assert set(row) == {"fisher", "grad", "cov", "score"}


@slow
def test_plan_is_deterministic_and_old_spellings_still_work(tmp_path):
    "Same options, same plan; the old spellings (--model, --budget, --weights) give the same plan, with a note each."
    new = fclora("plan", *TINY, "--rank-budget", "24", "--metric-weights", "0.6,0.2,0.2", "--score-batches", "2", "--json", tmp_path/"a.json")
    old = fclora("plan", "--model", "random-deit-tiny", "--dataset", "digits", "--image-size", "16", "--quiet", "--budget", "24",
                 "--weights", "0.6,0.2,0.2", "--score-batches", "2", "--json", tmp_path/"b.json")
    assert new.returncode == 0 == old.returncode, new.stderr + old.stderr
    assert (tmp_path/"a.json").read_text() == (tmp_path/"b.json").read_text()
    assert "deprecated" not in new.stderr
    for was, now in (("--model", "--model-name"), ("--budget", "--rank-budget"), ("--weights", "--metric-weights")):
        assert f"{was} is deprecated, use {now}" in old.stderr, old.stderr


@pytest.mark.parametrize("args, words", [
    (["--metric-weights", "0.5,0.5,0.5"], "summing to 1"),                                       # checked before loading anything
    pytest.param(["--targets", "mlp_in,mlp_out"], "no nn.Linear or Conv1D layer of DeiTForImageClassification matches", marks=slow),  # on the model
])
def test_plan_bad_input_one_line(args, words):
    "Each place `fclora plan` can find a bad value turns it into one line, exit 2 (which values are bad: 02/03/08_plan's tests)."
    assert words in one_line_error(fclora("plan", *TINY, "--score-batches", "1", *args))


@slow
def test_plan_bad_data(tmp_path):
    assert "unknown dataset" in one_line_error(fclora("plan", "--model-name", "random-deit-tiny", "--dataset", tmp_path/"nope"))


@slow
def test_plan_targets_and_param_budget(tmp_path):
    "--targets picks other layers (the attention outputs and MLPs of the tiny DeiT), --budget-unit params spends parameters."
    p = fclora("plan", *TINY, "--targets", "o_proj|fc1|fc2|dense", "--budget-unit", "params", "--rank-budget", "20000", "--score-batches", "2",
               "--json", tmp_path/"plan.json", "--save-config", tmp_path/"plan")
    assert p.returncode == 0, p.stderr
    plan = json.loads((tmp_path/"plan.json").read_text())
    # per block: the attention output 64 -> 64 (128 per rank), the MLP 64 -> 128 and 128 -> 64 (192 per rank); transformers 5
    # calls them o_proj, fc1, fc2, transformers 4 attention.output.dense, intermediate.dense, output.dense
    assert len(plan["ranks"]) == 12 and not any(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "query", "key", "value") for n in plan["ranks"])
    assert 0 <= 20000 - plan["params"]["adapter"] < 128
    assert json.loads((tmp_path/"plan/plan.json").read_text())["ranks"] == plan["ranks"]
    assert (tmp_path/"plan/adapter_config.json").exists()


@slow
def test_saved_cli_plan_equals_python_plan(shared, tmp_path):
    "`fclora plan --save-config DIR` on the ViT-S/14 gives the ranks `fclora.plan` gives in Python on the same seeded batches."
    import torch
    from fclora import Plan, plan      # (`fclora` here is conftest's command runner)
    from fclora.experiment import make_config, data_and_model, scoring_batches
    model_dir, data_dir = shared/"models/vit-small-patch14-imgfocus", shared/"data/cifar10"
    p = fclora("plan", "--model-name", model_dir, "--dataset", data_dir, "--rank-budget", "82", "--score-batches", "2",
               "--batch-size", "16", "--image-size", "112", "--seed", "3", "--quiet", "--save-config", tmp_path/"plan")
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = make_config("paper", "cifar10", model_name=str(model_dir), dataset=str(data_dir), score_batches=2, batch_size=16,
                      image_size=112, seed=3, progress=False)
    (train, _, _), model, mean, std = data_and_model(cfg, torch.device("cpu"))
    mine = plan(model, scoring_batches(train, cfg, mean, std), 82, progress=False)
    saved = Plan.load(tmp_path/"plan")
    assert saved.ranks == mine.ranks and sum(mine.ranks.values()) == 82 and saved.n_batches == 2
    assert len(saved.ranks) == 36 and saved.params == 82 * (384 + 384)   # 12 blocks x q/k/v, 384 -> 384 each
