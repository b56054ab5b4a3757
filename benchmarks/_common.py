"""Shared helpers for the benchmark scripts (not part of the fclora package).

Everything here drives fclora's own public functions; nothing re-implements them except the body of
`fclora.training.train`'s step loop (`fclora_step`), which the benchmarks need one step at a time.
"""
from __future__ import annotations
import argparse, json, math, os, statistics, sys, time, warnings
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


def emit(obj: dict):
    "One JSON line on stdout: the only thing a benchmark prints there."
    print(json.dumps(obj), flush=True)


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
    return p


# ---------------------------------------------------------------- models and data
def build_model(spec: str, num_labels: int, image_size: int, seed: int = 0, **overrides):
    """(model, mean, std): fclora.lora.load_model for fclora names / local folders, or the issue's reference DeiT.

    `overrides` change the config of the random tiny DeiT (e.g. num_hidden_layers=8)."""
    import transformers
    from fclora.lora import load_model, image_stats, RANDOM_MODELS
    if spec == TINY_REF or (spec in RANDOM_MODELS and overrides):
        torch.manual_seed(seed)
        if spec == TINY_REF:
            kw = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768, patch_size=4)
            cls, cfg_cls = "DeiTForImageClassification", "DeiTConfig"
        else:
            cls, cfg_cls, kw = RANDOM_MODELS[spec]
        cfg = getattr(transformers, cfg_cls)(num_labels=num_labels, image_size=image_size, **{**kw, **overrides})
        model = getattr(transformers, cls)(cfg)
        return model, *image_stats("random-deit-tiny")
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
                  precision: str = "fp32", method: str = "fclora", device: str = "cpu"):
    from fclora.training import Config
    return Config(method=method, model_name="benchmark", dataset="benchmark", image_size=image_size,
                  batch_size=batch_size, rank_budget=budget, score_batches=score_batches, seed=seed,
                  precision=precision, device=device, progress=False)


def fclora_model(model, data, cfg, mean, std):
    "fclora's plan (scored ranks for method fclora) and its peft wrapping; returns (model, ranks or None)."
    from fclora.experiment import plan_ranks, adapt_model
    ranks, _ = plan_ranks(model, data, cfg, mean, std)
    return adapt_model(model, ranks, cfg, total_steps=1000), ranks


# ---------------------------------------------------------------- fclora's training step
class FcloraStepper:
    """`fclora.training.train`'s loop, one step at a time: train_batch, then the library's own `train_step`."""

    def __init__(self, model, data, cfg, mean, std, dtype=None):
        from fclora.training import make_optimizer
        self.model, self.data, self.cfg, self.mean, self.std, self.dtype = model, data, cfg, mean, std, dtype
        self.device = data.x.device
        self.opt, self.sched = make_optimizer(model, cfg, total_steps=10**6)
        self.gen_cpu = torch.Generator().manual_seed(cfg.seed)
        self.gen_dev = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        self._order, self._epoch = [], 0
        self.loss_sum = torch.zeros((), device=self.device)

    def next_idx(self):
        "The next batch of indices, from the same epoch sampler as `train`, copied to the device once per epoch."
        from fclora.training import epoch_batches
        if not len(self._order):
            self._order = list(torch.stack(epoch_batches(len(self.data), self.cfg, self._epoch)).to(self.device))
            self._epoch += 1
        return self._order.pop(0)

    def batch(self):
        from fclora.training import train_batch
        return train_batch(self.data, self.next_idx(), self.cfg, self.mean, self.std, self.gen_cpu, self.gen_dev)

    def step(self, x=None, y=None):
        "A full fclora step; with (x, y) given, the model-only step on that fixed batch."
        from fclora.training import train_step
        if x is None: x, y = self.batch()
        loss = train_step(self.model, x, y, self.opt, self.sched, self.dtype)
        self.loss_sum += loss
        return loss


def timed(fn, steps: int, device="cpu") -> float:
    "Seconds for `steps` calls of fn(), synchronised at both ends on CUDA."
    sync(device)
    t = time.perf_counter()
    for _ in range(steps): fn()
    sync(device)
    return time.perf_counter() - t
