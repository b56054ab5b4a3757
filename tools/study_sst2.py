"""The MiniLM/SST-2 study (issue 23) in two phases, by rules fixed in its `design.json` before any result.

1. selection: every arm at each rate of its `lr_grid` on the selection seed (`select-arms.json`); the best final
   validation accuracy picks each arm's rate (`fclora.report.select_lr`; ties: the smaller rate). Their test numbers
   are not used.
2. evaluation: `arms.json`'s arms on their seeds, each once its rate is chosen (the rate is written into `arms.json`
   then, so `fclora sweep sst2 --arms arms.json` runs the same): the primary pair (fclora, lora) first, seed by seed.

Every phase is a function of the design and the committed runs, so any session (or two sweeps side by side) continues it.

    python tools/study_sst2.py status                  # what is done, the rates chosen so far, what is next
    OMP_NUM_THREADS=1 python tools/study_sst2.py run   # run what is left, in order (resumable)
    OMP_NUM_THREADS=1 python tools/study_sst2.py run --publish ../main   # also copy each finished run there and commit it
    python tools/study_sst2.py tables                  # runs.csv and aggregate.csv of the evaluation runs committed so far
"""
import json, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from study3 import _lr_name, _results, main, publish, publish_tables, tables   # the Study III driver's run reading, publishing, tables, command line

FOLDER = Path("results/study-minilm-sst2")
PRIMARY = ("fclora", "lora")


def design(folder=FOLDER) -> dict: return json.loads((Path(folder)/"design.json").read_text())


def chosen_lrs(folder=FOLDER) -> dict:
    "The selection's answers so far: {arm: rate} for each arm whose grid runs are all done."
    from fclora.report import select_lr
    d, out = design(folder), {}
    for arm, lrs in d["lr_grid"].items():
        rs = {lr: _results(folder, f"select-{arm}-lr{_lr_name(lr)}", d["selection_seed"]) for lr in lrs}
        if all(r is not None for r in rs.values()): out[arm] = select_lr({lr: r["history"][-1]["val_acc"] for lr, r in rs.items()})
    return out


def evaluation_arms(folder=FOLDER) -> tuple[dict, dict]:
    "(settings, arms with a chosen rate) of `arms.json`, after writing each chosen rate into it."
    f = Path(folder)/"arms.json"
    spec, lrs = json.loads(f.read_text()), chosen_lrs(folder)
    new = dict(spec, arms={a: dict(o, **({"lr": lrs[a]} if a in lrs else {})) for a, o in spec["arms"].items()})
    if new != spec: f.write_text(json.dumps(new, indent=1) + "\n")
    return new["settings"], {a: o for a, o in new["arms"].items() if "lr" in o}


def pending(folder=FOLDER) -> list[tuple[str, int, dict, dict]]:
    "(arm, seed, overrides, settings) of every run not yet done whose phase is known, the primary pair's runs first."
    from fclora.cli import load_arms, sweep_runs
    todo = []
    for phase, (settings, arms) in enumerate((load_arms(Path(folder)/"select-arms.json"), evaluation_arms(folder))):
        for arm, seed, over in sweep_runs(arms, [0]):
            if _results(folder, arm, seed) is None:
                todo.append((over["method"] not in PRIMARY or "targets" in over, phase, seed, arm, over, settings))
    return [(arm, seed, over, settings) for _, _, seed, arm, over, settings in sorted(todo, key=lambda t: t[:4])]


def status(folder=FOLDER):
    from fclora.cli import load_arms, sweep_runs
    print(f"learning rates chosen: {chosen_lrs(folder) or 'none yet'}")
    for phase, f in (("selection", "select-arms.json"), ("evaluation", "arms.json")):
        runs = sweep_runs(load_arms(Path(folder)/f)[1], [0])
        print(f"  {phase}: {sum(_results(folder, a, s) is not None for a, s, _ in runs)} of {len(runs)} runs done")
    print(f"next: {', '.join(f'{a}-seed{s}' for a, s, _, _ in pending(folder)[:4]) or 'nothing (the study is done)'}")


def run(dest=None, folder=FOLDER):
    from fclora.cli import sweep
    while True:
        left = pending(folder)
        if not left: print("SST-2 study: every known run is done"); return
        for arm, seed, over, settings in left:
            if not sweep("sst2", {arm: dict(over, seeds=[seed])}, [seed], str(folder), settings): continue   # claimed elsewhere
            if dest and (Path(folder)/f"{arm}-seed{seed}"/"results.json").exists():
                publish(folder, arm, seed, dest, label="issue 23: MiniLM/SST-2 study")
                if not arm.startswith("select-"): publish_tables(Path(dest)/folder, dest, "issue 23: MiniLM/SST-2 study tables")
            break   # a rate may have been chosen: look again
        else: print("SST-2 study: what is left runs in another sweep"); return


if __name__ == "__main__": main(__doc__, "study_sst2", status, run, lambda: tables(FOLDER))
