"""Finding a data set's files in the folder a ``--data`` spec names, each error naming the path."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from batchnorm.lab.data.dataset import DataError


def find_files(
    name: str, path: Path, folders: list[Path], files: dict[str, tuple[str, ...]], expected: str
) -> dict[str, Path]:
    """For each key of ``files``, the path of the first of its names present in one folder.

    ``folders`` are the layouts to try (the folder itself, a torchvision root, ...): the first that
    holds every file wins, and each of its files must be a readable regular file. Otherwise the
    error names the first missing file of the first folder that holds some of them, or, when no
    folder holds any, says what ``path`` should contain (``expected``).
    """
    _check_folder(name, path)
    partial = None
    for folder in folders:
        found = {key: _present(folder, names) for key, names in files.items()}
        if all(found.values()):
            for file in found.values():
                check_file(file)
            return found
        if partial is None and any(found.values()):
            partial = folder, found
    if partial is None:
        raise DataError(f"{name}: '{path}' does not hold {expected}")
    folder, found = partial
    names = next(files[key] for key, file in found.items() if file is None)
    others = "".join(f" (nor {other})" for other in names[1:])
    raise DataError(f"{folder / names[0]}: missing{others}, while the other {name} files are there")


def check_file(path: Path) -> None:
    """Refuse a path that is not a regular file: a directory, a broken link, a symlink loop."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise DataError(f"{path}: cannot be opened ({error.strerror or error})") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: a directory where a data file should be")
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file")


def _check_folder(name: str, path: Path) -> None:
    if path.is_dir():
        return
    if not os.path.lexists(path):
        raise DataError(f"{name}: folder '{path}' does not exist")
    try:
        path.stat()
    except OSError as error:
        raise DataError(f"{name}: '{path}' cannot be opened ({error.strerror or error})") from None
    raise DataError(f"{name}: '{path}' is not a folder")


def _present(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` that is a file in ``folder``, else the first that is there at all
    (a directory or a dangling link, refused later with its own message), else None."""
    candidates = [folder / name for name in names]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return next((candidate for candidate in candidates if os.path.lexists(candidate)), None)
