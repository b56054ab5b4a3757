"""`fclora run` from an installed package, not a clone: the wheel built from this checkout, installed with no
dependencies into a fresh venv that sees the test environment's third-party packages (torch, transformers, ...) but
not this repository, then `fclora run cifar10 --preset quick` from a folder outside the clone."""
import os, subprocess, sys
from pathlib import Path

from conftest import ROOT, THREADS, slow


def sh(*args, **kw):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert p.returncode == 0, (args, p.stdout[-2000:], p.stderr[-3000:])
    return p.stdout


@slow
def test_wheel_runs_an_experiment_outside_the_clone(tmp_path):
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path/"dist", ROOT, cwd=tmp_path)
    wheel, = (tmp_path/"dist").glob("fclora-*.whl")
    venv = tmp_path/"venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv/"bin"/"python"
    site = Path(sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # the third-party packages of this environment, as plain paths: no .pth of theirs runs, so no editable fclora comes with them
    theirs = [p for p in sys.path if p.endswith("site-packages") and not (Path(p)/"fclora").is_dir()]
    (site/"_deps.pth").write_text("\n".join(theirs) + "\n")
    sh(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q", wheel, cwd=tmp_path)
    where = sh(py, "-c", "import fclora, fclora.cli as c; print(fclora.__file__); print(c.notebook_path('sst2'))", cwd=tmp_path).split()
    assert all(Path(w).is_relative_to(venv) for w in where), where                      # the installed copy, its own notebooks
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, PATH=f"{venv/'bin'}:{os.environ['PATH']}")
    out = sh(venv/"bin"/"fclora", "run", "cifar10", "--preset", "quick", "--epochs", "1", "--no-progress", "--out-dir", tmp_path/"run",
             cwd=tmp_path, env=env)
    assert (tmp_path/"run"/"results.json").is_file() and (tmp_path/"run"/"10_cifar10.ipynb").is_file(), out
