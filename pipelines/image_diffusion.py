"""Unconditional and class-conditional image generation from any atdiff denoiser, in pixel or latent space."""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from atdiff.integrity import PIPELINE_MODULE, check_pipeline_folder, write_pipeline_manifest

from .schedulers import PREDICTION_TYPES, check_scheduler_fits, prediction_type_of
from .trust import check_no_code_from_folder

# diffusers resolves a plain `_class_name` in model_index.json only among its own classes, so a folder
# names its class as ["pipeline", "ImageDiffusionPipeline"] and ships this one-line module: diffusers'
# documented way to load a pipeline class it does not define, for users who call
# `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`. atdiff itself never imports it.
PIPELINE_MODULE_SOURCE = (
    "# Written by atdiff: lets DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) find the\n"
    "# pipeline class, which lives in the installed atdiff package rather than in diffusers.\n"
    "from atdiff.pipelines import ImageDiffusionPipeline  # noqa: F401\n"
)


def num_classes_of(model: ModelMixin) -> int:
    """Number of classes a denoiser is conditioned on (0: unconditional)."""
    # DiT-style `num_classes`, or a diffusers UNet's label embedding (`num_class_embeds` without a `class_embed_type`).
    config = model.config
    if getattr(config, "class_embed_type", None) is None and getattr(config, "num_class_embeds", None):
        return config.num_class_embeds
    return getattr(config, "num_classes", 0) or 0


