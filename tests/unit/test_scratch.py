"""The loop's folder for request files: private subfolders, removal by name, nothing left behind."""

from __future__ import annotations

import pytest

from fastdeploy.scratch import Scratch, UnusableFileName


def test_requests_with_the_same_file_name_get_their_own_folders():
    scratch = Scratch()
    try:
        folder_a, (path_a,) = scratch.write([["x.wav", b"a"]])
        folder_b, (path_b,) = scratch.write([["x.wav", b"b"]])
        assert folder_a != folder_b and path_a.endswith("/x.wav") and path_b.endswith("/x.wav")
        assert open(path_a, "rb").read() == b"a" and open(path_b, "rb").read() == b"b"
        Scratch.remove(folder_a, [path_a])
        assert not folder_a.exists() and folder_b.exists()
    finally:
        scratch.close()
    assert not scratch.root.exists()


def test_remove_also_takes_files_the_predictor_added():
    scratch = Scratch()
    try:
        folder, paths = scratch.write([["in.txt", b"x"]])
        (folder / "extra.tmp").write_bytes(b"made by the predictor")
        Scratch.remove(folder, paths)
        assert not folder.exists()
    finally:
        scratch.close()


@pytest.mark.parametrize("name", ["", ".", "..", "a\x00b"])
def test_unusable_names_are_refused_and_leave_nothing(name):
    scratch = Scratch()
    try:
        with pytest.raises(UnusableFileName):
            scratch.write([["ok.txt", b"1"], [name, b"2"]])
        assert list(scratch.root.iterdir()) == []
    finally:
        scratch.close()


def test_path_parts_are_stripped():
    scratch = Scratch()
    try:
        folder, (path,) = scratch.write([["../../etc/x.png", b"1"]])
        assert path == str(folder / "x.png")
    finally:
        scratch.close()
