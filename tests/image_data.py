"""Image folders written by the tests: one subfolder per colour, PNG and JPEG images of several sizes and modes."""

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}  # sorted: the labels 0, 1, 2


def write_folder(directory: Path, per_class: int = 12, mode: str = "RGB") -> Path:
    """One subfolder per colour; images of several sizes and modes (PNG and JPEG), each a noisy flat colour."""
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (directory / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = (20 + 3 * i, 18 + 2 * i)
            pixels = np.clip(np.array(colour) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels).convert(mode if i % 3 else "RGBA")  # RGBA: PNG only
            image.save(directory / name / (f"{i:02d}.jpg" if i % 3 and i % 2 else f"{i:02d}.png"))
    return directory


SHAPE_COLOURS = [(220, 30, 30), (30, 200, 40), (20, 40, 220), (230, 210, 30), (200, 40, 200), (30, 200, 210)]


def write_shapes(directory: Path, classes: int = 6, per_class: int = 60, separable: bool = True) -> Path:
    """``classes`` subfolders ``c0``, ``c1``, ... of ``per_class`` 24x24 PNGs: a square of random size and place on
    a noisy grey ground. Separable: class c's squares have colour c; else every class draws its colours from the
    same palette, so no network can tell the classes apart."""
    rng = np.random.default_rng(1)
    for c in range(classes):
        (directory / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.normal(128, 12, (24, 24, 3))
            side, (x, y) = rng.integers(8, 16), rng.integers(0, 8, 2)
            colour = SHAPE_COLOURS[c if separable else rng.integers(len(SHAPE_COLOURS))]
            pixels[y : y + side, x : x + side] = colour
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(directory / f"c{c}" / f"{i:02d}.png")
    return directory
