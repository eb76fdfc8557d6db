"""Generate the example images in this folder with PIL only (deterministic).

Run:  python assets/make_assets.py   (writes next to this file)
      python assets/make_assets.py OUT_DIR
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def centered_text(draw: ImageDraw.ImageDraw, xy, text, size, fill, anchor="mm"):
    draw.text(xy, text, font=font(size), fill=fill, anchor=anchor)


def make_chart(path: Path) -> None:
    """Bar chart 640x480: title, axis labels, values on the bars."""
    w, h = 640, 480
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    centered_text(d, (w // 2, 30), "Monthly Sales 2024", 26, "black")
    left, right, top, bottom = 90, 610, 70, 400
    # grid + y ticks
    vmax = 120
    for v in range(0, vmax + 1, 20):
        y = bottom - (bottom - top) * v / vmax
        d.line([(left, y), (right, y)], fill=(225, 225, 225), width=1)
        d.text((left - 10, y), str(v), font=font(14), fill="black", anchor="rm")
    d.line([(left, top), (left, bottom)], fill="black", width=2)
    d.line([(left, bottom), (right, bottom)], fill="black", width=2)
    data = [("Jan", 45), ("Feb", 62), ("Mar", 88), ("Apr", 71), ("May", 104), ("Jun", 93)]
    colors = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193)]
    slot = (right - left) / len(data)
    bw = slot * 0.6
    for i, ((label, v), c) in enumerate(zip(data, colors)):
        x0 = left + slot * i + (slot - bw) / 2
        y0 = bottom - (bottom - top) * v / vmax
        d.rectangle([x0, y0, x0 + bw, bottom - 1], fill=c, outline="black")
        d.text((x0 + bw / 2, y0 - 6), str(v), font=font(16), fill="black", anchor="mb")
        d.text((x0 + bw / 2, bottom + 8), label, font=font(16), fill="black", anchor="mt")
    centered_text(d, ((left + right) // 2, 455), "Month", 18, "black")
    # rotated y-axis label
    lab = Image.new("RGBA", (200, 30), (255, 255, 255, 0))
    ImageDraw.Draw(lab).text((100, 15), "Units sold", font=font(18), fill="black", anchor="mm")
    lab = lab.rotate(90, expand=True)
    img.paste(lab, (10, (top + bottom) // 2 - lab.height // 2), lab)
    img.save(path, optimize=True)


def make_receipt(path: Path) -> None:
    """Shop receipt 448x640: items, prices and a total."""
    w, h = 448, 640
    img = Image.new("RGB", (w, h), (236, 232, 222))
    d = ImageDraw.Draw(img)
    d.rectangle([34, 20, w - 34, h - 20], fill=(255, 255, 252), outline=(180, 180, 180))
    x0, x1 = 54, w - 54
    ink = (30, 30, 30)
    centered_text(d, (w // 2, 55), "CORNER GROCERY", 26, ink)
    centered_text(d, (w // 2, 85), "12 Market Road, Springfield", 14, ink)
    centered_text(d, (w // 2, 105), "2024-05-17  14:32   Till 3", 14, ink)
    d.line([(x0, 125), (x1, 125)], fill=ink, width=1)
    items = [
        ("Milk 1L", 1, 1.29),
        ("Bread", 1, 2.49),
        ("Apples 1kg", 2, 3.10),
        ("Coffee beans", 1, 8.99),
        ("Eggs x12", 1, 3.75),
        ("Orange juice", 2, 2.20),
    ]
    y = 145
    d.text((x0, y), "ITEM", font=font(16), fill=ink)
    d.text((x0 + 210, y), "QTY", font=font(16), fill=ink)
    d.text((x1, y), "PRICE", font=font(16), fill=ink, anchor="ra")
    y += 30
    subtotal = 0.0
    for name, qty, price in items:
        line = qty * price
        subtotal += line
        d.text((x0, y), name, font=font(16), fill=ink)
        d.text((x0 + 220, y), str(qty), font=font(16), fill=ink)
        d.text((x1, y), f"{line:.2f}", font=font(16), fill=ink, anchor="ra")
        y += 28
    d.line([(x0, y + 4), (x1, y + 4)], fill=ink, width=1)
    y += 16
    tax = round(subtotal * 0.08, 2)
    total = subtotal + tax
    for label, val in (("Subtotal", subtotal), ("Tax 8%", tax)):
        d.text((x0, y), label, font=font(16), fill=ink)
        d.text((x1, y), f"{val:.2f}", font=font(16), fill=ink, anchor="ra")
        y += 28
    d.line([(x0, y + 2), (x1, y + 2)], fill=ink, width=2)
    y += 12
    d.text((x0, y), "TOTAL", font=font(24), fill=ink)
    d.text((x1, y), f"${total:.2f}", font=font(24), fill=ink, anchor="ra")
    y += 50
    d.text((x0, y), "Paid: VISA **** 4821", font=font(14), fill=ink)
    centered_text(d, (w // 2, h - 60), "Thank you for shopping!", 18, ink)
    # barcode-like stripes, deterministic
    bx = w // 2 - 90
    for i in range(60):
        if (i * 7 + i // 3) % 5 < 3:
            d.rectangle([bx + i * 3, h - 45, bx + i * 3 + 1, h - 28], fill=ink)
    img.save(path, optimize=True)


def make_street_sign(path: Path) -> None:
    """Street sign photo-ish JPEG 800x600: green 'MAIN ST' sign above a STOP sign."""
    w, h = 800, 600
    img = Image.new("RGB", (w, h), (135, 190, 235))
    d = ImageDraw.Draw(img)
    # sky gradient
    for y in range(h):
        t = y / h
        d.line([(0, y), (w, y)], fill=(int(120 + 90 * t), int(180 + 50 * t), int(235 + 10 * t)))
    # ground and a few buildings
    d.rectangle([0, 470, w, h], fill=(110, 110, 110))
    d.rectangle([0, 460, w, 470], fill=(190, 190, 190))
    for x, bh, c in ((20, 230, (170, 140, 120)), (160, 300, (150, 150, 165)), (560, 260, (185, 160, 130)), (680, 330, (140, 145, 150))):
        d.rectangle([x, 460 - bh, x + 110, 460], fill=c)
        for wy in range(460 - bh + 20, 450, 40):
            for wx in range(x + 12, x + 100, 30):
                d.rectangle([wx, wy, wx + 16, wy + 22], fill=(230, 230, 200))
    # pole
    cx = 400
    d.rectangle([cx - 8, 120, cx + 8, 500], fill=(120, 120, 125))
    # street name sign
    d.rounded_rectangle([cx - 190, 110, cx + 190, 190], radius=10, fill=(0, 110, 60), outline="white", width=4)
    centered_text(d, (cx, 150), "MAIN ST", 56, "white")
    # STOP octagon
    r, oy = 95, 330
    pts = [(cx + r * math.cos(math.radians(22.5 + 45 * k)), oy + r * math.sin(math.radians(22.5 + 45 * k))) for k in range(8)]
    d.polygon(pts, fill=(200, 20, 30), outline="white", width=6)
    centered_text(d, (cx, oy), "STOP", 60, "white")
    img.save(path, quality=85, optimize=True)


def arrow(d: ImageDraw.ImageDraw, a, b, fill, width=4, head=14):
    d.line([a, b], fill=fill, width=width)
    ang = math.atan2(b[1] - a[1], b[0] - a[0])
    p1 = (b[0] - head * math.cos(ang - 0.45), b[1] - head * math.sin(ang - 0.45))
    p2 = (b[0] - head * math.cos(ang + 0.45), b[1] - head * math.sin(ang + 0.45))
    d.polygon([b, p1, p2], fill=fill)


def make_diagram(path: Path) -> None:
    """Flow diagram 1024x576: Upload -> Preprocess -> NPU -> Answer."""
    w, h = 1024, 576
    img = Image.new("RGB", (w, h), (250, 250, 252))
    d = ImageDraw.Draw(img)
    centered_text(d, (w // 2, 70), "Inference pipeline", 34, (20, 20, 40))
    steps = [
        ("Upload", "image + question", (222, 235, 255)),
        ("Preprocess", "resize, tokenize", (226, 247, 226)),
        ("NPU", "Qwen2.5-VL", (255, 236, 214)),
        ("Answer", "streamed text", (243, 226, 250)),
    ]
    bw, bh, gap = 180, 110, 68
    x = (w - (4 * bw + 3 * gap)) // 2
    y = h // 2 - bh // 2
    for i, (name, sub, c) in enumerate(steps):
        d.rounded_rectangle([x, y, x + bw, y + bh], radius=16, fill=c, outline=(40, 40, 70), width=3)
        centered_text(d, (x + bw // 2, y + 42), name, 28, (20, 20, 40))
        centered_text(d, (x + bw // 2, y + 80), sub, 16, (70, 70, 90))
        if i < 3:
            arrow(d, (x + bw + 6, y + bh // 2), (x + bw + gap - 6, y + bh // 2), (40, 40, 70))
        x += bw + gap
    centered_text(d, (w // 2, h - 80), "Step 1 -> Step 2 -> Step 3 -> Step 4", 20, (90, 90, 110))
    img.save(path, optimize=True)


def make_shapes(path: Path) -> None:
    """Coloured geometric shapes 448x448."""
    w, h = 448, 448
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.ellipse([30, 30, 190, 190], fill=(220, 40, 40), outline="black", width=3)  # red circle
    d.rectangle([250, 40, 410, 180], fill=(40, 90, 220), outline="black", width=3)  # blue rectangle
    d.polygon([(110, 250), (30, 410), (190, 410)], fill=(40, 170, 70), outline="black", width=3)  # green triangle
    # yellow star
    cx, cy, ro, ri = 330, 330, 85, 35
    pts = []
    for k in range(10):
        r = ro if k % 2 == 0 else ri
        a = math.radians(-90 + 36 * k)
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    d.polygon(pts, fill=(250, 200, 20), outline="black", width=3)
    img.save(path, optimize=True)


MAKERS = {
    "chart.png": make_chart,
    "receipt.png": make_receipt,
    "street_sign.jpg": make_street_sign,
    "diagram.png": make_diagram,
    "shapes.png": make_shapes,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", nargs="?", default=str(HERE))
    out = Path(p.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in MAKERS.items():
        fn(out / name)
        print(out / name, (out / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
