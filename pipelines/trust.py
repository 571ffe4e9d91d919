"""What a pipeline folder may make atdiff import: installed atdiff and diffusers classes, nothing else.

diffusers resolves each ``model_index.json`` entry ``"name": [library, class]`` by importing
``library`` -- from the folder itself when ``name/<library>.py`` exists (with
``trust_remote_code=True``), otherwise as an installed module, which for ``python -m`` includes the
current directory. A folder is data, so unless the caller trusts its code explicitly, every
component it names must come from an installed ``atdiff`` or ``diffusers`` module and no component
folder may hold a module of that name.
"""

from __future__ import annotations

import os
from pathlib import Path

from atdiff.errors import UsageError
from atdiff.integrity import read_model_index

TRUSTED_LIBRARIES = ("atdiff", "diffusers")
# Keys of model_index.json that are settings, not components.
NOT_COMPONENTS = ("_class_name", "_diffusers_version", "_name_or_path")


def is_trusted_library(name: str) -> bool:
    return any(name == lib or name.startswith(f"{lib}.") for lib in TRUSTED_LIBRARIES)


def check_no_code_from_folder(folder: str | os.PathLike, pipeline_class: type) -> None:
    """Refuse a local pipeline folder that would make ``pipeline_class.from_pretrained`` import code it holds or a
    library other than atdiff/diffusers (diffusers imports a component's library even when it is passed in)."""
    folder = Path(folder)
    if not folder.is_dir():
        return  # a Hub repo id: diffusers never runs its code without trust_remote_code=True
    index = read_model_index(folder)
    fix = "atdiff runs no code from a pipeline folder; in Python, pass trust_remote_code=True only if you trust that code"
    class_name = index.get("_class_name")
    if isinstance(class_name, list) and class_name[1:] != [pipeline_class.__name__]:
        raise UsageError(f"{folder}/model_index.json names the pipeline class {class_name}, not {pipeline_class.__name__}; {fix}")
    components, _ = pipeline_class._get_signature_keys(pipeline_class)
    for name, entry in index.items():
        if name in components and not (isinstance(entry, list) and len(entry) == 2):
            raise UsageError(f"{folder}/model_index.json: component {name!r} is {entry!r}, not a [library, class] pair")
        if name in NOT_COMPONENTS or not isinstance(entry, list) or entry[:1] == [None]:
            continue
        library = entry[0]
        if not isinstance(library, str) or not is_trusted_library(library):
            raise UsageError(
                f"{folder}/model_index.json: component {name!r} comes from {library!r}; atdiff loads components "
                f"only from {' and '.join(TRUSTED_LIBRARIES)} ({fix})"
            )
        module = folder / name / f"{library}.py"
        if module.exists():
            raise UsageError(f"{module} would be imported as component {name!r}'s code; remove it ({fix})")
