"""Regenerate the example PNG images in ./examples/ (text drawn with Pillow).

    python make_examples.py

Uses the DejaVu fonts when installed (Debian: fonts-dejavu-core), otherwise
Pillow's built-in default font. Needs only Pillow. The expected text of each
image is in EXPECTED (printed when run) and is what the predictor should read.
"""

import os

from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "examples")

FONT_DIRS = ["/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/TTF",
             "/usr/share/fonts/dejavu", "/Library/Fonts", "C:/Windows/Fonts"]

EXPECTED = {
    "invoice.png": ["INVOICE 2024-117", "3 widgets at 12.50", "Total due: 37.50 EUR"],
    "sign.png": ["OPEN 24 HOURS"],
    "note.png": ["Meeting moved to Friday", "Room 4B at 10:30 am"],
}


def font(size, bold=False):
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for d in FONT_DIRS:
        path = os.path.join(d, name)
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)  # Pillow >= 10.1


def draw_lines(path, lines, size, fg, bg, fsize, bold=False, spacing=1.6, margin=(30, 25)):
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    f = font(fsize, bold)
    x, y = margin
    for line in lines:
        d.text((x, y), line, fill=fg, font=f)
        y += int(fsize * spacing)
    img.save(path, optimize=True)


def main():
    os.makedirs(OUT, exist_ok=True)
    draw_lines(os.path.join(OUT, "invoice.png"), EXPECTED["invoice.png"],
               (520, 190), (20, 20, 20), (255, 255, 255), 30)
    draw_lines(os.path.join(OUT, "sign.png"), EXPECTED["sign.png"],
               (460, 110), (255, 255, 255), (170, 20, 30), 44, bold=True, margin=(28, 28))
    draw_lines(os.path.join(OUT, "note.png"), EXPECTED["note.png"],
               (560, 150), (30, 40, 120), (250, 245, 210), 32)
    for name, lines in EXPECTED.items():
        p = os.path.join(OUT, name)
        print(f"{name:12s} {os.path.getsize(p) // 1024:3d} KB  {' | '.join(lines)}")


if __name__ == "__main__":
    main()
