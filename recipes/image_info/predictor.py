"""Reads each image file: its format, size, mode, mean brightness and a SHA-256 of the bytes."""

import hashlib
from pathlib import Path

from PIL import Image, ImageStat


def _describe(path: str) -> dict:
    data = Path(path).read_bytes()
    with Image.open(path) as image:
        gray = image.convert("L")
        return {
            "file": Path(path).name,
            "format": image.format,
            "width": image.width,
            "height": image.height,
            "mode": image.mode,
            "mean_brightness": round(ImageStat.Stat(gray).mean[0], 3),
            "sha256": hashlib.sha256(data).hexdigest(),
        }


def predictor(inputs, batch_size=1):
    return [_describe(path) for path in inputs]
