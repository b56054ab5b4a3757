"""Study III's arms on one GPU at 224 px (issue 22), from the prepared folder `.gpu/` of the checkout: no ../shared, no network.

The device machine receives only the checkout (at most 64 MiB a call, tracked files included), so
`benchmarks/gpu_study3_prepare.py` (run where ../shared is) writes the ViT-S/14 and only the images the study uses
into packs `.gpu/p1`, `.gpu/p2`, ..., each small enough to travel with the checkout in one call (see benchmarks/README.md).
This script runs on the device machine, with the image's python3 and its packages (torch, transformers, peft, safetensors,
numpy, pandas, pillow): nothing is installed, `fclora` is imported from the checkout.

    python3 benchmarks/gpu_study3.py stage                 # decode the packs that have arrived into .gpu/work/ (checks every file)
    python3 benchmarks/gpu_study3.py run --budget-s 540    # stage, then the Study III arms at 224 px, bf16, until the budget
    python3 benchmarks/gpu_study3.py run --list            # the runs in order, their rates, epochs and sources; nothing run
    python3 benchmarks/gpu_study3.py run --smoke           # a CPU check of this path: 28 px, a few images, 1 epoch

`run` takes each dataset's recipe from results/study3-vits-*/design.json with image_size 224 and precision bf16, the
epochs and each arm's learning rate from the committed CPU study (arms.json where it exists, else the lr grid's choice
so far, else `--lr ARM=RATE`, else fclora's default rate for the method, marked provisional), and runs the arms through
`fclora.experiment.run_experiment` (the config via `make_config`, as `fclora sweep` does), in the design's order: the
primary pair (lora, fclora) seed by seed, both datasets, a pair only when both of its runs fit in the time left; then the
secondary arms (fclora-static, then full and linear). A run whose seed needs an image that no pack brought is not
started (`prepare_data`'s indices are checked against what arrived). At `--budget-s` plus `--grace-s` a run still going
is interrupted (its last epoch checkpoint stays in .gpu/work: a later `run` on the same machine resumes it).
After every run $OUT gets gpu_study3.json (each run: lr and its source, epochs, accuracy, wall clock; the environment;
what arrived) and study3-gpu-runs.tar.gz (results.json, config.json, plan.json, predictions.npz of every finished run).
"""
from __future__ import annotations
import argparse, hashlib, io, json, lzma, os, shutil, signal, sys, tarfile, time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # fclora from this checkout (nothing is installed on the device machine)
GPU = Path(".gpu")              # relative to the repository root (the script works from there): what results.json records
WORK = GPU/"work"
STUDIES = {"cifar10": "results/study3-vits-cifar10", "cifar100": "results/study3-vits-cifar100"}
PRIMARY = ("lora", "fclora")
COLS = 64                       # images per mosaic row
PER_FILE = 8192                 # images per WebP file (128 rows of 64: 4096 x 2048 px, inside WebP's 16383 px)
SMOKE = dict(image_size=28, epochs=1, score_batches=2, test_subset=100, eval_batch_size=64, precision="fp32", device="cpu")
SMOKE_TRAIN = {"cifar10": 80, "cifar100": 100}   # nested in each seed's design subset (balanced_subset takes per-class ranks in order)


