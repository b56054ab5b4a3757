"""JupyterLab as a reader uses it: `jupyter lab` from this environment, opened in headless Chromium.

A chapter (a copy of nbs/03_allocation.ipynb) is opened and run with the menu's Run > Run All Cells; when the
kernel is idle: no error in any cell (also in the notebook as saved with Ctrl+S), every table and figure the
chapter's saved outputs have is rendered again, the math is typeset by JupyterLab's MathJax, no table cell
reads NaN/None. Then the executed notebook `fclora run --preset quick` saves next to results.json is
opened: its figures show. Both open with the notebooks' `python3` kernel, the one this environment's
ipykernel provides, with no "Select Kernel" prompt. Screenshots go to test-artifacts/screenshots/.

The server runs on 127.0.0.1 at a port the OS picks, with a token, and with its config, data, runtime,
settings and workspace folders in a temporary folder (so a developer's own Jupyter set-up can't change
what is checked); it is shut down through its API and the test checks that no kernel is left behind.
Skips only where Chromium can't be installed (see _browser.py). ~60 s on 2 busy cores. Every wait below is a hang
guard (about 10x its idle time, x FCLORA_TEST_TIMEOUT_SCALE; conftest.py), never a speed check.
"""
import json, os, secrets, shutil, signal, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

from conftest import hang_guard, hung, slow
from _browser import MISSING, SHOTS, chromium, has_math, new_driver, screenshot, severe_console  # noqa: F401 (a fixture)

pytestmark = slow   # a JupyterLab server, a kernel and a quick run: minutes (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHAPTER = ROOT/'nbs'/'03_allocation.ipynb'
SETTINGS = {  # JupyterLab user settings: no requests to the internet (news, update checks)
    '@jupyterlab/apputils-extension/notification.jupyterlab-settings': {'fetchNews': 'false', 'checkForUpdates': False}}


# ---------------------------------------------------------------- a server, a quick run, a browser

