"""Cost of fclora's importance scoring relative to training, and how it grows with batch count and depth.

scoring_s: fclora.importance.collect_importance over fclora.experiment.scoring_batches (N batches: preprocess,
forward with q/k/v activation-moment hooks, backward to the q/k/v weights, Fisher/gradient sums).
training_s: N of fclora's training steps (train_batch -> LoRA forward/backward -> AdamW) on the same model
(peft-wrapped with the ranks that scoring produced), same batch size. ratio = scoring_s / training_s.
Scoring and training alternate over `--windows` windows; medians are reported.

Lines (one JSON object each): kind=main (the tiny model at --score-batches, and the ViT-S/14 at 112 px at
--large-batches when ../shared exists), kind=batches (N in --batch-counts: linear growth means a constant
scoring_ms_per_batch), kind=depth (random tiny DeiT with --depths layers at --depth-batches).
"""
from __future__ import annotations
import argparse, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import (log, emit, check_precisions, median, set_threads, add_common_args, build_model, train_images, fclora_config,
                     fclora_steps, timed, TINY_REF, VIT_S, sync)


def measure(kind, spec, size, label, n_batches, args, data, source, **overrides):
    from fclora.lora import find_qkv_modules
    from fclora.importance import collect_importance, importance_table
    from fclora.allocation import allocate_ranks
    from fclora.experiment import scoring_batches, adapt_model
    from fclora.training import autocast_dtype
    scored, mean, std = build_model(spec, data.num_classes, size, args.seed, **overrides)
    trained, _, _ = build_model(spec, data.num_classes, size, args.seed, **overrides)
    names = find_qkv_modules(scored)
    cfg = fclora_config(size, args.batch_size, args.rank * len(names), n_batches, args.seed, args.precision,
                        allow_emulated_bf16=args.allow_emulated_bf16)
    dtype = autocast_dtype(cfg, torch.device(args.device))
    scored.to(args.device); trained.to(args.device)
    data = data.to(args.device)

    def score():
        return collect_importance(scored, scoring_batches(data, cfg, mean, std), names, progress=False, autocast_dtype=dtype)
    stats = score()  # warm-up, and the ranks for the trained model
    ranks = allocate_ranks(importance_table(stats)["score"], cfg.rank_budget, cfg.r_min, cfg.r_max)
    fit, step = fclora_steps(adapt_model(trained, ranks, cfg, 1000), data, cfg, mean, std)
    fit.model.train()
    timed(step, min(3, n_batches), args.device)  # warm-up
    s_times, t_times = [], []
    for w in range(args.windows):
        sync(args.device); t = time.perf_counter(); score(); sync(args.device); s_times.append(time.perf_counter() - t)
        t_times.append(timed(step, n_batches, args.device))
        log(f"[{kind} {label} N={n_batches}] window {w + 1}/{args.windows}: scoring {s_times[-1]:.2f}s, "
            f"training {t_times[-1]:.2f}s")
    s, t = median(s_times), median(t_times)
    layers = getattr(scored.config, "num_hidden_layers", None)
    emit(dict(kind=kind, model=label, layers=layers, qkv_modules=len(names), image_size=size, batch_size=args.batch_size,
              precision=args.precision, threads=args.threads, data=source, batches=n_batches,
              scoring_s=round(s, 4), training_s=round(t, 4), ratio=round(s / t, 3),
              scoring_ms_per_batch=round(1000 * s / n_batches, 2), training_ms_per_step=round(1000 * t / n_batches, 2),
              windows=args.windows), args.device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.set_defaults(score_batches=100)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--large-batches", type=int, default=5, help="N for the ViT-S/14 main line (0: skip it)")
    p.add_argument("--batch-counts", default="5,10,20", help="N values for the growth-with-batches lines")
    p.add_argument("--depths", default="2,4,8", help="layer counts of the tiny DeiT for the growth-with-depth lines")
    p.add_argument("--depth-batches", type=int, default=20)
    p.add_argument("--train-images", type=int, default=2048)
    args = p.parse_args()
    check_precisions([args.precision], args.device, args.allow_emulated_bf16)
    log(f"threads: {set_threads(args.threads)}")
    data, source = train_images(args.train_images, args.seed)
    tiny = (TINY_REF, "deit-tiny-ref-6x192") if args.tiny_config else ("random-deit-tiny", "random-deit-tiny")
    measure("main", tiny[0], 32, tiny[1], args.score_batches, args, data, source)
    if args.large_batches and VIT_S.exists():
        measure("main", str(VIT_S), 112, "vit-s14-imgfocus", args.large_batches, args, data, source)
    for n in (int(v) for v in args.batch_counts.split(",") if v):
        measure("batches", tiny[0], 32, tiny[1], n, args, data, source)
    for d in (int(v) for v in args.depths.split(",") if v):
        measure("depth", "random-deit-tiny", 32, f"random-deit-tiny-{d}L", args.depth_batches, args, data, source,
                num_hidden_layers=d)


if __name__ == "__main__":
    main()