def log(*a): print(*a, flush=True)
def digest(b) -> str: return hashlib.sha256(b if isinstance(b, bytes) else np.ascontiguousarray(b).tobytes()).hexdigest()
def file_digest(f) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""): h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ images: lossless WebP mosaics
def encode_images(x:np.ndarray, folder:Path, method:int=4, quality:int=75) -> list[str]:
    "Write uint8 images (N, H, W, 3) as lossless WebP mosaics of COLS images a row; the file names, in order."
    from PIL import Image
    n, h, w, c = x.shape
    assert x.dtype == np.uint8 and c == 3, (x.dtype, x.shape)
    files = []
    for k, start in enumerate(range(0, n, PER_FILE)):
        part = x[start:start + PER_FILE]
        rows = -(-len(part) // COLS)
        pad = np.zeros((rows * COLS - len(part), h, w, c), np.uint8)
        mos = np.concatenate([part, pad]).reshape(rows, COLS, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, COLS * w, c)
        name = f"images-{k:02d}.webp"
        Image.fromarray(mos).save(folder/name, "WEBP", lossless=True, quality=quality, method=method, exact=True)
        files.append(name)
    return files


def decode_images(folder:Path, files:list[str], n:int, h:int=32, w:int=32) -> np.ndarray:
    "The (n, h, w, 3) uint8 images of `encode_images`."
    from PIL import Image
    parts = []
    for name in files:
        with Image.open(folder/name) as im: mos = np.asarray(im.convert("RGB"))
        rows = mos.shape[0] // h
        parts.append(mos.reshape(rows, h, COLS, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * COLS, h, w, 3))
    return np.ascontiguousarray(np.concatenate(parts)[:n])


# ------------------------------------------------------------------ the model: bf16 byte planes
def bf16_keys(shapes:dict) -> set:
    """The tensors fclora's bf16 path keeps in bf16 (`keep_frozen_in_bf16`: weights and biases of every nn.Linear and
    nn.Conv2d): in the checkpoint, each `*.weight` of 2 or more dimensions, and the `*.bias` beside it. (The dry run
    checks this rule against `keep_frozen_in_bf16` on the loaded model.)"""
    w = {k for k, s in shapes.items() if k.endswith(".weight") and len(s) >= 2}
    return w | {k[:-len("weight")] + "bias" for k in w if k[:-len("weight")] + "bias" in shapes}


def _bf16_bits(a:np.ndarray) -> np.ndarray:
    "float32 -> bf16 bit patterns (uint16), rounding to nearest even as torch's .to(torch.bfloat16) does (finite values)."
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def encode_model(src:Path, folder:Path, preset:int=6) -> dict:
    """Write the checkpoint `src/model.safetensors` as: the bf16 tensors (`bf16_keys`) split into a high-byte plane
    (sign and exponent: xz) and a low-byte plane (mantissa: incompressible, raw), the other tensors in float32 (xz),
    and `src/config.json`. Returns meta.json's content."""
    from safetensors import safe_open
    from safetensors.numpy import load_file
    sd = load_file(str(src/"model.safetensors"))
    with safe_open(str(src/"model.safetensors"), "np") as f: metadata = f.metadata()
    half = bf16_keys({k: v.shape for k, v in sd.items()})
    tensors, bits, rest = [], [], []
    for k, v in sd.items():
        assert v.dtype == np.float32, (k, v.dtype)
        tensors.append(dict(name=k, shape=list(v.shape), dtype="bf16" if k in half else "f32"))
        (bits if k in half else rest).append(_bf16_bits(v).ravel() if k in half else v.ravel())
    b = np.concatenate(bits)
    (folder/"bf16-hi.xz").write_bytes(lzma.compress((b >> 8).astype(np.uint8).tobytes(), preset=preset))
    (folder/"bf16-lo.bin").write_bytes((b & 0xFF).astype(np.uint8).tobytes())
    (folder/"f32.xz").write_bytes(lzma.compress(np.concatenate(rest).astype("<f4").tobytes(), preset=preset))
    shutil.copyfile(src/"config.json", folder/"config.json")
    return dict(tensors=tensors, metadata=metadata, values_sha256=digest(_model_values(tensors, b, np.concatenate(rest))))


def _model_values(tensors, bits, rest) -> bytes:
    "Every tensor's float32 values, in order, as bytes: what the decoded checkpoint holds."
    return b"".join(v.astype("<f4").tobytes() for v in _unpack(tensors, bits, rest).values())


def _unpack(tensors, bits:np.ndarray, rest:np.ndarray) -> dict:
    out, i, j = {}, 0, 0
    for t in tensors:
        n = int(np.prod(t["shape"], dtype=np.int64))
        if t["dtype"] == "bf16": out[t["name"]] = (bits[i:i + n].astype(np.uint32) << 16).view(np.float32).reshape(t["shape"]); i += n
        else: out[t["name"]] = rest[j:j + n].reshape(t["shape"]); j += n
    assert i == len(bits) and j == len(rest)
    return out


def decode_model(folder:Path, dest:Path) -> Path:
    """A folder `from_pretrained` loads: config.json and a float32 model.safetensors whose bf16 tensors hold exactly
    the bf16-rounded original values (what a bf16 run computes with) and whose other tensors are the originals."""
    from safetensors.numpy import save_file
    meta = json.loads((folder/"meta.json").read_text())
    hi = np.frombuffer(lzma.decompress((folder/"bf16-hi.xz").read_bytes()), np.uint8)
    lo = np.frombuffer((folder/"bf16-lo.bin").read_bytes(), np.uint8)
    bits = (hi.astype(np.uint16) << 8) | lo
    rest = np.frombuffer(lzma.decompress((folder/"f32.xz").read_bytes()), "<f4")
    sd = _unpack(meta["tensors"], bits, rest)
    if digest(b"".join(v.astype("<f4").tobytes() for v in sd.values())) != meta["values_sha256"]:
        raise SystemExit(f"gpu_study3: {folder}: the decoded weights do not match their checksum")
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}, str(dest/"model.safetensors"), metadata=meta["metadata"])
    shutil.copyfile(folder/"config.json", dest/"config.json")
    return dest


