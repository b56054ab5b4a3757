"""Training throughput (images/s): fclora's step vs the stock torchvision/DataLoader/peft recipe vs the model alone.

(a) fclora: uint8 tensors in memory -> fclora.training.train_batch (batched crop/flip/resize/normalise/CutMix)
    -> peft LoRA from fclora.allocation.lora_config with fclora's allocated ranks -> soft CE -> AdamW + schedule,
    through fclora.training.start_fit / one_batch, so in bf16 with fclora's bf16 path (`prepare_for_precision`:
    frozen weights stored in bf16 once, eager attention on a CPU) under autocast.
(b) stock: Dataset of PIL images -> transforms.v2 Resize/RandomHorizontalFlip/ToImage/ToDtype/Normalize ->
    DataLoader(num_workers=2, persistent) -> transformers model + peft LoraConfig(r=uniform, q/k/v leaf names,
    classifier in modules_to_save) -> transforms.v2.CutMix (p=0.5, as fclora) -> CrossEntropyLoss(label_smoothing=0.1)
    -> AdamW. Always fp32 (the stock reference).
(c) model only: model (a) stepping on one fixed, already preprocessed float batch (the ceiling for (a)).

Paths run alternately (a, b, c, a, b, c, ...) in one process: `--windows` windows of `--steps` steps each after
`--warmup` untimed steps; medians over windows are reported. One JSON line per (model, precision) on stdout.

Fairness notes: the stock loader prefetches; to charge its workers' CPU time to the stock windows only, the script
waits `--settle` s after each stock window (workers fill their queue while nothing is timed) and discards the
prefetched batches (untimed) at the start of the next stock window.
"""
from __future__ import annotations
import argparse, random, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from torch import nn
from _common import (log, emit, check_precisions, median, set_threads, add_common_args, model_choices, resolve_models, build_model,
                     train_images, fclora_config, fclora_model, fclora_steps, fclora_batch, timed)


class PILDataset(torch.utils.data.Dataset):
    "The stock input: PIL images and integer labels, transformed per item."
    def __init__(self, data, transform):
        from PIL import Image
        x = data.x.permute(0, 2, 3, 1).numpy()
        self.images = [Image.fromarray(a) for a in x]
        self.labels = data.y.tolist()
        self.transform = transform

    def __len__(self): return len(self.images)
    def __getitem__(self, i): return self.transform(self.images[i]), self.labels[i]


