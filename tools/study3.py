"""Study III (issue 22): each dataset's study in three phases, by rules fixed in its `design.json` before any result.

1. schedule: uniform LoRA on the selection seed for `max_epochs`; its validation curve picks the epochs
   (`fclora.report.select_epochs`: the shortest within `tol` of the best).
2. lr grid: every arm of `lr_grid` at those epochs, one run per rate, on the selection seed; the best final
   validation accuracy picks each arm's rate (`fclora.report.select_lr`).
3. evaluation: the arms of `design.json` at the chosen epochs and rates, on their evaluation seeds, written to
   `arms.json` (what `fclora sweep --arms` runs) when the phase starts.

Selection runs score only `selection_test_subset` test images: their test numbers are not used and not reported.
Every phase is a function of the design and the committed runs, so any session (or `fclora sweep --arms`) continues it.

    python tools/study3.py status                    # what is done, what is next, the choices made so far
    OMP_NUM_THREADS=1 python tools/study3.py run     # run what is left, in order (resumable; two side by side share the work)
    OMP_NUM_THREADS=1 python tools/study3.py run --publish ../main   # also copy each finished run there and commit it
    OMP_NUM_THREADS=1 python tools/study3.py run --until 17:30       # start only runs expected to end by then (leased hosts)
    python tools/study3.py tables                    # each dataset's runs.csv and aggregate.csv of the evaluation runs so far
"""
import argparse, inspect, json, shutil, subprocess, sys, time
from pathlib import Path

STUDIES = {"cifar10": "results/study3-vits-cifar10", "cifar100": "results/study3-vits-cifar100"}
RUN_FILES = ("results.json", "config.json", "plan.json", "predictions.npz")   # and the executed notebook: what is committed


def design(folder) -> dict: return json.loads((Path(folder)/"design.json").read_text())
def _results(folder, arm, seed):
    f = Path(folder)/f"{arm}-seed{seed}"/"results.json"
    return json.loads(f.read_text()) if f.exists() else None
def _lr_name(lr): return f"{lr:g}"


def schedule_arm(d) -> tuple[str, dict]:
    s = d["schedule"]
    return f"select-{s['arm']}-e{s['max_epochs']}-lr{_lr_name(s['lr'])}", dict(method=s["arm"], lr=s["lr"], epochs=s["max_epochs"])


def chosen_epochs(folder, d) -> int|None:
    "Phase 1's answer: the epochs, or None until the schedule run is done."
    from fclora.report import select_epochs
    r = _results(folder, schedule_arm(d)[0], d["selection_seed"])
    return None if r is None else select_epochs([h["val_acc"] for h in r["history"]], d["schedule"]["tol"])


def grid_arms(d, epochs:int) -> dict:
    "Phase 2: {arm name: overrides} of every (arm, rate) of the grid."
    return {f"select-{arm}-lr{_lr_name(lr)}": dict(d["arms"][arm], lr=lr, epochs=epochs)
            for arm, lrs in d["lr_grid"].items() for lr in lrs}


def chosen_lrs(folder, d, epochs:int) -> dict:
    "Phase 2's answers so far: {arm: rate} for each arm of the grid whose runs are all done."
    from fclora.report import select_lr
    val = {}
    for arm, lrs in d["lr_grid"].items():
        rs = {lr: _results(folder, f"select-{arm}-lr{_lr_name(lr)}", d["selection_seed"]) for lr in lrs}
        if all(r is not None for r in rs.values()):
            val[arm] = select_lr({lr: r["history"][-1]["val_acc"] for lr, r in rs.items()})
    return val


def eval_arms(d, epochs:int, lrs:dict) -> dict:
    "Phase 3: the design's arms whose rate is chosen, at the chosen epochs and rates (`lr_from`: another arm's rate)."
    arms = {}
    for name, a in d["arms"].items():
        a = dict(a); lr_from = a.pop("lr_from", name)
        if lr_from in lrs: arms[name] = dict(a, epochs=epochs, lr=lrs[lr_from], seeds=a["seeds"])
    return arms


