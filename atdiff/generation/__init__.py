"""Generation: drawing images from a pipeline, the layer under training, evaluation and the commands.

- ``settings``: ``SamplingConfig``, the one sampling-settings type (config section, flags, records, call),
- ``loading``: a pipeline folder checked (the trust rules) and loaded, with a scheduler by name,
- ``drawing``: the call that draws images; image i depends only on (seed, i, its label),
- ``folder``: samples folders, filled resumably by one process or all of an ``accelerate launch``,
- ``outputs``: a grid or an ADM npz assembled from a complete folder,
- ``cli``: ``atdiff sample``.

Import from the submodules: ``atdiff.config`` imports ``settings``, and the others load pipelines.
"""
