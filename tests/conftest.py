"""Shared helpers for the tests that cross process boundaries: the `fclora` command, papermill runs,
the docs build (`tools/docs.py`, built once per session for test_docs and test_browser)."""
import json, os, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent           # console scripts of this environment
SHARED = ROOT.parent/"shared"               # read-only real data and model, when present
# pytest runs two workers (pyproject.toml: -n 2) on the 2 cores CI has, so each command gets one thread; runs that are
# compared with each other (resume, same seed twice) get the same number, which is all their equality needs
THREADS = os.environ.get("OMP_NUM_THREADS", "1")

# No test fails for being slow. Every wall-clock limit in these tests is a hang guard: about 10x (or more) what the step
# takes on 2 idle cores, so a slow, busy or emulating machine still passes (tools/busy_ci.sh checks it), and
# FCLORA_TEST_TIMEOUT_SCALE=N multiplies them all for a machine slower still.
TIMEOUT_SCALE = float(os.environ.get("FCLORA_TEST_TIMEOUT_SCALE") or 1)


def hang_guard(seconds:float) -> float:
    "A hang guard's limit: `seconds` (about 10x the step's idle time) x FCLORA_TEST_TIMEOUT_SCALE."
    return seconds * TIMEOUT_SCALE


def hung(what:str, limit:float, took:float) -> str:
    "The message of a hang guard that fired: what hung, how long it ran, and how to allow more."
    return (f"hang guard: {what} was still running after {took:.0f} s (its limit, {limit:.0f} s, is about 10x its time on "
            f"2 idle cores, so this looks like a hang, not a slow machine; if the machine is that slow, raise every limit "
            f"with FCLORA_TEST_TIMEOUT_SCALE=N)")


def run_guarded(cmd, what:str, limit:float, **kw) -> subprocess.CompletedProcess:
    "`subprocess.run(cmd, capture_output=True, text=True, **kw)` under a hang guard of `limit` s: a hang fails the test, saying so."
    t0, limit = time.monotonic(), hang_guard(limit)
    try: return subprocess.run(cmd, capture_output=True, text=True, timeout=limit, **kw)
    except subprocess.TimeoutExpired: pytest.fail(hung(what, limit, time.monotonic() - t0), pytrace=False)


def fclora(*args, cwd=None, timeout=900, env=None):
    "Run the `fclora` command (`timeout`: its hang guard, scaled); return the CompletedProcess (text)."
    e = dict(os.environ, OMP_NUM_THREADS=THREADS, **(env or {}))
    return run_guarded([str(BIN/"fclora"), *map(str, args)], f"`fclora {' '.join(map(str, args[:3]))} ...`", timeout, cwd=cwd, env=e)


def in_process(cli_args, **overrides) -> dict:
    """What `fclora CLI_ARGS` (a `run` command) would run, run here by `run_experiment` with `overrides`, on THREADS threads
    like the commands: the same `Config`, read by fclora's own parser, without a kernel's ~15 s of imports."""
    import torch
    from fclora.cli import _parser, config_overrides
    from fclora.core import make_config
    from fclora.experiment import run_experiment
    args = _parser().parse_args([str(a) for a in cli_args])
    cfg = make_config(args.preset, args.experiment, **{**config_overrides(args), **{k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()}})
    threads = torch.get_num_threads()
    torch.set_num_threads(int(THREADS))
    try: return run_experiment(cfg)
    finally: torch.set_num_threads(threads)


def one_line_error(proc):
    "Assert the process failed on bad input: exit 2, one line on stderr, no traceback."
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.startswith("fclora: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def prose(path) -> str:
    "A page's text, one space between words, without markdown emphasis; of a notebook, its markdown cells."
    text = Path(path).read_text()
    if Path(path).suffix == ".ipynb": text = " ".join("".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "markdown")
    return " ".join(text.replace("*", "").split())


def quoted(row):
    "A decision_table row as the pages word it: '+1.01 points (95% CI +0.27 .. +1.75', a few words allowed between."
    import re
    interval = re.escape(f"95% CI {row['CI low']:+.2f} .. {row['CI high']:+.2f}")
    return re.compile(re.escape(f"{row['A - B']:+.2f} points") + ".{0,40}" + interval)


@pytest.fixture
def shared():
    if not (SHARED/"models/vit-small-patch14-imgfocus/config.json").exists(): pytest.skip("../shared is absent")
    return SHARED


def results(out_dir):
    return json.loads((Path(out_dir)/"results.json").read_text())


def docs(*args, timeout):
    "Run `python tools/docs.py ARGS` (`timeout`: its hang guard, scaled); return the CompletedProcess (text)."
    return run_guarded([sys.executable, str(ROOT/"tools"/"docs.py"), *args], f"`tools/docs.py {' '.join(args)}`", timeout, cwd=ROOT)


@pytest.fixture(scope="session")
def docs_site(tmp_path_factory):
    """Build the offline docs site once per test run into a folder of its own (not _docs/, which another session or a
    developer's build may be replacing while this one's pages are checked); return the folder. The pytest workers
    (test_docs and test_browser may land on both) share one build: the first builds it under a lock, the other waits."""
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"): root = root.parent      # the folder the workers of this run share
    dest, t0 = root/"docs-site"/"_docs", time.monotonic()
    with FileLock(str(root/"docs-site.lock")):
        if not (dest.parent/"built").exists():
            dest.parent.mkdir(exist_ok=True)
            # about 1-2 min on 2 idle cores (nbdev runs every notebook cell that imports something: keep imports in their
            # own cells, away from slow code); 6 min on 2 busy ones
            r = docs("site", "--offline", "--dest", str(dest), timeout=1800)
            print(f"docs site built in {time.monotonic() - t0:.0f} s")
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
            (dest.parent/"built").touch()
    return dest


# The default run (pyproject.toml: -m 'not slow') keeps one check of each process boundary (a `fclora run` through
# papermill, the `fclora` command, `--nproc 2` against one process, the docs site in Chromium, a saved adapter reloaded
# by stock peft, the text notebook, bad input and the bf16 refusal in one line) so that the README's test command fits
# 10 minutes on 2 idle cores, install included; `slow` marks the longer cross-process checks of the same paths (sweeps,
# two torchrun nodes, resume after a kill, the plan in a fresh process, the wheel, JupyterLab, every page in Chromium):
# `pytest tests -m slow` runs them, `pytest tests -m ''` runs everything.
slow = pytest.mark.slow

