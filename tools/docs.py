#!/usr/bin/env python
"""Build fclora's README.md and documentation site from the notebooks in nbs/.

    python tools/docs.py readme            # README.md from nbs/index.ipynb (no Quarto needed)
    python tools/docs.py readme --check    # exit 1 if README.md is out of date
    python tools/docs.py site              # nbdev_docs if Quarto is installed, else an offline site
    python tools/docs.py site --offline    # always the offline site: _docs/<notebook>.html
    python tools/docs.py site --offline --dest DIR   # ... into another folder (the tests use a temporary one)
    python tools/docs.py execute [NAMES]   # run notebooks in place so the docs show their figures

Both commands first run nbdev's own docs processing on each notebook (the same
`FilterDefaults` processors `nbdev_docs` uses): hidden cells go, `show_doc` cells are
added for exported names and executed, front matter is read from the `# Title` /
`> summary` cell. Saved outputs (figures) are kept; nothing else is executed.
Then nbconvert turns the processed notebooks into GitHub markdown or HTML.
"""
import argparse, hashlib, html, json, os, re, shutil, subprocess, sys, tarfile, tempfile, warnings
from html.parser import HTMLParser
from pathlib import Path

sys.modules.setdefault("rfc3987_syntax", None)   # as `fclora`'s command does: nbformat's jsonschema would spend ~8 s compiling
import nbformat, yaml                            # an IRI grammar at import (jsonschema#1428) that no notebook needs
from jinja2 import DictLoader
from nbconvert import HTMLExporter, MarkdownExporter

ROOT = Path(__file__).resolve().parents[1]
NBS, DOCS, CACHE = ROOT/'nbs', ROOT/'_docs', ROOT/'.cache'
MATHJAX_CDN = 'https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js'


# ---------------------------------------------------------------- notebook processing

def load(text):
    "Parse notebook JSON; cells that nbdev inserted get an id (nbformat warns without one)."
    nb = json.loads(text)
    for i, cell in enumerate(nb['cells']): cell.setdefault('id', f'cell-{i}')
    return nbformat.reads(json.dumps(nb), as_version=4)


def process(src: Path):
    "Run nbdev's docs processors on one notebook in this process; return an nbformat notebook."
    from execnb.nbio import read_nb, nb2str
    from nbdev.processors import FilterDefaults
    os.environ['IN_TEST'] = '1'  # as nbdev's own docs worker (nbdev.serve_drv) does
    nb = read_nb(src)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "cells containing imports and other code" notes
        FilterDefaults()(nb)
    return load(nb2str(nb))


def _directives(src):
    "Split leading `#| key: value` lines off a code cell: (dict of directives, remaining source)."
    lines, d = src.splitlines(), {}
    while lines and lines[0].startswith('#|'):
        k, _, v = lines.pop(0)[2:].partition(':')
        d[k.strip()] = v.strip().lower() or 'true'
    return d, '\n'.join(lines)


def _source_link(md):
    "Drop Quarto's link attributes from show_doc's `[source](url){target=...}` links."
    return re.sub(r'(\[source\]\(\S+?\))\{[^}]*\}', r'\1', md)


def tidy(nb):
    """Turn what Quarto would interpret into plain Jupyter: front matter becomes a `# Title`
    cell (and `nb.metadata.title`); `#|` directives are applied (`echo`, `output`, `include`)
    and stripped. Returns the title."""
    title, cells = None, []
    for cell in nb.cells:
        if cell.cell_type == 'raw' and cell.source.startswith('---'):
            fm = yaml.safe_load(cell.source.strip().strip('-')) or {}
            title = fm.get('title')
            md = f"# {title}" + (f"\n\n> {fm['description']}" if fm.get('description') else '')
            cells.append(nbformat.v4.new_markdown_cell(md, id=cell.get('id')))
            continue
        if cell.cell_type == 'code':
            d, cell.source = _directives(cell.source)
            if d.get('include') == 'false': continue
            if d.get('echo') == 'false': cell.metadata['transient'] = {'remove_source': True}
            if d.get('output') == 'false': cell.outputs = []
            for o in cell.outputs:
                if 'text/markdown' in o.get('data', {}):
                    o.data['text/markdown'] = _source_link(o.data['text/markdown'])
        cells.append(cell)
    nb.cells = cells
    title = title or nb.metadata.get('title') or 'Untitled'
    nb.metadata['title'] = title  # nbconvert's <title>
    return title


# ---------------------------------------------------------------- README.md

