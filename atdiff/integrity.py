"""What atdiff checks before it loads a folder it wrote: manifests, and the weights themselves.

A manifest, ``manifest.json``, lists each file of a folder with its size and sha256; it is written
last and checked before anything is loaded, so a damaged, truncated or edited file is named instead
of loaded. Checkpoints (``atdiff.training.checkpoint``) and pipeline folders keep one. A pipeline's
covers ``model_index.json``, the ``pipeline.py`` beside it and every file of the component folders
that ``model_index.json`` names: not the rest of a run folder (checkpoints, logs, samples), which
keeps changing after its pipeline is written.

Weights are read from safetensors only and must be floating point and finite: a model cast to
int8 would be cast back silently by diffusers, and NaN weights sample black images.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open

from .errors import UsageError
from .files import sha256_of, write_atomic

MANIFEST = "manifest.json"
PIPELINE_FORMAT, PIPELINE_VERSION = "atdiff-pipeline", 1
PIPELINE_INDEX = "model_index.json"
LOCK_NAME = ".atdiff-run.lock"  # marks a folder as an `atdiff train` run, and locks it while one trains
PIPELINE_MODULE = "pipeline"  # pipeline.py, written by ImageDiffusionPipeline.save_pretrained
# Weight files diffusers would unpickle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class IntegrityError(Exception):
    """A folder whose files are not what its manifest says (the message names the file); it is never loaded."""


# ------------------------------------------------------------------------------------------------
# Manifests
# ------------------------------------------------------------------------------------------------


def write_manifest(folder: Path, names: Iterable[str], **header) -> None:
    """``folder/manifest.json``: ``header`` (format, version, ...) and each of ``names`` (paths
    relative to ``folder``) with its size and sha256."""
    files = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)} for name in sorted(names)}
    write_atomic(folder / MANIFEST, json.dumps({**header, "files": files}, indent=2) + "\n")


def read_manifest(folder: Path, format: str, version: int) -> dict | None:
    """The ``format`` manifest of ``folder``, None if it has no manifest; IntegrityError for another one."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise IntegrityError(f"unreadable {MANIFEST} ({err})") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == format and isinstance(manifest.get("files"), dict)):
        raise IntegrityError(f"{MANIFEST} is not an {format} manifest")
    if manifest.get("version") != version:
        raise IntegrityError(f"format version {manifest.get('version')!r}; this atdiff reads version {version}")
    return manifest


def check_files(folder: Path, files: dict) -> None:
    """Raise IntegrityError unless every file a manifest lists is in ``folder`` with its size and sha256."""
    for name, expected in files.items():
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or any(p.startswith(".") for p in parts) or not isinstance(expected, dict):
            raise IntegrityError(f"{MANIFEST} has a malformed entry {name!r}")  # only files inside the folder
        file = folder / name
        if not file.is_file():
            raise IntegrityError(f"{name} is missing")
        if file.stat().st_size != expected.get("size"):
            raise IntegrityError(f"{name} has {file.stat().st_size} bytes, {MANIFEST} says {expected.get('size')} (truncated?)")
        if sha256_of(file) != expected.get("sha256"):
            raise IntegrityError(f"{name} does not match its sha256 in {MANIFEST} (corrupted or modified)")


def check_nothing_unlisted(folder: Path, files: dict, subfolders: Iterable[str]) -> None:
    """Raise IntegrityError if ``subfolders`` of ``folder`` ("" for itself) hold a file the manifest
    does not list: loaders look for files by name (another process's RNG state, a component's
    weights in another format), so one added later would be read unverified."""
    for subfolder in subfolders:
        for path in sorted((folder / subfolder).rglob("*")):
            name = path.relative_to(folder).as_posix()
            if name not in files and name != MANIFEST and (path.is_symlink() or not path.is_dir()):
                raise IntegrityError(f"{name} is not listed in {MANIFEST} (added after the folder was written)")


# ------------------------------------------------------------------------------------------------
# Pipeline folders
# ------------------------------------------------------------------------------------------------


