"""Prepare `.gpu/` (ignored by git) for benchmarks/gpu_study3.py: the ViT-S/14 and only the images Study III uses, in
packs that each travel to the device machine with the checkout in one call (64 MiB a call, tracked files included).

Run where ../shared is, from anywhere in the checkout the device calls are made from (its size sets the packs' size):

    python benchmarks/gpu_study3_prepare.py             # encode (cached in .gpu/items) and pack into .gpu/p1, .gpu/p2, ...
    python benchmarks/gpu_study3_prepare.py --dry-run   # also decode the packs as the device does, check them, and run
                                                        # the device script's --smoke (28 px, a few images) on this CPU

What it writes:
- model: the ViT-S/14 of ../shared/models/vit-small-patch14-imgfocus. The weights and biases of every nn.Linear and
  nn.Conv2d (what fclora's bf16 path, `keep_frozen_in_bf16`, stores in bf16) as bf16, split into a high-byte plane (sign
  and exponent, xz) and a low-byte plane (raw: the mantissa does not compress); the other tensors (position embeddings,
  norms, layer scales, tokens) in float32, xz. On the device `gpu_study3.py` expands it into a float32 model.safetensors
  that `from_pretrained` loads: after `keep_frozen_in_bf16` a bf16 run holds exactly the weights it would hold from the
  original file (the dry run checks this on the loaded models); only the full fine-tuning arm starts from bf16-rounded
  Linear weights.
- images, chosen by fclora's own `prepare_data` (the function every CPU run calls: `balanced_subset` of the training file
  by seed, `train_val_split`, `balanced_subset(test, test_subset, 0)`) with each dataset's design.json settings: the
  fixed test subset, and for each evaluation seed of the design the images of its training subset (train + validation)
  that no earlier seed's item holds. Lossless WebP mosaics (64 images a row; about 0.5x the raw bytes, against 0.9x
  for npz), with the labels of the whole source files, so that on the device the files are rebuilt at full length
  (absent images zero, and checked never to be used) and `prepare_data` picks by seed exactly the images a CPU run
  of that seed uses.
- packs: the items in priority order (model, test images, then seed 0, 1, ... of both datasets) placed first-fit into
  packs of at most 64 MiB less what travels anyway (tracked and untracked-not-ignored files of this checkout) less
  --margin-mib (the checkout grows as the study commits runs: prepare again just before the device calls).
"""
from __future__ import annotations
import argparse, json, os, shutil, subprocess, sys, time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_study3 import (REPO, GPU, WORK, STUDIES, encode_images, encode_model, digest, file_digest, assemble, absent_images,
                        bf16_keys, log)

MIB = 2**20
CODEC = dict(images="webp-lossless-mosaic-64", model="bf16-planes-xz", version=1)


def travelling_bytes(repo:Path=REPO) -> dict:
    "Bytes of what travels with every device call: tracked files, untracked files git does not ignore, and shared/."
    def size(paths): return sum((repo/p).stat().st_size for p in paths if (repo/p).is_file() and not (repo/p).is_symlink())
    ls = lambda *a: [p for p in subprocess.run(["git", "-C", str(repo), "ls-files", "-z", *a], capture_output=True, text=True,
                                                check=True).stdout.split("\0") if p]
    tracked, untracked = ls(), ls("--others", "--exclude-standard")
    shared = [str(p.relative_to(repo)) for p in (repo/"shared").rglob("*")] if (repo/"shared").is_dir() else []
    out = dict(tracked=size(tracked), tracked_files=len(tracked), untracked=size(untracked), untracked_files=len(untracked),
               shared=size(shared))
    out["total"] = out["tracked"] + out["untracked"] + out["shared"]
    return out


def design(ds): return json.loads((REPO/STUDIES[ds]/"design.json").read_text())


def choose_images(shared:Path, ds:str, seeds:list[int], test_subset:int) -> dict:
    "The images of each seed's run and the test images, picked by `prepare_data` exactly as a CPU run of that seed does."
    from fclora.core import make_config
    from fclora.experiment import prepare_data
    from fclora.data import load_data
    d = design(ds)
    out = dict(seeds={})
    for seed in seeds:
        cfg = make_config("paper", ds, **dict(d["settings"], dataset=str(shared/"data"/ds), seed=seed, test_subset=test_subset))
        train, val, test = prepare_data(cfg)
        out["seeds"][seed] = np.sort(np.concatenate([train.index.numpy(), val.index.numpy()]))
        out["test"] = np.sort(test.index.numpy())
    return out