class _Table(HTMLParser):
    "The rows of an HTML table as lists of cell texts; `head` counts the rows in <thead>."
    def __init__(self):
        super().__init__(); self.rows, self.head, self._cell, self._in_head = [], 0, None, False
    def handle_starttag(self, tag, attrs):
        if tag == 'thead': self._in_head = True
        elif tag == 'tr': self.rows.append([]); self.head += self._in_head
        elif tag in ('td', 'th'): self._cell = ''
    def handle_endtag(self, tag):
        if tag == 'thead': self._in_head = False
        elif tag in ('td', 'th') and self._cell is not None: self.rows[-1].append(self._cell.strip()); self._cell = None
    def handle_data(self, data):
        if self._cell is not None: self._cell += data


def markdown_table(html_table):
    """A pandas DataFrame's HTML as a GitHub Markdown table (GitHub drops the `<style>` pandas writes).
    pandas' second header row (the index name alone) becomes the first column's heading."""
    t = _Table(); t.feed(html_table)
    head, body = t.rows[:t.head] or t.rows[:1], t.rows[t.head:] if t.head else t.rows[1:]
    top = head[0]
    if len(head) == 2 and head[1][0] and not any(head[1][1:]): top = [head[1][0]] + top[1:]
    esc = lambda c: html.unescape(c).replace('|', '\\|')
    line = lambda cells: '| ' + ' | '.join(map(esc, cells)) + ' |'
    return '\n'.join([line(top), '|---|' + '---:|' * (len(top) - 1), *map(line, body)])  # numbers right-aligned


def markdown_tables(nb):
    "Replace every DataFrame output's HTML with a Markdown table, in place."
    for cell in nb.cells:
        for o in cell.get('outputs', []):
            h = ''.join(o.get('data', {}).get('text/html', ''))
            if '<table' in h and 'dataframe' in h:
                del o.data['text/html']
                o.data['text/markdown'] = markdown_table(h)


def readme_files():
    "The README (and any figures from index.ipynb) as {relative path: bytes}."
    nb = process(NBS/'index.ipynb')
    tidy(nb)
    markdown_tables(nb)
    md, res = MarkdownExporter().from_notebook_node(nb, resources={'output_files_dir': 'README_files'})
    md = re.sub(r'\n{3,}', '\n\n', md).strip() + '\n'
    return {'README.md': md.encode(), **res.get('outputs', {})}


def readme(check=False):
    files = readme_files()
    if check:
        stale = [p for p, b in files.items() if not (ROOT/p).exists() or (ROOT/p).read_bytes() != b]
        if stale:
            sys.exit(f"Out of date: {', '.join(stale)}. Run `python tools/docs.py readme`.")
        return print('README.md is up to date')
    for p, b in files.items():
        (ROOT/p).parent.mkdir(parents=True, exist_ok=True)
        (ROOT/p).write_bytes(b)
    print(f"Wrote {', '.join(files)}")


# ---------------------------------------------------------------- offline site

def reading_order():
    "Notebooks in nbs/sidebar.yml order (those that exist), then any others, sorted."
    listed = yaml.safe_load((NBS/'sidebar.yml').read_text())['website']['sidebar']['contents']
    nbs = [NBS/n for n in listed if isinstance(n, str) and (NBS/n).exists()]
    return nbs + sorted(set(NBS.glob('*.ipynb')) - set(nbs))


def mathjax(dest: Path):
    """Copy MathJax 3 into `dest`/mathjax (fetched once with `npm pack` into .cache/mathjax) and return its
    URL; fall back to the CDN when npm can't get it. The fetch unpacks in a folder of its own and is
    renamed into place, so builds running at the same time never see half a copy."""
    pkg = CACHE/'mathjax'/'package'
    if not pkg.exists() and shutil.which('npm'):
        (CACHE/'mathjax').mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE/'mathjax'))
        try:
            r = subprocess.run(['npm', 'pack', 'mathjax@3', '--silent'], cwd=tmp, capture_output=True, text=True)
            if r.returncode == 0:
                with tarfile.open(tmp/r.stdout.split()[-1]) as t: t.extractall(tmp, filter='data')
                try: (tmp/'package').rename(pkg)
                except OSError: pass  # another build got there first
        finally: shutil.rmtree(tmp, ignore_errors=True)
    if (pkg/'es5').exists():
        shutil.copytree(pkg/'es5', dest/'mathjax', dirs_exist_ok=True)
        return 'mathjax/tex-mml-chtml.js'
    print(f'WARNING: could not get MathJax with npm; math will load from {MATHJAX_CDN}', file=sys.stderr)
    return MATHJAX_CDN


