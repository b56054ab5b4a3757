"""Notebooks and library agree: `nbdev_export` would change nothing in fclora/, and `nbdev_clean`
would change no notebook.

Both commands run on a temporary copy of the project, so the tests never write to the working
tree (safe while someone is editing notebooks) and tolerate a dirty git tree: they compare file
hashes, not git state.
"""
import hashlib, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # nbdev's console scripts live next to this python


def hashes(folder: Path, pattern='**/*'):
    "{relative path: sha256} of the files under `folder` (no caches)."
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.glob(pattern) if p.is_file() and '__pycache__' not in p.parts}


def changed(before, after): return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.fixture
def copy(tmp_path):
    "The files nbdev reads and writes, copied to a temporary project."
    for f in ('settings.ini', 'setup.py', 'pyproject.toml'): shutil.copy2(ROOT/f, tmp_path/f)
    shutil.copytree(ROOT/'nbs', tmp_path/'nbs', ignore=shutil.ignore_patterns('.*', '_*'))
    shutil.copytree(ROOT/'fclora', tmp_path/'fclora', ignore=shutil.ignore_patterns('__pycache__'))
    return tmp_path


def test_export_leaves_library_unchanged(copy):
    subprocess.run([BIN/'nbdev_export'], cwd=copy, check=True)
    diff = changed(hashes(ROOT/'fclora'), hashes(copy/'fclora'))
    assert not diff, f'nbdev_export would change fclora/{diff}: run nbdev_export'


def test_clean_leaves_notebooks_unchanged(copy):
    before = hashes(copy/'nbs', '*.ipynb')
    subprocess.run([BIN/'nbdev_clean'], cwd=copy, check=True)
    diff = changed(before, hashes(copy/'nbs', '*.ipynb'))
    assert not diff, f'nbdev_clean would change nbs/{diff}: run nbdev_clean'
