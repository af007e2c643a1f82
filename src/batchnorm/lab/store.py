"""Run results on disk: one JSON file per run, named by a hash of the run's full configuration.

Files are written to a temporary name and renamed into place, so a killed process leaves either
the whole file or none. Each file carries a checksum of its content; a file that fails to parse,
has the wrong key or the wrong checksum is reported as missing (and so run again), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT = 1
# Bumped when a change to the training code changes results, so old files are not reused.
LAB_CODE_VERSION = 2


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)


def run_key(identity: dict) -> str:
    """The file name of a run: sha256 of its canonical configuration (first 24 hex digits)."""
    payload = canonical_json({"lab_code_version": LAB_CODE_VERSION, **identity})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _checksum(record: dict) -> str:
    return hashlib.sha256(canonical_json(record).encode()).hexdigest()


def plain(value: Any) -> Any:
    """Check that a result is plain JSON data (numbers, strings, bools, lists, dicts)."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a run must return plain numbers, got {type(value).__name__}: {value!r}")


class ResultStore:
    """A folder of run results keyed by :func:`run_key`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def save(self, key: str, identity: dict, result: dict) -> None:
        record = {"format": FORMAT, "key": key, "identity": identity, "result": plain(result)}
        record["checksum"] = _checksum(record)
        self.root.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as file:
                file.write(canonical_json(record))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path(key))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def load(self, key: str) -> dict | None:
        """The saved result, or None when it is missing, truncated, corrupt or for another key."""
        path = self.path(key)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            return None
        checksum = record.pop("checksum", None)
        if record.get("key") != key or checksum != _checksum(record):
            return None
        return record["result"]
