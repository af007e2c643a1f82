"""Result files: keyed by the configuration's hash, atomic, and never trusted when damaged."""

from __future__ import annotations

import pytest

from batchnorm.lab.store import ResultStore, run_key

IDENTITY = {"experiment": "init", "config": {"steps": 3}, "params": {"seed": 0}}


def test_round_trip_and_key_depends_on_everything(tmp_path):
    store = ResultStore(tmp_path)
    key = run_key(IDENTITY)
    assert run_key(dict(IDENTITY)) == key
    assert run_key({**IDENTITY, "params": {"seed": 1}}) != key
    assert run_key({**IDENTITY, "config": {"steps": 4}}) != key
    assert store.load(key) is None
    store.save(key, IDENTITY, {"accuracy": 0.5, "curve": [0.1, 0.2], "nan": float("nan")})
    loaded = store.load(key)
    assert loaded["accuracy"] == 0.5 and loaded["curve"] == [0.1, 0.2]
    assert list(tmp_path.iterdir()) == [store.path(key)]  # no temporary file left behind


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # truncated
        lambda text: text.replace("0.5", "0.9"),  # edited: checksum no longer matches
        lambda text: "",  # empty
        lambda text: "\x00\xff garbage",
    ],
)
def test_damaged_files_are_not_trusted(tmp_path, damage):
    store = ResultStore(tmp_path)
    key = run_key(IDENTITY)
    store.save(key, IDENTITY, {"accuracy": 0.5})
    path = store.path(key)
    path.write_text(damage(path.read_text()))
    assert store.load(key) is None


def test_a_file_for_another_key_is_not_trusted(tmp_path):
    store = ResultStore(tmp_path)
    key, other = run_key(IDENTITY), run_key({**IDENTITY, "params": {"seed": 9}})
    store.save(other, IDENTITY, {"accuracy": 0.5})
    store.path(other).rename(store.path(key))
    assert store.load(key) is None


def test_results_must_be_plain_numbers(tmp_path):
    with pytest.raises(TypeError, match="plain numbers"):
        ResultStore(tmp_path).save("k", IDENTITY, {"tensor": object()})
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