def check_all_weights_loaded(pipe: DiffusionPipeline, folder: str | os.PathLike) -> None:
    """Refuse components with parameters their weights file lacked: diffusers only warns and leaves them
    on the meta device, where the first forward fails far from the cause."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            missing = [n for n, p in component.named_parameters() if p.is_meta]
            if missing:
                raise ValueError(
                    f"{folder}/{name}: {len(missing)} parameters of {type(component).__name__} are not in its weights "
                    f"file (e.g. {missing[0]}); the weights were saved from another class or config"
                )



class NonFiniteSamples(ValueError):
    """The samples came out NaN or infinite (a guidance too large, or weights that overflow): never decoded."""


class ImageDiffusionPipeline(DiffusionPipeline):
    r"""Sample images from an atdiff denoiser (``DiTModel``, ``MixerUNet2DModel``, ...).

    Args:
        model: called as ``model(x, timestep, class_labels).sample`` (without labels when
            ``model.config.num_classes`` is 0 or missing); outputs with learned-sigma channels keep
            only the first ``in_channels`` unless the scheduler learns the variance itself.
        scheduler: any diffusers scheduler that reads the model output the way it was trained (DDPM,
            DDIM, DPM-Solver++, Euler, Heun, ... for DDPM-trained models; FlowMatch Euler/Heun or
            DPM-Solver++ with flow sigmas for flow-matching ones). Swap it the usual way:
            ``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``.
        vae: optional ``AutoencoderKL``; when given, the model works on its latents, which are decoded
            with the VAE's ``scaling_factor`` (and ``shift_factor``).
        prediction_type: what the model predicts (``epsilon``, ``v_prediction``, ``sample`` or
            ``flow_prediction``); read from the training scheduler when not given, and stored in
            ``model_index.json`` so it survives a scheduler swap.
    """

    model_cpu_offload_seq = "model->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        model: ModelMixin,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        prediction_type: str | None = None,
    ):
        super().__init__()
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:  # model_index.json is text anyone can edit
            raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
        self.register_modules(model=model, scheduler=scheduler, vae=vae)
        self.register_to_config(prediction_type=prediction_type or prediction_type_of(scheduler))
        # Outputs live in [-1, 1]; the processor maps them to [0, 1] and to pil/np/pt.
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    # -------------------------------------------------------------------------------------------
    # Saving and loading
    # -------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """``DiffusionPipeline.save_pretrained``, plus what lets ``DiffusionPipeline.from_pretrained`` find this
        class, and last the manifest that ``from_pretrained`` verifies."""
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        (folder / f"{PIPELINE_MODULE}.py").write_text(PIPELINE_MODULE_SOURCE)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        write_pipeline_manifest(folder)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, **kwargs
    ) -> "ImageDiffusionPipeline":
        """``DiffusionPipeline.from_pretrained`` that runs no code from the folder: its ``pipeline.py`` is never
        imported (this class is what it would import), and unless ``trust_remote_code=True`` every component
        comes from the installed ``atdiff`` or ``diffusers``: anything else is refused. A local folder's files
        are checked against its manifest, and its weights must be safetensors, floating point and finite."""
        if not trust_remote_code:
            check_no_code_from_folder(pretrained_model_name_or_path, cls)
        if Path(pretrained_model_name_or_path).is_dir():
            check_pipeline_folder(Path(pretrained_model_name_or_path))
        pipe = super().from_pretrained(pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **kwargs)
        if kwargs.get("device_map") is None:  # without one, nothing is meant to stay on the meta device
            check_all_weights_loaded(pipe, pretrained_model_name_or_path)
        return pipe

    @classmethod
    def load_config(cls, *args, **kwargs):
        """``ConfigMixin.load_config``, with ``_class_name: [module, cls.__name__]`` read as plain ``cls.__name__``:
        diffusers imports the named module whenever the folder has it, even when called on the very class
        that module would give, while a plain name makes it use ``cls`` itself."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        class_name = config.get("_class_name")
        if isinstance(class_name, list) and class_name[1:] == [cls.__name__]:
            config["_class_name"] = cls.__name__
        return loaded

    # -------------------------------------------------------------------------------------------
    # Sampling
    # -------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return num_classes_of(self.model)

    def check_class_labels(self, class_labels: torch.Tensor) -> None:
        if not self.num_classes:
            raise ValueError("this model is unconditional: pass no class_labels")
        bad = class_labels[(class_labels < 0) | (class_labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"class label {bad[0].item()} is out of range: this model has classes 0..{self.num_classes - 1}")

    def check_guidance(self, guidance_scale: float) -> None:
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale} is not a finite number (1 turns guidance off)")
        largest = torch.finfo(self.model.dtype).max
        if abs(guidance_scale) > largest:  # it would be inf in the model's dtype, and the images NaN
            raise ValueError(f"guidance_scale={guidance_scale} is beyond what {self.model.dtype} holds ({largest:.3g}); useful values are about 1 to 10")
        if guidance_scale == 1.0:
            return
        if not self.num_classes:
            raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional model; this one is unconditional (use 1.0)")
        # DiT's null-label embedding exists only when labels were dropped during training.
        if getattr(self.model.config, "class_dropout_prob", None) == 0:
            raise ValueError("this model was trained without label dropout, so it has no null label to guide with; use guidance_scale=1.0")

    def prepare_class_labels(
        self, class_labels: int | list[int] | torch.Tensor | None, batch_size: int, generator
    ) -> torch.Tensor | None:
        """Labels as a (batch,) tensor (a single label is repeated); for a class-conditional model without
        labels, drawn uniformly with ``generator`` (with each image's own for a list of generators)."""
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).expand(batch_size)
            self.check_class_labels(labels)
        elif self.num_classes:
            generators = generator if isinstance(generator, list) else [generator] * batch_size
            devices = [None if g is None else g.device for g in generators]
            labels = torch.cat([torch.randint(self.num_classes, (1,), generator=g, device=d) for g, d in zip(generators, devices)])
        else:
            return None
        return labels.to(self._execution_device)

    def predict(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None,
        guidance_scale: float,
        guidance_channels: int | None = None,
    ) -> torch.Tensor:
        """Model output for the scheduler, guided on its first ``guidance_channels`` channels (None: all
        ``x``'s channels) when ``guidance_scale != 1``; the other channels are the conditional output."""
        channels = x.shape[1]
        guided_channels = channels if guidance_channels is None else guidance_channels
        t = t.expand(x.shape[0])
        if labels is None:
            out = self.model(x, t).sample
        elif guidance_scale == 1.0:
            out = self.model(x, t, labels).sample
        else:
            null = torch.full_like(labels, self.num_classes)
            out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).sample
            cond, uncond = out.chunk(2)
            guided = uncond[:, :guided_channels] + guidance_scale * (cond[:, :guided_channels] - uncond[:, :guided_channels])
            out = torch.cat([guided, cond[:, guided_channels:]], dim=1)
        # Learned-sigma channels follow the prediction; only DDPM's learned variance reads them (a
        # scheduler built from its config by from_config keeps variance_type there without using it).
        if isinstance(self.scheduler, DDPMScheduler) and self.scheduler.config.variance_type in ("learned", "learned_range"):
            return out
        return out[:, :channels]

    def check_guidance_channels(self, guidance_channels: int | None) -> None:
        channels = self.model.config.in_channels
        if guidance_channels is not None and not 1 <= guidance_channels <= channels:
            raise ValueError(f"guidance_channels={guidance_channels}: must be between 1 and the model's {channels} channels (None: all)")

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampler output -> image in [-1, 1]: VAE-decoded when the model works on latents."""
        if self.vae is None:
            return x
        latents = x / self.vae.config.scaling_factor + (self.vae.config.get("shift_factor") or 0.0)
        return self.vae.decode(latents.to(self.vae.dtype)).sample

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: int | list[int] | torch.Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        guidance_channels: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size: number of images; a list or tensor of ``class_labels`` sets it instead.
            class_labels: one label for all images, one per image, or None (class-conditional models then
                draw labels uniformly with ``generator``).
            num_inference_steps: sampler steps (Heun-type samplers call the model about twice per step).
            guidance_scale: classifier-free guidance ``uncond + g * (cond - uncond)`` with the null label
                ``model.config.num_classes``; 1 disables it (one model call per step).
            guidance_channels: guide only the first this many channels of the prediction and take the
                conditional one for the rest: 3 is DiT/SiT's convention on 4-channel latents, which their
                published FIDs use; None (default) guides all channels.
            generator: a ``torch.Generator``, or one per image so each image depends only on its own.
            output_type: ``"pil"``, ``"np"`` (float NHWC in [0, 1]), ``"pt"`` (float NCHW in [0, 1]) or
                ``"latent"`` (the sampler's final output, before any VAE decoding, as a tensor).
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if class_labels is not None and torch.as_tensor(class_labels).dim() > 0:
            batch_size = torch.as_tensor(class_labels).numel()
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} images; pass one per image")
        check_scheduler_fits(self.scheduler, self.config.prediction_type)
        self.check_guidance(guidance_scale)
        self.check_guidance_channels(guidance_channels)
        labels = self.prepare_class_labels(class_labels, batch_size, generator)

        config = self.model.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        device, dtype = self._execution_device, self.model.dtype
        x = randn_tensor((batch_size, config.in_channels, height, width), generator=generator, device=device, dtype=dtype)

        # An adaptive scheduler (FlowMatchDopri5Scheduler) picks its own times: its timesteps are an
        # iterable of unknown length, and a timestep may hold one time per image.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # Flow schedulers start from x_1 = noise and define no init_noise_sigma.
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        # Stochastic samplers (DDPM, ancestral) draw their per-step noise from the same generator(s).
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = self.scheduler.scale_model_input(x, t) if hasattr(self.scheduler, "scale_model_input") else x
            model_output = self.predict(x_in, t, labels, guidance_scale, guidance_channels)
            x = self.scheduler.step(model_output, t, x, **step_kwargs).prev_sample
        if not torch.isfinite(x).all():  # decoded, these would be flat black or white images
            raise NonFiniteSamples(f"sampling gave NaN or infinite values (guidance_scale={guidance_scale}): lower the guidance, or check the model")

        if output_type == "latent":
            images = x
        else:
            images = self.image_processor.postprocess(self.decode(x).float(), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
