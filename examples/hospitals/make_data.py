"""Write a small synthetic chest-X-ray-like dataset: five hospitals, each with its own size, class balance and
scanner, plus a public reference set for the server.

Layout (what ``insitu client --data`` and ``insitu server --data`` read: one folder per class, train/ and
test/ as the splits)::

    OUT/hospital_1/train/normal/0000.png   OUT/hospital_1/test/pneumonia/0003.png   ...
    OUT/reference/normal/0000.png          (the server's public evaluation set: all test)

Each image is a 64x64 grayscale "chest": a bright body, two dark lung fields, faint ribs and noise. A
pneumonia image adds a blurred bright opacity (size, place and strength drawn at random) inside one lung.
Hospitals differ (non-IID): pneumonia share, number of patients, exposure (brightness), contrast, noise,
blur and scanner tilt, so a model must learn the opacity, not the hospital. Deterministic: the same --seed
writes the same bytes.

    python examples/hospitals/make_data.py --out examples/hospitals/data [--scale 0.3] [--size 64]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = ("normal", "pneumonia")


@dataclass(frozen=True)
class Hospital:
    """One site: its patients (images) and its scanner."""

    name: str
    images: int            # train + test
    pneumonia: float       # share of pneumonia cases
    brightness: float      # added to every pixel (exposure)
    contrast: float        # multiplies the deviation from mid-gray
    noise: float           # std of the pixel noise
    blur: float            # extra blur of the whole image (pixels)
    tilt: float            # max rotation of the chest (radians)


HOSPITALS = (
    Hospital("hospital_1", 300, 0.50, 0.00, 1.00, 0.04, 0.0, 0.05),   # large university hospital
    Hospital("hospital_2", 200, 0.30, 0.10, 0.80, 0.05, 0.5, 0.08),   # brighter, flatter scanner
    Hospital("hospital_3", 150, 0.65, -0.08, 1.20, 0.06, 0.0, 0.10),  # a pneumonia ward: mostly positive
    Hospital("hospital_4", 100, 0.20, 0.05, 0.90, 0.08, 1.0, 0.05),   # small, noisy, blurry
    Hospital("hospital_5", 60, 0.40, -0.12, 1.10, 0.05, 0.5, 0.12),   # smallest, dark exposure
)
REFERENCE = Hospital("reference", 200, 0.50, 0.0, 1.0, 0.05, 0.5, 0.08)  # the server's public evaluation set
TEST_SHARE, MIN_TEST = 0.25, 10


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (numpy only), reflecting at the border."""
    if sigma <= 0:
        return image
    radius = max(1, int(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image, radius, mode="reflect")
    rows = sum(w * padded[radius + o: radius + o + image.shape[0], :] for o, w in zip(offsets, kernel))
    return sum(w * rows[:, radius + o: radius + o + image.shape[1]] for o, w in zip(offsets, kernel))


def chest(rng: np.random.Generator, size: int, site: Hospital, sick: bool) -> np.ndarray:
    """One image in [0, 1]: body, lungs, ribs, (an opacity if sick), then the site's scanner."""
    coords = (np.arange(size) + 0.5) / size * 2 - 1  # -1..1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    angle = rng.uniform(-site.tilt, site.tilt)
    x, y = x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)
    shift_x, shift_y = rng.normal(0, 0.04, 2)
    x, y = x - shift_x, y - shift_y
    body = ((x / 0.85) ** 2 + (y / 0.95) ** 2 < 1).astype(float)
    image = 0.15 + 0.5 * body
    lung_w, lung_h = rng.uniform(0.24, 0.3), rng.uniform(0.48, 0.58)
    lungs = []
    for side in (-1, 1):
        cx = side * rng.uniform(0.33, 0.4)
        lung = ((x - cx) / lung_w) ** 2 + ((y + 0.05) / lung_h) ** 2 < 1
        lungs.append((cx, lung))
        image = np.where(lung, image - 0.35, image)
    ribs = 0.05 * np.maximum(0, np.sin(y * rng.uniform(18, 22) + rng.uniform(0, np.pi))) * body
    image = image + ribs
    if sick:  # a blurred bright opacity inside one lung, of random size, place and strength
        cx, lung = lungs[rng.integers(2)]
        oy, ox = rng.uniform(-0.35, 0.3), cx + rng.uniform(-0.1, 0.1)
        radius = rng.uniform(0.1, 0.2)
        blob = np.exp(-(((x - ox) ** 2 + (y - oy) ** 2) / (2 * radius ** 2)))
        image = image + rng.uniform(0.18, 0.32) * blob * _gaussian_blur(lung.astype(float), size / 64)
    image = _gaussian_blur(image, size / 64 * (0.7 + site.blur))
    image = 0.5 + site.contrast * (image - 0.5) + site.brightness
    image = image + rng.normal(0, site.noise, image.shape)
    return np.clip(image, 0, 1)


def write_site(out: Path, site: Hospital, count: int, size: int, rng: np.random.Generator) -> dict[str, int]:
    """Write one site's train/ and test/ folders; returns the number of images per split and class."""
    from PIL import Image

    sick = np.zeros(count, dtype=bool)
    sick[: round(site.pneumonia * count)] = True
    rng.shuffle(sick)
    test = max(MIN_TEST, round(TEST_SHARE * count)) if site is not REFERENCE else count
    in_test = np.zeros(count, dtype=bool)  # stratified: the test split keeps the site's pneumonia share
    for cases in (np.flatnonzero(sick), np.flatnonzero(~sick)):
        in_test[cases[: round(test * len(cases) / count)]] = True
    counts: dict[str, int] = {}
    for i, is_sick in enumerate(sick):
        split = "test" if in_test[i] else "train"
        label = CLASSES[int(is_sick)]
        # the reference set is all test: a flat ROOT/<class>/ folder, which a server evaluates on whole
        folder = out / site.name / label if site is REFERENCE else out / site.name / split / label
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(chest(rng, size, site, bool(is_sick)) * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png", optimize=False)
        counts[f"{split}/{label}"] = counts.get(f"{split}/{label}", 0) + 1
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data", help="Folder to write into.")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply every site's number of images.")
    parser.add_argument("--size", type=int, default=64, help="Image side in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed (same seed, same files).")
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 10 or args.size < 16:
        parser.error("--scale must be in (0, 10] and --size at least 16")
    for index, site in enumerate((*HOSPITALS, REFERENCE)):
        if (args.out / site.name).exists():
            parser.error(f"{args.out / site.name} exists: remove {args.out} first (the files are regenerated from --seed)")
        count = max(2 * MIN_TEST if site is not REFERENCE else MIN_TEST, round(site.images * args.scale))
        counts = write_site(args.out, site, count, args.size, np.random.default_rng([args.seed, index]))
        print(f"{site.name:<11} " + "  ".join(f"{k} {v:>3}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