def _item(folder:Path, key:dict, make) -> dict:
    "An item of .gpu/items: reused when its key (inputs and codec) is unchanged, else made again by `make(folder)`."
    f = folder/"item.json"
    if f.exists():
        it = json.loads(f.read_text())
        if it.get("key") == key and all((folder/n).exists() for n in it["file_names"]): return it
    shutil.rmtree(folder, ignore_errors=True); folder.mkdir(parents=True)
    t = time.perf_counter()
    it = dict(make(folder), key=key)
    it["file_names"] = sorted(p.name for p in folder.iterdir() if p.name != "item.json")
    it["encode_s"] = round(time.perf_counter() - t, 1)
    f.write_text(json.dumps(it))
    return it


def make_items(shared:Path, seeds:dict, test_subset:int, webp:tuple, items_dir:Path) -> list[tuple[str, Path, dict]]:
    "[(name, folder, entry)] of every item, in priority order: model, test images, then seed by seed (both datasets)."
    src = shared/"models"/"vit-small-patch14-imgfocus"
    st = (src/"model.safetensors").stat()
    model = _item(items_dir/"model", dict(CODEC, source=str(src), size=st.st_size, mtime=int(st.st_mtime)),
                  lambda f: dict(kind="model", **_model(src, f)))
    items, later = [("model", items_dir/"model", model)], []
    for ds in STUDIES:
        files = {s: shared/"data"/ds/f"{s}.npz" for s in ("train", "test")}
        stamp = {s: [f.stat().st_size, int(f.stat().st_mtime)] for s, f in files.items()}
        chosen = choose_images(shared, ds, seeds[ds], test_subset)
        arrays = {s: np.load(f, allow_pickle=False) for s, f in files.items()}
        x = {s: arrays[s]["x"] for s in files}
        def test_item(folder, idx=chosen["test"]):
            extra = {"classes": arrays["train"]["classes"]} if "classes" in arrays["train"] else {}
            np.savez_compressed(folder/"labels.npz", y_train=arrays["train"]["y"], y_test=arrays["test"]["y"],
                                shape=np.array(x["train"].shape[1:]), **extra)
            np.savez_compressed(folder/"index.npz", carries=idx)
            return dict(kind="images", dataset=ds, split="test", test_subset=test_subset, n=len(idx),
                        images=encode_images(x["test"][idx], folder, *webp), images_sha256=digest(x["test"][idx]))
        key = dict(CODEC, webp=list(webp), source=stamp, test_index=digest(chosen["test"]))
        items.append((f"{ds}-test", items_dir/f"{ds}-test", _item(items_dir/f"{ds}-test", key, test_item)))
        seen = np.zeros(len(arrays["train"]["y"]), bool)
        for seed in seeds[ds]:
            needs = chosen["seeds"][seed]
            new = needs[~seen[needs]]
            seen[needs] = True
            def seed_item(folder, idx=new, needs=needs, seed=seed):
                np.savez_compressed(folder/"index.npz", carries=idx, needs=needs)
                return dict(kind="images", dataset=ds, split="train", seed=seed, n=len(idx), n_needs=len(needs),
                            images=encode_images(x["train"][idx], folder, *webp), images_sha256=digest(x["train"][idx]))
            key = dict(CODEC, webp=list(webp), source=stamp, carries=digest(new), needs=digest(needs))
            later.append((seed, ds, (f"{ds}-seed{seed}", items_dir/f"{ds}-seed{seed}", _item(items_dir/f"{ds}-seed{seed}", key, seed_item))))
    order = {ds: i for i, ds in enumerate(STUDIES)}
    return items + [it for _, _, it in sorted(later, key=lambda t: (t[0], order[t[1]]))]


def _model(src:Path, folder:Path) -> dict:
    meta = encode_model(src, folder)
    (folder/"meta.json").write_text(json.dumps(meta))
    return dict(n_tensors=len(meta["tensors"]), n_bf16=sum(t["dtype"] == "bf16" for t in meta["tensors"]))


def pack(items, budget:int, gpu:Path=GPU) -> list[dict]:
    "Place the items first-fit, in order, into packs gpu/p1, p2, ... of at most `budget` bytes (hard links to the items)."
    for old in gpu.glob("p[0-9]*"): shutil.rmtree(old)
    packs = []
    for name, folder, it in items:
        size = sum((folder/n).stat().st_size for n in it["file_names"])
        if size > budget: raise SystemExit(f"gpu_study3_prepare: the item {name} ({size / MIB:.1f} MiB) is larger than a pack "
                                           f"may be ({budget / MIB:.1f} MiB): lower --margin-mib, or make the checkout smaller")
        p = next((p for p in packs if p["bytes"] + size + 4096 <= budget), None)
        if p is None: p = dict(pack=f"p{len(packs) + 1}", bytes=0, items={}); packs.append(p)
        entry = {k: v for k, v in it.items() if k not in ("key", "file_names")}
        entry["files"] = {n: file_digest(folder/n) for n in it["file_names"]}
        entry["bytes"] = size
        p["items"][name], p["bytes"] = entry, p["bytes"] + size
        dest = gpu/p["pack"]/name
        dest.mkdir(parents=True)
        for n in it["file_names"]:
            try: os.link(folder/n, dest/n)
            except OSError: shutil.copy2(folder/n, dest/n)
    for p in packs:
        (gpu/p["pack"]/"manifest.json").write_text(json.dumps(p, indent=1))
        p["bytes"] += (gpu/p["pack"]/"manifest.json").stat().st_size
    return packs


