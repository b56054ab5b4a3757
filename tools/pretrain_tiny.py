"""Pretrain `fclora-tiny-digits`, the tiny DeiT that ships with fclora (fclora/models/fclora-tiny-digits).

The model has the architecture of fclora's `random-deit-tiny` (4 blocks, 64 wide, 4 heads, patch 4) at 16 px and
is trained, every weight from scratch, on the *source* task `digits-0to4` (the digits 0-4 of scikit-learn's
embedded digits, their 734 training images). The 5-way source head is dropped before saving: what ships is the
backbone, and `load_model("fclora-tiny-digits", num_labels)` puts a new head on it. The quick preset then
fine-tunes it with LoRA on the *target* task `digits-5to9`, digits the backbone has never seen.

Seeded and single-threaded, with torch's deterministic algorithms: rerunning it on the same kind of CPU regenerates
the same weights byte for byte; another kind of CPU rounds differently and 20 epochs amplify it (an AVX2 EPYC gives
source accuracy 0.748 against the shipped weights' 0.767): the same recipe and quality, other bits
(tests/test_pretrained.py checks this, marked slow). It takes about a minute on one idle CPU core (270 s on a busy one).

    python tools/pretrain_tiny.py                  # rewrite fclora/models/fclora-tiny-digits
    python tools/pretrain_tiny.py --out /tmp/tiny   # somewhere else
"""
import argparse, json, math, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT/"fclora"/"models"/"fclora-tiny-digits"
RECIPE = dict(seed=0, epochs=20, batch_size=64, lr=3e-3, weight_decay=0.05, warmup_epochs=3, label_smoothing=0.1,
              max_shift=2, image_size=16, views="d8")
D8 = [(k, m) for m in (False, True) for k in range(4)]  # the 8 symmetries of a square: (quarter turns, mirrored)


def shift(x, max_shift:int, g:torch.Generator):
    "Translate each image by up to `max_shift` pixels in each direction, filling with black."
    B, C, H, W = x.shape
    xp = F.pad(x, (max_shift,) * 4)
    oy, ox = (torch.randint(0, 2 * max_shift + 1, (B,), generator=g) for _ in range(2))
    rows, cols = oy[:, None] + torch.arange(H), ox[:, None] + torch.arange(W)
    return xp.permute(0, 2, 3, 1)[torch.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def views(data, views:list):
    "Each image in each of `views` (quarter turns, mirrored); the class is (label, view)."
    from fclora.data import ImageSet
    k = len(views)
    xs = torch.cat([torch.rot90(data.x.flip(3) if m else data.x, t, (2, 3)) for t, m in views])
    ys = torch.cat([data.y * k + i for i in range(k)])
    return ImageSet(xs, ys, [f"{c}/{i}" for c in data.classes for i in range(k)])


def build_model(num_labels:int, image_size:int, seed:int):
    "fclora's random-deit-tiny architecture, randomly initialised with `seed`."
    from fclora.lora import load_model
    return load_model("random-deit-tiny", num_labels, image_size=image_size, seed=seed)


def accuracy(model, data, size:int, mean, std) -> float:
    from fclora.data import preprocess
    model.eval()
    with torch.no_grad(): pred = model(pixel_values=preprocess(data.x, size, mean, std)).logits.argmax(1)
    model.train()
    return (pred == data.y).float().mean().item()


def pretrain(recipe:dict=RECIPE, verbose:bool=True):
    "Train the tiny DeiT on digits-0to4 with `recipe`; return (model, source test accuracy, seconds)."
    from fclora.data import load_data, preprocess, batch_indices, IMAGENET_MEAN, IMAGENET_STD
    r = recipe
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train, test = load_data("digits-0to4")
    train, test = views(train, D8), views(test, D8)  # 40 classes: each digit 0-4 in each of its 8 views
    model = build_model(train.num_classes, r["image_size"], r["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    steps_per_epoch = len(train) // r["batch_size"]
    total, warmup = r["epochs"] * steps_per_epoch, r["warmup_epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    g = torch.Generator().manual_seed(r["seed"])
    model.train()
    for epoch in range(r["epochs"]):
        for idx in batch_indices(len(train), r["batch_size"], shuffle=True, generator=g, drop_last=True):
            x = preprocess(shift(train.x[idx].float() / 255, r["max_shift"], g), r["image_size"], IMAGENET_MEAN, IMAGENET_STD)
            loss = F.cross_entropy(model(pixel_values=x).logits, train.y[idx], label_smoothing=r["label_smoothing"])
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
        if verbose and (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, source test accuracy "
                  f"{accuracy(model, test, r['image_size'], IMAGENET_MEAN, IMAGENET_STD):.3f}", flush=True)
    acc = accuracy(model, test, r["image_size"], IMAGENET_MEAN, IMAGENET_STD)
    return model, acc, time.perf_counter() - t0


def save_backbone(model, out:Path, recipe:dict, source_acc:float):
    "Save the model without its source head (a `num_labels=0` classifier is the identity), plus the image processor."
    from transformers import ViTImageProcessor
    from fclora.data import IMAGENET_MEAN, IMAGENET_STD
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    model.classifier = torch.nn.Identity()
    model.config.num_labels = 0
    model.config.architectures = ["DeiTForImageClassification"]
    model.config.fclora_pretraining = dict(task="digits-0to4", source_test_accuracy=round(source_acc, 4), recipe=recipe,
                                           script="tools/pretrain_tiny.py")
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": recipe["image_size"], "width": recipe["image_size"]},
                      image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"folder to write (default: {OUT.relative_to(ROOT)})")
    a = p.parse_args(argv)
    model, acc, secs = pretrain(RECIPE)
    save_backbone(model, a.out, RECIPE, acc)
    size = sum(f.stat().st_size for f in a.out.iterdir())
    print(json.dumps(dict(out=str(a.out), source_test_accuracy=acc, seconds=round(secs, 1), bytes=size)))


if __name__ == "__main__": sys.exit(main())
