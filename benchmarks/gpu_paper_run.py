"""The paper's protocol, timed on one GPU with no network: fclora vs full fine-tuning of a random-init DeiT-B.

Data: synthetic uint8 CIFAR-shaped images (default 40,000 train + 10,000 val + 10,000 test, 32x32x3, 10 classes),
held on the GPU and resized to 224 px by fclora's own batched preprocessing. Model: "random-deit-base"
(transformers DeiTConfig() defaults, random init: timing only, accuracy is meaningless). bf16 autocast.

Per method (fclora, then full), with fclora's library functions and loop:
  scoring   fclora.experiment.plan_ranks (fclora only): --score-batches batches of collect_importance
  epoch     fclora.training.train for 1 epoch (all steps + the epoch-end validation pass, as in every epoch)
  eval      fclora.training.predict on val and test (the run's final evaluation)
and prints images/s, MFU, peak memory (torch.cuda.max_memory_allocated) and the extrapolated wall-clock of the
paper's protocol: scoring + epochs x epoch + eval (default 10 epochs). One JSON line per method + a summary line.

MFU = images/s x FLOP/image / peak. FLOP/image of a forward defaults to 17.6e9 for DeiT-B at 224 px; training
steps count ~2x forward (LoRA: no weight gradients for the frozen base) or ~3x (full), scoring ~2x, eval 1x.
NB: 17.6 "GFLOPs" is DeiT-B's multiply-accumulate count (a FLOP counter gives ~35.3e9 FLOP/forward), so the
`mfu` fields use the brief's convention and `mfu_x2` doubles them (2 FLOP per MAC).

On CUDA it also runs a few training steps and scoring batches under torch.cuda.set_sync_debug_mode("warn") and
reports which source lines synchronise host and device (`sync_points`).

--smoke: a tiny DeiT at 32 px, a few hundred images, on whatever device is there (CPU here): checks the script runs.
"""
from __future__ import annotations
import argparse, collections, dataclasses, gc, math, sys, time, warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from _common import log, emit, sync, fclora_steps, check_precisions


def synthetic(n, seed, device, num_classes=10):
    from fclora.data import ImageSet
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return ImageSet(x, y, [str(i) for i in range(num_classes)]).to(device)


def macs_per_image(model, size, device):
    "Multiply-accumulates of one forward (FlopCounterMode FLOP / 2), for --smoke's tiny model."
    from torch.utils.flop_counter import FlopCounterMode
    from fclora.lora import model_logits
    x = torch.zeros(1, 3, size, size, device=device)
    with FlopCounterMode(display=False) as fc, torch.no_grad(): model_logits(model, x)
    return fc.get_total_flops() / 2


def sync_points(fn, n):
    "Run fn() n times with CUDA sync debug warnings on; {file:line: count} of synchronising calls."
    counts, cuda = collections.Counter(), torch.cuda.is_available()
    if not cuda:  # --smoke on CPU: run the calls, nothing to report
        for _ in range(n): fn()
        return {}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n): fn()
            torch.cuda.synchronize()
        finally: torch.cuda.set_sync_debug_mode("default")
    for w in rec:
        if "synchroniz" in str(w.message).lower(): counts[f"{Path(w.filename).name}:{w.lineno}"] += 1
    return {k: round(v / n, 2) for k, v in counts.most_common()}  # per call


