"""FILE recipes: base64 files to a private folder, paths in key order, answers keyed by the request."""

from __future__ import annotations

import base64
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.helpers import RECIPES, serve


@pytest.fixture(scope="module")
def files():
    with serve(RECIPES / "image_info") as server:
        yield server


def _png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_seed_file_example_works_unchanged(files, tmp_path):
    # the seed API.md FILE snippet, with real files on disk
    file_paths = []
    for i, size in enumerate([(10, 20), (30, 5)]):
        path = tmp_path / f"{i + 1}.png"
        path.write_bytes(_png(*size, (0, 0, 255)))
        file_paths.append(str(path))
    data = {}
    for file_path in file_paths:
        with open(file_path, "rb") as f:  # noqa: F841 (the seed snippet, verbatim)
            data[file_path] = base64.b64encode(open(file_path, "rb").read()).decode("utf-8")
    import requests

    response = requests.post(f"{files.url}/sync", json={"data": data}).json()
    assert response["success"] is True
    assert list(response["prediction"]) == file_paths  # keyed by exactly the request's keys
    assert response["prediction"][file_paths[0]]["width"] == 10
    assert response["prediction"][file_paths[1]]["height"] == 5
    response = requests.post(f"{files.url}/async", json={"data": data}).json()
    result = files.wait_result(response["unique_id"])
    assert result["prediction"][file_paths[1]]["width"] == 30


def test_real_work_on_real_files_and_names_reduced(files):
    red, green = _png(64, 48, (255, 0, 0)), _png(7, 9, (0, 255, 0))
    data = {"../../x.png": base64.b64encode(red).decode(), "dir\\sub\\y.png": base64.b64encode(green).decode()}
    body = files.post("/sync", {"data": data}).json()
    assert body["success"] is True
    prediction = body["prediction"]
    assert list(prediction) == ["../../x.png", "dir\\sub\\y.png"]
    x, y = prediction["../../x.png"], prediction["dir\\sub\\y.png"]
    assert x["file"] == "x.png" and y["file"] == "y.png"  # base names on disk
    assert (x["width"], x["height"], x["format"]) == (64, 48, "PNG")
    assert x["sha256"] == hashlib.sha256(red).hexdigest()
    assert y["sha256"] == hashlib.sha256(green).hexdigest()


def test_same_base_name_in_concurrent_requests_stays_private(files):
    images = [_png(5 + i, 5, (i, i, i)) for i in range(12)]

    def send(image: bytes) -> dict:
        return files.post("/sync", {"data": {"same.png": base64.b64encode(image).decode()}}).json()

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, images))
    for image, answer in zip(images, answers):
        assert answer["prediction"]["same.png"]["sha256"] == hashlib.sha256(image).hexdigest()


def test_files_are_deleted_after_the_answer(tmp_path):
    recipe = tmp_path / "paths"
    recipe.mkdir()
    (recipe / "predictor.py").write_text(
        "def predictor(inputs, batch_size=1):\n    return [{'path': p, 'text': open(p).read()} for p in inputs]\n"
    )
    (recipe / "example.txt").write_text("example")
    (recipe / "example.py").write_text("input_type = 'file'\nexample = ['example.txt']\n")
    with serve(recipe) as server:
        body = server.post("/sync", {"data": {"a.txt": base64.b64encode(b"alpha").decode(),
                                              "b.txt": base64.b64encode(b"beta").decode()}}).json()
        assert body["prediction"]["a.txt"]["text"] == "alpha"
        assert body["prediction"]["b.txt"]["text"] == "beta"
        import os

        for key in ("a.txt", "b.txt"):
            path = body["prediction"][key]["path"]
            assert os.path.isabs(path)
            assert not os.path.exists(path)
            assert not os.path.exists(os.path.dirname(path))
        assert server.get("/meta").json()["input_type"] == "file"
        empty = server.post("/sync", {"data": {}}).json()
        assert empty["success"] is True and empty["prediction"] == {}
