import torch
import pytest
from evl_nb.core import as_dtype, find_fixture, in_ci, shared_dir


def test_shared_dir_found():
    if not in_ci(): pytest.skip('the shared folder is only required under CI')
    assert (shared_dir() / 'fixtures' / 'evl_reference_tiny.pt').is_file()


def test_as_dtype():
    assert as_dtype('fp16') is torch.float16
    with pytest.raises(ValueError, match='precision'):
        as_dtype('fp8')


def test_find_fixture_required():
    with pytest.raises(FileNotFoundError):
        find_fixture('nope.bin', required=True)
