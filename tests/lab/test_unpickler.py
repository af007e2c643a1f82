"""The restricted unpickler loads CIFAR's contents and refuses anything that could run code."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from batchnorm.lab.data import DataError, load_data
from batchnorm.lab.data.unpickler import UnsafePickleError, restricted_loads
from tests.lab.conftest import make_cifar_folder


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_loads_arrays_lists_dicts_bytes(protocol):
    value = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), b"labels": [1, 2, 3],
             b"name": b"batch", "nested": ({"x": 1.5},)}
    loaded = restricted_loads(pickle.dumps(value, protocol=protocol))
    assert np.array_equal(loaded[b"data"], value[b"data"])
    assert loaded[b"labels"] == [1, 2, 3] and loaded[b"name"] == b"batch"
    assert loaded["nested"] == ({"x": 1.5},)


def test_refuses_os_system_without_running_it(tmp_path):
    marker = tmp_path / "was-run"
    payload = pickle.dumps({b"data": _RunsCommand(marker)})
    pickle.loads(pickle.dumps(0))  # plain pickle works in this environment
    with pytest.raises(UnsafePickleError, match=r"refused to load '(posix|nt|os)\.system'"):
        restricted_loads(payload)
    assert not marker.exists()


def test_refuses_eval():
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        restricted_loads(pickle.dumps(_Evaluates()))


def test_malicious_cifar_batch_is_refused_with_the_file_named(tmp_path):
    make_cifar_folder(tmp_path)
    marker = tmp_path / "was-run"
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(_RunsCommand(marker), protocol=2))
    with pytest.raises(UnsafePickleError, match="data_batch_2"):
        load_data(f"cifar10:{tmp_path}")
    assert not marker.exists()


def test_a_dict_of_the_wrong_shape_is_a_data_error(tmp_path):
    make_cifar_folder(tmp_path)
    wrong = {b"data": np.zeros((2, 10), dtype=np.uint8), b"labels": [0, 1]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(wrong))
    with pytest.raises(DataError, match=r"expected b'data' of shape \(N, 3072\)"):
        load_data(f"cifar10:{tmp_path}")
