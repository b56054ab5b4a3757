"""Shared helpers for the tests that cross process boundaries: the `fclora` command, papermill runs,
the docs build (`tools/docs.py`, built once per session for test_docs and test_browser)."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent           # console scripts of this environment
SHARED = ROOT.parent/"shared"               # read-only real data and model, when present
# pytest runs two workers (pyproject.toml: -n 2) on the 2 cores CI has, so each command gets one thread; runs that are
# compared with each other (resume, same seed twice) get the same number, which is all their equality needs
THREADS = os.environ.get("OMP_NUM_THREADS", "1")


def fclora(*args, cwd=None, timeout=900, env=None):
    "Run the `fclora` command; return the CompletedProcess (text)."
    e = dict(os.environ, OMP_NUM_THREADS=THREADS, **(env or {}))
    return subprocess.run([str(BIN/"fclora"), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e)


def one_line_error(proc):
    "Assert the process failed on bad input: exit 2, one line on stderr, no traceback."
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.startswith("fclora: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture
def shared():
    if not (SHARED/"models/vit-small-patch14-imgfocus/config.json").exists(): pytest.skip("../shared is absent")
    return SHARED


def results(out_dir):
    return json.loads((Path(out_dir)/"results.json").read_text())


def docs(*args, timeout):
    "Run `python tools/docs.py ARGS`; return the CompletedProcess (text)."
    return subprocess.run([sys.executable, str(ROOT/"tools"/"docs.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def docs_site(tmp_path_factory):
    """Build the offline docs site once per test session into a folder of its own (not _docs/, which another
    session or a developer's build may be replacing while this one's pages are checked); return the folder."""
    dest = tmp_path_factory.mktemp("docs")/"_docs"
    try: r = docs("site", "--offline", "--dest", str(dest), timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("docs site build took over 3 minutes: nbdev runs every notebook cell that imports "
                    "something, so keep imports in their own cells, away from slow code")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return dest
