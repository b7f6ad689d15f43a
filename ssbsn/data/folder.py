"""Image files and folders."""
from __future__ import annotations

from pathlib import Path

from ..errors import ImageError
from ..images import is_image_file


def list_images(inputs, recursive: bool = False) -> list[Path]:
    """Image files named by ``inputs`` (files or folders), in a stable order.

    A folder contributes its image files (sorted; with ``recursive``, those of its sub-folders
    too; hidden files are skipped). Raises :class:`ImageError` for a missing path, a file that
    is not an image type, or when nothing is found.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(f for f in p.glob(pattern)
                           if f.is_file() and is_image_file(f) and not f.name.startswith("."))
            if not found:
                raise ImageError(f"{p}: no images found in this folder "
                                 "(.png, .jpg, .jpeg, .tif, .tiff, .bmp)")
            out.extend(found)
        elif p.is_file():
            if not is_image_file(p):
                raise ImageError(f"{p}: not an image file type "
                                 "(.png, .jpg, .jpeg, .tif, .tiff, .bmp)")
            out.append(p)
        else:
            raise ImageError(f"{p}: no such file or folder")
    if not out:
        raise ImageError("no input images given")
    return out


def paired_images(noisy_dir, clean_dir) -> list[tuple[Path, Path]]:
    """(noisy, clean) pairs matched by file stem across two folders (recursive)."""
    noisy = {p.relative_to(noisy_dir).with_suffix(""): p
             for p in list_images(noisy_dir, recursive=True)}
    clean = {p.relative_to(clean_dir).with_suffix(""): p
             for p in list_images(clean_dir, recursive=True)}
    missing = sorted(set(noisy) - set(clean))
    if missing:
        raise ImageError(f"{clean_dir}: no clean image for {len(missing)} noisy image(s), "
                         f"e.g. {missing[0]}")
    return [(noisy[k], clean[k]) for k in sorted(noisy)]