# nbconvert's "lab" page, plus a sidebar; MathJax 3 (nbconvert configures MathJax 2) and no require.js
PAGE = r"""{%- extends 'lab/index.html.j2' -%}
{% block html_head_js_requirejs %}{% endblock %}
{% block html_head_js_mathjax %}
<script>window.MathJax = {tex: {inlineMath: [['$', '$'], ['\\(', '\\)']], processEscapes: true, tags: 'ams'}};</script>
<script id="MathJax-script" src="{{ resources.mathjax_url }}"></script>
{% endblock %}
{% block extra_css %}<link rel="icon" href="data:,">{# no /favicon.ico request (a 404 in the console) #}
<style>
nav.site { position: fixed; top: 0; left: 0; bottom: 0; width: 15rem; overflow-y: auto; padding: 1rem;
           background: #f7f7f9; border-right: 1px solid #ddd; font-family: sans-serif; font-size: 0.95rem; }
nav.site ul { list-style: none; padding: 0; } nav.site li { margin: 0.4rem 0; }
nav.site a { color: #2780e3; text-decoration: none; } nav.site a.active { font-weight: bold; color: #000; }
body > main { margin-left: 17rem; max-width: 60rem; }
main .jp-RenderedMarkdown.jp-RenderedHTMLCommon pre { background: #f7f7f9; padding: 0.5rem 0.75rem; margin-bottom: 1rem; overflow-x: auto; }
@media (max-width: 50rem) { nav.site { position: static; width: auto; } body > main { margin-left: 0; } }
</style>{% endblock %}
{% block body_header %}{{ super() }}{{ resources.nav }}{% endblock %}
"""


def nav_html(pages, current):
    "The sidebar: one link per page, in reading order."
    items = ''.join(f'<li><a href="{stem}.html"{" class=active" if stem == current else ""}>{title}</a></li>'
                    for stem, title in pages)
    return f'<nav class="site"><ul>{items}</ul></nav>'


def local_links(htmls):
    """Point nbdev's doc links (`{doc_host}{doc_baseurl}/data.html#imageset`, to the Quarto site's
    page names and lower-case anchors) at this site's pages (`00_data.html#ImageSet`)."""
    from nbdev.config import get_config
    cfg = get_config()
    base = re.escape(f"{cfg.doc_host}{cfg.doc_baseurl}".rstrip('/'))
    stems = {re.sub(r'^\d+[a-zA-Z0-9]*_', '', s.lower()): s for s in htmls}  # as nbdev's _nbpath2html
    ids = {s: {i.lower(): i for i in re.findall(r'\bid="([^"]+)"', h)} for s, h in htmls.items()}
    def sub(m):
        stem = stems.get(m[1])
        if stem is None: return m[0]
        anchor = m[2] and ids[stem].get(m[2].lower(), m[2])
        return f'href="{stem}.html' + (f'#{anchor}' if anchor else '') + '"'
    return {s: re.sub(rf'href="{base}/([^"#/]+)\.html(?:#([^"]*))?"', sub, h) for s, h in htmls.items()}


def _cache_key(src: Path):
    "What a processed notebook depends on: its bytes, settings.ini and the nbdev / execnb versions."
    from importlib.metadata import version
    h = hashlib.sha256(src.read_bytes())
    for part in ((ROOT/'settings.ini').read_bytes(), version('nbdev').encode(), version('execnb').encode()): h.update(part)
    return h.hexdigest()[:16]


def processed(src: Path, force=False):
    """`process(src)` as notebook JSON, cached in .cache/proc/ under a hash of what it depends on: a notebook
    edited during a build is processed again next time (nbdev's _proc/ compares modification times, so an edit
    made while a build runs can be missed), and builds running at the same time share the cache safely
    (each file is written whole, then renamed into place)."""
    cache = CACHE/'proc'/f'{src.stem}.{_cache_key(src)}.ipynb'
    if cache.exists() and not force: return cache.read_text(encoding='utf-8')
    from execnb.nbio import nb2str
    text = nb2str(process(src))
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix='.tmp')
    with os.fdopen(fd, 'w', encoding='utf-8') as f: f.write(text)
    os.replace(tmp, cache)
    for old in cache.parent.glob(f'{src.stem}.*.ipynb'):
        if old != cache: old.unlink(missing_ok=True)
    return text


def process_all(nbs, force=False):
    """Every notebook processed (nbdev's docs processors, as `nbdev_docs` runs them) into the cache, by
    worker processes (`docs.py process NB...`, one per core, the notebooks shared out); {notebook: JSON}."""
    todo = [n for n in nbs if force or not (CACHE/'proc'/f'{n.stem}.{_cache_key(n)}.ipynb').exists()]
    workers = max(1, min(len(todo), os.cpu_count() or 1))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))  # one torch thread per worker
    procs = [subprocess.Popen([sys.executable, __file__, 'process', *(['--force'] if force else []),
                               *map(str, todo[i::workers])], cwd=ROOT, env=env) for i in range(workers) if todo]
    failed = [p.args for p in procs if p.wait() != 0]  # their tracebacks are on stderr
    if failed: raise RuntimeError(f'{len(failed)} worker(s) failed: {" ".join(failed[0][3:])}')
    return {n: processed(n) for n in nbs}