def _api(lab, path, method='GET'):
    req = urllib.request.Request(f'{lab["url"]}api/{path}', method=method,
                                 headers={'Authorization': f'token {lab["token"]}'})
    with urllib.request.urlopen(req, timeout=hang_guard(60)) as r: return json.loads(r.read() or b'null')


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "`jupyter lab` serving a temporary folder; yields {url, token, root, proc}; shut down through its API."
    import psutil
    tmp = tmp_path_factory.mktemp('lab')
    root, home = tmp/'root', tmp/'home'
    root.mkdir()
    for rel, value in SETTINGS.items():
        (home/'settings'/rel).parent.mkdir(parents=True, exist_ok=True)
        (home/'settings'/rel).write_text(json.dumps(value))
    token = secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home/'config'), JUPYTER_DATA_DIR=str(home/'data'),
               JUPYTER_RUNTIME_DIR=str(home/'runtime'), JUPYTERLAB_SETTINGS_DIR=str(home/'settings'),
               JUPYTERLAB_WORKSPACES_DIR=str(home/'workspaces'), IPYTHONDIR=str(home/'ipython'),
               OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    cmd = [str(BIN/'jupyter'), 'lab', '--no-browser', '--ServerApp.ip=127.0.0.1', '--ServerApp.port=0',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}', '--ServerApp.terminals_enabled=False',
           '--LabApp.extension_manager=readonly']  # no PyPI queries
    if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')  # containers, CI
    log = (tmp/'server.log').open('w')
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        info, t0, limit = None, time.monotonic(), hang_guard(600)   # ~10 s idle
        while info is None:  # the server writes its URL (with the port the OS gave it) to the runtime folder
            assert proc.poll() is None, f'jupyter lab exited: {(tmp/"server.log").read_text()[-3000:]}'
            assert time.monotonic() - t0 < limit, hung('starting jupyter lab', limit, time.monotonic() - t0) + \
                f'\n{(tmp/"server.log").read_text()[-3000:]}'
            found = sorted((home/'runtime').glob('jpserver-*.json'))
            info = json.loads(found[0].read_text()) if found and found[0].stat().st_size else None
            time.sleep(0.2)
        lab = dict(url=info['url'], token=token, root=root, proc=proc, log=tmp/'server.log')
        while True:  # the runtime file appears before the server answers
            try: _api(lab, 'status'); break
            except OSError:
                assert time.monotonic() - t0 < limit, hung('waiting for jupyter lab to answer', limit, time.monotonic() - t0)
                time.sleep(0.2)
        yield lab
        kernels = [k for k in psutil.Process(proc.pid).children(recursive=True)]
        t0 = time.monotonic()
        try: _api(lab, 'shutdown', 'POST')
        except OSError: pass
        proc.wait(timeout=hang_guard(300))
        print(f'jupyter lab shut down in {time.monotonic() - t0:.1f} s')
        left = [k for k in kernels if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
        assert not left, f'processes left after the server shut down: {[k.cmdline() for k in left]}'
    finally:
        if proc.poll() is None: os.killpg(proc.pid, 9); proc.wait()
        log.close()


@pytest.fixture(scope='module')
def quick_run(lab):
    "`fclora run cifar10 --preset quick` into the server's folder, started at once (it runs while the chapter is checked)."
    out = lab['root']/'quick'
    p = subprocess.Popen([str(BIN/'fclora'), 'run', 'cifar10', '--preset', 'quick', '--epochs', '1', '--out-dir', str(out),
                          '--no-progress'],  # one epoch: the same notebook and figures, a test's time
                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    def wait():
        try: log, _ = p.communicate(timeout=hang_guard(1800))   # ~1 min idle
        except subprocess.TimeoutExpired: stop(p); pytest.fail(hung('`fclora run --preset quick`', hang_guard(1800), hang_guard(1800)), pytrace=False)
        assert p.returncode == 0, log[-3000:]
        return out
    yield wait
    if p.poll() is None: stop(p)


def stop(p):
    "Stop `fclora run` as Ctrl-C does (it stops its kernel, which runs in a session of its own), else kill them all."
    import psutil
    kids = psutil.Process(p.pid).children(recursive=True)
    p.send_signal(signal.SIGTERM)
    try: p.wait(timeout=20)
    except subprocess.TimeoutExpired: p.kill(); p.wait()
    for k in kids:
        try: k.kill()
        except psutil.NoSuchProcess: pass


@pytest.fixture(scope='module')
def driver(chromium, tmp_path_factory):
    d = new_driver(chromium, tmp_path_factory.mktemp('chromium-profile'), size=(1400, 1800), timeout=hang_guard(600))
    yield d
    d.quit()


# ---------------------------------------------------------------- JupyterLab, driven through its UI

def wait_for(driver, script, timeout, what, *args):
    "Poll a JS expression until it is truthy; return its value. `timeout` is a hang guard (about 10x idle; scaled)."
    t0, limit = time.monotonic(), hang_guard(timeout)
    while time.monotonic() - t0 < limit:
        v = driver.execute_script(script, *args)
        if v: return v
        time.sleep(0.25)
    raise AssertionError(f'JupyterLab: {what}; ' + hung(what, limit, time.monotonic() - t0))


PANEL = "document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)')"


def open_notebook(driver, lab, rel):
    "Open a notebook by URL; wait until all its cells are on the page and its kernel is idle; return the kernel's name."
    n = len(json.loads((lab['root']/rel).read_text(encoding='utf-8'))['cells'])
    driver.get(f'{lab["url"]}lab/tree/{rel}?token={lab["token"]}')
    wait_for(driver, f'const p = {PANEL}; return p && p.querySelectorAll(".jp-Cell").length == arguments[0]', 600,
             f'{rel} did not open with its {n} cells', n)
    status = wait_for(driver, f"""const p = {PANEL}, d = document.querySelector('.jp-Dialog');
        if (d) return 'dialog: ' + d.textContent;
        const s = p.querySelector('.jp-Notebook-ExecutionIndicator'), k = p.querySelector('.jp-KernelName');
        return s && s.dataset.status === 'idle' && k && !/^(No Kernel|Kernel)?$/.test(k.textContent.trim())
               && 'kernel: ' + k.textContent.trim()""", 600, f'the kernel of {rel} did not start')
    assert status.startswith('kernel: '), f'{rel}: a dialog opened ({status[:200]!r}): the notebook\'s kernel was not found?'
    return status[len('kernel: '):]


def run_all(driver):
    "Run > Run All Cells, through the menu bar; wait until every code cell has run and the kernel is idle."
    from selenium.webdriver.common.by import By
    run = next(e for e in driver.find_elements(By.CSS_SELECTOR, '.lm-MenuBar-item') if e.text.strip() == 'Run')
    run.click()
    item = wait_for(driver, """return [...document.querySelectorAll('.lm-Menu .lm-Menu-item')]
        .find(e => e.textContent.trim().startsWith('Run All Cells'))""", 120,
        'no "Run All Cells" in the Run menu: ' + driver.execute_script(
            "return [...document.querySelectorAll('.lm-Menu')].map(m => m.textContent).join(' / ')"))
    item.click()
    t0 = time.monotonic()
    wait_for(driver, f"""const p = {PANEL};
        const prompts = [...p.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim());
        return prompts.length && prompts.every(t => /^\\[\\d+\\]:$/.test(t))
               && p.querySelector('.jp-Notebook-ExecutionIndicator').dataset.status === 'idle'""",
             1800, 'Run All Cells did not finish')   # ~30 s idle
    return time.monotonic() - t0


def save(driver, path: Path):
    "File > Save Notebook (Ctrl+S) and wait for the file on disk to be the run one; return it."
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    driver.execute_script(f'{PANEL}.querySelector(".jp-Notebook").focus()')
    ActionChains(driver).key_down(Keys.CONTROL).send_keys('s').key_up(Keys.CONTROL).perform()
    def saved():
        try: nb = json.loads(path.read_text(encoding='utf-8'))
        except (OSError, ValueError): return None
        code = [c for c in nb['cells'] if c['cell_type'] == 'code' and ''.join(c['source']).strip()]
        return nb if all(c.get('execution_count') for c in code) else None
    t0, limit = time.monotonic(), hang_guard(300)
    while (nb := saved()) is None:
        assert time.monotonic() - t0 < limit, hung(f'waiting for {path.name} to be saved with Ctrl+S', limit, time.monotonic() - t0)
        time.sleep(0.25)
    return nb


# What the open notebook shows, cell by cell, once MathJax has typeset the markdown.
INSPECT = r"""
const done = arguments[arguments.length - 1], re = new RegExp(arguments[0]);
const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
(async () => {
  const cells = [...p.querySelectorAll('.jp-Notebook .jp-Cell')].filter(c => c.parentElement.closest('.jp-Cell') === null);  // not nested
  for (const img of p.querySelectorAll('.jp-OutputArea img')) await img.decode().catch(() => null);
  return cells.map(c => {
    const prose = c.querySelector('.jp-RenderedMarkdown');
    let text = '';
    if (prose) { const x = prose.cloneNode(true);
                 x.querySelectorAll('code, pre, mjx-container, script').forEach(e => e.remove()); text = x.textContent; }
    return {
      kind: c.classList.contains('jp-CodeCell') ? 'code' : c.classList.contains('jp-MarkdownCell') ? 'markdown' : 'raw',
      tables: c.querySelectorAll('.jp-OutputArea table').length,
      images: [...c.querySelectorAll('.jp-OutputArea img')].map(i => i.naturalWidth),
      errors: [...c.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
                .map(e => e.textContent).filter(t => /Traceback|Error/.test(t)).map(t => t.slice(0, 300)),
      math: c.querySelectorAll('mjx-container').length,
      math_errors: c.querySelectorAll('mjx-merror').length,
      raw_math: (text.match(/\$[^$\n]+\$/g) || []).slice(0, 2),
      missing: [...c.querySelectorAll('.jp-OutputArea td, .jp-OutputArea th')].map(td => td.textContent.trim())
                 .filter(t => re.test(t)),
    };
  });
})().then(done, e => done({error: String(e)}));
"""


def inspect(driver, n_cells=None):
    """What the open notebook shows (see INSPECT). With `n_cells`, look again for up to 30 s (scaled) while the count differs:
    right after a notebook opens, JupyterLab can briefly hold one cell element more than its model (seen once in CI
    with the status bar reading "Cell 1/9" and 10 cell elements on the page)."""
    t0 = time.monotonic()
    while True:
        r = driver.execute_async_script(INSPECT, MISSING)
        assert not isinstance(r, dict), f'inspection script failed: {r["error"]}'
        if n_cells is None or len(r) == n_cells or time.monotonic() - t0 > hang_guard(30): return r
        time.sleep(0.5)


def expected_outputs(nb: dict):
    "Per cell: (number of html tables, number of images) in a notebook's saved outputs."
    def count(c):
        outs = [o.get('data', {}) for o in c.get('outputs', [])]
        return (sum('<table' in ''.join(d.get('text/html', '')) for d in outs), sum('image/png' in d for d in outs))
    return [count(c) for c in nb['cells']]


def shoot(driver, name, selector='.jp-Cell'):
    "A screenshot of the window, the notebook scrolled to the first element matching `selector`."
    driver.execute_script(f'const e = {PANEL}.querySelector(arguments[0]); if (e) e.scrollIntoView();', selector)
    time.sleep(0.5)
    screenshot(driver, SHOTS/name)


def problems_in(shown, expected, rel):
    "What is wrong with an open notebook, compared with the outputs it should have."
    out = []
    if len(shown) != len(expected):
        return [f'{rel}: {len(shown)} cells on screen, the notebook has {len(expected)}']
    for i, (c, (tables, images)) in enumerate(zip(shown, expected)):
        out += [f'cell {i}: error output {e!r}' for e in c['errors']]
        if c['tables'] < tables: out.append(f'cell {i}: {tables} table(s) expected, {c["tables"]} shown')
        if len(c['images']) < images: out.append(f'cell {i}: {images} figure(s) expected, {len(c["images"])} shown')
        out += [f'cell {i}: a figure did not load (naturalWidth 0)' for w in c['images'] if not w]
        out += [f'cell {i}: a table cell reads {t!r}' for t in c['missing']]
        out += [f'cell {i}: math left as text: {m!r}' for m in c['raw_math']]
        if c['math_errors']: out.append(f'cell {i}: {c["math_errors"]} MathJax error(s)')
    return out


# ---------------------------------------------------------------- the tests

def test_python3_kernel_is_this_environment(lab):
    "The notebooks ask for `python3`; the server started from this environment offers it, run by this python."
    specs = _api(lab, 'kernelspecs')['kernelspecs']
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        ks = json.loads(nb.read_text(encoding='utf-8'))['metadata'].get('kernelspec', {})
        assert ks.get('name') == 'python3', f'{nb.name}: kernelspec {ks} (want python3: what a fresh clone has)'
    assert 'python3' in specs, f'no python3 kernel: {sorted(specs)}'
    argv = specs['python3']['spec']['argv']
    assert argv[0] in ('python', 'python3', sys.executable) and 'ipykernel_launcher' in argv, argv


def test_chapter_runs_in_jupyterlab(lab, quick_run, driver):
    rel = CHAPTER.name
    shutil.copy(CHAPTER, lab['root']/rel)  # a copy: the repository's notebook stays as it is
    driver.get_log('browser')
    kernel = open_notebook(driver, lab, rel)
    assert kernel.startswith('Python 3'), f'kernel shown: {kernel!r}'
    took = run_all(driver)
    print(f'Run All Cells: {took:.1f} s')
    shown = inspect(driver, len(json.loads(CHAPTER.read_text(encoding='utf-8'))['cells']))
    shoot(driver, 'jupyterlab-03_allocation.png', 'mjx-container')
    shoot(driver, 'jupyterlab-03_allocation-table.png', '.jp-OutputArea table')
    saved = save(driver, lab['root']/rel)
    problems = problems_in(shown, expected_outputs(json.loads(CHAPTER.read_text(encoding='utf-8'))), rel)
    problems += [f'cell {i}: saved with an error output: {o.get("ename")}: {o.get("evalue")}'
                 for i, c in enumerate(saved['cells']) for o in c.get('outputs', []) if o['output_type'] == 'error']
    md = [c for c in shown if c['kind'] == 'markdown']
    if has_math(CHAPTER) and not sum(c['math'] for c in md):
        problems.append('the chapter has $...$ math but JupyterLab typeset none (no mjx-container)')
    problems += severe_console(driver)
    assert not problems, f'{rel} in JupyterLab (Run All took {took:.0f} s; screenshot {SHOTS}/jupyterlab-03_allocation.png):\n  ' \
                         + '\n  '.join(dict.fromkeys(problems))


def test_quick_run_notebook_shows_its_figures(lab, quick_run, driver):
    t0 = time.monotonic()
    out = quick_run()
    print(f'waited {time.monotonic() - t0:.1f} s more for fclora run')
    executed = json.loads((out/'10_cifar10.ipynb').read_text(encoding='utf-8'))
    expected = expected_outputs(executed)
    assert sum(n for _, n in expected) >= 1, 'the executed notebook has no figure'
    rel = (out/'10_cifar10.ipynb').relative_to(lab['root']).as_posix()
    driver.get_log('browser')
    kernel = open_notebook(driver, lab, rel)
    assert kernel.startswith('Python 3'), f'kernel shown: {kernel!r}'
    shown = inspect(driver, len(expected))
    shoot(driver, 'jupyterlab-quick-run.png', '.jp-OutputArea img')
    problems = problems_in(shown, expected, rel) + severe_console(driver)
    assert not problems, f'{rel} in JupyterLab (screenshot {SHOTS}/jupyterlab-quick-run.png):\n  ' + '\n  '.join(problems)