def phases(folder) -> list[tuple[str, dict, dict]]:
    "[(phase, settings, arms)] of the phases whose inputs are known, in order; writes arms.json when phase 3 is known."
    d = design(folder)
    sel = dict(d["settings"], test_subset=d["selection_test_subset"])
    name, over = schedule_arm(d)
    out = [("schedule", sel, {name: dict(over, seeds=[d["selection_seed"]])})]
    if (epochs := chosen_epochs(folder, d)) is None: return out
    out.append(("lr grid", sel, {a: dict(o, seeds=[d["selection_seed"]]) for a, o in grid_arms(d, epochs).items()}))
    if not (arms := eval_arms(d, epochs, chosen_lrs(folder, d, epochs))): return out
    spec = dict(about=f"Study III evaluation arms, written by tools/study3.py from design.json and the selection runs "
                      f"(epochs {epochs} from the schedule run, each arm's learning rate from the lr grid; an arm appears once its rate is chosen).",
                settings=d["settings"], arms=arms)
    f = Path(folder)/"arms.json"
    if not f.exists() or json.loads(f.read_text()) != spec: f.write_text(json.dumps(spec, indent=1) + "\n")
    return out + [("evaluation", d["settings"], arms)]


PRIMARY = ("lora", "fclora")   # the primary pair: its runs come first, so a study cut short loses secondary runs only


def _primary(d, arm:str) -> bool:
    "Whether a run of `arm` (an evaluation arm, or a selection run) serves the primary pair."
    base = arm.removeprefix("select-").rsplit("-lr", 1)[0].split("-e")[0] if arm.startswith("select-") else arm
    return base in PRIMARY


def pending(root=".") -> list[tuple[str, str, str, int, dict, dict]]:
    """(dataset, folder, arm, seed, overrides, settings) of every run not yet done whose phase is known: the primary
    pair's runs first, then by phase, then seed by seed (both datasets' pairs grow evenly)."""
    from fclora.cli import sweep_runs
    todo = []
    for rank, phase in enumerate(("schedule", "lr grid", "evaluation")):
        for ds, folder in STUDIES.items():
            folder, d = Path(root)/folder, design(Path(root)/folder)
            for ph, settings, arms in phases(folder):
                if ph != phase: continue
                for arm, seed, over in sweep_runs(arms, [0]):
                    if _results(folder, arm, seed) is None:
                        todo.append((not _primary(d, arm), rank, seed, ds, str(folder), arm, over, settings))
    todo.sort(key=lambda t: t[:3])
    return [(ds, folder, arm, seed, over, settings) for _, _, seed, ds, folder, arm, over, settings in todo]


def status():
    for ds, folder in STUDIES.items():
        d = design(folder)
        epochs = chosen_epochs(folder, d)
        print(f"{ds}: epochs {'not chosen yet' if epochs is None else epochs}", end="")
        lrs = chosen_lrs(folder, d, epochs) if epochs else {}
        print(f"; learning rates {lrs or 'not chosen yet'}")
        for ph, _, arms in phases(folder):
            from fclora.cli import sweep_runs
            runs = sweep_runs(arms, [0])
            done = sum(_results(folder, a, s) is not None for a, s, _ in runs)
            print(f"  {ph}: {done} of {len(runs)} runs done")
    left = pending()
    print(f"next: {', '.join(f'{ds} {a}-seed{s}' for ds, _, a, s, _, _ in left[:4]) or 'nothing (the known phases are done)'}")


def publish(folder, arm, seed, dest, label="issue 22: study III"):
    "Copy a finished run (and the study's phase files) into the checkout `dest` and commit them there (message: `label` + the run)."
    src, paths = Path(folder)/f"{arm}-seed{seed}", []
    for f in [*(src/n for n in RUN_FILES), *src.glob("*.ipynb"), *(Path(folder)/n for n in ("arms.json",))]:
        if not f.exists(): continue
        to = Path(dest)/f
        to.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, to); paths.append(str(f))
    for attempt in range(20):   # another git command in dest may hold its index lock for a moment
        add = subprocess.run(["git", "-C", str(dest), "add", "--", *paths], capture_output=True, text=True)
        com = subprocess.run(["git", "-C", str(dest), "commit", "-q", "-m", f"{label} {Path(folder).name} {arm}-seed{seed}",
                              "--", *paths], capture_output=True, text=True) if add.returncode == 0 else add
        if com.returncode == 0: return
        if "index.lock" not in com.stderr: print(f"publish: {com.stderr.strip()}", file=sys.stderr); return
        time.sleep(3)


def tables(folder=None):
    "Write `runs.csv` and `aggregate.csv` of the evaluation runs committed in `folder` (default: both datasets'; `fclora compare`)."
    from fclora.cli import compare
    for folder in ([folder] if folder else STUDIES.values()):
        runs = sorted(str(f.parent) for f in Path(folder).glob("*-seed*/results.json") if not f.parent.name.startswith("select-"))
        if runs: compare(runs, csv=str(Path(folder)/"runs.csv"), agg_csv=str(Path(folder)/"aggregate.csv"))


