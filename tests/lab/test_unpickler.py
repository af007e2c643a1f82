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


class _CallsWith:
    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return (self.function, self.arguments)


def test_an_empty_array_loads_in_protocol_2():
    loaded = restricted_loads(pickle.dumps({b"data": np.zeros((0, 3072), np.uint8)}, protocol=2))
    assert loaded[b"data"].shape == (0, 3072) and loaded[b"data"].dtype == np.uint8


@pytest.mark.parametrize(
    "payload, refused",
    [
        (_CallsWith(np.ndarray, (2**40,), "u1"), r"numpy\.ndarray\(\(1099511627776,\)"),
        (_CallsWith(np.zeros(1).__reduce__()[0], np.ndarray, (2**40,), b"B"), "_reconstruct"),
        (_CallsWith(bytes, 2**40), r"bytes\(1099511627776"),
    ],
    ids=["ndarray(shape)", "_reconstruct(shape)", "bytes(n)"],
)
def test_a_few_bytes_of_pickle_cannot_allocate_a_terabyte(payload, refused):
    data = pickle.dumps(payload, protocol=2)
    assert len(data) < 200
    with pytest.raises(UnsafePickleError, match=refused) as error:
        restricted_loads(data, source="batch")
    assert str(error.value).startswith("batch: refused")
