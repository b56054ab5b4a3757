"""The offline docs site in a real browser: each page of _docs/ opened in headless Chromium.

Per page: no console errors (JS errors, failed resource loads), the notebook's title, every <img>
decoded (figures visible), the math rendered by MathJax where the notebook has `$...$`, no table cell
reading NaN/None/nan unless the markdown above that table says so, and links within the site pointing
at pages and anchors that exist. A full-page screenshot of each page goes
to test-artifacts/screenshots/ (gitignored).

Needs selenium (a dev requirement) and Debian's `chromium` + `chromium-driver`; when they are missing
and we are root with apt, the test installs them (~20 s), else it skips. ~12 s for 12 pages.
"""
import functools, html, json, re, threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import slow
from _browser import MISSING, SHOTS, chromium, has_math, new_driver, screenshot, severe_console  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
NOTEBOOKS = sorted(p for p in NBS.glob('*.ipynb') if p.stem == 'index' or p.stem[:2].isdigit())


# ---------------------------------------------------------------- what each notebook should give

def notebook_title(nb: Path):
    "The title nbdev gives the notebook: front matter `title:`, else its first `# Heading`."
    cells = json.loads(nb.read_text(encoding='utf-8'))['cells']
    for c in cells:
        src = ''.join(c['source'])
        if c['cell_type'] == 'raw' and src.startswith('---'):
            m = re.search(r'^title:\s*(.+?)\s*$', src, re.M)
            if m: return m.group(1).strip('"\'')
        if c['cell_type'] == 'markdown':
            m = re.search(r'^#\s+(.+?)\s*$', src, re.M)
            if m: return m.group(1)



# ---------------------------------------------------------------- a server, a driver

@pytest.fixture(scope='module')
def server(docs_site):
    "Serve _docs/ on 127.0.0.1 at a free port; yield (base URL, list of (path, status) >= 400)."
    failed = []
    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
        def log_request(self, code='-', size='-'):
            if isinstance(code, int) and code >= 400 or str(code).startswith(('4', '5')):
                failed.append((self.path, int(code)))
    srv = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(docs_site)))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_port}/', failed
    srv.shutdown(); srv.server_close()


@pytest.fixture(scope='module')
def driver(chromium, tmp_path_factory):
    d = new_driver(chromium, tmp_path_factory.mktemp('chromium-profile'))
    yield d
    d.quit()


# ---------------------------------------------------------------- one page

# After load: wait for MathJax's first typeset, web fonts and every image, then report.
INSPECT = r"""
const done = arguments[arguments.length - 1];
(async () => {
  // a busy machine may fire 'load' before MathJax's script has run: wait for it where the page loads it
  if (document.querySelector('script[src*="mathjax"]'))
    for (let i = 0; i < 600 && !(window.MathJax && window.MathJax.startup); i++) await new Promise(r => setTimeout(r, 100));
  const M = window.MathJax;
  if (M && M.startup && M.startup.promise) await M.startup.promise;
  await document.fonts.ready;
  await Promise.all([...document.images].map(i => i.decode().catch(() => null)));
  const prose = [...document.querySelectorAll('.jp-RenderedMarkdown')].map(el => {
    const c = el.cloneNode(true);
    c.querySelectorAll('code, pre, mjx-container, script').forEach(x => x.remove());
    return c.textContent; }).join('\n');
  return {
    title: document.title,
    mathjax: M && M.version || null,
    math: document.querySelectorAll('mjx-container').length,
    math_errors: [...document.querySelectorAll('mjx-merror')].map(e => e.getAttribute('data-mjx-error') || e.textContent),
    raw_math: (prose.match(/\$[^$\n]+\$/g) || []).slice(0, 3),
    images: [...document.images].map(i => ({src: i.src.slice(0, 60), w: i.naturalWidth,
                                             shown: i.getBoundingClientRect().width})),
    links: [...document.querySelectorAll('a[href]')].filter(a => a.origin === location.origin)
             .map(a => a.pathname + a.hash),
    height: Math.max(document.body.scrollHeight, document.documentElement.scrollHeight),
    missing: missing(new RegExp(arguments[0])),
  };
})().then(done, e => done({error: String(e)}));

// Table cells reading a missing value, each with whether the nearest markdown cell above the table names it.
function missing(re) {
  return [...document.querySelectorAll('.jp-OutputArea table td, .jp-OutputArea table th')]
    .filter(td => re.test(td.textContent.trim())).map(td => {
      const text = td.textContent.trim(), token = text.match(re)[0];
      let c = td.closest('.jp-Cell');
      while (c && !c.classList.contains('jp-MarkdownCell')) c = c.previousElementSibling;
      const row = td.closest('tr'), head = row && row.querySelector('th');
      return {text, row: head ? head.textContent.trim() : '', explained: !!c && c.textContent.includes(token)};
    });
}
"""


def _ids(page: Path):
    return {html.unescape(i) for i in re.findall(r'\bid="([^"]*)"', page.read_text(encoding='utf-8'))}


def check_page(driver, server, site: Path, stem, title=None, math=False):
    "Open one page; return a list of what is wrong with it."
    base, failed = server
    driver.get_log('browser')  # drop anything left from the previous page
    failed.clear()
    driver.get(f'{base}{stem}.html')
    r = driver.execute_async_script(INSPECT, MISSING)
    if 'error' in r: return [f'inspection script failed: {r["error"]}']
    screenshot(driver, SHOTS/f'{stem}.png', r['height'])
    problems = severe_console(driver)
    problems += [f'server answered {code} for {path}' for path, code in failed]
    if title and r['title'] != title: problems.append(f'title is {r["title"]!r}, not the notebook title {title!r}')
    for i in r['images']:
        if not i['w']: problems.append(f'image {i["src"]!r} did not load (naturalWidth 0)')
        elif not i['shown']: problems.append(f'image {i["src"]!r} loaded but is not displayed (width 0)')
    if math:
        if not r['mathjax']: problems.append('MathJax did not load')
        elif not r['math']: problems.append('the notebook has $...$ math but MathJax rendered none (no mjx-container)')
    problems += [f'MathJax error: {e}' for e in r['math_errors']]
    problems += [f'math left as text: {m!r}' for m in r['raw_math']]
    problems += [f'a table cell reads {m["text"]!r} (row {m["row"]!r}) and the text above the table does not say why'
                 for m in r['missing'] if not m['explained']]
    for link in r['links']:
        path, _, anchor = link.partition('#')
        target = site/unquote(path.lstrip('/'))
        if target.is_dir(): target = target/'index.html'
        if not target.is_file(): problems.append(f'link to missing page {link}')
        elif anchor and target.suffix == '.html' and unquote(anchor) not in _ids(target):
            problems.append(f'link to missing anchor {link}')
    return problems


DEFAULT_PAGES = ('index', '04_training', '12_results')   # the home page, a chapter with math and figures, the results: the rest are slow


@pytest.mark.parametrize('nb', [pytest.param(nb, marks=() if nb.stem in DEFAULT_PAGES else slow) for nb in NOTEBOOKS], ids=lambda p: p.stem)
def test_page_in_browser(driver, server, docs_site, nb):
    page = docs_site/f'{nb.stem}.html'
    assert page.exists(), f'{page.name}: not built'
    problems = check_page(driver, server, docs_site, nb.stem, title=notebook_title(nb), math=has_math(nb))
    assert not problems, f'{page.name} in Chromium (screenshot: {SHOTS/page.name.replace(".html", ".png")}):\n  ' \
                         + '\n  '.join(dict.fromkeys(problems))