def site(offline=False, force=False, dest: Path = DOCS):
    """The docs site into `dest` (default _docs/). Built in a fresh folder beside `dest` and moved into place
    at the end, so a build never writes into a folder someone is reading; the notebooks are listed once."""
    if shutil.which('quarto') and not offline:
        return subprocess.run(['nbdev_docs'], cwd=ROOT, check=True)
    nbs = reading_order()  # once: a notebook added during the build waits for the next build
    try: texts = process_all(nbs, force)
    except Exception as e:
        sys.exit(f"nbdev's docs processing failed: {e}\nNote: nbdev runs every cell that imports something, so "
                 "a cell mixing imports with other code must be split (imports in their own cell).")
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f'.{dest.name}-', dir=dest.parent))
    try:
        exporter = HTMLExporter(extra_loaders=[DictLoader({'page.html.j2': PAGE})], template_file='page.html.j2',
                                embed_images=True, mathjax_url=mathjax(out),
                                exclude_input_prompt=True, exclude_output_prompt=True)
        books = {}
        for src in nbs:
            nb = load(texts[src])
            books[src.stem] = (tidy(nb), nb)
        pages = [(stem, title) for stem, (title, _) in books.items()]
        htmls = {stem: exporter.from_notebook_node(nb, resources={'nav': nav_html(pages, stem),
                                                                  'metadata': {'name': title, 'path': str(NBS)}})[0]
                 for stem, (title, nb) in books.items()}
        for stem, html in local_links(htmls).items():
            (out/f'{stem}.html').write_text(html, encoding='utf-8')
        out.chmod(0o755)
        old = dest.with_name(f'.{dest.name}-old-{os.getpid()}')
        if dest.exists(): dest.rename(old)
        out.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally: shutil.rmtree(out, ignore_errors=True)
    print(f'Wrote {len(books)} pages to {dest} (start at index.html)')


# ---------------------------------------------------------------- saved outputs

def execute(names=()):
    """Run notebooks in place so the docs show their outputs (figures, tables), then drop the noise:
    stderr (warnings, progress bars) and execution counts; `nbdev_clean` finishes the job."""
    from nbclient import NotebookClient
    env = dict(TQDM_DISABLE='1', PYTHONWARNINGS='ignore', TRANSFORMERS_VERBOSITY='error')
    os.environ.update(env)  # the kernel inherits them
    for path in sorted(NBS.glob('[0-9]*.ipynb')) + [NBS/'index.ipynb']:
        if names and path.stem not in names: continue
        nb = nbformat.read(path, as_version=4)
        if any('#| eval: false' in c.source for c in nb.cells if c.cell_type == 'code') and path.stem.startswith('1') \
                and path.stem != '12_results': continue  # the experiment notebooks keep no outputs: they are run by papermill
        print('executing', path.name, flush=True)
        NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(NBS)}}).execute()
        for c in nb.cells:
            if c.cell_type == 'code':
                c.outputs = [o for o in c.outputs if not (o.output_type == 'stream' and o.name == 'stderr')]
        nbformat.write(nb, path)
        # clean just this notebook: others may be editing theirs right now
        subprocess.run([str(Path(sys.executable).parent/'nbdev_clean'), '--fname', str(path)], cwd=ROOT, check=True)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    sub.add_parser('readme', help='build README.md').add_argument(
        '--check', action='store_true', help='exit 1 if README.md differs from what would be built')
    s = sub.add_parser('site', help='build the docs site into _docs/')
    s.add_argument('--offline', action='store_true', help="don't use Quarto even if it is installed")
    s.add_argument('--force', action='store_true', help='reprocess all notebooks, ignoring the .cache/proc/ cache')
    s.add_argument('--dest', type=Path, default=DOCS, help='the folder to write the offline site to (default _docs/)')
    w = sub.add_parser('process', help="run nbdev's docs processing on notebooks into .cache/proc/ (the site's workers)")
    w.add_argument('--force', action='store_true'); w.add_argument('paths', nargs='+', type=Path)
    e = sub.add_parser('execute', help='run notebooks in place to save their outputs for the docs')
    e.add_argument('names', nargs='*', help='notebook stems (default: all but the papermill experiment notebooks)')
    a = p.parse_args()
    os.chdir(ROOT)  # nbdev finds settings.ini from the working directory
    if a.cmd == 'readme': readme(a.check)
    elif a.cmd == 'site': site(a.offline, a.force, a.dest)
    elif a.cmd == 'process':
        for path in a.paths: processed(path, a.force)
    else: execute(a.names)