def run_method(method, data, args, device, flop_fwd):
    from fclora.lora import load_model, find_qkv_modules
    from fclora.importance import collect_importance
    from fclora.experiment import plan_ranks, adapt_model, scoring_batches, _try_compile, peak_memory_mb, total_steps
    from fclora.core import Config
    from fclora.training import Callback, train, predict, autocast_dtype, steps_per_epoch
    from fclora.data import IMAGENET_MEAN as mean, IMAGENET_STD as std
    train_set, val_set, test_set = data
    gc.collect()
    if device.type == "cuda": torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
    cfg = Config(method=method, model_name=args.model, dataset="synthetic", image_size=args.image_size, epochs=1,
                 batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, score_batches=args.score_batches,
                 rank_budget=args.rank_budget, precision=args.precision, device=device.type, progress=False,
                 compile=args.compile, seed=args.seed, allow_emulated_bf16=args.allow_emulated_bf16)
    t = time.perf_counter()
    model = load_model(args.model, 10, args.image_size, args.seed).to(device)
    setup_s = time.perf_counter() - t
    out = dict(method=method, model=args.model, image_size=args.image_size, batch_size=args.batch_size,
               precision=args.precision, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    syncs = {}
    check = args.sync_check and method == "fclora" and (device.type == "cuda" or args.smoke)  # smoke: exercise the code
    if check:  # also warms up cuBLAS/cuDNN
        sub = Config(**{**cfg.to_dict(), "score_batches": 2, "metric_weights": tuple(cfg.metric_weights)})
        syncs["scoring_batch"] = sync_points(lambda: collect_importance(
            model, scoring_batches(train_set, sub, mean, std), find_qkv_modules(model), progress=False,
            autocast_dtype=autocast_dtype(cfg, device)), 1)
        syncs["scoring_batch"] = {k: v / 2 for k, v in syncs["scoring_batch"].items()}
    sync(device); t = time.perf_counter()
    ranks, _ = plan_ranks(model, train_set, cfg, mean, std)
    sync(device); scoring_s = time.perf_counter() - t if method == "fclora" else 0.0
    model = adapt_model(model, ranks, cfg, total_steps(len(train_set), cfg))
    if cfg.compile: model = _try_compile(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    steps = steps_per_epoch(len(train_set), cfg)
    warm = min(args.warm_steps, max(steps - 2, 0))
    marks = {}
    class Marks(Callback):
        def after_step(self, s):
            if s.step in (warm, steps): sync(device); marks[s.step] = time.perf_counter()
    sync(device); t = time.perf_counter()
    train(model, train_set, val_set, cfg, mean, std, ckpt_path=None, callbacks=[Marks()])
    sync(device); epoch_s = time.perf_counter() - t
    marks.setdefault(0, t)
    steady_img_s = (steps - warm) * cfg.batch_size / (marks[steps] - marks[warm])
    t = time.perf_counter()
    predict(model, val_set, cfg, mean, std); predict(model, test_set, cfg, mean, std)
    sync(device); eval_s = time.perf_counter() - t
    peak = peak_memory_mb(device)  # fclora's: CUDA max_memory_allocated, else the process's ru_maxrss

    if check:
        _, step = fclora_steps(model, train_set, dataclasses.replace(cfg, epochs=10**4), mean, std)
        step()
        syncs["train_step"] = sync_points(step, 5)
        syncs["predict_batch"] = sync_points(lambda: predict(model, test_set[:cfg.eval_batch_size], cfg, mean, std), 2)

    step_factor = 2 if method != "full" else 3
    peak_flops = args.peak_tflops * 1e12
    train_img_s = steps * cfg.batch_size / epoch_s
    eval_img_s = (len(val_set) + len(test_set)) / eval_s
    score_img_s = cfg.score_batches * cfg.batch_size / scoring_s if scoring_s else None
    mfu = lambda img_s, f: None if img_s is None else float(f"{img_s * f * flop_fwd / peak_flops:.4g}")
    total = scoring_s + args.epochs * epoch_s + eval_s
    out.update(
        trainable_params=trainable, ranks_min=None if ranks is None else int(ranks.min()),
        ranks_max=None if ranks is None else int(ranks.max()), rank_budget=cfg.rank_budget if ranks is not None else None,
        n_train=len(train_set), n_val=len(val_set), n_test=len(test_set), steps_per_epoch=steps,
        setup_s=round(setup_s, 2), scoring_s=round(scoring_s, 2), score_batches=cfg.score_batches if scoring_s else 0,
        epoch_s=round(epoch_s, 2), eval_s=round(eval_s, 2),
        train_img_s_epoch=round(train_img_s, 1),  # whole train() call: steps + epoch-end val pass
        train_img_s_steady=round(steady_img_s, 1),  # steps after the first --warm-steps, without the val pass
        scoring_img_s=None if score_img_s is None else round(score_img_s, 1), eval_img_s=round(eval_img_s, 1),
        mfu_train_steady=mfu(steady_img_s, step_factor), mfu_scoring=mfu(score_img_s, 2), mfu_eval=mfu(eval_img_s, 1),
        mfu_x2_train_steady=mfu(steady_img_s, 2 * step_factor),
        flop_per_image_fwd=flop_fwd, peak_tflops=args.peak_tflops, peak_memory_mb=round(peak, 1),
        peak_memory_measure="cuda max_memory_allocated" if device.type == "cuda" else "process ru_maxrss (CPU)",
        epochs_extrapolated=args.epochs, extrapolated_total_s=round(total, 1), extrapolated_total_min=round(total / 60, 2),
        sync_points=syncs or None)
    del model; gc.collect()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, few images: check the script runs (CPU is fine)")
    p.add_argument("--model", default="random-deit-base")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=1024)
    p.add_argument("--score-batches", type=int, default=100)
    p.add_argument("--rank-budget", type=int, default=82, help="the paper's CIFAR-10 budget (36 q/k/v projections)")
    p.add_argument("--n-train", type=int, default=40000)
    p.add_argument("--n-val", type=int, default=10000)
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--methods", default="fclora,full")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the protocol to extrapolate to")
    p.add_argument("--warm-steps", type=int, default=10, help="steps left out of the steady-state img/s")
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--gflop-per-image", type=float, default=17.6, help="forward cost per image (DeiT-B, 224 px)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (fclora's Config.compile)")
    p.add_argument("--no-sync-check", dest="sync_check", action="store_false")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-emulated-bf16", action="store_true",
                   help="bf16 even on a CPU without native bf16 (emulated: about 15x slower than float32); --smoke implies it")
    args = p.parse_args()
    if args.smoke:
        args.allow_emulated_bf16 = True  # a check that the script runs, on a tiny model: any CPU will do
        args.model, args.image_size, args.batch_size, args.eval_batch_size = "random-deit-tiny", 32, 32, 128
        args.score_batches, args.rank_budget, args.n_train, args.n_val, args.n_test = 3, 24, 320, 128, 128
        args.warm_steps = 2
    if args.threads: torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    check_precisions([args.precision], device, args.allow_emulated_bf16)
    if device.type == "cuda": torch.backends.cuda.matmul.allow_tf32 = True
    log(f"device {device}; model {args.model} at {args.image_size} px; batch {args.batch_size}; {args.precision}")
    t0 = time.perf_counter()
    data = tuple(synthetic(n, args.seed + i, device) for i, n in enumerate((args.n_train, args.n_val, args.n_test)))
    flop_fwd = args.gflop_per_image * 1e9
    if args.smoke:
        from fclora.lora import load_model
        flop_fwd = macs_per_image(load_model(args.model, 10, args.image_size, args.seed).to(device), args.image_size, device)
    res = {}
    for m in args.methods.split(","):
        log(f"[{m}] scoring / 1 epoch of {args.n_train} / eval ...")
        res[m] = run_method(m, data, args, device, flop_fwd)
        emit(res[m], device)
        log(f"[{m}] scoring {res[m]['scoring_s']}s, epoch {res[m]['epoch_s']}s ({res[m]['train_img_s_steady']} img/s "
            f"steady, MFU {res[m]['mfu_train_steady']}), eval {res[m]['eval_s']}s, peak {res[m]['peak_memory_mb']} MB, "
            f"{args.epochs}-epoch protocol ~{res[m]['extrapolated_total_min']} min")
    if {"fclora", "full"} <= set(res):
        a, b = res["fclora"], res["full"]
        emit(dict(kind="summary", precision=args.precision, fclora_vs_full_train_img_s=round(a["train_img_s_steady"] / b["train_img_s_steady"], 3),
                  fclora_vs_full_peak_memory=round(a["peak_memory_mb"] / b["peak_memory_mb"], 3) if device.type == "cuda" else None,
                  fclora_vs_full_epoch_time=round(a["epoch_s"] / b["epoch_s"], 3),
                  fclora_vs_full_protocol_time=round(a["extrapolated_total_s"] / b["extrapolated_total_s"], 3),
                  scoring_share_of_fclora_protocol=round(a["scoring_s"] / a["extrapolated_total_s"], 4),
                  wall_s=round(time.perf_counter() - t0, 1)), device)


if __name__ == "__main__":
    main()
