"""`fclora.plan` as a peft user meets it: a saved plan read back in a fresh process by fclora and by stock peft,
and one clear error for each kind of bad input."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fclora
from fclora.data import FcloraError
from conftest import run_guarded, slow

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


@slow
def test_saved_plan_builds_the_planned_adapter_in_a_fresh_process(tmp_path):
    plans = {"gpt2": fclora.plan(gpt2(), tokens(), 2_000, targets=["c_attn", "c_proj", "c_fc"], budget_unit="params", progress=False),
             "vit": fclora.plan(vit(), images(), 20, progress=False)}
    for name, make in (("gpt2", gpt2), ("vit", vit)):
        make().save_pretrained(tmp_path/name/"base")
        plans[name].save(tmp_path/name/"plan")
    p = run_guarded([sys.executable, "-c", CHECK, str(tmp_path)], "loading the saved plans in a fresh process", 900)
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
    (lambda: fclora.plan(vit().vit, images(), 20), "ViTModel returned BaseModelOutputWithPooling with neither a loss nor logits"),
    (lambda: fclora.plan(gpt2(), tokens(), 8, targets="wte|c_attn"), "not nn.Linear or Conv1D (transformer.wte: Embedding)"),
])
def test_bad_input_is_one_clear_error(call, words):
    with pytest.raises(FcloraError) as e: call()
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


# --- issue 21: the adapter peft builds is the plan, on every task head and in the oldest peft allowed ---

def built(peft_model):
    "What peft built, read from its weights: {layer: (lora_A shape, lora_B shape)}, the heads wrapped to train and save, LoRA parameters."
    base = peft_model.get_base_model()
    layers = {n: (tuple(m.lora_A["default"].weight.shape), tuple(m.lora_B["default"].weight.shape))
              for n, m in base.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    wrapped = [n for n, m in base.named_children() if "default" in getattr(m, "modules_to_save", {})
               and all(p.requires_grad for p in m.modules_to_save["default"].parameters())]
    n_lora = sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    return layers, wrapped, n_lora


def families():
    "name: (task model factory, one batch, targets): tiny random models of each task family, heads not named `classifier`."
    import transformers as T
    g = torch.Generator().manual_seed(0)
    ids, lab = torch.randint(1, VOCAB, (4, 10), generator=g), torch.randint(0, 3, (4,), generator=g)
    qwen = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0, num_labels=3)
    bert = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)  # QA: 2 labels
    vis = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4)
    text = {"input_ids": ids, "labels": lab}
    qa = {"input_ids": ids, "start_positions": lab, "end_positions": lab}
    pixels = (torch.randn(4, 3, 16, 16, generator=g), lab)
    return {
        "qwen2-seq": (lambda: T.Qwen2ForSequenceClassification(T.Qwen2Config(**qwen)), text, None),
        "qwen2-token": (lambda: T.Qwen2ForTokenClassification(T.Qwen2Config(**qwen)), {"input_ids": ids, "labels": ids % 3}, None),
        "gpt2-seq": (lambda: T.GPT2ForSequenceClassification(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                                                           pad_token_id=0, num_labels=3)), text, ["c_attn"]),
        "distilbert-seq": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=3)), text, ["q_lin", "k_lin", "v_lin"]),
        "bert-qa": (lambda: T.BertForQuestionAnswering(bert), qa, None),
        "t5-qa": (lambda: T.T5ForQuestionAnswering(T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                                                decoder_start_token_id=0)), qa, ["q", "k", "v"]),
        "deit-teacher": (lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**vis, num_labels=3)), pixels, None),
        "clip-image": (lambda: T.CLIPForImageClassification(T.CLIPConfig(
            text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=VOCAB,
                             bos_token_id=0, eos_token_id=1, pad_token_id=1),
            vision_config=dict(vis), projection_dim=16, num_labels=3)), pixels, None),
        "wav2vec2-audio": (lambda: T.Wav2Vec2ForSequenceClassification(T.Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4),
            conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=16, num_labels=3)),
            {"input_values": torch.randn(4, 400, generator=g), "labels": lab}, None),
        "whisper-audio": (lambda: T.WhisperForAudioClassification(T.WhisperConfig(
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
            decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=16, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1, num_labels=3)), {"input_features": torch.randn(4, 8, 32, generator=g), "labels": lab}, None),
    }


@pytest.mark.parametrize("name", list(families()))
def test_each_task_heads_are_what_a_body_checkpoint_leaves_fresh_and_peft_builds_the_plan(name, tmp_path):
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging
    make, batch, targets = families()[name]
    torch.manual_seed(0)
    model = make()
    AutoModel.from_config(model.config).save_pretrained(tmp_path)        # a checkpoint of the pretrained body alone
    hf_logging.set_verbosity_error()
    _, info = type(model).from_pretrained(tmp_path, config=model.config, output_loading_info=True)
    fresh = list(dict.fromkeys(k.split(".")[0] for k in info["missing_keys"]))   # what that checkpoint does not initialise
    p = fclora.plan(model, [batch], 12, targets=targets, progress=False)
    assert sorted(p.heads) == sorted(fresh), (p.heads, fresh)
    layers, wrapped, n_lora = built(p.check(get_peft(model, p)))
    assert layers == {n: ((r, p.shapes[n][0]), (p.shapes[n][1], r)) for n, r in p.ranks.items()}
    assert sorted(wrapped) == sorted(p.heads) and n_lora == p.params


def get_peft(model, p):
    from peft import get_peft_model
    return get_peft_model(model, p.lora_config())


def test_a_causal_lm_has_no_head():
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    m = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    p = fclora.plan(m, tokens(1), 12, progress=False)
    assert p.heads == [] and p.lora_config().modules_to_save is None
    layers, wrapped, n_lora = built(p.check(get_peft(m, p)))
    assert {n: a[0] for n, (a, b) in layers.items()} == p.ranks and wrapped == [] and n_lora == p.params


def test_a_head_among_the_targets_gets_no_rank():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, num_labels=3))
    batch = {"input_ids": torch.randint(0, VOCAB, (4, 8)), "labels": torch.tensor([0, 1, 2, 0])}
    with pytest.warns(UserWarning, match="no rank for classifier: it is in a fresh head"):
        p = fclora.plan(m, [batch], 8, targets=["query", "key", "value", "classifier"], progress=False)
    layers, wrapped, n_lora = built(p.check(get_peft(m, p)))
    assert "classifier" not in p.ranks and sum(p.ranks.values()) == 8 and n_lora == p.params == 8 * 64 and wrapped == ["classifier"]


# Run with the oldest peft the package allows first on the path: peft builds every planned rank from fclora's keys.
OLD_PEFT = r"""
import json, random, sys
import peft, torch
from torch import nn
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
from fclora.allocation import lora_config
from fclora.lora import find_qkv_modules, find_head_modules