# ------------------------------------------------------------------ assembling the packs that arrived
def packs_present(gpu:Path=GPU) -> dict:
    "{item name: (folder, manifest entry)} over every pack `gpu/p*/manifest.json` here, each file checked against its sha256."
    items = {}
    for m in sorted(gpu.glob("p*/manifest.json"), key=lambda p: int(p.parent.name[1:]) if p.parent.name[1:].isdigit() else 0):
        man = json.loads(m.read_text())
        for name, it in man["items"].items():
            folder = m.parent/name
            for f, h in it["files"].items():
                if not (folder/f).exists() or file_digest(folder/f) != h:
                    raise SystemExit(f"gpu_study3: {folder/f} is missing or damaged: carry {m.parent} again")
            items[name] = (folder, it)
    return items


def assemble(gpu:Path=GPU, work:Path=WORK) -> dict:
    """Decode what the packs brought into `work`: model/ (from_pretrained's folder) and data/<dataset>/{train,test}.npz
    at the source files' full length: the images no pack brought are zeros, marked absent in data/<dataset>.present.npz,
    so that fclora's own `prepare_data` picks the same images by seed as on the CPU (it needs only the labels and the
    length) and a run can be checked to use no absent image. Idempotent: skipped when the same items are already there."""
    items = packs_present(gpu)
    key = digest(json.dumps({k: it["files"] for k, (_, it) in sorted(items.items())}, sort_keys=True).encode())
    done = work/"assembled.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        info = json.loads(done.read_text())
        if all(Path(f).exists() for f in [info["model"] or ".", *(v["folder"] for v in info["datasets"].values())]): return info
    t0 = time.perf_counter()
    info = dict(key=key, items=sorted(items), packs=sorted({str(f.parent.name) for f, _ in items.values()}), model=None, datasets={})
    if "model" in items:
        info["model"] = str(decode_model(items["model"][0], work/"model"))
    for ds in STUDIES:
        if f"{ds}-test" not in items: continue
        folder, it = items[f"{ds}-test"]
        lab = np.load(folder/"labels.npz", allow_pickle=False)
        shape = tuple(int(s) for s in lab["shape"])
        x = {s: np.zeros((len(lab[f"y_{s}"]), *shape), np.uint8) for s in ("train", "test")}
        present = {s: np.zeros(len(lab[f"y_{s}"]), bool) for s in ("train", "test")}
        for name, (f, e) in items.items():
            if e.get("dataset") != ds: continue
            idx = np.load(f/"index.npz")["carries"]
            imgs = decode_images(f, e["images"], len(idx), *shape[:2])
            if digest(imgs) != e["images_sha256"]: raise SystemExit(f"gpu_study3: {f}: decoded images do not match their checksum")
            x[e["split"]][idx], present[e["split"]][idx] = imgs, True
        out = work/"data"/ds
        out.mkdir(parents=True, exist_ok=True)
        for s in ("train", "test"):
            extra = {"classes": lab["classes"]} if "classes" in lab else {}
            np.savez(out/f"{s}.npz", x=x[s], y=lab[f"y_{s}"], **extra)
        np.savez(work/"data"/f"{ds}.present.npz", **present)
        info["datasets"][ds] = dict(folder=str(out), train_images=int(present["train"].sum()), test_images=int(present["test"].sum()),
                                    train_file=len(present["train"]), test_file=len(present["test"]), test_subset=it["test_subset"],
                                    seeds_carried=sorted(e["seed"] for _, e in items.values() if e.get("dataset") == ds and e.get("split") == "train"))
    info["assemble_s"] = round(time.perf_counter() - t0, 2)
    work.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(info, indent=1))
    return info


