"""The one-file outputs of ``atdiff sample``: a grid (PNG or JPEG) or an ADM-format npz, assembled from
a complete samples folder and carrying its record (a PNG text chunk, a JPEG comment, an npz member).

The npz is the ADM evaluator's layout: uint8 NHWC in ``arr_0``, class labels (if any) in ``arr_1``,
stored uncompressed as ``np.savez`` does, so that readers can memory-map it (``atdiff.eval.npz_images``).
It is streamed image by image from the PNGs: a 50k-image ImageNet npz (9.8 GB) is never in memory.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import UsageError
from ..files import atomic_path
from .folder import check_same_settings, read_image, read_images

RECORD_KEY = "atdiff_sample"  # where a grid (PNG text chunk, JPEG comment) or npz keeps its settings
GRID_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def output_kind(out: Path) -> str:
    """``"dir"``, ``"grid"`` or ``"npz"``, from the suffix of ``--out``."""
    suffix = out.suffix.lower()
    if suffix in GRID_FORMATS:
        return "grid"
    if suffix == ".npz":
        return "npz"
    if suffix in Image.registered_extensions():
        raise UsageError(f"--out {out}: a grid is written as .png or .jpg; pass one of those, a .npz or a folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file; pass a folder, a .png or .jpg (grid) or a .npz")
    return "dir"


def write_grid(folder: Path, num_images: int, path: Path, record: dict) -> None:
    """A grid image of the folder's first ``num_images`` (PNG or JPEG, by suffix) that carries ``record``."""
    from torchvision.utils import make_grid

    images = read_images(folder, range(num_images))
    grid = make_grid(torch.from_numpy(images).permute(0, 3, 1, 2), nrow=math.ceil(math.sqrt(len(images))), padding=2)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    format = GRID_FORMATS[path.suffix.lower()]
    with atomic_path(path) as partial:
        if format == "PNG":
            info = PngInfo()
            info.add_text(RECORD_KEY, json.dumps(record))
            image.save(partial, format=format, pnginfo=info)
        else:
            image.save(partial, format=format, quality=95, comment=json.dumps({RECORD_KEY: record}))


def write_npz(folder: Path, num_images: int, labels: Sequence[int] | None, path: Path, record: dict) -> None:
    """The ADM-format npz of the folder's first ``num_images``, one image in memory at a time."""
    first = read_image(folder, 0)
    # np.savez cannot take an iterator: the .npy members are written here as it writes them (a header,
    # then the raw array), into an uncompressed zip64 archive.
    with atomic_path(path) as partial, zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
                      "shape": (num_images, *first.shape)}
            np.lib.format.write_array_header_1_0(member, header)
            for i in range(num_images):
                image = read_image(folder, i, first.shape)
                member.write(np.ascontiguousarray(image).tobytes())
        arrays = {RECORD_KEY: np.array(json.dumps(record))}
        if labels is not None:
            arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def read_record(path: Path) -> dict | None:
    """The settings a grid or npz written by ``atdiff sample`` carries; None for any other file."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as data:
                record = json.loads(str(data[RECORD_KEY])) if RECORD_KEY in data else None
        else:
            with Image.open(path) as image:
                if RECORD_KEY in image.info:  # PNG text chunk
                    record = json.loads(image.info[RECORD_KEY])
                else:
                    record = json.loads(image.info["comment"])[RECORD_KEY]  # JPEG comment
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):  # not ours, or not readable: foreign
        return None
    return record if isinstance(record, dict) else None  # JSON under our key, but not a record we wrote


def check_existing_file(out: Path, record: dict) -> None:
    """Refuse a grid/npz ``out`` that was sampled with other settings or not by ``atdiff sample``."""
    previous = read_record(out)
    if previous is None:
        raise UsageError(f"{out} exists and was not written by `atdiff sample`; use a new --out")
    check_same_settings(out, previous, record)
