"""Headless Chromium for the tests that look at pages as a reader does (test_browser: the docs site;
test_jupyterlab: notebooks in JupyterLab). Import the `chromium` fixture from here.

Needs selenium (a dev requirement) and Debian's `chromium` + `chromium-driver`; when they are missing
and we are root with apt, they are installed (~20 s), else the tests skip with the reason.
"""
import base64, json, os, re, shutil, socket, subprocess
from pathlib import Path

import pytest

from conftest import hang_guard

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT/'test-artifacts'/'screenshots'  # gitignored
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--disable-dev-shm-usage']


def _apt_install():
    "Install Debian's chromium + chromium-driver; return '' or why it failed."
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    cmd = ['apt-get', 'install', '-y', '-q', '-o', 'Dpkg::Use-Pty=0', 'chromium', 'chromium-driver']
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=hang_guard(1800), env=env)
        if r.returncode != 0:  # maybe stale or empty package lists
            subprocess.run(['apt-get', 'update', '-q'], capture_output=True, timeout=hang_guard(900), env=env)
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=hang_guard(1800), env=env)
    except subprocess.TimeoutExpired as e: return f'`{" ".join(e.cmd)}` still ran after {e.timeout:.0f} s (a hang guard)'
    return '' if r.returncode == 0 else (r.stderr or r.stdout).strip()[-500:]


@pytest.fixture(scope='module')
def chromium():
    "Paths of (chromium, chromedriver); installed with apt if missing and possible, else skip."
    pytest.importorskip('selenium', reason='selenium is not installed (a dev requirement: pip install -e ".[dev]")')
    find = lambda: (shutil.which('chromium'), shutil.which('chromedriver'))
    if not all(find()):
        if not (hasattr(os, 'geteuid') and os.geteuid() == 0 and shutil.which('apt-get')):
            pytest.skip('Chromium and chromedriver are not installed and cannot be (needs root and apt): '
                        '`apt-get install chromium chromium-driver`')
        why = _apt_install()
        if why or not all(find()): pytest.skip(f'could not install chromium + chromium-driver with apt: {why}')
    return find()


def new_driver(chromium, profile: Path, size=(1280, 1000), timeout=None):
    "A headless Chromium driven by chromedriver (no Selenium Manager, no network), console logs kept."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium[0]
    for f in FLAGS + [f'--window-size={size[0]},{size[1]}', f'--user-data-dir={profile}']: opts.add_argument(f)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    d = webdriver.Chrome(options=opts, service=Service(chromium[1]))
    timeout = timeout or hang_guard(300)   # page loads and scripts: a hang guard (a page loads in ~1 s idle)
    d.set_page_load_timeout(timeout); d.set_script_timeout(timeout)
    SHOTS.mkdir(parents=True, exist_ok=True)
    return d


def severe_console(driver):
    "The browser console's errors since the last call (JS errors, failed resource loads)."
    return [f'console {e["level"]}: {e["message"][:300]}' for e in driver.get_log('browser') if e['level'] == 'SEVERE']


def screenshot(driver, path: Path, height=None):
    """A PNG via the DevTools protocol; with `height`, of the whole page: the viewport made that high
    (so a fixed sidebar spans it), at most 16000 px."""
    w, h = driver.execute_script('return [window.innerWidth, document.documentElement.clientHeight]')
    height = min(max(height or h, h), 16000)
    driver.execute_cdp_cmd('Emulation.setDeviceMetricsOverride',
                           {'width': w, 'height': height, 'deviceScaleFactor': 1, 'mobile': False})
    try:
        shot = driver.execute_cdp_cmd('Page.captureScreenshot', {'format': 'png', 'captureBeyondViewport': True,
                                      'clip': {'x': 0, 'y': 0, 'width': w, 'height': height, 'scale': 1}})
    finally: driver.execute_cdp_cmd('Emulation.clearDeviceMetricsOverride', {})
    path.write_bytes(base64.b64decode(shot['data']))


def free_port():
    "A TCP port on 127.0.0.1 that nothing listens on now."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


# Table cells a reader must never see where a number is meant (pandas' and Python's missing values).
MISSING = r'^(nan|NaN|None|NaT|<NA>|null|undefined)$|\b(nan|NaN)\b'

MATH = re.compile(r'\$\$.+?\$\$|(?<![\\$])\$[^$\n]+?(?<!\\)\$', re.S)


def _markdown(nb: Path):
    "The markdown cells of a notebook, with code spans and fences removed."
    cells = json.loads(nb.read_text(encoding='utf-8'))['cells']
    md = '\n\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
    return re.sub(r'`[^`\n]*`', '', re.sub(r'```.*?```', '', md, flags=re.S))


def has_math(nb: Path): return bool(MATH.search(_markdown(nb)))
