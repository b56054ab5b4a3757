"""CPU seconds per training step of the ViT-S/14 (112 px, uniform LoRA 82 over the 36 q/k/v projections), fp32 and bf16,
on the model-only path (fclora's `train_step` on one fixed batch from fclora's own pipeline), with 1 thread by default.

Process CPU time, not wall clock: images per CPU-second are what a step costs whoever else runs on the core, so this
measures a CPU's speed on a busy machine, where `train_throughput.py`'s wall-clock numbers are meaningless. The first
step of each precision is a warm-up, left out of the median unless it is the only one (`--bf16-steps 0`: on a CPU
without native bf16 an emulated step takes minutes). bf16 there needs `--allow-emulated-bf16`, as everywhere.

    python benchmarks/step_cpu_time.py --batch-size 8 --fp32-steps 2 --bf16-steps 0 --allow-emulated-bf16
"""
import argparse, sys, time, warnings

import torch

from _common import (emit, log, build_model, train_images, fclora_config, fclora_model, fclora_steps, fclora_batch,
                     check_precisions, VIT_S)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fp32-steps", type=int, default=3, help="timed steps after the warm-up (0: the warm-up step alone)")
    p.add_argument("--bf16-steps", type=int, default=1, help="timed steps after the warm-up (0: the warm-up step alone)")
    p.add_argument("--allow-emulated-bf16", action="store_true", help="measure bf16 on a CPU without native bf16 (emulated)")
    args = p.parse_args()
    if not VIT_S.exists(): raise SystemExit(f"step_cpu_time.py: needs {VIT_S}")
    check_precisions(["bf16"], "cpu", args.allow_emulated_bf16)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*emulated.*")
    data, source = train_images(256, 0)
    for prec, n in (("fp32", args.fp32_steps), ("bf16", args.bf16_steps)):
        model, mean, std = build_model(str(VIT_S), 10, 112, 0)
        cfg = fclora_config(112, args.batch_size, 82, 1, 0, prec, method="lora", allow_emulated_bf16=args.allow_emulated_bf16)
        model, _ = fclora_model(model, data, cfg, mean, std)
        fit, step = fclora_steps(model, data, cfg, mean, std)
        fit.model.train()
        x, y = fclora_batch(fit)
        cpu, wall = [], []
        for i in range(n + 1):
            c, w = time.process_time(), time.perf_counter()
            step(x, y)
            cpu.append(time.process_time() - c); wall.append(time.perf_counter() - w)
            log(f"[{prec}] step {i}: {cpu[-1]:.1f} CPU-s, {wall[-1]:.1f} s wall")
        timed = sorted(cpu[1:] or cpu)
        emit(dict(model="vit-s14-imgfocus", image_size=112, batch_size=args.batch_size, precision=prec, threads=args.threads,
                  data=source, path="model-only (train_step on a fixed batch), uniform LoRA 82",
                  cpu_s_per_step=[round(v, 2) for v in cpu], wall_s_per_step=[round(v, 2) for v in wall],
                  warmup_only=n == 0, img_per_cpu_s=round(args.batch_size / timed[len(timed) // 2], 3)))


if __name__ == "__main__":
    main()