def read_model_index(folder: Path) -> dict:
    """``model_index.json`` as a dict; a UsageError naming it if it is not a JSON object."""
    path = folder / PIPELINE_INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is not readable JSON ({err}); pass a pipeline folder written by save_pretrained") from None
    if not isinstance(index, dict):
        raise UsageError(f"{path} is not a JSON object; pass a pipeline folder written by save_pretrained")
    return index


def pipeline_components(folder: Path) -> list[str]:
    """The component folders ``model_index.json`` names (``"model": ["atdiff", "DiTModel"]``) that exist."""
    return sorted(
        name for name, entry in read_model_index(folder).items()
        if isinstance(entry, list) and entry[:1] != [None] and Path(name).name == name and not name.startswith(".")
        and (folder / name).is_dir()
    )


def write_pipeline_manifest(folder: Path) -> None:
    """The manifest of the pipeline in ``folder`` (see the module docstring); written last."""
    names = [PIPELINE_INDEX, *([f"{PIPELINE_MODULE}.py"] if (folder / f"{PIPELINE_MODULE}.py").is_file() else [])]
    for component in pipeline_components(folder):
        names += [p.relative_to(folder).as_posix() for p in (folder / component).rglob("*") if p.is_file()]
    write_manifest(folder, names, format=PIPELINE_FORMAT, version=PIPELINE_VERSION)


def verify_pipeline(folder: Path) -> bool:
    """Refuse (UsageError, naming the file) a pipeline folder that is not what its manifest lists;
    False if it has no manifest."""
    try:
        manifest = read_manifest(folder, PIPELINE_FORMAT, PIPELINE_VERSION)
        if manifest is None:
            return False
        if PIPELINE_INDEX not in manifest["files"]:
            raise IntegrityError(f"{MANIFEST} lists no {PIPELINE_INDEX}")
        check_files(folder, manifest["files"])
        check_nothing_unlisted(folder, manifest["files"], pipeline_components(folder))  # model_index.json now verified
    except IntegrityError as err:
        raise UsageError(f"{folder}: {err}; restore the folder from a good copy or write it again") from None
    return True


def check_pipeline_folder(folder: Path) -> None:
    """What loading a pipeline folder checks first: its manifest (a folder without one, saved by plain
    diffusers or an older atdiff, loads with a note) and the weight files of each component."""
    if not verify_pipeline(folder):
        print(f"note: {folder} has no {MANIFEST} (not written by atdiff, or by an older one): its files are not verified", file=sys.stderr)
    for component in pipeline_components(folder):
        check_weight_files(folder / component)


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------


def check_weights(tensors: Iterable[tuple[str, torch.Tensor]], where: str | Path) -> None:
    """Refuse weights that are not floating point or not finite, naming the first such tensor."""
    for name, tensor in tensors:
        if not tensor.is_floating_point():
            raise UsageError(f"{where}: tensor {name} is {tensor.dtype}, not floating point (quantised or cast?); atdiff loads float weights only")
        if not torch.isfinite(tensor).all():
            raise UsageError(f"{where}: tensor {name} holds NaN or infinite values; the weights are broken (a diverged run?)")


def check_weight_files(folder: Path) -> None:
    """Refuse a model folder with pickled weights, and check each safetensors file's tensors."""
    for path in sorted(folder.iterdir()):
        if path.suffix in PICKLE_SUFFIXES:
            raise UsageError(
                f"{path} is a pickle, which atdiff refuses to load (unpickling can run code); convert it to "
                f"safetensors (load it where you trust it, then save_pretrained(..., safe_serialization=True))"
            )
        if path.suffix == ".safetensors":
            try:
                with safe_open(path, framework="pt") as file:
                    check_weights(((key, file.get_tensor(key)) for key in file.keys()), path)  # one tensor at a time
            except UsageError:
                raise
            except Exception as err:  # safetensors raises its own SafetensorError on a bad header
                raise UsageError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None
