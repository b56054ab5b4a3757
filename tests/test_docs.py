"""The docs build: an offline site with a page (and API docs) per notebook, and a README in sync.

The site test runs `python tools/docs.py site --offline` (nbdev's docs processing + nbconvert, no
Quarto) into _docs/ (gitignored). It takes ~15 s on 16 cores from cold, and is failed past 3 minutes.
"""
import ast, json, re
from pathlib import Path

import pytest

from conftest import docs

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
NOTEBOOKS = sorted(p for p in NBS.glob('*.ipynb') if p.stem == 'index' or p.stem[:2].isdigit())
NUMBERED = [p for p in NOTEBOOKS if p.stem != 'index']


@pytest.fixture(scope='module')
def site(docs_site):  # built once per session (conftest.py), shared with test_browser.py
    return docs_site


def default_exp(nb: Path):
    "The module a notebook exports to (its `#| default_exp`), or None."
    for cell in json.loads(nb.read_text(encoding='utf-8'))['cells']:
        m = re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(cell['source']), re.M)
        if cell['cell_type'] == 'code' and m: return m.group(1)


def exported_names(module):
    "Public top-level names that fclora/_modidx.py lists for `fclora.<module>`."
    tree = ast.parse((ROOT/'fclora'/'_modidx.py').read_text())
    d = ast.literal_eval(next(n.value for n in tree.body if isinstance(n, ast.Assign)))
    prefix = f'fclora.{module}.'
    return [k[len(prefix):] for k in d['syms'].get(f'fclora.{module}', {})
            if '.' not in k[len(prefix):] and not k[len(prefix):].startswith('_')]


def test_every_notebook_has_a_page(site):
    assert (site/'index.html').exists()
    index = (site/'index.html').read_text(encoding='utf-8')
    for nb in NOTEBOOKS:
        page = site/f'{nb.stem}.html'
        assert page.exists(), f'no page for {nb.name}'
        assert f'href="{nb.stem}.html"' in index, f'index.html has no link to {page.name}'
        assert re.search(r'<title>[^<]+</title>', page.read_text(encoding='utf-8'))


@pytest.mark.parametrize('nb', NUMBERED, ids=lambda p: p.stem)
def test_pages_have_api_docs(site, nb):
    names = exported_names(default_exp(nb)) if default_exp(nb) else []
    if not names: pytest.skip(f'{nb.name} exports nothing')
    html = (site/f'{nb.stem}.html').read_text(encoding='utf-8')
    shown = [n for n in names if re.search(rf'<h[2-4][^>]*>\s*{re.escape(n)}\b', html)]
    assert shown, f'{nb.stem}.html has no show_doc heading for any of {names}'


def test_readme_in_sync():
    r = docs('readme', '--check', timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_tables_are_markdown():
    "GitHub drops <style> blocks: the README's tables are Markdown tables, not pandas HTML."
    readme = (ROOT/'README.md').read_text(encoding='utf-8')
    assert '<style' not in readme and '<table' not in readme, 'README.md has HTML tables: python tools/docs.py readme'
    assert re.search(r'^\| method \|.*\n\|---\|', readme, re.M), 'README.md has no Markdown results table'
