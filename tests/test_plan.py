"""`fclora.plan` as a peft user meets it: a saved plan read back in a fresh process by fclora and by stock peft,
and one clear error for each kind of bad input."""
import json, subprocess, sys

import pytest
import torch
from torch import nn

import fclora
from fclora.data import FcloraError

VOCAB = 64


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0))


def vit():
    from fclora.lora import load_model
    return load_model("random-vit-tiny", num_labels=10, image_size=16, seed=0)


def tokens(n=2):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, VOCAB, (2, 8), generator=g)), "labels": ids} for _ in range(n)]


def images(n=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


# Run in a fresh interpreter: only the folders on disk connect it to the plans made here.
CHECK = r"""
import json, sys
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForImageClassification
from fclora import Plan
out = {}
for name, auto in (("gpt2", AutoModelForCausalLM), ("vit", AutoModelForImageClassification)):
    d = sys.argv[1] + "/" + name
    plan, config = Plan.load(d + "/plan"), LoraConfig.from_pretrained(d + "/plan")
    model = get_peft_model(auto.from_pretrained(d + "/base"), config)
    shapes = {n[len("base_model.model."):]: list(m.lora_A["default"].weight.shape) + list(m.lora_B["default"].weight.shape)
              for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    out[name] = dict(ranks=plan.ranks, shapes=shapes, io={n: list(s) for n, s in plan.shapes.items()})
print(json.dumps(out))
"""


def test_saved_plan_builds_the_planned_adapter_in_a_fresh_process(tmp_path):
    plans = {"gpt2": fclora.plan(gpt2(), tokens(), 2_000, targets=["c_attn", "c_proj", "c_fc"], budget_unit="params", progress=False),
             "vit": fclora.plan(vit(), images(), 20, progress=False)}
    for name, make in (("gpt2", gpt2), ("vit", vit)):
        make().save_pretrained(tmp_path/name/"base")
        plans[name].save(tmp_path/name/"plan")
    p = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for name, plan in plans.items():
        g = got[name]
        assert g["ranks"] == plan.ranks
        assert sorted(g["shapes"]) == sorted(plan.ranks)             # adapters on exactly the planned layers
        for module, r in plan.ranks.items():                          # lora_A (r, d_in), lora_B (d_out, r)
            d_in, d_out = plan.shapes[module]
            assert g["shapes"][module] == [r, d_in, d_out, r], (module, g["shapes"][module], r)
    assert plans["gpt2"].shapes["transformer.h.0.attn.c_attn"] == (32, 96)          # GPT-2's fused q/k/v Conv1D
    assert 0 <= 2_000 - plans["gpt2"].params < min(a + b for a, b in plans["gpt2"].shapes.values())
    assert sum(plans["vit"].ranks.values()) == 20


class Embedder(nn.Module):
    "Returns neither a loss nor logits."
    def __init__(self): super().__init__(); self.query = nn.Linear(4, 4)
    def forward(self, x): return {"embedding": self.query(x)}


@pytest.mark.parametrize("call, words", [
    (lambda: fclora.plan(gpt2(), tokens(), 8, targets=["q_proj"]), "its layers are named e.g. c_attn, c_proj, c_fc"),
    (lambda: fclora.plan(gpt2(), tokens(), 8, targets=["c_attn"], budget_unit="tokens"), "unknown budget unit 'tokens'"),
    (lambda: fclora.plan(gpt2(), tokens(), 40, targets=["c_attn"]), "rank budget 40 is infeasible for 2 layers"),
    (lambda: fclora.plan(gpt2(), tokens(), 10**6, targets=["c_attn"], budget_unit="params"), "parameter budget 1,000,000 is infeasible"),
    (lambda: fclora.plan(gpt2(), [torch.zeros(2, 8, dtype=torch.long)], 8, targets=["c_attn"]), "a batch must be an (x, y) pair"),
    (lambda: fclora.plan(gpt2(), torch.zeros(2, 8), 8, targets=["c_attn"]), "batches must be an iterable of batches"),
    (lambda: fclora.plan(Embedder(), [(torch.randn(2, 4), torch.tensor([0, 1]))], 2), "neither a loss nor logits"),
])
def test_bad_input_is_one_clear_error(call, words):
    with pytest.raises(FcloraError) as e: call()
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