def absent_images(cfg, work:Path=WORK) -> int:
    "How many of the images `prepare_data(cfg)` picks (train, val and test) no pack brought (0: the run can go)."
    from fclora.experiment import prepare_data
    train, val, test = prepare_data(cfg)
    m = np.load(work/"data"/f"{Path(cfg.dataset).name}.present.npz")
    return int((~m["train"][np.concatenate([train.index.numpy(), val.index.numpy()])]).sum() + (~m["test"][test.index.numpy()]).sum())


# ------------------------------------------------------------------ the study's runs
def _study3():
    sys.path.insert(0, str(REPO/"tools"))
    import study3
    return study3


def study_runs(args, info:dict) -> list[dict]:
    """Every run of the design's arms at 224 px, in the design's order (primary pairs seed by seed, both datasets; then
    fclora-static; then full and linear), each with its learning rate and epochs and where they come from."""
    from fclora.core import METHOD_LR
    study3, runs = _study3(), []
    lr_flags = dict(kv.split("=", 1) for kv in args.lr)
    for ds, folder in STUDIES.items():
        if args.datasets and ds not in args.datasets: continue
        d = study3.design(folder)
        committed = json.loads((Path(folder)/"arms.json").read_text())["arms"] if (Path(folder)/"arms.json").exists() else {}
        epochs = study3.chosen_epochs(folder, d)
        e_src = "schedule run (CPU study)" if epochs else "--epochs (provisional)"
        epochs = epochs or args.epochs
        lrs = study3.chosen_lrs(folder, d, epochs) if epochs else {}
        settings = dict(d["settings"], model_name=str(WORK/"model"), dataset=str(WORK/"data"/ds), image_size=args.image_size,
                        precision=args.precision, progress=False, device=args.device)
        if ds in info["datasets"]: settings["test_subset"] = info["datasets"][ds]["test_subset"]
        for arm, a in d["arms"].items():
            if args.arms and arm not in args.arms: continue
            a = dict(a); lr_from = a.pop("lr_from", arm); seeds = a.pop("seeds")
            if arm in committed: lr, src = committed[arm]["lr"], "arms.json"
            elif lr_from in lrs: lr, src = lrs[lr_from], f"lr grid (CPU study, {lr_from}'s rate)"
            elif arm in lr_flags or lr_from in lr_flags: lr, src = float(lr_flags.get(arm, lr_flags.get(lr_from))), "--lr (provisional)"
            else: lr, src = METHOD_LR[a["method"]], "fclora's default for the method (provisional)"
            ep = committed.get(arm, {}).get("epochs", epochs)
            for seed in seeds:
                if args.seeds and seed not in args.seeds: continue
                over = dict(a, epochs=ep, lr=lr)
                if args.smoke: over.update(SMOKE, train_subset=SMOKE_TRAIN[ds])   # (the smoke's epochs: 1, whatever the source says)
                run = dict(settings, **over, seed=seed, out_dir=str(runs_dir(args)/f"study3-gpu-vits-{ds}"/f"{arm}-seed{seed}"))
                if arm != run.get("method"): run["arm"] = arm        # as `fclora sweep`: an arm named after its method needs no name
                group = 0 if arm in PRIMARY else 1 if a["method"] == "static" else 2
                runs.append(dict(dataset=ds, arm=arm, seed=seed, method=a["method"], lr=lr, lr_source=src, epochs=over["epochs"],
                                 epochs_source=e_src, group=group, params=run))
    order = {ds: i for i, ds in enumerate(STUDIES)}
    runs.sort(key=lambda r: (r["group"], r["seed"], order[r["dataset"]], r["group"] == 0 and PRIMARY.index(r["arm"])))
    return runs


