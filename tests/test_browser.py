"""Real-browser test of the attention viewer: JupyterLab on 127.0.0.1, Debian's headless Chromium driven by Playwright.

Runs `nbs/explore.ipynb` (a copy, in a temporary root), drags the frame slider with the mouse (its track must be wider
than 100 px), checks the readout and the picture change, and saves a screenshot of the viewer (tmp, or EVL_NB_SCREENSHOT).
Needs the `chromium` apt package and the `playwright` Python package (never `playwright install`).
Skips locally when either is missing; fails under CI=true (.ci/run installs them)."""
import io, json, os, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import numpy as np
import pytest

from evl_nb.core import in_ci

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get('EVL_NB_CHROMIUM', '/usr/bin/chromium')
CHROME_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
               '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage']
DEADLINE_S = 240          # the whole test, server start to cleanup
# the viewer's picture: into the test's tmp folder, unless EVL_NB_SCREENSHOT names a file (to refresh the README's
# docs/images/attention_viewer_browser.png: EVL_NB_SCREENSHOT=docs/images/attention_viewer_browser.png)
SCREENSHOT = os.environ.get('EVL_NB_SCREENSHOT')


def _requirements():
    missing = []
    if not Path(CHROMIUM).exists(): missing.append(f'chromium ({CHROMIUM}; apt-get install chromium)')
    try: import playwright.sync_api  # noqa: F401
    except ImportError: missing.append('the playwright Python package (pip install playwright)')
    if shutil.which('jupyter-lab', path=str(Path(sys.executable).parent)) is None and \
            shutil.which('jupyter-lab') is None: missing.append('jupyter-lab')
    if missing:
        msg = 'browser test needs ' + ', '.join(missing)
        if in_ci(): pytest.fail(msg + ' (under CI .ci/run must install them)')
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


class JupyterLab:
    "A JupyterLab server in its own process group, with private config/data/runtime dirs, stopped on exit."
    def __init__(self, root: Path, home: Path):
        self.port, self.token = _free_port(), secrets.token_hex(16)
        exe = Path(sys.executable).parent / 'jupyter-lab'
        exe = str(exe) if exe.exists() else shutil.which('jupyter-lab')
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep),
                   JUPYTER_CONFIG_DIR=str(home / 'config'), JUPYTER_RUNTIME_DIR=str(home / 'runtime'), JUPYTER_DATA_DIR=str(home / 'data'),
                   JUPYTERLAB_SETTINGS_DIR=str(home / 'settings'), JUPYTERLAB_WORKSPACES_DIR=str(home / 'workspaces'),
                   MPLBACKEND='agg', PYDEVD_DISABLE_FILE_VALIDATION='1')
        # no 'get notified about Jupyter news?' toast over the page (and no request for news)
        ns = home / 'settings' / '@jupyterlab' / 'apputils-extension'
        ns.mkdir(parents=True, exist_ok=True)
        (ns / 'notification.jupyterlab-settings').write_text('{"fetchNews": "false", "checkForUpdates": false}')
        self.log = open(home / 'jupyter.log', 'wb')
        self.proc = subprocess.Popen(
            [exe, '--no-browser', '--ip=127.0.0.1', f'--port={self.port}', '--port-retries=0',
             f'--IdentityProvider.token={self.token}', f'--ServerApp.root_dir={root}', '--ServerApp.disable_check_xsrf=True',
             '--LabApp.expose_app_in_browser=True', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate',
             '--LabApp.news_url=None', '--LabApp.extension_manager=readonly']
            + (['--allow-root'] if hasattr(os, 'geteuid') and os.geteuid() == 0 else []),
            cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.home = home

    @property
    def url(self): return f'http://127.0.0.1:{self.port}'

    def wait_ready(self, timeout: float = 60):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None: raise RuntimeError(f'jupyter lab exited early:\n{self.tail()}')
            try:
                with urllib.request.urlopen(f'{self.url}/api/status?token={self.token}', timeout=2) as r:
                    if r.status == 200: return
            except OSError: time.sleep(0.5)
        raise TimeoutError(f'jupyter lab did not answer within {timeout}s:\n{self.tail()}')

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return (self.home / 'jupyter.log').read_bytes()[-n:].decode(errors='replace')

    def stop(self):
        if self.proc.poll() is None:
            try: os.killpg(self.proc.pid, signal.SIGTERM)      # the server's own group: server and its kernels
            except ProcessLookupError: pass
            try: self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait(5)
        self.log.close()


def _wait_for_change(page, img, last, done, timeout_s: float) -> np.ndarray:
    "Screenshots of `img` every 0.5 s until `done(pixels)` or `timeout_s`; the last one."
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        page.wait_for_timeout(500)
        last = _png(img.screenshot())
        if done(last): break
    return last


def _png(b: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(b)).convert('RGB')).astype(np.int16)


