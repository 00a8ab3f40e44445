"""Where a FILE stage's request files live while the predictor reads them.

One folder per loop process, made once; each request gets a numbered subfolder (two
requests may send the same file name), and its files are removed by name right after
the batch. Per-request ``mkdtemp`` + ``rmtree`` cost a few percent of a loop's time on
small files; this costs one ``mkdir``, the writes, the unlinks and one ``rmdir``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence


class UnusableFileName(ValueError):
    """A file name that would leave its request's folder (checked again here: a shared store
    may hold jobs from API servers we do not control)."""


class Scratch:
    """A loop's private folder for request files; ``close`` removes whatever is left."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fastdeploy-files-"))
        self._numbers = itertools.count()

    def write(self, files: Sequence[Any]) -> tuple[Path, list[str]]:
        """Write one request's ``[name, bytes]`` pairs into a new subfolder; returns it and the paths."""
        folder = self.root / str(next(self._numbers))
        os.mkdir(folder)
        paths: list[str] = []
        try:
            for name, content in files:
                base = os.path.basename(str(name).replace("\\", "/"))
                if base in ("", ".", "..") or "\x00" in base:
                    raise UnusableFileName(f"unusable file name {name!r}")
                path = os.path.join(folder, base)
                with open(path, "wb") as f:
                    f.write(content)
                paths.append(path)
        except BaseException:
            self.remove(folder, paths)
            raise
        return folder, paths

    @staticmethod
    def remove(folder: Path, paths: Sequence[str]) -> None:
        """Delete a request's files; anything the predictor added beside them goes too."""
        try:
            for path in paths:
                os.unlink(path)
            os.rmdir(folder)
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
