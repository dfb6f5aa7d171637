"""Shared pytest helpers. Fixtures come from ../shared (or $EVL_NB_SHARED); missing ones skip locally, fail under CI.
The tiers are markers (pytest.ini): a `cuda` test skips where torch sees no CUDA GPU. Tests never change the
checkout: a session that leaves `git status` other than it found it says so, and fails under CI."""
from __future__ import annotations
import subprocess
from pathlib import Path

import pytest
import torch

from evl_nb.core import find_fixture, in_ci
from evl_nb.video import check_video

REPO = Path(__file__).resolve().parents[1]
_TREE = pytest.StashKey[object]()       # git status when the session started


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
    "The checkout as the session found it: a test that writes into it fails the run under CI (a warning locally)."
    before, after = session.config.stash.get(_TREE, None), _tree()
    if before is None or after is None or before == after: return
    new = sorted(set(after.splitlines()) - set(before.splitlines()))
    tr = session.config.pluginmanager.get_plugin('terminalreporter')
    if tr is not None:
        tr.write_line(f'the tests changed the checkout ({REPO}), git status now also lists:', red=True)
        for line in new or after.splitlines(): tr.write_line(f'  {line}', red=True)
    if in_ci() and session.exitstatus == 0: session.exitstatus = pytest.ExitCode.TESTS_FAILED