@pytest.mark.browser
@pytest.mark.slow
def test_mouse_dragged_frame_slider_changes_the_picture_in_jupyterlab(tmp_path):
    _requirements()
    from playwright.sync_api import sync_playwright
    t_start = time.time()
    left = lambda: max(1.0, DEADLINE_S - (time.time() - t_start))
    root, home = tmp_path / 'root', tmp_path / 'home'
    root.mkdir(); home.mkdir()
    # the explorer's randomised view (untrained=True): seconds, where its trained default may train a model for minutes
    nb = json.loads((REPO / 'nbs' / 'explore.ipynb').read_text())
    params = next(c for c in nb['cells'] if 'parameters' in c.get('metadata', {}).get('tags', []))
    params['source'] = ''.join(params['source']) + '\nuntrained = True\n'
    (root / 'explore.ipynb').write_text(json.dumps(nb))
    lab = JupyterLab(root, home)
    try:
        lab.wait_ready(min(90, left()))
        with sync_playwright() as pw:
            page = None
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS, timeout=60_000)
            try:
                page = browser.new_page(viewport={'width': 1400, 'height': 1000})
                page.set_default_timeout(60_000)
                page.goto(f'{lab.url}/lab/tree/explore.ipynb?token={lab.token}')
                page.wait_for_function('() => window.jupyterapp && window.jupyterapp.shell.currentWidget '
                                       '&& window.jupyterapp.shell.currentWidget.sessionContext '
                                       '&& window.jupyterapp.shell.currentWidget.sessionContext.session '
                                       '&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel',
                                       timeout=left() * 1000)
                page.wait_for_function("() => window.jupyterapp.shell.currentWidget.sessionContext.kernelDisplayStatus == 'idle'",
                                       timeout=left() * 1000)
                page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
                img = page.locator('img.evl-attention-image')
                img.wait_for(state='visible', timeout=left() * 1000)
                page.wait_for_function("() => { const i = document.querySelector('img.evl-attention-image');"
                                       " return i && i.complete && i.naturalWidth > 0; }", timeout=left() * 1000)
                img.scroll_into_view_if_needed()
                before = _png(img.screenshot())
                # the frame slider: the slider widget labelled 'frame'. Drag its handle with the mouse along its track
                slider = page.locator('.widget-slider', has=page.locator('label', has_text='frame')).first
                track = slider.locator('.noUi-target').first
                handle = slider.locator('.noUi-handle').first
                readout = slider.locator('.widget-readout').first
                assert readout.inner_text().strip() == '0'
                measures = page.locator('.evl-attention-measures')            # present when the clip's object is known
                measures_before = measures.first.inner_text() if measures.count() else None
                page.locator('.widget-vbox', has=img).last.scroll_into_view_if_needed()   # sliders in the viewport too
                slider.scroll_into_view_if_needed()
                tb, hb = track.bounding_box(), handle.bounding_box()
                assert tb is not None and tb['width'] > 100, f'the frame slider track is {tb} wide: no room to drag it'
                top = float(handle.get_attribute('aria-valuemax') or 7)     # noUiSlider's range: 0..T-1 (7 for evl-tiny)
                assert top >= 3, f'the frame slider only goes to {top}'
                x0, y0 = hb['x'] + hb['width'] / 2, hb['y'] + hb['height'] / 2
                page.mouse.move(x0, y0)
                page.mouse.down()
                for k in range(1, 11):                               # to value 3, in small steps as a hand does
                    page.mouse.move(x0 + k / 10 * 3 / top * tb['width'], y0)
                page.mouse.up()
                after = _wait_for_change(page, img, before, lambda a: np.abs(a - before).mean() > 1, min(60, left()))
                assert readout.inner_text().strip() == '3', f'slider readout is {readout.inner_text()!r} after the drag'
                assert after.shape == before.shape and np.abs(after - before).mean() > 1, \
                    'the viewer image did not change after dragging the frame slider'
                if measures_before is not None:                              # the measures line follows the frame
                    assert 'uniform' in measures_before and 'frame 0' in measures_before, measures_before
                    assert 'frame 3' in measures.first.inner_text(), measures.first.inner_text()
                # the viewer as a user sees it (sliders with their tracks), for the README
                viewer = page.locator('.widget-vbox', has=img).last
                shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / 'attention_viewer.png'
                shot.parent.mkdir(parents=True, exist_ok=True)
                viewer.screenshot(path=str(shot))
                # dragging back to the left end restores frame 0
                slider.scroll_into_view_if_needed()
                tb, hb = track.bounding_box(), handle.bounding_box()
                x1, y1 = hb['x'] + hb['width'] / 2, hb['y'] + hb['height'] / 2
                page.mouse.move(x1, y1); page.mouse.down()
                for k in range(1, 11): page.mouse.move(x1 - k / 10 * (x1 - tb['x'] + 20), y1)
                page.mouse.up()
                back = _wait_for_change(page, img, after, lambda a: np.abs(a - before).mean() < 0.5, min(20, left()))
                assert readout.inner_text().strip() == '0', f'slider readout is {readout.inner_text()!r} after dragging back'
                if os.environ.get('EVL_NB_BROWSER_DEBUG'):
                    from PIL import Image
                    for n, a in (('before', before), ('after', after), ('back', back)):
                        Image.fromarray(a.astype(np.uint8)).save(Path(os.environ['EVL_NB_BROWSER_DEBUG']) / f'{n}.png')
                assert np.abs(back - before).mean() < 0.5, 'dragging the slider back did not restore frame 0'
            except Exception:
                try: page.screenshot(path=str(tmp_path / 'failure.png'), full_page=True)   # what the browser showed
                except Exception: pass
                raise
            finally:
                browser.close()
    except Exception as e:
        shot = tmp_path / 'failure.png'
        raise AssertionError(f'{type(e).__name__}: {e}\n' + (f'page screenshot: {shot}\n' if shot.exists() else '')
                             + f'--- jupyter log tail ---\n{lab.tail()}') from e
    finally:
        lab.stop()
    assert lab.proc.poll() is not None