def prepare(args) -> dict:
    t0 = time.perf_counter()
    shared = Path(args.shared).resolve()
    if not (shared/"models"/"vit-small-patch14-imgfocus"/"config.json").exists():
        raise SystemExit(f"gpu_study3_prepare: needs ../shared (the ViT-S/14 and CIFAR-10/100), not found at {shared}")
    seeds = {ds: sorted({s for a in design(ds)["arms"].values() for s in a["seeds"]} & set(args.seeds or range(10**6)))
             for ds in STUDIES}
    travel = travelling_bytes()
    budget = int(args.limit_mib * MIB - travel["total"] - args.margin_mib * MIB)
    log(f"gpu_study3_prepare: what travels anyway: {travel['tracked'] / MIB:.2f} MiB tracked ({travel['tracked_files']} files) + "
        f"{travel['untracked'] / MIB:.2f} MiB untracked-not-ignored ({travel['untracked_files']} files); a pack may hold "
        f"{budget / MIB:.2f} MiB ({args.limit_mib} MiB - that - {args.margin_mib} MiB margin)")
    items = make_items(shared, seeds, args.test_subset, (args.webp_method, args.webp_quality), GPU/"items")
    packs = pack(items, budget)
    report = dict(travelling=travel, limit_mib=args.limit_mib, margin_mib=args.margin_mib, pack_budget=budget, seeds=seeds,
                  test_subset=args.test_subset, codec=CODEC, items={}, packs=[])
    raw = {"model": 0}
    for name, folder, it in items:
        size = sum((folder/n).stat().st_size for n in it["file_names"])
        report["items"][name] = dict(bytes=size, n_images=it.get("n"), bytes_per_image=round(size / it["n"]) if it.get("n") else None,
                                     encode_s=it["encode_s"])
    for p in packs:
        call = travel["total"] + p["bytes"]
        report["packs"].append(dict(pack=p["pack"], bytes=p["bytes"], items=list(p["items"]), call_bytes=call, call_mib=round(call / MIB, 2)))
    img = sum(v["bytes"] for k, v in report["items"].items() if k != "model")
    n_img = sum(v["n_images"] or 0 for v in report["items"].values())
    report.update(model_bytes=report["items"]["model"]["bytes"], image_bytes=img, n_images=n_img, prepare_s=round(time.perf_counter() - t0, 1))
    (GPU/"prepare.json").write_text(json.dumps(report, indent=1))
    log(f"gpu_study3_prepare: model {report['model_bytes'] / MIB:.2f} MiB; {n_img} images {img / MIB:.2f} MiB "
        f"({img / n_img:.0f} B an image, raw 3072); {len(packs)} pack(s):")
    for p in report["packs"]:
        log(f"  .gpu/{p['pack']}: {p['bytes'] / MIB:.2f} MiB, a call carrying it sends {p['call_mib']:.2f} MiB of {args.limit_mib}: {', '.join(p['items'])}")
    for name, v in report["items"].items():
        log(f"    {name:16s} {v['bytes'] / MIB:7.2f} MiB" + (f"  {v['n_images']:5d} images, {v['bytes_per_image']} B each" if v["n_images"] else ""))
    log(f"gpu_study3_prepare: done in {report['prepare_s']} s; the report is .gpu/prepare.json")
    return report