class StockStepper:
    def __init__(self, model, data, image_size, batch_size, rank, mean, std, num_workers, seed, lr=1e-3):
        from torchvision.transforms import v2
        from peft import LoraConfig, get_peft_model
        from fclora.lora import find_qkv_modules, find_head_modules
        leaves = sorted({n.rsplit(".", 1)[-1] for n in find_qkv_modules(model)})
        self.model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=leaves,
                                                      modules_to_save=find_head_modules(model)))
        self.model.train()
        tf = v2.Compose([v2.Resize((image_size, image_size), antialias=True), v2.RandomHorizontalFlip(),
                         v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
        self.loader = torch.utils.data.DataLoader(
            PILDataset(data, tf), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
            persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))
        self.prefetched = 2 * num_workers  # DataLoader's default prefetch_factor=2 per worker
        self.cutmix = v2.CutMix(num_classes=data.num_classes)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
        self.rng = random.Random(seed)
        base = self.model.get_base_model()
        import inspect
        self.kw = ({"interpolate_pos_encoding": True} if getattr(base.config, "image_size", image_size) != image_size
                   and "interpolate_pos_encoding" in inspect.signature(base.forward).parameters else {})
        self.it = None

    def next_batch(self):
        if self.it is not None:
            try: return next(self.it)
            except StopIteration: pass
        self.it = iter(self.loader)
        return next(self.it)

    def drain(self):
        "Take the batches the workers prefetched while other paths were timed (untimed)."
        for _ in range(self.prefetched): self.next_batch()

    def step(self):
        x, y = self.next_batch()
        if self.rng.random() < 0.5: x, y = self.cutmix(x, y)
        loss = self.loss_fn(self.model(pixel_values=x, **self.kw).logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


def measure(spec, size, label, precision, args, data, source):
    from fclora.lora import find_qkv_modules
    log(f"[{label} {precision}] building models at {size} px ...")
    base, mean, std = build_model(spec, data.num_classes, size, args.seed)
    n_mod = len(find_qkv_modules(base))
    budget = args.rank * n_mod
    cfg = fclora_config(size, args.batch_size, budget, args.score_batches, args.seed, precision,
                        allow_emulated_bf16=args.allow_emulated_bf16)
    t = time.perf_counter()
    model_a, ranks = fclora_model(base, data, cfg, mean, std)
    log(f"[{label}] fclora ranks {ranks.min()}..{ranks.max()} (budget {budget} over {n_mod} modules), "
        f"scored {args.score_batches} batches in {time.perf_counter() - t:.1f}s")
    fit, a_step = fclora_steps(model_a, data, cfg, mean, std)
    fit.model.train()
    x_fixed, y_fixed = fclora_batch(fit)  # (c)'s fixed preprocessed batch, produced once by fclora's own pipeline
    stock_base, _, _ = build_model(spec, data.num_classes, size, args.seed)
    b = StockStepper(stock_base, data, size, args.batch_size, args.rank, mean, std, args.workers, args.seed)

    paths = {"fclora": a_step, "stock": b.step, "model_only": lambda: a_step(x_fixed, y_fixed)}
    steps = args.steps_large if size > 32 else args.steps
    for name, fn in paths.items():  # warm-up (and start the stock workers)
        timed(fn, args.warmup)
    time.sleep(args.settle)
    rates = {k: [] for k in paths}
    for w in range(args.windows):
        for name, fn in paths.items():
            if name == "stock": b.drain()
            s = timed(fn, steps)
            rates[name].append(steps * args.batch_size / s)
            if name == "stock": time.sleep(args.settle)
        log(f"[{label} {precision}] window {w + 1}/{args.windows}: " +
            ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()))
    med = {k: median(v) for k, v in rates.items()}
    from fclora.training import _inner
    emit(dict(model=label, precision=precision, resolved_precision="bf16" if fit.dtype == torch.bfloat16 else "fp32",
              attention=getattr(_inner(fit.core).config, "_attn_implementation", None), image_size=size,
              batch_size=args.batch_size, threads=args.threads,
              data=source, rank_budget=budget, fclora_rank_min=int(ranks.min()), fclora_rank_max=int(ranks.max()),
              stock_rank=args.rank, stock_workers=args.workers, windows=args.windows, steps_per_window=steps,
              fclora_img_s=round(med["fclora"], 2), stock_img_s=round(med["stock"], 2),
              model_only_img_s=round(med["model_only"], 2),
              vs_stock=round(med["fclora"] / med["stock"], 3), vs_model_only=round(med["fclora"] / med["model_only"], 3),
              windows_img_s={k: [round(r, 2) for r in v] for k, v in rates.items()}), args.device)
    del b  # stops the persistent workers


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    model_choices(p)
    p.add_argument("--precision", choices=("fp32", "bf16", "auto", "both"), default="fp32",
                   help="precision of the fclora and model-only paths (both: fp32 then bf16; auto: what fclora's "
                        "precision='auto' picks for the model on this device); the stock path is always fp32")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="steps per window for 32 px models")
    p.add_argument("--steps-large", type=int, default=2, help="steps per window for larger images (ViT-S at 112 px)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per path before the windows")
    p.add_argument("--workers", type=int, default=2, help="stock DataLoader workers")
    p.add_argument("--settle", type=float, default=0.5, help="seconds to let stock workers refill after its window")
    p.add_argument("--train-images", type=int, default=2048, help="images held in memory (class-balanced subset)")
    args = p.parse_args()
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    check_precisions(precisions, args.device, args.allow_emulated_bf16)
    log(f"threads: {set_threads(args.threads)}")
    data, source = train_images(args.train_images, args.seed)
    for spec, size, label in resolve_models(args.models, args.tiny_config):
        for prec in precisions:
            measure(spec, size, label, prec, args, data, source)


if __name__ == "__main__":
    main()
