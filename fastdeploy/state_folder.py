"""The state folder: created with a ``.gitignore`` of its own, so jobs, uploads and the store
secret never reach git (the default folder, RECIPE/.fastdeploy, sits inside the recipe)."""

from __future__ import annotations

from pathlib import Path


def create_state_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents); only a folder created here gets the ``.gitignore``:
    one that exists already (``--state-dir`` may name a folder of the user's) is left as it is.
    Raises OSError when it cannot be created."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir()
    except FileExistsError:
        return
    (folder / ".gitignore").write_text("*\n")  # everything in it, this file included