def runs_dir(args) -> Path: return WORK/("runs-smoke" if args.smoke else "runs")   # a smoke's runs never pass for the study's


def units(runs:list[dict]) -> list[list[dict]]:
    "What starts together: a primary pair (lora and fclora of one dataset and seed), or one secondary run."
    out, pairs = [], {}
    for r in runs:
        if r["group"] == 0:
            key = (r["dataset"], r["seed"])
            if key not in pairs: pairs[key] = []; out.append(pairs[key])
            pairs[key].append(r)
        else: out.append([r])
    return out


class Clock:
    "The time budget, and how long a run of each (dataset, method) took here (the estimate for the next one)."
    def __init__(self, budget_s:float, first_run_s:float):
        self.t0, self.budget, self.first, self.took = time.monotonic(), budget_s, first_run_s, {}
    def elapsed(self): return time.monotonic() - self.t0
    def left(self): return self.budget - self.elapsed()
    def estimate(self, r:dict) -> float:
        ds, m = r["dataset"], r["method"]
        if (ds, m) in self.took: return self.took[(ds, m)]
        slow = 1.6 if m == "full" else 1.0
        same = [v for (d, _), v in self.took.items() if d == ds]
        if same: return max(same) * slow
        if self.took: return max(self.took.values()) * slow * (2.0 if ds == "cifar100" else 1.0)
        return self.first * slow


