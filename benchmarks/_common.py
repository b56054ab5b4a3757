"""Shared helpers for the benchmark scripts (not part of the fclora package).

Everything here drives fclora's own public functions: models come from `fclora.lora.load_model`, and a
training step is `fclora.training.one_batch`, the very function `train` runs.
"""
from __future__ import annotations
import argparse, itertools, json, math, os, statistics, sys, time, warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VIT_S = SHARED / "models" / "vit-small-patch14-imgfocus"
CIFAR = SHARED / "data" / "cifar10"
TINY_REF = "tiny-ref"  # the reference: DeiT 6 layers, 192 wide, patch 4, 32 px

warnings.filterwarnings("ignore", message=".*pin_memory.*")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def emit(obj: dict, device="cpu"):
    """One JSON line on stdout: the only thing a benchmark prints there. It ends with `host`, what the numbers ran on
    (fclora's `host_info`: device, CPU model, vector capability, native bf16, threads, precision, versions)."""
    from fclora.training import host_info
    prec = obj.get("resolved_precision", obj.get("precision"))
    host = host_info(torch.device(device), torch.bfloat16 if prec == "bf16" else None)
    if isinstance(obj.get("threads"), int) and obj["threads"] > 0: host["threads"] = obj["threads"]  # the measuring process's
    print(json.dumps({**obj, "host": host}), flush=True)


def check_precisions(precisions, device="cpu", allow_emulated_bf16=False):
    "Before any work: refuse bf16 on a CPU that would emulate it (fclora's `check_precision`), in one line, unless insisted."
    from fclora.core import Config, FcloraError
    from fclora.training import check_precision
    for p in precisions:
        try: check_precision(Config(precision=p, allow_emulated_bf16=allow_emulated_bf16), torch.device(device))
        except FcloraError as e: raise SystemExit(f"{Path(sys.argv[0]).name}: {e}") from None


def median(v):
    return float(statistics.median(v)) if v else float("nan")


def sync(device):
    if torch.device(device).type == "cuda": torch.cuda.synchronize(device)


def set_threads(n: int | None):
    if n: torch.set_num_threads(n)
    return torch.get_num_threads()


def add_common_args(p: argparse.ArgumentParser, precision_default="fp32"):
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2 = this machine's cores)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rank", type=int, default=4,
                   help="mean LoRA rank; the budget is rank x (number of q/k/v projections)")
    p.add_argument("--score-batches", type=int, default=4,
                   help="scoring batches used only to get fclora's allocated ranks (their shapes are what matters here)")
    p.add_argument("--tiny-config", action="store_true",
                   help="use the issue's reference tiny DeiT (6 layers, 192 wide, 3 heads, patch 4, 32 px) "
                        "instead of fclora's random-deit-tiny (4 layers, 64 wide)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--allow-emulated-bf16", action="store_true",
                   help="measure bf16 even on a CPU without native bf16 (emulated: about 15x slower than float32); refused otherwise")
    return p


# ---------------------------------------------------------------- models and data
# The reference DeiT, registered as one more of fclora's random-init architectures (`load_model` builds it).
TINY_REF_CONFIG = ("DeiTForImageClassification", "DeiTConfig",
                   dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768, patch_size=4))


def build_model(spec: str, num_labels: int, image_size: int, seed: int = 0, **overrides):
    """(model, mean, std) from fclora's `load_model`: a fclora random-init name, TINY_REF, or a local folder.

    `overrides` change the config of a random-init architecture (e.g. num_hidden_layers=8): the variant is
    registered in `fclora.lora.RANDOM_MODELS` under its own name, and `load_model` builds it."""
    from fclora.lora import load_model, image_stats, RANDOM_MODELS
    RANDOM_MODELS.setdefault(TINY_REF, TINY_REF_CONFIG)
    if overrides:
        cls, cfg_cls, kw = RANDOM_MODELS[spec]
        spec = spec + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
        RANDOM_MODELS[spec] = (cls, cfg_cls, {**kw, **overrides})
    model = load_model(spec, num_labels, image_size if spec in RANDOM_MODELS else None, seed)
    return model, *image_stats(spec)


