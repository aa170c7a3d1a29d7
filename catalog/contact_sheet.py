"""A contact sheet: catalog images in a grid, each with its name and description, to check by eye."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..atomic import staged_file
from .images import to_model_image
from .readers import Catalog

CELL_W, IMAGE_H, TEXT_H, PAD = 256, 256, 176, 10


def pick_items(catalog: Catalog, n: int, split: str = "all") -> list:
    """One item of each subcategory first, then the next ones in catalog order, up to n."""
    records = catalog.records(split)
    chosen, seen = [], set()
    for r in records:
        if r.subcategory not in seen:
            seen.add(r.subcategory)
            chosen.append(r.id)
    chosen = chosen[:n]
    chosen += [r.id for r in records if r.id not in set(chosen)][: n - len(chosen)]
    wanted = set(chosen)
    items = {it.id: it for it in catalog.items(split) if it.id in wanted}
    return [items[i] for i in chosen if i in items]


def _font(name: str, size: int):
    """DejaVu where the system has it (it draws every latin-1 letter), else Pillow's own font."""
    try:
        return ImageFont.truetype(name, size)
    except OSError:
        return ImageFont.load_default(size=size)


def contact_sheet(catalog: Catalog, out: str | Path, n: int = 16, columns: int = 4, split: str = "all") -> Path:
    items = pick_items(catalog, n, split)
    if not items:
        raise ValueError("the catalog has no items to show")
    rows = -(-len(items) // columns)
    sheet = Image.new("RGB", (columns * (CELL_W + PAD) + PAD, rows * (IMAGE_H + TEXT_H + PAD) + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    bold, regular = _font("DejaVuSans-Bold.ttf", 12), _font("DejaVuSans.ttf", 10)
    for k, item in enumerate(items):
        x = PAD + (k % columns) * (CELL_W + PAD)
        y = PAD + (k // columns) * (IMAGE_H + TEXT_H + PAD)
        sheet.paste(Image.fromarray(to_model_image(item.image)), (x, y))
        ty = y + IMAGE_H + 4
        for line in textwrap.wrap(item.name, 36)[:2]:
            draw.text((x, ty), line, fill=(20, 20, 20), font=bold)
            ty += 16
        for line in textwrap.wrap(item.description, 44)[:9]:
            draw.text((x, ty), line, fill=(70, 70, 70), font=regular)
            ty += 14
    out = Path(out)
    with staged_file(out) as tmp:
        sheet.save(tmp, format="PNG", optimize=True)
    return out