def check(shared:Path, report:dict) -> dict:
    "Decode the packs as the device does and compare with ../shared: every image, the labels, the model's weights."
    import torch
    from safetensors.torch import load_file
    from fclora.core import make_config
    from fclora.lora import load_model, find_head_modules
    from fclora.training import keep_frozen_in_bf16
    t0 = time.perf_counter()
    shutil.rmtree(WORK/"model", ignore_errors=True); shutil.rmtree(WORK/"data", ignore_errors=True); (WORK/"assembled.json").unlink(missing_ok=True)
    info = assemble()
    out = dict(assemble_s=info["assemble_s"])
    # images and labels: every image a pack brought equals the original, the labels are the whole files'
    for ds in STUDIES:
        for s in ("train", "test"):
            a, b = np.load(shared/"data"/ds/f"{s}.npz"), np.load(WORK/"data"/ds/f"{s}.npz")
            present = np.load(WORK/"data"/f"{ds}.present.npz")[s]
            assert (a["y"] == b["y"]).all() and ("classes" in a) == ("classes" in b), (ds, s)
            if "classes" in a: assert (a["classes"] == b["classes"]).all()
            same = (a["x"][present] == b["x"][present]).all() and not b["x"][~present].any()
            assert same, f"{ds} {s}: decoded images differ from the originals"
            out[f"{ds}_{s}_images_checked"] = int(present.sum())
        # every evaluation seed of the design (real settings: 2,000/4,000 training images, 5,000 test) has all its images
        d = design(ds)
        out[f"{ds}_seeds_complete"] = [seed for seed in report["seeds"][ds] if absent_images(make_config(
            "paper", ds, **dict(d["settings"], dataset=str(WORK/"data"/ds), seed=seed, test_subset=report["test_subset"]))) == 0]
    # the model: the checkpoint's tensors, then the loaded models after fclora's bf16 storage
    orig = load_file(str(shared/"models"/"vit-small-patch14-imgfocus"/"model.safetensors"))
    new = load_file(str(WORK/"model"/"model.safetensors"))
    half = bf16_keys({k: tuple(v.shape) for k, v in orig.items()})
    assert orig.keys() == new.keys()
    bad = [k for k in orig if not torch.equal(new[k], orig[k].to(torch.bfloat16).float() if k in half else orig[k])]
    assert not bad, f"tensors differ: {bad[:5]}"
    out["model_tensors_checked"], out["model_bf16_tensors"] = len(orig), len(half)
    m1, m2 = (load_model(str(p), 100, None, 0) for p in (shared/"models"/"vit-small-patch14-imgfocus", WORK/"model"))
    for m in (m1, m2): m.requires_grad_(False); keep_frozen_in_bf16(m)
    s1, s2 = m1.state_dict(), m2.state_dict()
    diff = [k for k in s1 if s1[k].dtype != s2[k].dtype or not torch.equal(s1[k], s2[k])]
    assert s1.keys() == s2.keys() and not diff, f"after keep_frozen_in_bf16 the models differ: {diff[:5]}"
    heads = tuple(f"{h}." for h in find_head_modules(m1))   # the new head (here frozen too) is no part of the checkpoint
    n_bf16 = sum(v.dtype == torch.bfloat16 for k, v in s1.items() if not k.startswith(heads))
    out["loaded_models_equal_after_bf16_storage"], out["loaded_bf16_tensors"] = True, int(n_bf16)
    assert n_bf16 == len(half), (n_bf16, len(half))   # the rule `bf16_keys` = what keep_frozen_in_bf16 stores in bf16
    out["check_s"] = round(time.perf_counter() - t0, 1)
    log(f"gpu_study3_prepare: check: {json.dumps(out)}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", default=str(REPO.parent/"shared"))
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="only these evaluation seeds (comma-separated; default: every seed of the designs)")
    p.add_argument("--test-subset", type=int, default=5000, help="test images a dataset (default: the design's 5,000; fewer: "
                   "a deviation, though the smaller set lies inside the 5,000, balanced_subset being nested)")
    p.add_argument("--limit-mib", type=float, default=64, help="what one device call may send")
    p.add_argument("--margin-mib", type=float, default=2, help="room left in each call for the checkout's growth")
    p.add_argument("--webp-method", type=int, default=4)
    p.add_argument("--webp-quality", type=int, default=75, help="lossless WebP's effort (0-100; the images stay lossless)")
    p.add_argument("--dry-run", action="store_true", help="then decode and check the packs as the device does and run the "
                   "device script's --smoke here (CPU, 28 px, a few images)")
    args = p.parse_args(argv)
    os.chdir(REPO)
    report = prepare(args)
    if not args.dry_run: return 0
    report["check"] = check(Path(args.shared).resolve(), report)
    subprocess.run([sys.executable, str(REPO/"benchmarks"/"gpu_study3.py"), "run", "--list"])   # the device's runs (224 px, bf16)
    t = time.perf_counter()
    smoke = subprocess.run([sys.executable, str(REPO/"benchmarks"/"gpu_study3.py"), "run", "--smoke", "--out", str(GPU/"out-smoke")])
    report["smoke"] = dict(rc=smoke.returncode, wall_s=round(time.perf_counter() - t, 1),
                           summary=json.loads((GPU/"out-smoke"/"gpu_study3.json").read_text()) if (GPU/"out-smoke"/"gpu_study3.json").exists() else None)
    (GPU/"prepare.json").write_text(json.dumps(report, indent=1))
    log(f"gpu_study3_prepare: dry run: smoke exit {smoke.returncode} in {report['smoke']['wall_s']} s")
    return smoke.returncode


if __name__ == "__main__":
    sys.exit(main())
