"""Images in an ``.npz`` (the ADM evaluator's layout), read one at a time: a 50k-image file never sits in memory.

``np.load(path)["arr_0"]`` decompresses the whole array (50k ImageNet images at 256: 9.8 GB), and
``mmap_mode`` does nothing for ``.npz`` files. So the member's ``.npy`` header is parsed here and
the images are read from the archive directly: memory-mapped when the member is stored uncompressed
(``np.savez``: ADM's samples, ``atdiff sample --out X.npz``), else (``np.savez_compressed``) read
through a seekable decompressing stream, in order as a DataLoader asks for them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from atdiff.errors import UsageError

# The zip local file header: 30 fixed bytes, then the file name and the extra field (lengths at 26, 28).
LOCAL_HEADER_SIZE = 30


def read_npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the ``.npy`` array ``stream`` is at the start of; the stream is left at its data."""
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(stream)


class NpzImages(Dataset):
    """uint8 (C, H, W) images of an ``.npz`` member holding (N, H, W, C) or (N, C, H, W) uint8."""

    def __init__(self, path: str | Path, member: str):
        """``member``: the array's name in the archive (``arr_0``)."""
        self.path = Path(path)
        with zipfile.ZipFile(self.path) as archive:
            self.info = archive.getinfo(f"{member}.npy")
            with archive.open(self.info) as stream:
                shape, fortran, dtype = read_npy_header(stream)
                self.data_start = stream.tell()  # offset of the first image inside the member
        if dtype != np.uint8 or len(shape) != 4 or fortran or 0 in shape[1:]:
            raise UsageError(f"{self.path}: expected uint8 images (N, H, W, C) of at least one pixel, got {dtype} {shape}")
        if shape[-1] in (1, 3):
            self.channels_last = True
        elif shape[1] in (1, 3):
            self.channels_last = False
        else:
            raise UsageError(f"{self.path}: expected 1 or 3 channels first or last, got shape {shape}")
        self.shape = shape
        self.image_bytes = int(np.prod(shape[1:]))
        self._array = self._memmap() if self.info.compress_type == zipfile.ZIP_STORED else None
        self._archive = self._stream = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        image = self._array[index] if self._array is not None else self._read(index)
        return torch.from_numpy(np.array(image.transpose(2, 0, 1) if self.channels_last else image))  # a copy: memmaps are read-only

    def _memmap(self) -> np.memmap:
        with open(self.path, "rb") as file:
            file.seek(self.info.header_offset)
            header = file.read(LOCAL_HEADER_SIZE)
        name_length = int.from_bytes(header[26:28], "little")
        extra_length = int.from_bytes(header[28:30], "little")
        offset = self.info.header_offset + LOCAL_HEADER_SIZE + name_length + extra_length + self.data_start
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=self.shape)

    def _read(self, index: int) -> np.ndarray:
        # Forward seeks skip by decompressing; a backward one restarts the stream (the zip module does both).
        if self._stream is None:
            self._archive = zipfile.ZipFile(self.path)
            self._stream = self._archive.open(self.info)
        self._stream.seek(self.data_start + index * self.image_bytes)
        data = self._stream.read(self.image_bytes)
        if len(data) != self.image_bytes:
            raise UsageError(f"{self.path}: truncated: image {index} of {len(self)} is incomplete")
        return np.frombuffer(data, dtype=np.uint8).reshape(self.shape[1:])

    def __getstate__(self) -> dict:
        # DataLoader workers get their own file handles.
        return {**self.__dict__, "_archive": None, "_stream": None}
