"""Malformed MNIST and CIFAR-10 folders end ``batchnorm lab`` cleanly.

Every folder below is broken in one way. Through the real command, each must end with a non-zero
exit, exactly one line on stderr that names the broken file and the problem, no traceback, and
nothing written to the output folder. The gzip bombs and the sparse 8 GiB files are read under a
lowered address-space limit (in this process with every allocation traced, and two of them by
``python -m batchnorm`` under 1.5 GB), so a reader that trusts their sizes fails the test instead
of exhausting the machine.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import re
import resource
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from batchnorm.cli import main

# Enough training images for one batch of the largest size any experiment uses (128 in
# batch-size's full config), so the valid folders below are refused for their flaw alone.
TRAIN, TEST = 128, 16
PER_BATCH = 26  # five CIFAR training batches of 26: 130 training images
# The largest batch the whole --quick suite trains on (ioffe-mnist's 60).
QUICK_BATCH = 128  # the largest batch of the quick configs (ics, gradients, depth)

IDX = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_TRAIN = [f"data_batch_{index}" for index in range(1, 6)]
CIFAR_FILES = [*CIFAR_TRAIN, "test_batch"]

GIB = 1 << 30
MEMORY_LIMIT = 1536 << 20  # the address-space limit of the bomb and sparse-file processes
BOMB_SIZE = 4 * GIB  # what the gzip bombs expand to


# --- the files, valid and broken -----------------------------------------------------------------


def idx_bytes(shape, payload: bytes | None = None, *, magic=b"\x00\x00", dtype=0x08,
              dims: int | None = None) -> bytes:
    """An idx file: magic, type code, dimension count, big-endian sizes, then the payload."""
    dims = len(shape) if dims is None else dims
    header = magic + bytes([dtype, dims]) + b"".join(int(s).to_bytes(4, "big") for s in shape)
    if payload is None:
        payload = np.random.default_rng(len(header)).integers(0, 256, int(np.prod(shape)),
                                                              dtype=np.uint8).tobytes()
    return header + payload


def images(count: int, height: int = 28, width: int = 28) -> bytes:
    return idx_bytes((count, height, width))


def labels(values) -> bytes:
    values = np.asarray(values, dtype=np.uint8)
    return idx_bytes(values.shape, values.tobytes())


def valid_labels(count: int) -> np.ndarray:
    return np.arange(count) % 10


def mnist_files() -> dict[str, bytes]:
    return {
        IDX["train_images"]: images(TRAIN),
        IDX["train_labels"]: labels(valid_labels(TRAIN)),
        IDX["test_images"]: images(TEST),
        IDX["test_labels"]: labels(valid_labels(TEST)),
    }


def write_mnist(folder: Path, gz: bool, **replaced: bytes) -> None:
    """A valid MNIST folder with some files' contents replaced (keys as in ``IDX``)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = mnist_files()
    files.update({IDX[key]: data for key, data in replaced.items()})
    for name, data in files.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / name).write_bytes(data)


def mnist_path(folder: Path, key: str, gz: bool) -> Path:
    return folder / (IDX[key] + (".gz" if gz else ""))


def cifar_batch(count: int = PER_BATCH, seed: int = 0, **replaced) -> dict:
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"a batch",
        b"labels": [int(label) for label in rng.integers(0, 10, count)],
        b"data": rng.integers(0, 256, (count, 3072)).astype(np.uint8),
        b"filenames": [f"{i}.png".encode() for i in range(count)],
    }
    batch.update({key.encode(): value for key, value in replaced.items()})
    return batch


def cifar_meta() -> dict:
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    return {b"num_cases_per_batch": PER_BATCH, b"label_names": names, b"num_vis": 3072}


