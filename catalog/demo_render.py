"""Studio-style 256x256 product shots for demo products, drawn with Pillow and numpy.

Each subcategory has a silhouette drawn in a 100x100 unit box; every attribute in the spec
changes pixels a 32x32 patch sees (a sleeve, a collar, a pocket, a heel). Pose, scale, light
and background vary a little per product so no two images are the same.

One file over 400 lines on purpose: one drawing function per subcategory (12), each short,
sharing the helpers at the top; split apart they would only import each other.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .demo_spec import COLOURS, ProductSpec

SIZE = 256
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_PIX = np.arange(SIZE, dtype=np.float32)
_RAMP = _PIX / SIZE - 0.5  # -0.5 .. 0.5 across the image
Point = tuple[float, float]


def _mirror(points: list[Point]) -> list[Point]:
    return [(100 - x, y) for x, y in points]


class Canvas:
    """A fabric mask drawn in unit coordinates, and detail strokes drawn after the fabric is filled."""

    def __init__(self, rng: np.random.Generator, base: np.ndarray):
        self.k = rng.uniform(0.86, 1.0) * SIZE / 100 * 0.95  # pixels per unit
        self.ox = SIZE / 2 - 50 * self.k + rng.uniform(-7, 7)
        self.oy = SIZE / 2 - 50 * self.k + rng.uniform(-6, 6)
        self.mask = Image.new("L", (SIZE, SIZE), 0)
        self._md = ImageDraw.Draw(self.mask)
        self.later: list[Callable[[ImageDraw.ImageDraw], None]] = []
        self.base = base
        luma = 0.299 * base[0] + 0.587 * base[1] + 0.114 * base[2]
        # Seams and outlines: darker than the fabric, or lighter on near-black fabric so they show.
        self.seam = tuple(int(v) for v in (np.minimum(base + 75, 255) if luma < 60 else base * 0.55))
        self.trim = (238, 234, 226) if luma < 140 else (48, 44, 40)  # buttons and drawstrings
        self.metal = (196, 198, 204)

    def p(self, points: list[Point]) -> list[Point]:
        return [(self.ox + x * self.k, self.oy + y * self.k) for x, y in points]

    def w(self, units: float) -> int:
        return max(1, round(units * self.k))

    def fabric(self, points: list[Point], both_sides: bool = False) -> None:
        self._md.polygon(self.p(points), fill=255)
        if both_sides:
            self._md.polygon(self.p(_mirror(points)), fill=255)

    def fabric_ellipse(self, x0, y0, x1, y1) -> None:
        self._md.ellipse(self.p([(x0, y0), (x1, y1)]), fill=255)

    def cut(self, points: list[Point]) -> None:
        self._md.polygon(self.p(points), fill=0)

    def cut_ellipse(self, x0, y0, x1, y1) -> None:
        self._md.ellipse(self.p([(x0, y0), (x1, y1)]), fill=0)

    # Strokes after the fabric: each appends a closure run on the RGB image.
    def line(self, points: list[Point], width: float = 0.7, colour=None) -> None:
        pts, w, c = self.p(points), self.w(width), colour or self.seam
        self.later.append(lambda d: d.line(pts, fill=c, width=w, joint="curve"))

    def outline(self, points: list[Point], width: float = 0.7, colour=None) -> None:
        self.line(points + points[:1], width, colour)

    def shape(self, points: list[Point], colour, outline=None) -> None:
        pts, o, w = self.p(points), outline, self.w(0.6)
        self.later.append(lambda d: d.polygon(pts, fill=colour, outline=o, width=w))

    def dot(self, x: float, y: float, r: float, colour=None) -> None:
        (x0, y0), (x1, y1) = self.p([(x - r, y - r), (x + r, y + r)])
        c = colour or self.trim
        edge = self.seam
        self.later.append(lambda d: d.ellipse([x0, y0, x1, y1], fill=c, outline=edge))

    def arc(self, box: tuple[float, float, float, float], start: float, end: float, width: float, colour) -> None:
        (x0, y0), (x1, y1) = self.p([box[:2], box[2:]])
        w = self.w(width)
        self.later.append(lambda d: d.arc([x0, y0, x1, y1], start, end, fill=colour, width=w))

    def buttons(self, x: float, y0: float, y1: float, n: int, r: float = 1.2) -> None:
        for y in np.linspace(y0, y1, n):
            self.dot(x, float(y), r)

    def zip(self, x: float, y0: float, y1: float) -> None:
        self.line([(x, y0), (x, y1)], 1.0, self.metal)
        for y in np.arange(y0, y1, 2.0):
            self.line([(x - 0.9, float(y)), (x + 0.9, float(y))], 0.3, (120, 122, 128))
        self.dot(x, y0 + 1.2, 1.0, self.metal)


# Silhouettes ----------------------------------------------------------------------------------


def _sleeves(c: Canvas, kind: str, shoulder: Point, length_y: float | None = None) -> None:
    sx, sy = shoulder
    if kind == "short":
        c.fabric([(sx, sy), (sx - 11, sy + 6), (sx - 15, sy + 21), (sx - 4, sy + 24), (sx + 1, sy + 14)], both_sides=True)
        c.line([(sx - 15, sy + 21), (sx - 4, sy + 24)], 0.6)
        c.line([(100 - sx + 15, sy + 21), (100 - sx + 4, sy + 24)], 0.6)
    elif kind == "long":
        end = length_y or sy + 56
        c.fabric([(sx, sy), (sx - 9, sy + 5), (sx - 19, end), (sx - 10, end + 1.5), (sx + 1, sy + 18)], both_sides=True)
        for side in (1, -1):
            x0, x1 = 50 + side * (50 - (sx - 19)), 50 + side * (50 - (sx - 10))
            c.line([(x0, end - 3.5), (x1, end - 2)], 0.6)


def _neckline(c: Canvas, kind: str, y: float, half: float = 8) -> None:
    if kind == "v-neck":
        c.cut([(50 - half, y - 1), (50 + half, y - 1), (50, y + 13)])
        c.line([(50 - half - 1, y - 1), (50, y + 14.5), (50 + half + 1, y - 1)], 1.0)
    elif kind == "turtleneck":
        c.fabric([(50 - half, y - 11), (50 + half, y - 11), (50 + half + 1, y + 2), (50 - half - 1, y + 2)])
        for yy in (y - 8, y - 5, y - 2):
            c.line([(50 - half, yy), (50 + half, yy)], 0.5)
    else:  # crew, round
        c.cut_ellipse(50 - half, y - 5, 50 + half, y + 5)
        c.arc((50 - half - 1.2, y - 6.2, 50 + half + 1.2, y + 6.2), 0, 180, 1.2, c.seam)


def draw_tshirt(c: Canvas, s: ProductSpec) -> None:
    d = s.details
    if d["sleeve"] == "sleeveless":
        c.fabric([(38, 20), (62, 20), (66, 40), (67, 86), (33, 86), (34, 40)])
    else:
        c.fabric([(34, 20), (66, 20), (67, 86), (33, 86)])
        _sleeves(c, d["sleeve"], (34, 20))
    _neckline(c, d["neckline"], 20)
    if d["pocket"] == "chest pocket":
        c.outline([(37, 34), (46, 34), (46, 44), (37, 44)], 0.8)
        c.line([(37, 36), (46, 36)], 0.5)
    c.line([(33, 82), (67, 82)], 0.5)


def draw_shirt(c: Canvas, s: ProductSpec) -> None:
    d = s.details
    c.fabric([(34, 20), (66, 20), (67, 84), (58, 88), (50, 86), (42, 88), (33, 84)])
    _sleeves(c, d["sleeve"], (34, 20))
    c.cut_ellipse(43, 15, 57, 25)
    collar = d["collar"]
    if collar == "point collar":
        left = [(42, 17), (50, 22), (45, 32)]
    elif collar == "spread collar":
        left = [(42, 17), (50, 22), (36, 27)]
    else:  # band collar
        left = [(42, 16), (50, 19), (50, 23), (42.5, 21)]
    c.fabric(left, both_sides=True)
    c.outline(left, 0.7)
    c.outline(_mirror(left), 0.7)
    c.line([(50, 22), (50, 86)], 0.7)
    c.buttons(51.5, 26, 80, 6)
    if d["pocket"] == "chest pocket":
        c.outline([(38, 36), (46, 36), (46, 45), (38, 45)], 0.8)


def draw_sweater(c: Canvas, s: ProductSpec) -> None:
    d = s.details
    hem = 64 if d["length"] == "cropped" else 80
    c.fabric([(33, 22), (67, 22), (68, hem), (32, hem)])
    c.fabric([(32, hem), (68, hem), (67, hem + 6), (33, hem + 6)])
    for x in np.arange(34, 67, 2.2):
        c.line([(float(x), hem + 0.5), (float(x), hem + 5.5)], 0.35)
    c.line([(32, hem), (68, hem)], 0.6)
    _sleeves(c, "long", (33, 22), length_y=76)
    _neckline(c, d["neckline"], 22, 7)


def _legs(c: Canvas, top: float, hem: float, waist_half: float, hem_outer: float, hem_inner: float, crotch: float) -> None:
    left = [(50 - waist_half, top), (50, top), (50, crotch), (50 - hem_inner, hem), (50 - hem_outer, hem)]
    c.fabric(left, both_sides=True)
    c.fabric([(50 - waist_half, top), (50 + waist_half, top), (50 + waist_half, crotch), (50 - waist_half, crotch)])


def _waistband(c: Canvas, y: float, half: float) -> None:
    c.fabric([(50 - half, y - 5), (50 + half, y - 5), (50 + half, y), (50 - half, y)])
    c.line([(50 - half, y), (50 + half, y)], 0.7)


def draw_trousers(c: Canvas, s: ProductSpec) -> None:
    d = s.details
    hem = 92 if d["length"] == "full length" else 76
    outer, inner = {"straight": (16, 2), "wide": (22, 1.5), "slim": (12, 4)}[d["leg"]]
    _waistband(c, 13, 16)
    _legs(c, 13, hem, 16, outer, inner, 34)
    c.line([(50, 13), (50, 34)], 0.6)
    c.line([(50, 34), (50 - inner, hem)], 0.6)
    c.line([(50, 34), (50 + inner, hem)], 0.6)
    if d["pockets"] == "cargo pockets":
        for side in (1, -1):
            pts = [(50 - side * 17, 42), (50 - side * 9, 42), (50 - side * 9, 54), (50 - side * 17, 54)]
            c.outline(pts, 0.8)
            c.line([(50 - side * 17.5, 45), (50 - side * 8.5, 45)], 0.7)


def draw_shorts(c: Canvas, s: ProductSpec) -> None:
    d = s.details
    hem = 52 if d["length"] == "short" else 68
    _waistband(c, 24, 17)
    _legs(c, 24, hem, 17, 20, 2, 40)
    c.line([(50, 40), (48, hem)], 0.6)
    c.line([(50, 40), (52, hem)], 0.6)
    if d["hem"] == "rolled cuffs":
        for side in (1, -1):
            band = [(50 - side * 20.5, hem - 5), (50 - side * 1.5, hem - 5), (50 - side * 2, hem + 0.5), (50 - side * 20.5, hem + 0.5)]
            c.fabric(band)
            c.outline(band, 0.9)
    if d["waist"] == "drawstring":
        c.line([(48, 22), (46, 34)], 0.6, c.trim)
        c.line([(52, 22), (54, 34)], 0.6, c.trim)
    else:
        c.dot(50, 21.5, 1.4)
        c.line([(50, 24), (50, 36)], 0.6)


def draw_skirt(c: Canvas, s: ProductSpec) -> None:
    d = s.details
    hem = {"mini": 48, "knee-length": 66, "midi": 82}[d["length"]]
    top = 20
    flare = {"a-line": 0.45, "pencil": 0.06, "pleated": 0.4}[d["shape"]] * (hem - top)
    _waistband(c, top, 13)
    c.fabric([(37, top), (63, top), (63 + flare, hem), (37 - flare, hem)])
    if d["shape"] == "pleated":
        for t in np.linspace(0.12, 0.88, 7):
            xt, xb = 37 + 26 * t, (37 - flare) + (26 + 2 * flare) * t
            c.line([(float(xt), top + 1), (float(xb), hem)], 0.45)
    if d["buttons"] == "button front":
        c.buttons(50, top + 4, hem - 5, max(3, int((hem - top) / 9)))


def draw_dress(c: Canvas, s: ProductSpec) -> None:
    d = s.details
    hem = {"mini": 58, "midi": 78, "maxi": 94}[d["length"]]
    waist = 42
    if d["sleeve"] == "sleeveless":
        c.fabric([(40, 14), (44, 14), (45, 24), (55, 24), (56, 14), (60, 14), (62, 30), (60, waist), (40, waist), (38, 30)])
    else:
        c.fabric([(38, 14), (62, 14), (61, waist), (39, waist)])
        _sleeves(c, d["sleeve"], (38, 14), length_y=58)
    if d["sleeve"] != "sleeveless":
        _neckline(c, "v-neck" if d["neckline"] == "v-neck" else "crew", 14, 7)
    elif d["neckline"] == "v-neck":
        c.cut([(45, 23), (55, 23), (50, 32)])
        c.line([(45, 23), (50, 33), (55, 23)], 0.9)
    else:
        c.cut_ellipse(45, 19, 55, 29)
    c.fabric([(39, waist), (61, waist), (61 + 0.32 * (hem - waist), hem), (39 - 0.32 * (hem - waist), hem)])
    if d["belt"] == "belted":
        band = [(38.5, waist - 2), (61.5, waist - 2), (61.5, waist + 2.5), (38.5, waist + 2.5)]
        c.shape(band, tuple(int(v) for v in c.base * 0.7), c.seam)
        c.shape([(48, waist - 3), (52, waist - 3), (52, waist + 3.5), (48, waist + 3.5)], c.metal, c.seam)
        c.line([(49, waist + 2.5), (46, waist + 12)], 1.0, tuple(int(v) for v in c.base * 0.7))
    else:
        c.line([(39, waist), (61, waist)], 0.5)


def draw_jacket(c: Canvas, s: ProductSpec) -> None:
    d = s.details
    hem = 72
    if d["hood"] == "hooded":
        c.fabric([(38, 22), (37, 10), (42, 3), (58, 3), (63, 10), (62, 22)])
        c.outline([(42, 20), (41, 10), (45, 6), (55, 6), (59, 10), (58, 20)], 0.7)
    c.fabric([(32, 20), (68, 20), (69, hem), (31, hem)])
    _sleeves(c, "long", (32, 20), length_y=74)
    if d["hood"] == "stand collar":
        collar = [(41, 12), (59, 12), (60, 21), (40, 21)]
        c.fabric(collar)
        c.outline(collar, 0.7)
    c.line([(31, hem - 5), (69, hem - 5)], 0.6)
    if d["closure"] == "zip":
        c.zip(50, 20 if d["hood"] == "hooded" else 13, hem)
    else:
        c.line([(50, 21), (50, hem)], 0.6)
        c.buttons(52.5, 25, hem - 8, 5, 1.3)
    if d["pockets"] == "flap pockets":
        for side in (1, -1):
            flap = [(50 - side * 16, 52), (50 - side * 6, 52), (50 - side * 6, 56), (50 - side * 16, 56)]
            c.outline(flap, 0.8)
            c.line([(50 - side * 16, 62), (50 - side * 6, 62)], 0.5)


def draw_coat(c: Canvas, s: ProductSpec) -> None:
    d = s.details
    hem = 84 if d["length"] == "knee-length" else 97
    c.fabric([(33, 10), (67, 10), (70, hem), (30, hem)])
    _sleeves(c, "long", (33, 10), length_y=66)
    lapel = [(42, 9), (50, 16), (47, 36), (40, 24), (37, 22)]
    c.outline(lapel, 0.8)
    c.outline(_mirror(lapel), 0.8)
    c.cut([(44, 8), (56, 8), (50, 15)])
    if d["closure"] == "single-breasted":
        c.line([(51, 36), (51, hem)], 0.6)
        c.buttons(53, 40, 40 + 3 * 8, 4, 1.4)
    else:
        c.line([(56, 30), (56, hem)], 0.6)
        for x in (44, 54):
            c.buttons(x, 38, 38 + 2 * 9, 3, 1.4)
    if d["belt"] == "belted":
        band = [(31, 44), (69, 44), (69.3, 49), (30.7, 49)]
        c.fabric(band)
        c.outline(band, 0.9)
        c.shape([(48, 43), (54, 43), (54, 50), (48, 50)], None, c.metal)
        c.line([(50, 49), (47, 60)], 1.4, c.seam)


def draw_sneakers(c: Canvas, s: ProductSpec) -> None:
    d = s.details
    collar_y = 28 if d["height"] == "high-top" else 48
    upper = [(15, 72), (14, collar_y), (32, collar_y - 2), (42, 50), (62, 55), (80, 58), (87, 64), (88, 72)]
    c.fabric(upper)
    second = COLOURS.get(s.pattern_colour or "", (0, 0, 0))
    if s.pattern == "side stripe":
        c.shape([(30, 66), (44, 54), (52, 56), (40, 68)], second, c.seam)
    elif s.pattern == "colour-block":
        c.shape([(70, 57), (80, 58), (87, 64), (88, 72), (72, 72)], second, c.seam)  # toe cap
        c.shape([(15, 72), (14, collar_y + 8), (22, collar_y + 10), (24, 72)], second, c.seam)  # heel counter
    c.outline(upper, 0.7)
    sole = {"white sole": (240, 238, 232), "black sole": (30, 30, 32), "gum sole": (150, 96, 48)}[d["sole"]]
    c.shape([(13, 71), (89, 71), (90, 77), (86, 81), (16, 81), (12, 77)], sole, (90, 90, 90))
    c.line([(14, 75.5), (88, 75.5)], 0.4, (110, 110, 110))
    if d["fastening"] == "laces":
        for i in range(5):
            x = 38 + i * 5
            c.line([(x, 50 + i * 1.2), (x + 5, 56 + i * 1.2)], 0.6, c.trim)
            c.line([(x + 5, 50 + i * 1.2), (x, 56 + i * 1.2)], 0.6, c.trim)
    else:
        for i in range(3):
            x = 36 + i * 8
            c.shape([(x, 48 + i * 2), (x + 5, 49 + i * 2), (x + 7, 62 + i), (x + 2, 62 + i)], c.trim, c.seam)
    c.dot(18, collar_y + 3, 0.8, c.trim)


def draw_boots(c: Canvas, s: ProductSpec) -> None:
    d = s.details
    top = {"ankle": 48, "mid-calf": 32, "knee-high": 10}[d["shaft"]]
    lift = {"flat": 0, "block heel": 7, "high heel": 13}[d["heel"]]
    sole_y = 86
    heel_y = sole_y - lift
    boot = [(22, top), (44, top), (45, 60), (50, 68), (70, 74), (84, 79), (85, sole_y), (62, sole_y), (40, heel_y), (22, heel_y)]
    c.fabric(boot)
    c.outline(boot, 0.6)
    dark = (34, 28, 26)
    if d["heel"] == "flat":
        c.shape([(21, sole_y - 3), (86, sole_y - 3), (86, sole_y + 1), (21, sole_y + 1)], dark)
    elif d["heel"] == "block heel":
        c.shape([(22, heel_y), (33, heel_y), (32, sole_y + 1), (23, sole_y + 1)], dark)
        c.shape([(40, heel_y), (62, sole_y - 2), (86, sole_y - 2), (86, sole_y + 1), (62, sole_y + 1), (40, heel_y + 2)], dark)
    else:
        c.shape([(22, heel_y), (28, heel_y), (25.5, sole_y + 1), (24.5, sole_y + 1)], dark)
        c.shape([(40, heel_y), (62, sole_y - 2), (86, sole_y - 2), (86, sole_y + 1), (62, sole_y + 1), (40, heel_y + 2)], dark)
    if d["fastening"] == "side zip":
        c.zip(30, top + 2, heel_y - 4)
    elif d["fastening"] == "laces":
        for y in np.arange(top + 3, 62, 5):
            c.line([(40, float(y)), (46, float(y) + 3)], 0.6, c.trim)
            c.line([(46, float(y)), (40, float(y) + 3)], 0.6, c.trim)
    else:
        gore = [(27, top), (37, top), (34, min(top + 18, heel_y - 6)), (30, min(top + 18, heel_y - 6))]
        c.shape(gore, tuple(int(v) for v in c.base * 0.6), c.seam)
        for x in (29.5, 32, 34.5):
            c.line([(x, top + 1), (32 + (x - 32) * 0.4, min(top + 17, heel_y - 7))], 0.35, c.seam)


def draw_tote(c: Canvas, s: ProductSpec) -> None:
    d = s.details
    body = [(24, 38), (76, 38), (81, 88), (19, 88)]
    c.fabric(body)
    strap = tuple(int(v) for v in c.base * 0.8)
    if d["handles"] == "short handles":
        for x0 in (30, 54):
            c.arc((x0, 18, x0 + 16, 58), 180, 360, 2.6, strap)
    else:
        c.arc((28, 2, 72, 74), 180, 360, 2.2, strap)
    if d["closure"] == "zip top":
        c.zip(50, 38, 39)
        c.line([(27, 41), (73, 41)], 1.0, c.metal)
        c.dot(70, 41, 1.2, c.metal)
    else:
        c.shape([(25, 38), (75, 38), (74, 42), (26, 42)], tuple(int(v) for v in c.base * 0.45))
    if d["pocket"] == "front pocket":
        c.outline([(34, 58), (66, 58), (67, 80), (33, 80)], 0.9)
        c.line([(33.5, 61), (66.5, 61)], 0.5)


DRAWERS = {"t-shirt": draw_tshirt, "shirt": draw_shirt, "sweater": draw_sweater, "trousers": draw_trousers,
           "shorts": draw_shorts, "skirt": draw_skirt, "dress": draw_dress, "jacket": draw_jacket, "coat": draw_coat,
           "sneakers": draw_sneakers, "boots": draw_boots, "tote": draw_tote}


# Fabric, light and background ----------------------------------------------------------------


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.clip(np.array(rgb, dtype=np.float32) + rng.uniform(-6, 6, 3).astype(np.float32), 0, 255)


def _pattern(rng, pattern: str, base: np.ndarray, second: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fabric colour at every pixel, (H, W, 3) float32."""
    if pattern in ("solid", "side stripe") or (pattern == "colour-block" and not mask.any()):
        return np.broadcast_to(base, (SIZE, SIZE, 3))
    phase = rng.uniform(0, 40)
    # Stripes, checks and blocks vary along one axis: computed on a line, broadcast to the plane.
    if pattern == "horizontal stripes":
        sel = (((_PIX + phase) % (period := rng.uniform(12, 18))) < period / 2)[:, None]
    elif pattern == "vertical stripes":
        sel = (((_PIX + phase) % (period := rng.uniform(10, 16))) < period * 0.4)[None, :]
    elif pattern == "polka dots":
        # Dots on a staggered grid; distances are separable, so only the final sum is 2-D.
        sp, r = rng.uniform(15, 20), rng.uniform(3.0, 4.2)
        odd = (np.floor((_PIX + phase) / sp) % 2).astype(np.intp)
        dx2 = np.stack([((_PIX + phase + shift) % sp - sp / 2) ** 2 for shift in (0, sp / 2)])  # (2, W)
        dy2 = (((_PIX + phase) % sp) - sp / 2) ** 2
        sel = dx2[odd] + dy2[:, None] < r * r
    elif pattern == "check":
        period = rng.uniform(14, 20)
        stripe = (((_PIX + phase) % period) < period / 2).astype(np.float32) / 2
        t = (stripe[:, None] + stripe[None, :])[..., None]
        return base * (1 - t) + second * t
    elif pattern == "colour-block":
        rows = np.nonzero(mask.any(axis=1))[0]
        sel = (_PIX > (rows[0] + rows[-1]) / 2)[:, None]
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return np.where(sel[..., None], second, base)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A plain studio backdrop, a little brighter at the top: (H, 1, 3), broadcast over the width."""
    colour = (rng.uniform(224, 244) + rng.uniform(-4, 4, 3)).astype(np.float32)
    gradient = 1.0 - np.float32(rng.uniform(0.02, 0.05)) * _RAMP
    return gradient[:, None, None] * colour


def render(spec: ProductSpec) -> np.ndarray:
    """The product shot of one spec, (256, 256, 3) uint8. Deterministic for the spec."""
    rng = np.random.default_rng([spec.seed, spec.index, 1])
    base = _jitter(rng, COLOURS[spec.colour])
    second = _jitter(rng, COLOURS[spec.pattern_colour]) if spec.pattern_colour else base
    canvas = Canvas(rng, base)
    DRAWERS[spec.sub.key](canvas, spec)

    mask_img = canvas.mask.filter(ImageFilter.BoxBlur(0.6))
    mask = np.asarray(mask_img, dtype=np.float32) / 255.0  # (H, W)
    # A soft drop shadow; blurred at quarter size, where it costs a sixteenth.
    small = canvas.mask.reduce(4).filter(ImageFilter.BoxBlur(1.2)).resize((SIZE, SIZE), Image.BILINEAR)
    shadow = np.roll(np.asarray(small, dtype=np.float32), (4, 3), axis=(0, 1)) / 255.0
    fabric = _pattern(rng, spec.pattern, base, second, mask > 0.5)

    # Soft studio light from one side, and a little low-frequency unevenness like folds.
    angle = rng.uniform(0, 2 * np.pi)
    folds = np.asarray(Image.fromarray(rng.integers(0, 255, (6, 6), dtype=np.uint8)).resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32)
    light = folds * np.float32(0.08 / 255) + np.float32(0.96)
    light += np.float32(0.07 * np.sin(angle)) * _RAMP[:, None] + np.float32(0.07 * np.cos(angle)) * _RAMP[None, :]

    # A darker rim just inside the silhouette reads as the garment's edge.
    inner = np.asarray(mask_img.filter(ImageFilter.BoxBlur(1.2)), dtype=np.float32) / 255.0
    rim = 1 - 0.35 * np.clip(2 * (mask - inner), 0, 1)
    # Weights are 2-D; only the two products with colours touch all three channels.
    on_fabric = (light * mask * rim)[..., None]
    on_backdrop = ((1 - mask) * rim * (1 - 0.13 * shadow))[..., None]
    out = _background(rng) * on_backdrop + fabric * on_fabric
    image = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for stroke in canvas.later:
        stroke(draw)
    return np.asarray(image)
