"""OCR of image files with rapidocr-onnxruntime (PP-OCRv4 det/rec + angle cls).

The models ship inside the rapidocr-onnxruntime wheel, nothing is downloaded.
Detector settings that read text drawn on generated/clean images well:
det_limit_type="max", det_limit_side_len=960, det_unclip_ratio=2.0.
One ONNX Runtime thread unless OMP_NUM_THREADS says otherwise.

RapidOCR works one image at a time (its recognizer batches the text lines of
one image), so batch_size does not change the work done per image.
"""

import os

from rapidocr_onnxruntime import RapidOCR


def _threads():
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


_engine = RapidOCR(
    det_limit_type="max",
    det_limit_side_len=960,
    det_unclip_ratio=2.0,
    intra_op_num_threads=_threads(),
    inter_op_num_threads=1,
)


def ocr(path):
    # No per-call keyword arguments: RapidOCR.__call__ resets unclip_ratio and
    # box_thresh to its defaults whenever any keyword is passed.
    result, _elapse = _engine(path)
    lines = []
    for box, text, score in result or []:
        lines.append({
            "text": text,
            "score": round(float(score), 4),
            "box": [[round(float(x), 1), round(float(y), 1)] for x, y in box],
        })
    return {"text": "\n".join(line["text"] for line in lines), "lines": lines}


def predictor(inputs, batch_size=1):
    """inputs: list of image file paths (PNG, JPEG, BMP, ... anything OpenCV/Pillow
    reads). Returns one {"text": str, "lines": [{"text", "score", "box"}]} per
    input, lines top-to-bottom, left-to-right. An unreadable file gives
    {"error": "..."} instead of failing the whole batch."""
    results = []
    for path in inputs:
        try:
            results.append(ocr(path))
        except Exception as e:
            results.append({"error": f"cannot OCR {os.path.basename(str(path))}: "
                                     f"{type(e).__name__}: {e}"})
    return results