def tree(rng, depth=0):
    if depth > 2 or rng.random() < 0.3: return nn.Linear(4, rng.randint(1, 6))
    kids = [tree(rng, depth + 1) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.5: return nn.Sequential(*kids)
    return nn.ModuleDict(dict(zip(rng.sample(["0", "1", "proj", "block"], len(kids)), kids)))

def built(m):
    base = m.get_base_model()
    return {n: [list(x.lora_A["default"].weight.shape), list(x.lora_B["default"].weight.shape), float(x.scaling["default"])]
            for n, x in base.named_modules() if hasattr(x, "lora_A") and "default" in x.lora_A}

rng, cases = random.Random(0), []
models = [nn.ModuleDict({"proj": nn.Linear(4, 4), "block": nn.ModuleDict({"proj": nn.Linear(4, 4)})}),
          nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 9)))]
models += [nn.Sequential(tree(rng), tree(rng)) for _ in range(20)]
for m in models:
    layers = [n for n, x in m.named_modules() if isinstance(x, nn.Linear)]
    ranks = {n: rng.randint(1, 8) for n in rng.sample(layers, rng.randint(1, len(layers)))}
    cases.append(dict(ranks=ranks, heads=[], built=built(get_peft_model(m, lora_config(ranks, [])))))
torch.manual_seed(0)
bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=32))
ranks = {n: rng.randint(1, 8) for n in find_qkv_modules(bert)}
heads = find_head_modules(bert)
pm = get_peft_model(bert, lora_config(ranks, heads))
cases.append(dict(ranks=ranks, heads=[n for n, x in pm.get_base_model().named_children() if hasattr(x, "modules_to_save")], built=built(pm)))
gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=12, n_head=2, n_positions=16))
ranks = {n: rng.randint(1, 8) for n, x in gpt2.named_modules() if n.endswith(("c_attn", "c_proj"))}
cases.append(dict(ranks=ranks, heads=[], built=built(get_peft_model(gpt2, lora_config(ranks, [], fan_in_fan_out=True)))))
print(json.dumps(dict(version=peft.__version__, file=peft.__file__, cases=cases)))
"""


def peft_floor() -> str:
    "The oldest peft the package allows, from settings.ini's requirements."
    import re
    from fclora.allocation import PEFT_MIN
    req = next(l for l in (Path(fclora.__file__).parents[1]/"settings.ini").read_text().splitlines() if l.startswith("requirements"))
    floor = re.search(r"\bpeft>=([\d.]+)", req).group(1)
    assert floor == PEFT_MIN, (floor, PEFT_MIN)
    return floor


@slow
def test_rank_patterns_round_trip_in_the_oldest_peft_allowed(tmp_path):
    floor = peft_floor()
    pip = run_guarded([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check",
                       "--target", str(tmp_path/"peft"), f"peft=={floor}"], f"pip install peft=={floor}", 900)
    if pip.returncode != 0: pytest.skip(f"peft=={floor} cannot be installed here: {(pip.stderr or pip.stdout).strip().splitlines()[-1]}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path/"peft"), os.environ.get("PYTHONPATH", "")]))
    p = run_guarded([sys.executable, "-c", OLD_PEFT], f"the round trip in peft=={floor}", 900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    from packaging.version import Version
    assert Version(out["version"]) == Version(floor) and str(tmp_path) in out["file"]
    assert len(out["cases"]) == 24
    for case in out["cases"]:
        want = {n: r for n, r in case["ranks"].items()}
        assert {n: b[0][0] for n, b in case["built"].items()} == want                  # every planned rank, nothing else
        assert all(b[1][1] == want[n] and b[2] == 2.0 for n, b in case["built"].items())   # lora_B (d_out, r), alpha / r = 2
    assert out["cases"][-2]["heads"] == ["classifier"]


def test_a_numpy_budget_plans_and_saves(tmp_path):
    np = pytest.importorskip("numpy")
    p = fclora.plan(gpt2(), tokens(), np.int64(4), targets=["c_attn"], progress=False)
    p.save(tmp_path/"plan")
    assert fclora.Plan.load(tmp_path/"plan").budget == 4 and type(p.budget) is int


class Broken(nn.Module):
    "Its forward takes the batch, then fails inside."
    def __init__(self): super().__init__(); self.query = nn.Linear(4, 3)
    def forward(self, x): return self.query(x, x)


def test_a_type_error_inside_forward_keeps_the_users_traceback():
    with pytest.raises(FcloraError, match="Broken.forward raised TypeError on this batch") as e:
        fclora.plan(Broken(), [(torch.randn(2, 4), torch.tensor([0, 1]))], 2, progress=False)
    assert isinstance(e.value.__cause__, TypeError)
