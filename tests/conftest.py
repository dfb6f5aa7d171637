"""Shared pytest helpers. Fixtures come from ../shared (or $EVL_NB_SHARED); missing ones skip locally, fail under CI.
The tiers are markers (pytest.ini): a `cuda` test skips where torch sees no CUDA GPU; the demo starts with the
session and its test runs last (`DemoRun`). Tests never change the checkout: a session that leaves `git status`
other than it found it says so, and fails under CI."""
from __future__ import annotations
import os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import pytest
import torch

from evl_nb.core import find_fixture, in_ci
from evl_nb.video import check_video

REPO = Path(__file__).resolve().parents[1]
_TREE = pytest.StashKey[object]()       # git status when the session started
_DEMO = pytest.StashKey[object]()       # the session's `make demo` run
# OpenMP threads that spin while they wait take the core another process needs (a CPU hog, another test's process):
# the processes the tests start wait passively. Results do not depend on it (fixed thread counts), times do.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')


def fixture_path(*parts):
    "Path of a shared fixture; skip the test when it is absent (fail under CI=true)."
    p = find_fixture(*parts, required=False)
    if p is None:
        if in_ci(): pytest.fail(f'shared fixture {"/".join(parts)} is missing under CI')
        pytest.skip(f'shared fixture {"/".join(parts)} not found (set EVL_NB_SHARED)')
    return p


class CheckedClips(dict):
    "{resolved path: `check_video(path)`} filled on first use: the check (a full sequential decode) runs once a file."
    def __missing__(self, key):
        info = self[key] = check_video(key)
        return info
    def of(self, path): return self[str(Path(path).resolve())]


@pytest.fixture(scope='session')
def checked_clips() -> CheckedClips:
    """`check_video` of the shared fixture clips with its defaults (as a video dataset checks a file), shared by the
    session: pass it as a dataset's `manifest` or `infos`, or call `.of(path)`. The check is most of the time of
    the tests that read the fixture clips."""
    return CheckedClips()


@pytest.fixture(scope='session')
def tiny_syn(tmp_path_factory) -> Path:
    "A synthetic set of 3 classes, 3 training and 2 validation clips each, 8 frames: what the real runs train on."
    from evl_nb.synthetic import make_synthetic_dataset
    root = tmp_path_factory.mktemp('tiny_syn') / 'syn'
    make_synthetic_dataset(root, num_classes=3, train_per_class=3, val_per_class=2, num_frames=(8, 8), ssv2=False,
                           progress=False)
    return root


def pytest_runtest_setup(item):
    "`@pytest.mark.cuda` tests need a GPU: without one they skip (benchmarks/gpu_check.sh runs them on one)."
    if item.get_closest_marker('cuda') is not None and not torch.cuda.is_available():
        pytest.skip('needs a CUDA GPU (benchmarks/gpu_check.sh runs pytest -m cuda)')


def _tree() -> str | None:
    "`git status --porcelain` of the checkout (changed and untracked files, not ignored ones); None outside git."
    try: r = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=all'], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired): return None
    return r.stdout if r.returncode == 0 else None


def pytest_sessionstart(session): session.config.stash[_TREE] = _tree()


def pytest_sessionfinish(session, exitstatus):
    "The background demo ended; the checkout as the session found it: a test that writes into it fails the run under CI."
    demo = session.config.stash.get(_DEMO, None)
    if demo is not None: demo.stop()
    before, after = session.config.stash.get(_TREE, None), _tree()
    if before is None or after is None or before == after: return
    new = sorted(set(after.splitlines()) - set(before.splitlines()))
    tr = session.config.pluginmanager.get_plugin('terminalreporter')
    if tr is not None:
        tr.write_line(f'the tests changed the checkout ({REPO}), git status now also lists:', red=True)
        for line in new or after.splitlines(): tr.write_line(f'  {line}', red=True)
    if in_ci() and session.exitstatus == 0: session.exitstatus = pytest.ExitCode.TESTS_FAILED



class DemoRun:
    """`python -m evl_nb.demo` (`make demo`) into a temporary folder, in its own process; `wait` collects it. When
    the session holds a `demo` test the run starts as soon as the tests are collected and runs beside the others at
    a lower priority (they keep about one of the 2 cores busy; it takes the rest), so most of its minutes are
    hidden. Its figures do not depend on the load: the synthetic set is the same file for file (`write_video`),
    and training on it uses fixed thread counts."""
    def __init__(self, *argv):
        self.dir = Path(tempfile.mkdtemp(prefix='evl-nb-demo-'))
        self.out, self.log, self.t0 = self.dir / 'demo', open(self.dir / 'demo.log', 'w+'), time.time()
        # niced: the other tests keep their pace and the demo takes the cycles they leave
        self.proc = subprocess.Popen([sys.executable, '-m', 'evl_nb.demo', '--output-dir', str(self.out),
                                      '--no-progress', *argv], stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     preexec_fn=lambda: os.nice(10))

    def wait(self, timeout: float = 3600) -> tuple[int, str, float]:
        "Wait for the run: (exit status, its output, seconds since it started)."
        rc = self.proc.wait(timeout)
        self.log.flush(); self.log.seek(0)
        return rc, self.log.read(), time.time() - self.t0

    def stop(self):
        "End the run if it is still going, and delete its folder."
        if self.proc.poll() is None: self.proc.kill(); self.proc.wait()
        self.log.close(); shutil.rmtree(self.dir, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    "`demo` tests last: they wait for the run that started with the session (`DemoRun`)."
    items.sort(key=lambda item: item.get_closest_marker('demo') is not None)        # stable: the rest keep their order


def pytest_collection_finish(session):
    "Start the demo run now when a selected test needs it (deselected tests are gone from `session.items`)."
    if session.config.option.collectonly: return
    if any(item.get_closest_marker('demo') is not None for item in session.items):
        session.config.stash[_DEMO] = DemoRun()


@pytest.fixture(scope='session')
def demo_run(pytestconfig) -> DemoRun:
    "The session's demo run (started with the session, or by the first test that asks for it)."
    if _DEMO not in pytestconfig.stash: pytestconfig.stash[_DEMO] = DemoRun()
    return pytestconfig.stash[_DEMO]