def default_models(tiny_config: bool, include_large: bool = True):
    "[(spec, image_size, label)]: the tiny DeiT at 32 px and, when ../shared exists, the ViT-S/14 at 112 px."
    tiny = (TINY_REF, 32, "deit-tiny-ref-6x192") if tiny_config else ("random-deit-tiny", 32, "random-deit-tiny")
    out = [tiny]
    if include_large and VIT_S.exists(): out.append((str(VIT_S), 112, "vit-s14-imgfocus"))
    return out


def model_choices(p: argparse.ArgumentParser):
    p.add_argument("--models", default="default",
                   help="comma-separated: tiny, large, or any fclora model name/folder (as name@size); "
                        "default: tiny, plus large when ../shared exists")


def resolve_models(arg: str, tiny_config: bool):
    if arg == "default": return default_models(tiny_config)
    out = []
    for m in arg.split(","):
        m = m.strip()
        if m == "tiny": out += default_models(tiny_config, include_large=False)
        elif m == "large":
            if not VIT_S.exists(): log(f"skipping 'large': {VIT_S} is absent"); continue
            out.append((str(VIT_S), 112, "vit-s14-imgfocus"))
        else:
            name, _, size = m.partition("@")
            out.append((name, int(size or 32), Path(name).name))
    return out


def train_images(n: int | None = None, seed: int = 0):
    "(ImageSet, source): real CIFAR-10 from ../shared when present, else seeded synthetic uint8 32x32 images."
    from fclora.data import load_data, image_set, balanced_subset
    if (CIFAR / "train.npz").exists():
        train, _ = load_data(str(CIFAR))
        return (balanced_subset(train, n, seed) if n and n < len(train) else train), "cifar10(../shared)"
    rng = np.random.default_rng(seed)
    n = n or 2048
    return image_set(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)), "synthetic"


def fclora_config(image_size: int, batch_size: int, budget: int, score_batches: int, seed: int = 0,
                  precision: str = "fp32", method: str = "fclora", device: str = "cpu", allow_emulated_bf16: bool = False):
    from fclora.core import Config
    return Config(method=method, model_name="benchmark", dataset="benchmark", image_size=image_size, epochs=10**4,
                  batch_size=batch_size, rank_budget=budget, score_batches=score_batches, seed=seed,
                  precision=precision, device=device, progress=False, allow_emulated_bf16=allow_emulated_bf16)


def fclora_model(model, data, cfg, mean, std):
    "fclora's plan (scored ranks for method fclora) and its peft wrapping; returns (model, ranks or None)."
    from fclora.experiment import plan_ranks, adapt_model
    ranks, _ = plan_ranks(model, data, cfg, mean, std)
    return adapt_model(model, ranks, cfg, total_steps=1000), ranks


# ---------------------------------------------------------------- fclora's training step
def fclora_steps(model, data, cfg, mean, std):
    """(fit, step): fclora's training state (`start_fit`) and `step()`, which trains on the next batch with
    `one_batch` (what `train` runs: augment, forward, loss, backward, AdamW), epoch after epoch.
    `step(x, y)` instead takes fclora's `train_step` alone on a fixed prepared batch (the model-only path)."""
    from fclora.training import start_fit, epoch_order, one_batch, train_step
    fit = start_fit(model, data, None, cfg, mean, std)
    batches = (idx for epoch in itertools.count() for idx in epoch_order(fit, epoch))

    def step(x=None, y=None):
        if x is None: return one_batch(fit, next(batches))
        return train_step(fit.model, x, y, fit.opt, fit.sched, fit.dtype)
    return fit, step


def fclora_batch(fit):
    "One prepared (x, soft y) batch from fclora's own pipeline (`train_batch`) on the fit's data."
    from fclora.training import train_batch, epoch_order
    return train_batch(fit.train_set, epoch_order(fit, 0)[0], fit.cfg, fit.mean, fit.std, fit.gen_cpu, fit.gen_dev)


def timed(fn, steps: int, device="cpu") -> float:
    "Seconds for `steps` calls of fn(), synchronised at both ends on CUDA."
    sync(device)
    t = time.perf_counter()
    for _ in range(steps): fn()
    sync(device)
    return time.perf_counter() - t
