"""Image folders (ROOT/<class>/image.png, optionally ROOT/train|test/... and ROOT/<group>/<class>/...) and the
Pillow decoding shared with Hugging Face Image columns."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu.data.files.raw import MissingDependencyError, Raw

if TYPE_CHECKING:
    from insitu.data.files import DataSpec

log = logging.getLogger("insitu.data")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
GRAYSCALE_MODES = frozenset({"1", "L", "I", "I;16", "I;16B", "I;16L", "F"})
WIDE_GRAYSCALE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L"})
GROUP_BY_FOLDER = "folder"
SHOWN_SKIPPED = 10
#: Subfolders that make ROOT a split layout (ROOT/train/<class>/..., ROOT/test/<class>/...): name -> is test.
SPLIT_FOLDERS = {"train": False, "test": True}
IGNORED_SPLITS = frozenset({"val", "valid", "validation"})
#: The most pixels (width x height) an image may have: Pillow's default MAX_IMAGE_PIXELS, above which it only warns
#: (and raises at twice that). Larger images are skipped before decoding: one would need gigabytes of memory.
MAX_PIXELS = 89_478_485


def pillow() -> Any:
    """The PIL.Image module, or an error saying how to install it."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib here
        raise MissingDependencyError("reading images needs Pillow: pip install 'insitu[data]'") from None
    return Image


