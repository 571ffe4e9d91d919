"""Training: the Accelerate loop and what it writes.

- ``loop``: ``train()`` and the ``Trainer`` (the Accelerate loop; knows no model class),
- ``checkpoint``: checkpoint folders (list, find, save, load; a pipeline at a checkpoint),
- ``optim``: AdamW, the LR schedule and the EMA from the config (also written into restored state),
- ``resume``: what a resume may change (each key's rule) and the record of what was in effect,
- ``run_dir``: the output folder (checks, lock, record files, the final pipeline folder),
- ``tensor_tree``: state dicts (optimizer, LR schedule, EMA, RNG) as pickle-free safetensors,
- ``timing``: step timer and the run's wall clock (memory figures: ``atdiff.memory``),
- ``trackers``: ``training.log_with`` checked before the run, sample grids to TensorBoard and wandb,
- ``sharding``: FSDP2 (its engine settings; full state dicts for the checkpoints).

The ``atdiff train`` command is ``atdiff.train_cli``, above this package and ``atdiff.eval`` (it hands
the loop its FID evaluator).
"""

from .checkpoint import list_checkpoints, pipeline_at_checkpoint
from .loop import ModelInterface, Trainer, TrainingDiverged, TrainingResult, train

__all__ = ["ModelInterface", "Trainer", "TrainingDiverged", "TrainingResult", "list_checkpoints", "pipeline_at_checkpoint", "train"]