def publish_tables(folder, dest, label="issue 22: study III tables"):
    "Rewrite the tables of the runs committed in checkout `dest` and commit them there (the tests check they agree)."
    tables(folder)
    files = [str(Path(folder)/n) for n in ("runs.csv", "aggregate.csv")]
    subprocess.run(["git", "-C", str(dest), "add", "--", *files], capture_output=True)
    subprocess.run(["git", "-C", str(dest), "commit", "-q", "-m", label, "--", *files], capture_output=True)


def expected_s(folder, over:dict, settings:dict) -> float|None:
    """Seconds a run should take here: the median committed run of its dataset on this CPU (of its method where there
    are some) without evaluation, plus the median evaluation of any study's runs on this CPU with as many test images
    (else scaled per image); +10% and two minutes. None: no such run."""
    import statistics, torch
    cpu, n_test = torch.backends.cpu.get_cpu_capability(), over.get("test_subset", settings["test_subset"])
    here = lambda fs: [r for f in fs if (r := json.loads(f.read_text()))["host"].get("cpu_capability") == cpu]
    runs, every = here(Path(folder).glob("*-seed*/results.json")), here(Path(folder).parent.glob("study3-*/*-seed*/results.json"))
    like = [r for r in runs if r["method"] == over["method"]] or runs
    if not like: return None
    fit = statistics.median(r["wall_clock_s"]["total"] - r["wall_clock_s"]["eval"] for r in like)
    same = [r["wall_clock_s"]["eval"] for r in every if r["config"]["test_subset"] == n_test]
    ev = statistics.median(same) if same else n_test*statistics.median(r["wall_clock_s"]["eval"]/r["config"]["test_subset"] for r in every)
    return 1.1*(fit + ev) + 120


def _deadline(until:str) -> float:
    "`HH:MM` (the next such time, local) or an ISO date-time, as a timestamp."
    import datetime as dt
    try: t = dt.datetime.fromisoformat(until) if "T" in until or "-" in until else None
    except ValueError: t = None
    if t is None:
        try: h, m = map(int, until.split(":"))
        except ValueError: raise SystemExit(f"study3: error: --until {until!r}: expected HH:MM or an ISO date-time")
        now = dt.datetime.now(); t = now.replace(hour=h, minute=m, second=0, microsecond=0)
        if t <= now: t += dt.timedelta(days=1)
    return t.timestamp()


def run(dest=None, until:str|None=None):
    "Run what is left, in order; with `until`, start only runs expected to end by then (`expected_s`), and stop when none does."
    from fclora.cli import sweep
    end = _deadline(until) if until else None
    while True:
        left = pending()
        if not left: print("study III: every known run is done"); return
        started, late, guess = False, 0, {}
        for ds, folder, arm, seed, over, settings in left:
            if end:   # one estimate per dataset, method and test-set size: they read every committed run
                key = (folder, over["method"], over.get("test_subset", settings["test_subset"]))
                if key not in guess: guess[key] = expected_s(folder, over, settings)
                if guess[key] is None or time.time() + guess[key] > end: late += 1; continue
            outs = sweep(ds, {arm: dict(over, seeds=[seed])}, [seed], folder, settings)
            if not outs: continue   # claimed by the other sweep
            started = True
            if dest and (Path(folder)/f"{arm}-seed{seed}"/"results.json").exists():
                publish(folder, arm, seed, dest)
                if not arm.startswith("select-"): publish_tables(Path(dest)/folder, dest)
            break   # the phases may have moved on: look again
        if not started:
            print(f"study III: {'no run left is expected to end by ' + until if late else 'what is left runs in another sweep'}"); return


def main(doc:str, name:str, status, run, tables=None):
    "A study driver's command line: `status`, `run [--publish CHECKOUT]` (or `tables`); interrupts and user errors end in one line."
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("command", choices=["status", "run"] + (["tables"] if tables else []))
    p.add_argument("--publish", default=None, metavar="CHECKOUT", help="copy each finished run into this checkout and commit it")
    if "until" in inspect.signature(run).parameters:
        p.add_argument("--until", default=None, metavar="HH:MM", help="start only runs expected to end by then (from the committed runs' times on this CPU)")
    a = p.parse_args()
    try: {"status": status, "run": lambda: run(a.publish, **({"until": a.until} if getattr(a, "until", None) else {})), "tables": tables}[a.command]()
    except KeyboardInterrupt: print(f"{name}: interrupted; the last checkpoint is kept: run again to continue", file=sys.stderr); sys.exit(130)
    except Exception as e:
        if type(e).__name__ != "FcloraError": raise
        print(f"{name}: error: {e}", file=sys.stderr); sys.exit(2)


if __name__ == "__main__": main(__doc__, "study3", status, run, tables)
