import torch
import pytest
from evl_nb.core import as_dtype, find_fixture, shared_dir


def test_shared_dir_found():
    assert (shared_dir() / 'fixtures').is_dir() or not __import__('evl_nb.core').core.in_ci()


def test_as_dtype():
    assert as_dtype('fp16') is torch.float16
    with pytest.raises(ValueError, match='precision'):
        as_dtype('fp8')


def test_find_fixture_required():
    with pytest.raises(FileNotFoundError):
        find_fixture('nope.bin', required=True)