def write_cifar(folder: Path, **replaced: bytes) -> None:
    """A valid cifar-10-batches-py folder with some files' bytes replaced (``batches_meta``)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: pickle.dumps(cifar_batch(seed=i), protocol=2)
             for i, name in enumerate(CIFAR_FILES)}
    files["batches.meta"] = pickle.dumps(cifar_meta(), protocol=2)
    files.update({name.replace("_meta", ".meta"): data for name, data in replaced.items()})
    for name, data in files.items():
        (folder / name).write_bytes(data)


class RunsCommand:
    """Pickles as a call to os.system: loading it with plain pickle would run the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def corrupt(data: bytes) -> bytes:
    """A gzip stream with bytes flipped in its middle (the deflate data)."""
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 16]) + data[middle + 16 :]


def gzip_bomb(header: bytes, size: int) -> bytes:
    """A valid gzip file of a few MB that expands to ``header`` and ``size`` zero bytes.

    It is a chain of gzip members (which every gzip reader joins), each one 16 MiB of zeros
    compressed once and repeated, so building it never touches the expanded size.
    """
    member = gzip.compress(bytes(16 << 20), compresslevel=9, mtime=0)
    assert size % (16 << 20) == 0
    return gzip.compress(header, mtime=0) + member * (size // (16 << 20))


def sparse_file(path: Path, header: bytes, size: int) -> None:
    """``header`` then zeros up to ``size`` bytes, as a sparse file that takes no disk."""
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(size)


# --- the cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    spec: str  # the --data argument
    named: Path  # the file (or folder) the error line must name
    problem: str  # a regular expression the error line must match


CASES: dict[str, Callable[[Path], Case]] = {}


def case(name: str):
    def register(build: Callable[[Path], Case]):
        CASES[name] = build
        return build

    return register


# Broken idx contents: (case, file, its bytes, the problem), each tried raw and gzipped.
IDX_CONTENTS = {
    "label 255": ("train_labels", lambda: labels([*valid_labels(TRAIN - 1), 255]), r"label 255"),
    "label 10": ("test_labels", lambda: labels([10, *valid_labels(TEST - 1)]), r"label 10\b"),
    "wrong magic": ("train_images", lambda: idx_bytes((TRAIN, 28, 28), magic=b"\x01\x00"),
                    r"not an idx file"),
    "float dtype code": ("train_images", lambda: idx_bytes((TRAIN, 28, 28), dtype=0x0D),
                         r"unsigned-byte"),
    "unknown dtype code": ("test_labels", lambda: idx_bytes((TEST,), bytes(TEST), dtype=0x42),
                           r"unsigned-byte"),
    "no dimensions": ("train_labels", lambda: idx_bytes((), b"", dims=0), r"dimension"),
    "images as vectors": ("train_images", lambda: idx_bytes((TRAIN, 784)), r"28x28"),
    "labels in two dimensions": ("train_labels", lambda: idx_bytes((TRAIN, 1), bytes(TRAIN)),
                                 r"one label per image"),
    "header cut short": ("test_images", lambda: images(TEST)[:10], r"header"),
    "file of three bytes": ("test_labels", lambda: b"\x00\x00\x08", r"not an idx file|header"),
    "empty file": ("train_labels", lambda: b"", r"not an idx file|header"),
    "sizes past 2^64": ("train_images", lambda: idx_bytes((2**31, 2**31, 4), b""),
                        r"declares|2147483648"),
    "sizes of 2^32-1": ("test_images", lambda: idx_bytes((2**32 - 1,) * 3, b""),
                        r"declares|4294967295"),
    # A raw file is measured before it is read; a gzip stream only as it is decompressed.
    "payload cut short": ("train_images", lambda: images(TRAIN)[:-100],
                          (r"file holds 100252 \(truncated\)", r"truncated, holds only 100252")),
    "trailing bytes": ("test_images", lambda: images(TEST) + b"extra",
                       (r"file holds 12549 \(trailing bytes\)", r"more than the 12544 bytes")),
    "fewer labels than images": ("train_labels", lambda: labels(valid_labels(TRAIN - 1)),
                                 r"127 labels.*128 images"),
    "more labels than images": ("test_labels", lambda: labels(valid_labels(TEST + 1)),
                                r"17 labels.*16 images"),
    "zero test images": ("test_images", lambda: images(0), r"no images|0 labels|16 labels"),
    "zero-size images": ("train_images", lambda: images(TRAIN, 0, 0), r"28x28"),
    "6x5 images": ("train_images", lambda: images(TRAIN, 6, 5), r"28x28"),
    "test images 32x32": ("test_images", lambda: images(TEST, 32, 32), r"28x28"),
    "test images 28x27": ("test_images", lambda: images(TEST, 28, 27), r"28x28"),
}


def _idx_content_case(key: str, data: Callable[[], bytes], problem: str | tuple, gz: bool):
    if isinstance(problem, tuple):  # (raw, gzipped)
        problem = problem[gz]

    def build(root: Path) -> Case:
        write_mnist(root, gz, **{key: data()})
        return Case(f"mnist:{root}", mnist_path(root, key, gz), problem)

    return build


for _name, (_key, _data, _problem) in IDX_CONTENTS.items():
    for _gz in (False, True):
        case(f"mnist {'gz' if _gz else 'raw'}: {_name}")(
            _idx_content_case(_key, _data, _problem, _gz)
        )


@case("mnist raw: training set smaller than a batch")
def _(root):
    write_mnist(root, False, train_images=images(40), train_labels=labels(valid_labels(40)))
    return Case(f"mnist:{root}", root / IDX["train_images"], rf"40 .*batch of {QUICK_BATCH}")


@case("mnist gz: zero training images")
def _(root):
    write_mnist(root, True, train_images=images(0), train_labels=labels([]))
    return Case(f"mnist:{root}", mnist_path(root, "train_images", True),
                r"no images|0 training images")


@case("fashion-mnist gz: zero training images in the torchvision layout")
def _(root):
    folder = root / "FashionMNIST" / "raw"
    write_mnist(folder, True, train_images=images(0), train_labels=labels([]))
    return Case(f"fashion-mnist:{root}", mnist_path(folder, "train_images", True),
                r"no images|0 training images")


@case("mnist gz: corrupt deflate stream")
def _(root):
    write_mnist(root, True, train_images=b"")
    path = mnist_path(root, "train_images", True)
    path.write_bytes(corrupt(gzip.compress(images(TRAIN), mtime=0)))
    return Case(f"mnist:{root}", path, r"gzip|CRC|invalid|corrupt")


@case("mnist gz: stream cut in half")
def _(root):
    write_mnist(root, True)
    path = mnist_path(root, "test_images", True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return Case(f"mnist:{root}", path, r"ended before|gzip|truncated")


@case("mnist gz: garbage after the stream")
def _(root):
    write_mnist(root, True)
    path = mnist_path(root, "test_labels", True)
    path.write_bytes(path.read_bytes() + b"garbage!")
    return Case(f"mnist:{root}", path, r"gzip|not a gzipped")


@case("mnist gz: garbage bytes")
def _(root):
    write_mnist(root, True)
    path = mnist_path(root, "train_labels", True)
    path.write_bytes(os.urandom(200))
    return Case(f"mnist:{root}", path, r"gzip|not a gzipped")


@case("mnist raw: garbage bytes")
def _(root):
    write_mnist(root, False)
    path = mnist_path(root, "train_labels", False)
    path.write_bytes(b"\x00\x00\x08\x01" + b"\xff" * 4 + b"junk")
    return Case(f"mnist:{root}", path, r"declares|bytes")


@case("mnist raw: test labels missing")
def _(root):
    write_mnist(root, False)
    mnist_path(root, "test_labels", False).unlink()
    return Case(f"mnist:{root}", root / IDX["test_labels"], r"missing")


@case("mnist raw: a directory where the training images should be")
def _(root):
    write_mnist(root, False)
    path = mnist_path(root, "train_images", False)
    path.unlink()
    path.mkdir()
    return Case(f"mnist:{root}", path, r"directory")


@case("mnist raw: the training labels a symlink loop")
def _(root):
    write_mnist(root, False)
    path = mnist_path(root, "train_labels", False)
    path.unlink()
    path.symlink_to(path)
    return Case(f"mnist:{root}", path, r"symbolic link|symlink")


@case("mnist: the folder a symlink loop")
def _(root):
    folder = root / "loop"
    folder.symlink_to(folder)
    return Case(f"mnist:{folder}", folder, r"(?i)symbolic link|symlink")


@case("mnist: the folder a file")
def _(root):
    path = root / "file"
    path.write_bytes(images(TRAIN))
    return Case(f"mnist:{path}", path, r"not a folder|does not exist")


@case("mnist: no idx files")
def _(root):
    (root / "notes.txt").write_text("nothing here")
    return Case(f"mnist:{root}", root, r"does not hold the idx files")


# CIFAR-10: (case, file, its contents, the problem). Objects are pickled; bytes written as they are.
def _marker(root: Path) -> Path:
    return root / "code-was-run"


CIFAR_CONTENTS = {
    "code in a training batch": ("data_batch_2", lambda root: RunsCommand(_marker(root)),
                                 r"refused to load '(posix|nt|os)\.system'"),
    "code inside the batch dict": (
        "test_batch", lambda root: {b"data": RunsCommand(_marker(root)), b"labels": [0]},
        r"refused to load"),
    "code in batches.meta": ("batches_meta", lambda root: RunsCommand(_marker(root)),
                             r"refused to load"),
    "garbage bytes": ("test_batch", lambda root: os.urandom(300), r"not a readable"),
    "garbage starting like a pickle": ("data_batch_1", lambda root: b"\x80\x02" + b"\xfe" * 50,
                                       r"not a readable"),
    "pickle cut in half": ("data_batch_5",
                           lambda root: pickle.dumps(cifar_batch(), protocol=2)[:40_000],
                           r"not a readable"),
    "empty file": ("data_batch_3", lambda root: b"", r"not a readable"),
    "a list instead of a dict": ("data_batch_4", lambda root: [1, 2, 3], r"expected a dict"),
    "a string instead of a dict": ("test_batch", lambda root: "data", r"expected a dict"),
    "no b'labels'": ("data_batch_1", lambda root: {b"data": cifar_batch()[b"data"]},
                     r"labels"),
    "no b'data'": ("test_batch", lambda root: {b"labels": [1, 2]}, r"b'data'"),
    "data of 1024 columns": ("data_batch_2",
                             lambda root: cifar_batch(data=np.zeros((PER_BATCH, 1024), np.uint8)),
                             r"3072"),
    "data as one flat row": ("test_batch",
                             lambda root: cifar_batch(data=np.zeros(PER_BATCH * 3072, np.uint8)),
                             r"3072"),
    "data in four dimensions": (
        "data_batch_3", lambda root: cifar_batch(data=np.zeros((PER_BATCH, 3, 32, 32), np.uint8)),
        r"3072"),
    "data as a list of lists": (
        "data_batch_1", lambda root: cifar_batch(data=[[0] * 3072 for _ in range(PER_BATCH)]),
        r"3072|array"),
    "object data with values over 255": (
        "data_batch_4",
        lambda root: cifar_batch(data=np.full((PER_BATCH, 3072), 300, dtype=object)),
        r"object|0\.\.255"),
    "int64 data with 256": (
        "test_batch",
        lambda root: cifar_batch(data=np.full((PER_BATCH, 3072), 256, dtype=np.int64)),
        r"0\.\.255"),
    "negative int16 data": (
        "data_batch_5",
        lambda root: cifar_batch(data=np.full((PER_BATCH, 3072), -1, dtype=np.int16)),
        r"0\.\.255"),
    "NaN in float data": ("data_batch_1",
                          lambda root: cifar_batch(data=np.full((PER_BATCH, 3072), np.nan)),
                          r"float64|NaN"),
    "negative label": ("data_batch_2", lambda root: cifar_batch(labels=[-1] * PER_BATCH),
                       r"label -1"),
    "label 10": ("test_batch", lambda root: cifar_batch(labels=[3] * (PER_BATCH - 1) + [10]),
                 r"label 10\b"),
    "label 255 as uint8": (
        "data_batch_3", lambda root: cifar_batch(labels=np.full(PER_BATCH, 255, np.uint8)),
        r"label 255"),
    "float labels": ("data_batch_4", lambda root: cifar_batch(labels=[1.5] * PER_BATCH),
                     r"integer|float"),
    "string labels": ("data_batch_5", lambda root: cifar_batch(labels=["cat"] * PER_BATCH),
                      r"integer"),
    "bool labels": ("data_batch_1", lambda root: cifar_batch(labels=[True] * PER_BATCH),
                    r"integer|bool"),
    "labels past int64": ("test_batch", lambda root: cifar_batch(labels=[2**70] * PER_BATCH),
                          r"integer|label"),
    "labels as bytes": ("data_batch_2", lambda root: cifar_batch(labels=b"\x01" * PER_BATCH),
                        r"labels"),
    "labels in two dimensions": ("data_batch_3",
                                 lambda root: cifar_batch(labels=[[1]] * PER_BATCH),
                                 r"labels|\(N,\)"),
    "ragged labels": ("data_batch_4", lambda root: cifar_batch(labels=[1, [2, 3]] * 13),
                      r"labels"),
    "fewer labels than images": ("data_batch_5",
                                 lambda root: cifar_batch(labels=[1] * (PER_BATCH - 1)),
                                 r"25 labels.*26 images"),
    "zero images": ("test_batch", lambda root: cifar_batch(count=0), r"no images"),
    "meta a list": ("batches_meta", lambda root: ["airplane"], r"expected a dict"),
    "meta garbage": ("batches_meta", lambda root: os.urandom(100), r"not a readable"),
    "meta with 3 label names": ("batches_meta",
                                lambda root: {b"label_names": [b"a", b"b", b"c"]},
                                r"10 label names|label_names"),
}


def _cifar_content_case(file: str, content: Callable[[Path], object], problem: str):
    def build(root: Path) -> Case:
        folder = root / "cifar-10-batches-py"
        value = content(root)
        data = value if isinstance(value, bytes) else pickle.dumps(value, protocol=2)
        write_cifar(folder, **{file: data})
        return Case(f"cifar10:{root}", folder / file.replace("_meta", ".meta"), problem)

    return build


for _name, (_file, _content, _problem) in CIFAR_CONTENTS.items():
    case(f"cifar10: {_name}")(_cifar_content_case(_file, _content, _problem))


@case("cifar10: training set smaller than a batch")
def _(root):
    write_cifar(root, **{name: pickle.dumps(cifar_batch(count=10)) for name in CIFAR_TRAIN})
    return Case(f"cifar10:{root}", root, rf"50 .*batch of {QUICK_BATCH}")


@case("cifar10: data_batch_3 missing")
def _(root):
    write_cifar(root)
    (root / "data_batch_3").unlink()
    return Case(f"cifar10:{root}", root / "data_batch_3", r"missing")


@case("cifar10: a directory where test_batch should be")
def _(root):
    write_cifar(root)
    (root / "test_batch").unlink()
    (root / "test_batch").mkdir()
    return Case(f"cifar10:{root}", root / "test_batch", r"directory")


@case("cifar10: data_batch_1 a symlink loop")
def _(root):
    write_cifar(root)
    path = root / "data_batch_1"
    path.unlink()
    path.symlink_to(path)
    return Case(f"cifar10:{root}", path, r"symbolic link|symlink")


@case("cifar10: a 100 MB sparse batch")
def _(root):
    write_cifar(root)
    sparse_file(root / "data_batch_2", b"", 100 << 20)
    return Case(f"cifar10:{root}", root / "data_batch_2", r"MiB|bytes")


# --- the runs ------------------------------------------------------------------------------------


def lab_arguments(spec: str, out: Path) -> list[str]:
    return ["lab", "--quick", "--jobs", "1", "--no-progress", "--data", spec, "--out", str(out)]


def assert_ends_cleanly(code: int, stdout: str, stderr: str, out: Path, case: Case) -> None:
    assert code != 0, f"exit {code}: {stdout[-400:]}"
    assert "Traceback" not in stdout + stderr, stderr[-2000:]
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {stderr[-2000:]}"
    assert not out.exists(), sorted(out.rglob("*"))
    line = lines[0]
    assert str(case.named) in line, f"does not name {case.named}: {line}"
    assert re.search(case.problem, line), f"does not say /{case.problem}/: {line}"


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_folder_ends_with_one_line(name, tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    malformed = CASES[name](root)
    out = tmp_path / "out"
    # Past the data check the lab would train for a minute: a folder that gets there has failed.
    monkeypatch.setattr("batchnorm.lab.cli.run_lab", lambda *args: print("accepted") or 0)
    code = main(lab_arguments(malformed.spec, out))
    captured = capsys.readouterr()
    assert_ends_cleanly(code, captured.out, captured.err, out, malformed)
    assert not _marker(root).exists(), "the pickle's code ran"


# ``python -m batchnorm``, plus a note of the process's own peak memory when it exits: VmHWM,
# which starts afresh at exec (ru_maxrss from wait4 would count the parent's memory at fork).
LAUNCHER = """
import atexit, os, runpy, sys
def note_peak():
    status = open("/proc/self/status").read()
    open(os.environ["PEAK_FILE"], "w").write(status.split("VmHWM:")[1].split()[0])
atexit.register(note_peak)
sys.argv[0] = "batchnorm"
runpy.run_module("batchnorm", run_name="__main__", alter_sys=True)
"""


def run_limited(arguments: list[str], cwd: Path) -> tuple[int, str, str, int]:
    """``python -m batchnorm ARGS`` under MEMORY_LIMIT; (exit code, stdout, stderr, peak RSS)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        resource.setrlimit(resource.RLIMIT_CPU, (120, 120))

    peak_file = cwd / "peak.txt"
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *arguments], cwd=cwd,
                            env={**os.environ, "PEAK_FILE": str(peak_file)}, preexec_fn=limit,
                            capture_output=True, text=True, timeout=300)
    peak = int(peak_file.read_text()) * 1024 if peak_file.exists() else -1  # kB in the file
    return result.returncode, result.stdout, result.stderr, peak


@contextlib.contextmanager
def address_space_headroom(headroom: int):
    """Lower this process's address-space limit to ``headroom`` above what it maps now, so a
    reader that trusts a huge declared size fails with MemoryError instead of taking the
    machine's memory; the limit is restored afterwards."""
    mapped = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped * 1024 + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


MNIST_HEADER = idx_bytes((TRAIN, 28, 28), b"")
BIG_COUNT = BOMB_SIZE // 784 + 1  # images whose declared size exceeds the bomb's 4 GiB


def _bomb_declaring_the_usual_size(root: Path) -> Case:
    write_mnist(root, True)
    path = mnist_path(root, "train_images", True)
    path.write_bytes(gzip_bomb(MNIST_HEADER, BOMB_SIZE))
    return Case(f"mnist:{root}", path, r"more than")


def _bomb_declaring_its_size(root: Path) -> Case:
    write_mnist(root, True, train_labels=idx_bytes((BIG_COUNT,), b""))
    path = mnist_path(root, "train_images", True)
    path.write_bytes(gzip_bomb(idx_bytes((BIG_COUNT, 28, 28), b""), BOMB_SIZE))
    return Case(f"mnist:{root}", path, r"declares")


def _sparse_declaring_the_usual_size(root: Path) -> Case:
    write_mnist(root, False)
    path = mnist_path(root, "train_images", False)
    sparse_file(path, MNIST_HEADER, 8 * GIB)
    return Case(f"mnist:{root}", path, r"the file holds 8589934576 \(trailing bytes\)")


def _sparse_declaring_its_size(root: Path) -> Case:
    count = (8 * GIB) // 784
    write_mnist(root, False, train_labels=idx_bytes((count,), b""))
    path = mnist_path(root, "train_images", False)
    sparse_file(path, idx_bytes((count, 28, 28), b""), 16 + count * 784)
    return Case(f"mnist:{root}", path, r"declares")


def _declaring_more_than_there_is(gz: bool):
    def build(root: Path) -> Case:
        count = 300_000  # 235 MB declared, under the cap; the file holds one image
        write_mnist(root, gz, train_labels=labels(valid_labels(count)),
                    train_images=idx_bytes((count, 28, 28), bytes(784)))
        return Case(f"mnist:{root}", mnist_path(root, "train_images", gz), r"truncated")

    return build


HUGE_CASES = {
    "gzip bomb of 4 GiB, usual header": _bomb_declaring_the_usual_size,
    "gzip bomb of 4 GiB, header declaring more": _bomb_declaring_its_size,
    "sparse 8 GiB idx file, usual header": _sparse_declaring_the_usual_size,
    "sparse 8 GiB idx file, header declaring it": _sparse_declaring_its_size,
    "raw idx file declaring 235 MB, holding 784 bytes": _declaring_more_than_there_is(False),
    "gzip idx file declaring 235 MB, holding 784 bytes": _declaring_more_than_there_is(True),
}
# What reading a huge file may allocate at most: its header, a chunk of the gzip stream and the
# small declared contents (100 KB), far below the gigabytes it expands to.
ALLOCATION_LIMIT = 16 << 20


@pytest.mark.parametrize("name", list(HUGE_CASES))
def test_huge_files_are_refused_without_reading_them(name, tmp_path, capsys, monkeypatch):
    """In this process, with 1 GiB of address space to spare and every allocation traced."""
    root = tmp_path / "data"
    root.mkdir()
    malformed = HUGE_CASES[name](root)
    out = tmp_path / "out"
    monkeypatch.setattr("batchnorm.lab.cli.run_lab", lambda *args: print("accepted") or 0)
    main(["lab", "--list"])  # import what the lab imports before memory is traced
    capsys.readouterr()
    tracemalloc.start()
    try:
        with address_space_headroom(GIB):
            code = main(lab_arguments(malformed.spec, out))
        peak = tracemalloc.get_traced_memory()[1]  # numpy's buffers are traced too
    finally:
        tracemalloc.stop()
    captured = capsys.readouterr()
    assert_ends_cleanly(code, captured.out, captured.err, out, malformed)
    assert peak < ALLOCATION_LIMIT, f"allocated {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("name", ["gzip bomb of 4 GiB, usual header",
                                  "sparse 8 GiB idx file, usual header"])
def test_the_command_refuses_them_in_a_process_with_little_memory(name, tmp_path):
    """``python -m batchnorm lab`` as a user runs it, under a 1.5 GB address-space limit."""
    root = tmp_path / "data"
    root.mkdir()
    malformed = HUGE_CASES[name](root)
    out = tmp_path / "out"
    code, stdout, stderr, peak = run_limited(lab_arguments(malformed.spec, out), tmp_path)
    assert_ends_cleanly(code, stdout, stderr, out, malformed)
    assert stderr.startswith("batchnorm: error: ")
    assert 0 < peak < GIB, f"peak resident memory {peak / 2**20:.0f} MiB"


def test_the_bomb_is_what_it_claims(tmp_path):
    """The bomb is a few MB of valid gzip whose first 64 MiB are the header and then zeros."""
    bomb = gzip_bomb(MNIST_HEADER, BOMB_SIZE)
    assert len(bomb) < 8 << 20
    path = tmp_path / "bomb.gz"
    path.write_bytes(bomb)
    with gzip.open(path, "rb") as handle:
        assert handle.read(len(MNIST_HEADER)) == MNIST_HEADER
        for _ in range(4):
            assert handle.read(16 << 20) == bytes(16 << 20)


def test_the_valid_folders_load(tmp_path):
    """The folders the cases break are valid as written, so each case fails for its flaw alone."""
    from batchnorm.lab.data import load_data

    for gz in (False, True):
        write_mnist(tmp_path / f"mnist-{gz}", gz)
        data = load_data(f"mnist:{tmp_path / f'mnist-{gz}'}")
        assert data.image_shape == (1, 28, 28) and len(data.train_labels) == TRAIN
    write_cifar(tmp_path / "cifar")
    data = load_data(f"cifar10:{tmp_path / 'cifar'}")
    assert len(data.train_labels) == 5 * PER_BATCH and len(data.test_labels) == PER_BATCH