def write_outputs(out:Path, summary:dict, runs:Path):
    "$OUT/gpu_study3.json and $OUT/study3-gpu-runs.tar.gz (every finished run's files), each replaced atomically."
    out.mkdir(parents=True, exist_ok=True)
    tmp = out/".gpu_study3.json.tmp"; tmp.write_text(json.dumps(summary, indent=1)); tmp.replace(out/"gpu_study3.json")
    tmp = out/".runs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for res in sorted(runs.glob("*/*/results.json")):
            for f in ("results.json", "config.json", "plan.json", "predictions.npz"):
                if (res.parent/f).exists(): tar.add(res.parent/f, arcname=str((res.parent/f).relative_to(runs)))
    tmp.replace(out/"study3-gpu-runs.tar.gz")


def environment() -> dict:
    import platform, torch
    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.cuda.is_available(),
               gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, cpus=os.cpu_count())
    for m in ("transformers", "peft", "safetensors", "numpy", "pandas", "PIL"):
        try: env[m] = __import__(m).__version__
        except Exception as e: env[m] = f"missing ({type(e).__name__})"
    from PIL import features
    env["pillow_webp"] = features.check("webp")
    return env


def run(args) -> int:
    out = Path(args.out or os.environ.get("OUT") or GPU/"out")
    clock = Clock(args.budget_s, args.first_run_s)
    env = environment()
    log(f"gpu_study3: {json.dumps(env)}")
    bad = [m for m in ("transformers", "peft", "safetensors") if str(env[m]).startswith("missing")]
    if bad or not env["pillow_webp"]:
        raise SystemExit(f"gpu_study3: missing here: {', '.join(bad) or 'WebP support in Pillow'} (carry wheels: benchmarks/README.md)")
    info = assemble()
    log(f"gpu_study3: packs {info['packs']} brought {len(info['items'])} items in {info.get('assemble_s', 0)} s: model "
        f"{'yes' if info['model'] else 'NO'}; " + "; ".join(f"{ds} {v['train_images']} training images (seeds {v['seeds_carried']}), "
                                                        f"{v['test_images']} test" for ds, v in info["datasets"].items()))
    if not info["model"]: raise SystemExit("gpu_study3: no pack brought the model (.gpu/p1): carry it (stage) first")
    from fclora.core import FcloraError, make_config, validate_config
    from fclora.experiment import run_experiment
    runs = [r for r in study_runs(args, info) if r["dataset"] in info["datasets"]]
    summary = dict(about="Study III arms at 224 px on one GPU (benchmarks/gpu_study3.py)", environment=env, assembled=info,
                   budget_s=args.budget_s, smoke=args.smoke, runs=[])
    # which (dataset, seed) have every image they need: prepare_data's choice, checked against what arrived
    ready = {}
    for r in runs:
        validate_config(make_config("paper", r["dataset"], **r["params"]))   # every run's config, before any run starts
        k = (r["dataset"], r["seed"])
        if k not in ready: ready[k] = absent_images(make_config("paper", r["dataset"], **{**r["params"], "out_dir": None}))
    log("gpu_study3: seeds with all their images here: " + "; ".join(
        f"{ds} {[s for (d, s), n in sorted(ready.items()) if d == ds and n == 0]}" for ds in sorted({d for d, _ in ready})))
    if args.list:
        for r in runs:
            log(f"  {r['dataset']:8s} {r['arm']:13s} seed {r['seed']}  lr {r['lr']:<7g} ({r['lr_source']})  {r['epochs']} epochs "
                f"({r['epochs_source']})  {r['params']['image_size']} px {r['params']['precision']}  "
                f"{'images here' if not ready[(r['dataset'], r['seed'])] else str(ready[(r['dataset'], r['seed'])]) + ' images absent'}")
        return 0
    if not args.smoke and args.device != "cpu" and not env["cuda"]:
        raise SystemExit("gpu_study3: no CUDA device here; this is the GPU study (use --smoke for a CPU check of the script)")
    def record(r, **kw):
        summary["runs"] = [x for x in summary["runs"] if (x["dataset"], x["arm"], x["seed"]) != (r["dataset"], r["arm"], r["seed"])]
        summary["runs"].append(dict({k: r[k] for k in ("dataset", "arm", "seed", "method", "lr", "lr_source", "epochs", "epochs_source")}, **kw))
        summary["elapsed_s"] = round(clock.elapsed(), 1)
        write_outputs(out, summary, runs_dir(args))
    def on_alarm(*_): raise KeyboardInterrupt
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.budget_s + args.grace_s - clock.elapsed())))
    stopped = "every run that has its images is done"
    try:
        for unit in units(runs):
            todo = [r for r in unit if not (Path(r["params"]["out_dir"])/"results.json").exists() and ready[(r["dataset"], r["seed"])] == 0]
            for r in unit:
                if ready[(r["dataset"], r["seed"])]: record(r, status="not run: images not brought", absent_images=ready[(r["dataset"], r["seed"])])
                elif r not in todo: record(r, status="done before", **_result(r))
            if not todo: continue
            need = sum(clock.estimate(r) for r in todo)
            if need > clock.left():
                log(f"gpu_study3: {todo[0]['dataset']} {'+'.join(r['arm'] for r in todo)} seed {todo[0]['seed']}: needs ~{need:.0f} s, "
                    f"{clock.left():.0f} s left: not started")
                for r in todo: record(r, status="not run: time")
                continue
            for r in todo:
                log(f"gpu_study3: [{clock.elapsed():6.0f} s] {r['dataset']} {r['arm']} seed {r['seed']} lr {r['lr']:g} ({r['lr_source']}), "
                    f"{r['epochs']} epochs ...")
                t = time.monotonic()
                try:
                    cfg = make_config("paper", r["dataset"], **r["params"], resume=(Path(r["params"]["out_dir"])/"config.json").exists())
                    res = run_experiment(cfg)
                except FcloraError as e:   # bad input or a diverged run: this run only
                    log(f"gpu_study3: {r['arm']} seed {r['seed']}: {e}"); record(r, status=f"failed: {e}"); continue
                except Exception as e:     # anything else (the machine's packages?) would hit every run: record it and stop
                    record(r, status=f"crashed: {type(e).__name__}: {e}"); raise
                took = time.monotonic() - t
                clock.took[(r["dataset"], r["method"])] = took
                record(r, status="done", **_result(r, res))
                log(f"gpu_study3: [{clock.elapsed():6.0f} s]   test accuracy {res['test_accuracy']:.4f} in {took:.0f} s "
                    f"(scoring {res['wall_clock_s']['scoring']:.1f}, training {res['wall_clock_s']['training']:.1f}, eval {res['wall_clock_s']['eval']:.1f})")
    except KeyboardInterrupt:
        stopped = f"stopped at {clock.elapsed():.0f} s (budget {args.budget_s} s + grace {args.grace_s} s): the run in progress was interrupted"
        log(f"gpu_study3: {stopped}")
        for r in runs:
            if not any((x["dataset"], x["arm"], x["seed"]) == (r["dataset"], r["arm"], r["seed"]) for x in summary["runs"]):
                summary["runs"].append(dict({k: r[k] for k in ("dataset", "arm", "seed", "lr", "epochs")}, status="not run: stopped"))
    finally:
        signal.alarm(0)
    if stopped.startswith("every") and (n := sum(x["status"] == "not run: time" for x in summary["runs"])):
        stopped = f"the time budget ({args.budget_s} s) left {n} runs unstarted"
    summary["stopped"] = stopped
    record_done = [x for x in summary["runs"] if x["status"] in ("done", "done before")]
    summary["elapsed_s"] = round(clock.elapsed(), 1)
    write_outputs(out, summary, runs_dir(args))
    log(f"gpu_study3: {len(record_done)} runs finished, {stopped}; {clock.elapsed():.0f} s; outputs in {out}")
    for ds in STUDIES:
        acc = {(x["arm"], x["seed"]): x["test_accuracy"] for x in record_done if x["dataset"] == ds}
        pairs = sorted(s for (a, s) in acc if a == "fclora" and ("lora", s) in acc)
        if pairs:
            diff = [acc[("fclora", s)] - acc[("lora", s)] for s in pairs]
            log(f"gpu_study3: {ds}: fclora - lora test accuracy by seed {dict(zip(pairs, np.round(diff, 4).tolist()))}, mean {np.mean(diff):+.4f}")
    return 0


def _result(r:dict, res:dict|None=None) -> dict:
    if res is None:
        f = Path(r["params"]["out_dir"])/"results.json"
        res = json.loads(f.read_text())
    return dict(test_accuracy=res["test_accuracy"], ece_scaled=res["ece_scaled"], test_loss=res["test_loss"],
                wall_clock_s={k: round(v, 1) for k, v in res["wall_clock_s"].items()}, peak_memory_mb=round(res["peak_memory_mb"], 1),
                device=res["device"], ranks_max=max(res["ranks"].values()) if res["ranks"] else None, n_train=res["n_train"], n_test=res["n_test"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["stage", "run"])
    p.add_argument("--budget-s", type=float, default=540, help="stop starting runs that would not finish by then (default 540: "
                   "the device's 600 s call limit less a minute for start-up and outputs)")
    p.add_argument("--grace-s", type=float, default=30, help="interrupt a run still going at budget + grace")
    p.add_argument("--first-run-s", type=float, default=75, help="the time a run is assumed to take before one has been measured")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--epochs", type=int, default=7, help="only where the CPU study has no schedule run (provisional)")
    p.add_argument("--lr", action="append", default=[], metavar="ARM=RATE", help="an arm's rate where the CPU study has not chosen one (provisional)")
    p.add_argument("--arms", type=lambda s: s.split(","), default=None, help="comma-separated arm names (default: all of the design's)")
    p.add_argument("--datasets", type=lambda s: s.split(","), default=None, help="cifar10,cifar100 (default both)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None, help="comma-separated (default: the design's)")
    p.add_argument("--out", default=None, help="where gpu_study3.json and the runs' tarball go (default $OUT, else .gpu/out)")
    p.add_argument("--list", action="store_true", help="list the runs in order (rate, epochs, their sources, whether their images are here); run nothing")
    p.add_argument("--smoke", action="store_true", help="a CPU check of this path: 28 px, float32, seed 0, a few images, 1 epoch")
    args = p.parse_args(argv)
    os.chdir(REPO)
    if args.smoke:
        args.seeds = args.seeds or [0]
        args.device, args.precision, args.image_size = "cpu", "fp32", SMOKE["image_size"]
    if args.command == "stage":
        info = assemble()
        log(json.dumps({k: v for k, v in info.items() if k != "key"}, indent=1))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
