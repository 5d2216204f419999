"""Procedurally drawn image-caption pairs: the offline stand-in for Conceptual Captions.

Each image is one coloured shape on a plain background, and its caption says which colour, which
shape, where and on what; a small model can learn both directions from a few hundred pairs.
Deterministic for a seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7),
          "center": (0.5, 0.5)}


def draw_sample(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, str]:
    """One (RGB image, caption) pair."""
    names = list(COLORS)
    color, background = rng.choice(len(names), size=2, replace=False)
    shape = SHAPES[rng.integers(len(SHAPES))]
    place = list(PLACES)[rng.integers(len(PLACES))]
    image = Image.new("RGB", (size, size), COLORS[names[background]])
    cx, cy = (v * size for v in PLACES[place])
    # Radius a quarter to a third of the side: at the demo's 32px and 4x4 pixels per token a shape
    # is 4-5 tokens wide, so some tokens are all shape colour (smaller shapes lose their colour in
    # the AugVAE's reconstructions far more often: docs/demo.md).
    r = size * rng.uniform(0.25, 0.32)
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(image)
    fill = COLORS[names[color]]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    article = lambda word: "an" if word[0] in "aeiou" else "a"  # noqa: E731
    caption = (f"{article(names[color])} {names[color]} {shape} at the {place} "
               f"on {article(names[background])} {names[background]} background")
    return image, caption

