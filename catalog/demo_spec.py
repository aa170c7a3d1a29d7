"""What the demo catalog's products are: subcategories, attribute dimensions, and how captions say them.

Every attribute value here is drawn by catalog/demo_render.py and stated in every caption, so a
caption pins down its image up to nuisance (pose, scale, shading) and noise words (material,
fit, brand) that no image can show. Products of one subcategory differ in colour, pattern and at
least one more detail: the fine-grained matching FashionBERT's patches are meant for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# name -> RGB. Chosen so that no two are confusable on a light studio background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 31),
    "white": (246, 246, 243),
    "grey": (128, 129, 134),
    "navy": (30, 42, 88),
    "blue": (38, 94, 196),
    "light blue": (150, 192, 232),
    "red": (206, 34, 42),
    "burgundy": (112, 22, 44),
    "pink": (242, 158, 186),
    "green": (34, 138, 66),
    "olive": (108, 112, 48),
    "yellow": (246, 206, 42),
    "orange": (240, 122, 30),
    "beige": (214, 194, 158),
    "brown": (110, 70, 40),
    "purple": (112, 60, 152),
}

PATTERNS_GARMENT = ("solid", "horizontal stripes", "vertical stripes", "polka dots", "check", "colour-block")
PATTERNS_SHOE = ("solid", "side stripe", "colour-block")

# pattern -> word in the product name
PATTERN_NAME = {
    "solid": "",
    "horizontal stripes": "striped",
    "vertical stripes": "vertical-stripe",
    "polka dots": "polka-dot",
    "check": "check",
    "colour-block": "colour-block",
    "side stripe": "side-stripe",
}


@dataclass(frozen=True)
class Subcategory:
    key: str
    category: str
    subcategory: str
    noun: str
    department: str
    genders: tuple[str, ...]
    patterns: tuple[str, ...]
    # dimension -> value -> (words for the product name, ways to say it in a description)
    details: dict[str, dict[str, tuple[str, tuple[str, ...]]]]
    name_dims: tuple[str, ...]  # detail dimensions that also appear in the product name
    materials: tuple[tuple[str, str], ...]  # (material words, composition)
    price: tuple[int, int]
    extras: tuple[str, ...] = field(default=())  # invisible facts: noise for the model


def _d(**values: tuple[str, tuple[str, ...]]) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {k.replace("_", " "): v for k, v in values.items()}


SLEEVE = {
    "short": ("short sleeve", ("short sleeves", "short set-in sleeves", "short sleeves at the shoulders")),
    "long": ("long sleeve", ("long sleeves", "long set-in sleeves", "full-length sleeves")),
    "sleeveless": ("sleeveless", ("a sleeveless cut", "no sleeves", "a sleeveless body")),
}
NECK = {
    "crew neck": ("crewneck", ("a crew neck", "a rib-knit crewneck", "a round crew neckline")),
    "v-neck": ("v-neck", ("a v-neck", "a v-neckline", "a deep v neck")),
}

SUBCATEGORIES: tuple[Subcategory, ...] = (
    Subcategory(
        "t-shirt", "TOPS", "T-SHIRTS", "t-shirt", "CLOTHING", ("MEN", "WOMEN"),
        ("solid", "horizontal stripes", "polka dots", "colour-block"),
        {"sleeve": SLEEVE, "neckline": NECK,
         "pocket": {"chest pocket": ("", ("a patch pocket at the chest", "a chest pocket")),
                    "no pocket": ("", ("no pocket", "a clean front without pockets"))}},
        ("sleeve",),
        (("cotton jersey", "100% cotton"), ("organic cotton jersey", "100% organic cotton"), ("slub cotton", "100% cotton"),
         ("linen-blend jersey", "55% linen, 45% cotton")),
        (35, 120), ("Relaxed fit.", "Regular fit.", "Tonal stitching.", "Mid-weight jersey.", "Machine washable."),
    ),
    Subcategory(
        "shirt", "TOPS", "SHIRTS", "shirt", "CLOTHING", ("MEN", "WOMEN"),
        ("solid", "vertical stripes", "horizontal stripes", "check", "polka dots"),
        {"sleeve": {k: SLEEVE[k] for k in ("short", "long")},
         "collar": {"point collar": ("", ("a point collar", "a classic point collar")),
                    "spread collar": ("", ("a spread collar", "a wide spread collar")),
                    "band collar": ("band-collar", ("a band collar", "a collarless band neck"))},
         "pocket": {"chest pocket": ("", ("a patch pocket at the chest", "one chest pocket")),
                    "no pocket": ("", ("no pocket", "no pockets"))}},
        ("sleeve",),
        (("cotton poplin", "100% cotton"), ("oxford cotton", "100% cotton"), ("linen", "100% linen"),
         ("cotton twill", "100% cotton")),
        (60, 260), ("Button closure at front.", "Curved hem.", "Slim fit.", "Relaxed fit.", "Mother-of-pearl buttons."),
    ),
    Subcategory(
        "sweater", "SWEATERS", "SWEATERS", "sweater", "CLOTHING", ("MEN", "WOMEN"),
        ("solid", "horizontal stripes", "colour-block", "polka dots"),
        {"neckline": {**NECK, "turtleneck": ("turtleneck", ("a turtleneck", "a high rolled turtleneck collar"))},
         "length": {"cropped": ("cropped", ("a cropped length", "a cropped body")),
                    "regular length": ("", ("a regular length", "a hip-length body"))}},
        ("neckline", "length"),
        (("merino wool", "100% merino wool"), ("lambswool", "100% lambswool"), ("cotton knit", "100% cotton"),
         ("cashmere-blend knit", "70% wool, 30% cashmere")),
        (90, 420), ("Rib-knit cuffs and hem.", "Dropped shoulders.", "Relaxed fit.", "Hand wash."),
    ),
    Subcategory(
        "trousers", "PANTS", "TROUSERS", "trousers", "CLOTHING", ("MEN", "WOMEN"),
        ("solid", "check", "vertical stripes"),
        {"leg": {"straight": ("straight-leg", ("a straight leg", "straight legs")),
                 "wide": ("wide-leg", ("a wide leg", "wide, flared legs")),
                 "slim": ("slim", ("a slim tapered leg", "slim legs tapering to the ankle"))},
         "length": {"full length": ("", ("a full-length hem", "a full length")),
                    "cropped": ("cropped", ("a cropped ankle-length hem", "a hem cropped at the ankle"))},
         "pockets": {"cargo pockets": ("cargo", ("cargo pockets at the thighs", "patch cargo pockets on both legs")),
                     "no side pockets": ("", ("no cargo pockets", "clean legs without patch pockets"))}},
        ("leg", "length", "pockets"),
        (("cotton twill", "100% cotton"), ("wool flannel", "100% wool"), ("linen", "100% linen"),
         ("stretch gabardine", "97% cotton, 3% elastane")),
        (80, 340), ("Mid-rise.", "High-rise.", "Zip fly.", "Belt loops at waist.", "Pressed crease."),
    ),
    Subcategory(
        "shorts", "SHORTS", "SHORTS", "shorts", "CLOTHING", ("MEN", "WOMEN"),
        ("solid", "horizontal stripes", "check", "polka dots"),
        {"length": {"short": ("", ("a short mid-thigh length", "a short inseam")),
                    "knee-length": ("knee-length", ("a knee length", "a longer knee-length cut"))},
         "hem": {"rolled cuffs": ("", ("rolled cuffs at the hem", "turned-up cuffs")),
                 "plain hem": ("", ("a plain hem", "a clean hem"))},
         "waist": {"drawstring": ("drawstring", ("a drawstring waist", "an elasticated drawstring waistband")),
                   "button waist": ("", ("a button at the waist", "a button and zip fly"))}},
        ("length", "waist"),
        (("cotton twill", "100% cotton"), ("nylon", "100% nylon"), ("linen", "100% linen"), ("seersucker", "100% cotton")),
        (45, 190), ("Quick-dry.", "Two side pockets.", "Regular fit.", "Logo patch at back."),
    ),
    Subcategory(
        "skirt", "SKIRTS", "SKIRTS", "skirt", "CLOTHING", ("WOMEN",),
        ("solid", "check", "polka dots", "horizontal stripes", "vertical stripes"),
        {"length": {"mini": ("mini", ("a mini length", "a short mini hem")),
                    "knee-length": ("knee-length", ("a knee length", "a hem at the knee")),
                    "midi": ("midi", ("a midi length", "a hem below the knee"))},
         "shape": {"a-line": ("a-line", ("an a-line shape", "a flared a-line cut")),
                   "pencil": ("pencil", ("a straight pencil cut", "a fitted pencil shape")),
                   "pleated": ("pleated", ("knife pleats", "pleats all around"))},
         "buttons": {"button front": ("", ("a button front", "buttons down the front")),
                     "no buttons": ("", ("a plain front", "no buttons"))}},
        ("length", "shape"),
        (("wool crêpe", "100% wool"), ("cotton denim", "100% cotton"), ("satin", "100% polyester"), ("tweed", "80% wool, 20% nylon")),
        (70, 310), ("Concealed zip at side.", "Fully lined.", "High waist.", "Dry clean."),
    ),
    Subcategory(
        "dress", "DRESSES", "DRESSES", "dress", "CLOTHING", ("WOMEN",),
        ("solid", "polka dots", "horizontal stripes", "check", "colour-block"),
        {"sleeve": SLEEVE,
         "length": {"mini": ("mini", ("a mini length", "a short mini hem")),
                    "midi": ("midi", ("a midi length", "a mid-calf hem")),
                    "maxi": ("maxi", ("a maxi length", "a floor-sweeping hem"))},
         "neckline": {"v-neck": ("", ("a v-neck", "a v neckline")),
                      "round neck": ("", ("a round neck", "a scoop neckline"))},
         "belt": {"belted": ("belted", ("a self-tie belt at the waist", "a belted waist")),
                  "no belt": ("", ("an unbelted waist", "no belt"))}},
        ("length", "sleeve"),
        (("viscose crêpe", "100% viscose"), ("cotton poplin", "100% cotton"), ("silk", "100% silk"), ("jersey", "95% viscose, 5% elastane")),
        (90, 480), ("Concealed zip at back.", "Partially lined.", "Relaxed fit.", "Gathered skirt."),
    ),
    Subcategory(
        "jacket", "JACKETS & COATS", "JACKETS", "jacket", "CLOTHING", ("MEN", "WOMEN"),
        ("solid", "check", "colour-block"),
        {"closure": {"zip": ("zip", ("a zip closure", "a full-length zip at front")),
                     "buttons": ("", ("a button closure", "buttons at front"))},
         "hood": {"hooded": ("hooded", ("a drawstring hood", "an attached hood")),
                  "stand collar": ("", ("a stand collar", "a high stand collar"))},
         "pockets": {"flap pockets": ("", ("flap pockets at the waist", "two flap pockets")),
                     "no pockets": ("", ("no outer pockets", "a clean front"))}},
        ("hood", "closure"),
        (("nylon shell", "100% nylon"), ("cotton canvas", "100% cotton"), ("wool-blend", "60% wool, 40% polyamide"),
         ("technical ripstop", "100% polyester")),
        (120, 690), ("Water-repellent.", "Fully lined.", "Padded.", "Regular fit."),
    ),
    Subcategory(
        "coat", "JACKETS & COATS", "COATS", "coat", "CLOTHING", ("MEN", "WOMEN"),
        ("solid", "check"),
        {"length": {"knee-length": ("", ("a knee length", "a hem at the knee")),
                    "long": ("long", ("a long ankle-grazing length", "a long length"))},
         "closure": {"single-breasted": ("single-breasted", ("single-breasted button closure", "a single row of buttons")),
                     "double-breasted": ("double-breasted", ("double-breasted button closure", "two rows of buttons"))},
         "belt": {"belted": ("belted", ("a belt at the waist", "a self-belt at the waist")),
                  "no belt": ("", ("no belt", "an unbelted shape"))}},
        ("length", "closure", "belt"),
        (("wool-blend", "70% wool, 30% polyamide"), ("cashmere", "100% cashmere"), ("cotton gabardine", "100% cotton"),
         ("alpaca-blend", "60% alpaca, 40% wool")),
        (220, 1490), ("Notched lapel.", "Fully lined.", "Welt pockets.", "Relaxed fit."),
    ),
    Subcategory(
        "sneakers", "SHOES", "SNEAKERS", "sneakers", "SHOES", ("MEN", "WOMEN"),
        PATTERNS_SHOE,
        {"height": {"low-top": ("low-top", ("a low-top profile", "a low-cut collar")),
                    "high-top": ("high-top", ("a high-top profile", "an ankle-high collar"))},
         "fastening": {"laces": ("", ("lace-up fastening", "laces at the vamp")),
                       "straps": ("strap", ("hook-and-loop straps", "three grip straps"))},
         "sole": {"white sole": ("", ("a white rubber sole", "a white sole")),
                  "black sole": ("", ("a black rubber sole", "a black sole")),
                  "gum sole": ("", ("a gum rubber sole", "a brown gum sole"))}},
        ("height",),
        (("leather", "upper: leather; sole: rubber"), ("suede", "upper: suede; sole: rubber"),
         ("canvas", "upper: cotton canvas; sole: rubber"), ("mesh", "upper: polyester mesh; sole: rubber")),
        (85, 520), ("Padded collar.", "Logo at tongue.", "Cushioned footbed.", "Made in Italy."),
    ),
    Subcategory(
        "boots", "SHOES", "BOOTS", "boots", "SHOES", ("MEN", "WOMEN"),
        ("solid",),
        {"shaft": {"ankle": ("ankle", ("an ankle-high shaft", "an ankle height")),
                   "mid-calf": ("mid-calf", ("a mid-calf shaft", "a mid-calf height")),
                   "knee-high": ("knee-high", ("a knee-high shaft", "a tall knee-high shaft"))},
         "heel": {"flat": ("flat", ("a flat sole", "no heel")),
                  "block heel": ("block-heel", ("a block heel", "a chunky block heel")),
                  "high heel": ("high-heel", ("a slim high heel", "a stiletto heel"))},
         "fastening": {"side zip": ("", ("a zip at the inner side", "a side zip")),
                       "laces": ("lace-up", ("lace-up fastening", "laces at the front")),
                       "pull-on": ("", ("elastic side panels", "a pull-on style with elastic gussets"))}},
        ("shaft", "heel"),
        (("leather", "upper: leather; sole: leather"), ("suede", "upper: suede; sole: rubber"),
         ("patent leather", "upper: leather; sole: leather")),
        (150, 890), ("Almond toe.", "Leather lining.", "Pull tab at heel.", "Made in Spain."),
    ),
    Subcategory(
        "tote", "BAGS", "TOTE BAGS", "tote bag", "BAGS", ("MEN", "WOMEN"),
        ("solid", "horizontal stripes", "vertical stripes", "polka dots", "check", "colour-block"),
        {"handles": {"short handles": ("", ("two short top handles", "twin rolled handles")),
                     "shoulder strap": ("shoulder", ("one long shoulder strap", "a single long shoulder strap"))},
         "pocket": {"front pocket": ("", ("a patch pocket at the front", "an outer front pocket")),
                    "no pocket": ("", ("no outer pocket", "a clean front"))},
         "closure": {"zip top": ("", ("a zip closure at the top", "a zipped top")),
                     "open top": ("", ("an open top", "an open top without closure"))}},
        ("handles",),
        (("canvas", "100% cotton canvas"), ("leather", "100% leather"), ("nylon", "100% nylon"), ("jute", "100% jute")),
        (40, 950), ("Unlined.", "Interior zip pocket.", "Magnetic snap.", "Logo stamp at front."),
    ),
)

BRANDS = ("Aster & Oak", "Maison Élan", "Nordvik", "Harlow Lane", "Oda Studio", "Kestrel", "Sable & Sons",
          "Lumen", "Côté Nord", "Marlowe", "Tidewater", "Rue Sauvage")
SEASONS = ("SS2026", "FW2026")


@dataclass(frozen=True)
class ProductSpec:
    """Everything about one demo product except its pixels."""

    seed: int
    index: int
    product_id: int
    sub: Subcategory
    colour: str
    pattern: str
    pattern_colour: str | None
    details: dict[str, str]
    name: str
    description: str
    gender: str
    brand: str
    price: float
    composition: str
    season: str

    def attributes(self) -> dict[str, str]:
        """The visible attributes, as metadata keys (values the image shows)."""
        out = {"colour": self.colour, "pattern": self.pattern}
        if self.pattern_colour:
            out["pattern_colour"] = self.pattern_colour
        out.update({k.replace(" ", "_"): v for k, v in self.details.items()})
        return out


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _contrasting(rng: np.random.Generator, colour: str) -> str:
    """A second pattern colour that stays visible next to the first."""
    base = np.array(COLOURS[colour], dtype=float)
    options = [c for c, rgb in COLOURS.items()
               if c != colour and (abs(_luma(rgb) - _luma(COLOURS[colour])) > 55 or np.abs(np.array(rgb) - base).sum() > 260)]
    return options[rng.integers(len(options))]


def _choice(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _colour_phrase(rng, colour: str, pattern: str, second: str | None) -> str:
    """How the description says colour and pattern, in one of several phrasings."""
    if pattern == "solid":
        return _choice(rng, (f"in {colour}", f"in solid {colour}", f"in plain {colour}"))
    return {
        "horizontal stripes": (f"in {colour} with {second} horizontal stripes", f"striped horizontally in {colour} and {second}"),
        "vertical stripes": (f"in {colour} with {second} vertical stripes", f"in {colour} and {second} vertical stripes"),
        "polka dots": (f"in {colour} with {second} polka dots", f"in {colour} with an all-over {second} polka-dot print"),
        "check": (f"in a {colour} and {second} check", f"in {colour} and {second} gingham check"),
        "colour-block": (f"colour-blocked in {colour} with a {second} lower half", f"in {colour} above and {second} below, colour-blocked"),
        "side stripe": (f"in {colour} with a {second} side stripe", f"in {colour} with a contrast {second} stripe at the side"),
    }[pattern][rng.integers(2)]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_spec(seed: int, index: int) -> ProductSpec:
    """The product at `index` of the catalog with this seed: deterministic, independent of the others."""
    rng = np.random.default_rng([seed, index, 0])
    sub = SUBCATEGORIES[rng.integers(len(SUBCATEGORIES))]
    colour = _choice(rng, tuple(COLOURS))
    pattern = _choice(rng, sub.patterns)
    second = None if pattern == "solid" else _contrasting(rng, colour)
    details = {dim: _choice(rng, tuple(values)) for dim, values in sub.details.items()}
    material, composition = _choice(rng, sub.materials)

    colour_words = colour if second is None else f"{colour} and {second}"
    name_words = [colour_words, PATTERN_NAME[pattern]]
    name_words += [sub.details[d][details[d]][0] for d in sub.name_dims]
    name_words.append(sub.noun)
    name = " ".join(w for w in name_words if w)
    name = name[0].upper() + name[1:]

    phrases = [_choice(rng, sub.details[d][v][1]) for d, v in details.items()]
    order = rng.permutation(len(phrases))
    phrases = [phrases[i] for i in order]
    colour_phrase = _colour_phrase(rng, colour, pattern, second)
    lead_with_material = rng.random() < 0.5
    head = f"{material} {sub.noun}" if lead_with_material else sub.noun
    style = rng.integers(3)
    if style == 0:  # one sentence carries everything
        sentences = [f"{head} {colour_phrase} with {_join(phrases)}."]
    elif style == 1:  # the lead, then the details as a fragment list (the Fashion-Gen house style)
        sentences = [f"{head} {colour_phrase}.", " ".join(p[0].upper() + p[1:].removeprefix("a ").removeprefix("an ") + "." for p in phrases)]
    else:
        cut = 1 + rng.integers(len(phrases))
        sentences = [f"{head} {colour_phrase}, featuring {_join(phrases[:cut])}."]
        if cut < len(phrases):
            sentences.append(f"Finished with {_join(phrases[cut:])}.")
    brand = _choice(rng, BRANDS)
    noise = [_choice(rng, sub.extras)]
    if not lead_with_material:
        noise.insert(0, f"Made of {material}.")
    if rng.random() < 0.3:
        noise.append(f"By {brand}.")
    sentences.append(" ".join(noise))
    description = " ".join(s[0].upper() + s[1:] for s in sentences[:3])

    low, high = sub.price
    price = float(5 * int(rng.integers(low // 5, high // 5 + 1)))
    return ProductSpec(
        seed=seed, index=index, product_id=100_000 + index, sub=sub, colour=colour, pattern=pattern, pattern_colour=second,
        details=details, name=name, description=description, gender=_choice(rng, sub.genders), brand=brand,
        price=price, composition=composition, season=_choice(rng, SEASONS),
    )
