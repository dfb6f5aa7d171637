"""Shared pytest helpers. Fixtures come from ../shared (or $EVL_NB_SHARED); missing ones skip locally, fail under CI."""
import pytest

from evl_nb.core import find_fixture, in_ci


def fixture_path(*parts):
    "Path of a shared fixture; skip the test when it is absent (fail under CI=true)."
    p = find_fixture(*parts, required=False)
    if p is None:
        if in_ci(): pytest.fail(f'shared fixture {"/".join(parts)} is missing under CI')
        pytest.skip(f'shared fixture {"/".join(parts)} not found (set EVL_NB_SHARED)')
    return p


