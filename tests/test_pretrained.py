"""The pretrained model that ships with fclora (`fclora-tiny-digits`): it loads offline from the package, its
features beat the same architecture's random ones on the target task, and (slow) the seeded script regenerates it."""
import json, os, subprocess, sys

import numpy as np
import pytest
import torch

from conftest import ROOT, run_guarded

NAME = "fclora-tiny-digits"


def _offline(code:str, tmp_path):
    "Run `code` in a fresh Python with the Hugging Face hub switched off; return its last stdout line as JSON."
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path/"hf"), OMP_NUM_THREADS="1")
    p = run_guarded([sys.executable, "-c", code], "an offline check in a fresh process", 900, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_shipped_weights_load_offline(tmp_path):
    "An empty Hugging Face cache and no hub: the model and its image processor come from the installed package."
    got = _offline(f"""
import json, fclora
from pathlib import Path
from fclora.lora import load_model, image_stats, model_path
m = load_model("{NAME}", num_labels=5)
folder = Path(model_path("{NAME}"))
print(json.dumps(dict(inside=folder.is_relative_to(Path(fclora.__file__).parent), head=list(m.classifier.weight.shape),
                      params=sum(p.numel() for p in m.parameters()), mb=(folder/"model.safetensors").stat().st_size / 2**20,
                      stats=image_stats("{NAME}"))))""", tmp_path)
    assert got["inside"] and got["head"] == [5, 64] and got["mb"] <= 2
    assert got["params"] < 300_000
    np.testing.assert_allclose(got["stats"], [(0.485, 0.456, 0.406), (0.229, 0.224, 0.225)])


def _probe_accuracy(model, train, test) -> float:
    "Test accuracy of a logistic regression on the frozen [CLS] features (a linear probe)."
    from sklearn.linear_model import LogisticRegression
    from fclora.data import preprocess
    model.eval()
    with torch.no_grad():
        f = [model(pixel_values=preprocess(d.x, 16), output_hidden_states=True).hidden_states[-1][:, 0].numpy()
             for d in (train, test)]
    return LogisticRegression(max_iter=2000).fit(f[0], train.y.numpy()).score(f[1], test.y.numpy())


def test_pretrained_backbone_beats_random_init_on_the_target_task():
    "Linear probes on digits-5to9, digits the model never saw: the pretrained backbone against the same DeiT at random."
    from fclora.data import load_data
    from fclora.lora import load_model
    torch.set_num_threads(1)
    train, test = load_data("digits-5to9")
    pre = _probe_accuracy(load_model(NAME, 5, seed=0), train, test)
    rnd = _probe_accuracy(load_model("random-deit-tiny", 5, image_size=16, seed=0), train, test)
    assert pre >= 0.85 and pre - rnd >= 0.25, (pre, rnd)


@pytest.mark.slow
def test_seeded_recipe_regenerates_the_shipped_weights(tmp_path):
    """tools/pretrain_tiny.py, rerun from scratch, gives the shipped model: the same recipe, and the same quality on the
    source task. Not the same bits on every CPU: rerunning it on one kind of CPU gives the same weights byte for byte (two
    reruns on a 2-core AVX2 EPYC, 2026-12-02), but float rounding differs between CPU kinds and 20 epochs amplify it (that
    host: source accuracy 0.748 against the shipped 0.767, made on another host), so the features are compared only where
    the rerun took the shipped model's path."""
    p = run_guarded([sys.executable, str(ROOT/"tools"/"pretrain_tiny.py"), "--out", str(tmp_path/"m")], "tools/pretrain_tiny.py",
                    3600, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    shipped = json.loads((ROOT/"fclora"/"models"/NAME/"config.json").read_text())["fclora_pretraining"]
    ours = json.loads((tmp_path/"m"/"config.json").read_text())["fclora_pretraining"]
    acc = "source_test_accuracy"
    assert {k: v for k, v in ours.items() if k != acc} == {k: v for k, v in shipped.items() if k != acc}
    assert abs(ours[acc] - shipped[acc]) < 0.03, (ours[acc], shipped[acc])
    if ours[acc] != shipped[acc]: return   # another CPU kind's path (see above): same recipe and quality, other bits
    from fclora.data import load_data, preprocess
    from fclora.lora import load_model
    _, test = load_data("digits")
    x = preprocess(test.x, 16)
    feats = []
    for name in (NAME, str(tmp_path/"m")):
        m = load_model(name, 5, seed=0).eval()
        with torch.no_grad(): feats.append(m(pixel_values=x, output_hidden_states=True).hidden_states[-1])
    torch.testing.assert_close(feats[1], feats[0], rtol=1e-4, atol=1e-5)
