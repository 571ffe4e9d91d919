"""FSDP2 (``torch.distributed.fsdp.fully_shard``) through Accelerate: which engine settings ``atdiff
train`` runs with, and the full state dicts its checkpoints hold.

Under FSDP2 every process holds a shard (a ``DTensor``) of each parameter, of its optimizer state and
of its EMA shadow. Checkpoints stay the files DDP writes: the shards are gathered into full tensors
that the main process writes, and on resume every process reads the full tensors and keeps its own
shard. The final pipeline folder is likewise written from full weights, so it is DDP's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
from diffusers.training_utils import EMAModel
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from ..config import ExperimentConfig
from ..errors import UsageError

# Gathered on the main process only, in CPU memory: one full copy, where the writing happens.
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Every process reads the full tensors from the checkpoint and keeps its own shard of them.
FROM_FULL = StateDictOptions(full_state_dict=True)

# What each refused engine takes over that atdiff's loop must own.
REFUSED_ENGINES = {
    "ACCELERATE_USE_DEEPSPEED": (
        "DeepSpeed", "its engine takes over the optimizer step, gradient clipping, mixed precision and checkpoints "
        "(pickled), which atdiff's EMA, finite checks and verified checkpoints rely on, and it cannot be tested without GPUs here"),
    "ACCELERATE_USE_MEGATRON_LM": (
        "Megatron-LM", "it needs Megatron's own model classes and checkpoints, and cannot be tested without GPUs here"),
}
ALTERNATIVES = "use FSDP2 (`accelerate config`: FSDP with fsdp_version 2) or DDP (`accelerate launch --multi_gpu -m atdiff train ...`)"


def fsdp_plugin(cfg: ExperimentConfig) -> FullyShardedDataParallelPlugin | None:
    """The FSDP settings ``accelerate launch`` passes in the environment (from an ``accelerate config``
    file or its ``--fsdp_*`` flags), None without FSDP; settings atdiff cannot train or checkpoint
    with, and the engines it does not support, are one line each, before any work."""
    for variable, (engine, reason) in REFUSED_ENGINES.items():
        if parse_flag_from_env(variable):
            raise UsageError(f"{engine} is not supported by atdiff train ({variable} is set, e.g. by `accelerate config`): {reason}; {ALTERNATIVES}")
    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return None
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UsageError(f"FSDP version {version} is not supported by atdiff train (FSDP_VERSION={version}, e.g. from `accelerate config`): "
                         f"set fsdp_version: 2 in the accelerate config (FSDP2, fully_shard), or --fsdp_version 2")
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables as Accelerate does
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        # The EMA shadows and finite checks would sit on the device while the parameters live in CPU memory.
        raise UsageError("fsdp_offload_params (FSDP_OFFLOAD_PARAMS) is not supported by atdiff train: its EMA is kept on the "
                         "training device; set fsdp_offload_params: false, and training.gradient_checkpointing: true to save memory")
    if plugin.activation_checkpointing:
        # Accelerate's checkpoint wrapper renames every wrapped parameter, and the checkpoints name them.
        raise UsageError("fsdp_activation_checkpointing (FSDP_ACTIVATION_CHECKPOINTING) is not supported by atdiff train: "
                         "set it to false and training.gradient_checkpointing: true (the same recomputation, under DDP too)")
    if cfg.objective.repa_encoder:
        raise UsageError("objective.repa_encoder with FSDP: REPA's projector is trained beside the model and is not sharded "
                         "by atdiff yet; train REPA with DDP (`accelerate launch --multi_gpu -m atdiff train ...`)")
    return plugin


def use_fsdp_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Accelerate (1.16) layers FSDP over GPU process groups only: on CPU processes it runs plain
    multi-CPU data parallelism and drops the plugin without a word. FSDP2 itself runs over gloo, so
    set the state as ``AcceleratorState`` sets it over GPUs (its mixed precision into the plugin, the
    type in both shared states): then ``prepare``, clipping and accumulation take their FSDP2 paths on
    the CPU as well (how atdiff's tests run it)."""
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # a later AcceleratorState() copies it from there


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def model_class(module: torch.nn.Module) -> type:
    """The class a model was built as (``fully_shard`` swaps in a subclass ``FSDP<name>`` mixing in ``FSDPModule``)."""
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def local_shards(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """This process's part of each tensor (all of a plain one): what it holds in memory and checks."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor (a collective: every process calls it), on the CPU; a plain one as it is."""
    return tensor.full_tensor().cpu() if isinstance(tensor, DTensor) else tensor


# ------------------------------------------------------------------------------------------------
# Gathering (collectives: every process calls them; the main process gets the tensors)
# ------------------------------------------------------------------------------------------------


def gather_model_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded model (parameters and buffers), {} off the main process."""
    return get_model_state_dict(network, options=GATHERED)


def gather_optimizer_state(network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state in ``Optimizer.state_dict()``'s own layout (parameters by their index
    in the groups, not by name), so the file is the one DDP writes; {} off the main process."""
    gathered = get_optimizer_state_dict(network, optimizer, options=GATHERED)
    if not gathered:
        return {}
    index = {name: i for i, name in enumerate(parameter_names(network, optimizer))}
    return {
        "state": {index[name]: values for name, values in gathered["state"].items()},
        "param_groups": [{**{k: v for k, v in group.items() if k != "params"}, "params": [index[name] for name in group["params"]]}
                         for group in gathered["param_groups"]],
    }


def gather_ema_state(ema: EMAModel) -> dict:
    """``EMAModel.state_dict()`` with each sharded shadow gathered whole."""
    return {**ema.state_dict(), "shadow_params": [full_tensor(shadow) for shadow in ema.shadow_params]}


def ema_copy(network: torch.nn.Module, ema: EMAModel, new_model: Callable[[], torch.nn.Module], main: bool) -> torch.nn.Module | None:
    """On the main process, a plain (unsharded) model built by ``new_model`` holding ``network``'s
    buffers and the EMA's weights; None on the others. A sharded forward needs every process, while
    grids, evals and the final pipeline are drawn by the main process alone: it samples from this."""
    weights = gather_model_state(network)
    shadows = [full_tensor(shadow) for shadow in ema.shadow_params]
    if not main:
        return None
    model = new_model()
    model.load_state_dict(weights)
    with torch.no_grad():
        for parameter, shadow in zip(model.parameters(), shadows, strict=True):  # EMAModel's order: network.parameters()
            parameter.copy_(shadow)
    return model


# ------------------------------------------------------------------------------------------------
# Loading (every process reads the full tensors and keeps its shard)
# ------------------------------------------------------------------------------------------------


def load_model_state(network: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(network, full, options=FROM_FULL)  # strict: a missing or extra key raises


def load_optimizer_state(network: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load ``Optimizer.state_dict()``'s layout (``gather_optimizer_state``) into a sharded optimizer."""
    names = parameter_names(network, optimizer)
    by_name = {
        "state": {names[i]: values for i, values in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(network, optimizer, by_name, options=FROM_FULL)


def shard_ema(ema: EMAModel, parameters: Iterable[torch.nn.Parameter]) -> None:
    """Cut the full shadows ``ema.load_state_dict`` restored into the shards of ``parameters``."""
    ema.shadow_params = [
        distribute_tensor(shadow.to(parameter.device), parameter.device_mesh, parameter.placements) if isinstance(parameter, DTensor) else shadow
        for shadow, parameter in zip(ema.shadow_params, parameters, strict=True)
    ]


def parameter_names(network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names (FSDP2 keeps the module's own) of the optimizer's parameters, in its order."""
    names = {id(parameter): name for name, parameter in network.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
