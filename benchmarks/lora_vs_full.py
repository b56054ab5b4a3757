"""Step time and peak memory of fclora LoRA training vs full fine-tuning, same model, batch, data and step code.

Each (model, method) runs in a fresh subprocess (`--worker`), so peak memory is that process's own:
on CPU the peak resident set (resource.getrusage ru_maxrss; torch allocations are invisible to tracemalloc),
on CUDA torch.cuda.max_memory_allocated. `*_base_mb` is the same measure taken just before the first training step
(interpreter, libraries, model, data); the peak mark is reset to it there (CPU: Linux /proc/self/clear_refs "5",
which ru_maxrss follows; CUDA: reset_peak_memory_stats), so `*_peak_mb` is the peak while training (not while
importing or scoring) and train_memory_ratio compares what training added (peak - base).
Each method runs --windows times, alternating (lora, full, lora, full, ...); medians over runs are reported.
Step time: median of per-step times (--steps after --warmup) of fclora's training step
(train_batch -> forward -> soft CE -> backward -> AdamW). LoRA: fclora's scored ranks (budget = --rank x #q/k/v),
adapter + classifier trainable. Full: fclora's method "full" (every parameter trainable, AdamW state for all).
One JSON line per model on stdout.
"""
from __future__ import annotations
import argparse, json, resource, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import (log, emit, check_precisions, median, set_threads, add_common_args, model_choices, resolve_models, build_model,
                     train_images, fclora_config, fclora_model, fclora_steps, sync)


def reset_peak(device) -> bool:
    "Reset the peak-memory mark to the current usage (CPU: Linux clear_refs 5, which ru_maxrss follows)."
    if torch.device(device).type == "cuda": torch.cuda.reset_peak_memory_stats(device); return True
    try: Path("/proc/self/clear_refs").write_text("5"); return True
    except OSError: return False


def current_mb(device):
    if torch.device(device).type == "cuda": return torch.cuda.memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"): return int(line.split()[1]) / 1024
    return peak_mb(device)


def peak_mb(device):
    if torch.device(device).type == "cuda": return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args):
    "Run one configuration and print its JSON (the parent reads it)."
    from fclora.experiment import adapt_model
    set_threads(args.threads)
    spec, size = args.spec, args.size
    data, _ = train_images(args.train_images, args.seed)
    data = data.to(args.device)
    model, mean, std = build_model(spec, data.num_classes, size, args.seed)
    model.to(args.device)
    from fclora.lora import find_qkv_modules
    cfg = fclora_config(size, args.batch_size, args.rank * len(find_qkv_modules(model)), args.score_batches,
                        args.seed, args.precision, method="fclora" if args.worker == "lora" else "full",
                        device=args.device, allow_emulated_bf16=args.allow_emulated_bf16)
    if args.worker == "lora": model, _ = fclora_model(model, data, cfg, mean, std)
    else: model = adapt_model(model, None, cfg, 1000)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _, step = fclora_steps(model, data, cfg, mean, std)
    model.train()
    import gc; gc.collect()
    reset = reset_peak(args.device)
    base = current_mb(args.device)
    times = []
    for i in range(args.warmup + args.steps):
        sync(args.device); t = time.perf_counter()
        step()
        sync(args.device); times.append(time.perf_counter() - t)
    print(json.dumps(dict(step_s=median(times[args.warmup:]), peak_mb=peak_mb(args.device), base_mb=base,
                          peak_reset=reset, trainable=trainable, threads=torch.get_num_threads())), flush=True)


def run_worker(method, spec, size, args):
    cmd = [sys.executable, __file__, "--worker", method, "--spec", spec, "--size", str(size)]
    for k in ("threads", "batch_size", "rank", "score_batches", "seed", "device", "precision", "steps", "warmup",
              "train_images"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.allow_emulated_bf16: cmd.append("--allow-emulated-bf16")
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode: raise SystemExit(f"{method} worker failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"  {method}: {res} ({time.perf_counter() - t:.1f}s)")
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    model_choices(p)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--windows", type=int, default=2, help="fresh-process runs per method (alternating); medians reported")
    p.add_argument("--train-images", type=int, default=1024)
    p.add_argument("--worker", choices=("lora", "full"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker: return worker(args)
    check_precisions([args.precision], args.device, args.allow_emulated_bf16)
    for spec, size, label in resolve_models(args.models, args.tiny_config):
        log(f"[{label} at {size} px]")
        runs = {"lora": [], "full": []}
        for w in range(args.windows):  # alternate lora, full, lora, full, ... each in a fresh process
            for m in runs: runs[m].append(run_worker(m, spec, size, args))
        lo, fu = ({k: median([r[k] for r in rs]) if k in ("step_s", "peak_mb", "base_mb") else rs[0][k] for k in rs[0]}
                  for rs in runs.values())
        emit(dict(model=label, image_size=size, batch_size=args.batch_size, precision=args.precision,
                  threads=lo["threads"], device=args.device, steps=args.steps, windows=args.windows,
                  lora_step_s_windows=[round(r["step_s"], 4) for r in runs["lora"]],
                  full_step_s_windows=[round(r["step_s"], 4) for r in runs["full"]],
                  step_time_ratio=round(lo["step_s"] / fu["step_s"], 3),
                  peak_memory_ratio=round(lo["peak_mb"] / fu["peak_mb"], 3),
                  train_memory_ratio=round((lo["peak_mb"] - lo["base_mb"]) / max(fu["peak_mb"] - fu["base_mb"], 1e-9), 3),
                  lora_step_s=round(lo["step_s"], 4), full_step_s=round(fu["step_s"], 4),
                  lora_peak_mb=round(lo["peak_mb"], 1), full_peak_mb=round(fu["peak_mb"], 1),
                  lora_base_mb=round(lo["base_mb"], 1), full_base_mb=round(fu["base_mb"], 1),
                  lora_trainable=lo["trainable"], full_trainable=fu["trainable"],
                  memory_measure="cuda max_memory_allocated" if args.device.startswith("cuda") else
                  ("ru_maxrss after clear_refs reset" if lo["peak_reset"] and fu["peak_reset"] else "ru_maxrss (no reset)")),
             args.device)


if __name__ == "__main__":
    main()