def decode_images(items: list[tuple[str, Path | bytes]], spec: DataSpec, where: str
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode ``(name, file or bytes)`` items into float32 N x C x H x W in [0, 1].

    Returns the array, a boolean mask of the items that decoded and the names of those that did not (logged
    once, not raised: one corrupt scan should not stop a hospital); an image over :data:`MAX_PIXELS` is skipped
    before it is decoded, its size in the name. Images are converted to ``spec.image_mode`` (default: grayscale
    when every image is, else RGB) and resized to ``spec.image_size`` as each is decoded, so only the result is
    kept; without a size they must all have the same one.
    """
    image_module = pillow()
    bad = (OSError, ValueError, SyntaxError)
    too_large = (TooLargeError, image_module.DecompressionBombError)  # skipped with the reason
    fixed = {"grayscale": "L", "rgb": "RGB"}.get(spec.image_mode)
    pixels: list[np.ndarray] = []
    gray: list[bool] = []  # per decoded image: its own mode is grayscale (decoded as "L" while the mode is auto)
    sizes: dict[tuple[int, int], str] = {}
    ok, skipped = np.zeros(len(items), dtype=bool), []
    for i, (name, source) in enumerate(items):
        try:
            array, is_gray, size = _decode(image_module, source, fixed, spec.image_size)
        except too_large as error:
            skipped.append(f"{name} ({error})")
            continue
        except bad:
            skipped.append(name)
            continue
        pixels.append(array)
        gray.append(is_gray)
        sizes.setdefault(size, name)
        ok[i] = True
    if skipped:
        shown = ", ".join(skipped[:SHOWN_SKIPPED]) + (", ..." if len(skipped) > SHOWN_SKIPPED else "")
        log.warning("skipped %d unreadable image%s under %s: %s", len(skipped), "" if len(skipped) == 1 else "s",
                    where, shown)
    if not pixels:
        raise ValueError(f"no readable images under {where} ({len(skipped)} unreadable)")
    if spec.image_size is None and len(sizes) > 1:
        (w1, h1), first = next(iter(sizes.items()))
        (w2, h2), second = list(sizes.items())[1]
        raise ValueError(f"images under {where} differ in size ({h1}x{w1} in {first}, {h2}x{w2} in {second}): "
                         f"pass --image-size {h1} (or HEIGHTxWIDTH) to resize them all")
    if fixed is None and not all(gray):  # auto mode, some in color: the grayscale ones again, as RGB
        decoded = [item for item, good in zip(items, ok) if good]
        for j, is_gray in enumerate(gray):
            if is_gray:
                pixels[j] = _decode(image_module, decoded[j][1], "RGB", spec.image_size)[0]
    stacked = np.stack(pixels)
    del pixels
    if stacked.ndim == 3:
        return np.ascontiguousarray(stacked[:, None, :, :]), ok, skipped
    return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)), ok, skipped


class TooLargeError(ValueError):
    """An image whose width x height exceeds :data:`MAX_PIXELS` (checked from its header, before decoding)."""


def _decode(image_module: Any, source: Path | bytes, mode: str | None, size: tuple[int, int] | None
            ) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """One image as :func:`_pixels` makes it (``mode`` None: "L" if the image is grayscale, else "RGB"), whether
    its own mode is grayscale, and its original (width, height); the pixel count is checked before decoding."""
    with warnings.catch_warnings():  # over the cap is refused below, so Pillow's own warning would only repeat it
        warnings.simplefilter("ignore", image_module.DecompressionBombWarning)
        handle = image_module.open(source if isinstance(source, Path) else io.BytesIO(source))
    with handle:
        width, height = handle.size
        if width * height > MAX_PIXELS:
            raise TooLargeError(f"{width}x{height} = {width * height} pixels, over the {MAX_PIXELS}-pixel limit")
        handle.load()
        is_gray = handle.mode in GRAYSCALE_MODES
        return _pixels(image_module, handle, mode or ("L" if is_gray else "RGB"), size), is_gray, (width, height)


def _pixels(image_module: Any, image: Any, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """One image as float32 H x W (x C) in [0, 1]: 8-bit images by 255; 16-bit grayscale (medical scans, "I;16"
    or "I") by 65535 as 32-bit floats, so converting to 8 bits does not clip them."""
    if mode == "L" and image.mode in WIDE_GRAYSCALE_MODES:
        image = image_module.fromarray(np.asarray(image.convert("I"), dtype=np.float32) / np.float32(65535.0))
        scale = np.float32(1.0)
    else:
        image = image.convert(mode)
        scale = np.float32(1.0 / 255.0)
    if size is not None:
        image = image.resize((size[1], size[0]), image_module.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) * scale


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_folders(folder: Path, what: str) -> list[Path]:
    """The class subfolders of ``folder``; images lying beside them, or none at all, are errors."""
    loose = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise ValueError(f"{folder} holds images directly ({', '.join(sorted(loose)[:3])}): {what} must hold one "
                         f"subfolder per class ({folder}/<class>/image.png), the folder name being the class")
    classes = _subdirs(folder)
    if not classes:
        raise ValueError(f"{folder} has no class subfolders: put the images in one subfolder per class "
                         f"({folder}/<class>/image.png)")
    return classes


def _splits(folder: Path) -> list[tuple[Path, bool]] | None:
    """(split folder, is test) when ``folder``'s subfolders are only train/ and test/ (val/ ignored), else None."""
    names = {p.name for p in _subdirs(folder)}
    if not (names & SPLIT_FOLDERS.keys()) or not names <= SPLIT_FOLDERS.keys() | IGNORED_SPLITS:
        return None
    if names & IGNORED_SPLITS:
        log.warning("%s: using train/ and test/; %s ignored (a validation split is not used)", folder,
                    ", ".join(sorted(names & IGNORED_SPLITS)))
    return [(folder / n, SPLIT_FOLDERS[n]) for n in sorted(names & SPLIT_FOLDERS.keys(), reverse=True)]


def read_image_folder(root: Path, spec: DataSpec) -> Raw:
    """Read ROOT/<class>/*.png|jpg|...; when ROOT's subfolders are only train/, test/ (and val/, ignored) they are
    the splits; with ``partition_by = "folder"`` the next level is the group: ROOT/[train/]<group>/<class>/image,
    or, with each group's own split, ROOT/<group>/[train|test]/<class>/image (the layout of one folder per
    hospital that deployed clients read)."""
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}")
    if spec.partition_by and spec.partition_by != GROUP_BY_FOLDER:
        raise ValueError(f"an image folder is partitioned by its first-level folders (ROOT/<group>/<class>/image): "
                         f"pass --partition-by {GROUP_BY_FOLDER}, not {spec.partition_by!r}")
    splits = _splits(root)
    split_layout = splits is not None
    items: list[tuple[str, Path | bytes]] = []
    labels: list[str] = []
    groups: list[str] = []
    flags: list[bool] = []
    per_group_splits = False
    for folder, is_test in splits or [(root, False)]:
        group_dirs = _subdirs(folder) if spec.partition_by else [folder]
        if not group_dirs:
            raise ValueError(f"{folder} has no group subfolders: with --partition-by folder the layout is "
                             f"{folder}/<group>/<class>/image.png")
        for group_dir in group_dirs:
            group_splits = _splits(group_dir) if spec.partition_by and not split_layout else None
            per_group_splits = per_group_splits or group_splits is not None
            for class_root, test_flag in group_splits or [(group_dir, is_test)]:
                for class_dir in _class_folders(class_root, "a group folder" if spec.partition_by else "an image folder"):
                    files = _image_files(class_dir)
                    if not files:
                        raise ValueError(f"class folder {class_dir} has no images (looked for "
                                         f"{', '.join(sorted(IMAGE_SUFFIXES))}): add images or remove the folder")
                    for file in files:
                        items.append((str(file.relative_to(root)), file))
                        labels.append(class_dir.name)
                        groups.append(group_dir.name)
                        flags.append(test_flag)
    x, ok, skipped = decode_images(items, spec, str(root))
    keep = np.flatnonzero(ok)
    label_array = np.asarray(labels, dtype=str)
    return Raw(x, label_array[keep], str(root),
               groups=np.asarray(groups, dtype=str)[keep] if spec.partition_by else None,
               is_test=np.asarray(flags, dtype=bool)[keep] if split_layout or per_group_splits else None,
               classes=tuple(sorted(set(labels))), skipped=skipped)
