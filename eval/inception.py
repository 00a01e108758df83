"""Inception-v3 pool3 features, the features of FID and KID, with the TF FID graph's pooling for pytorch-fid's weights.

:class:`InceptionV3Features` is what ``--features inception:FILE`` loads (:func:`eval.features.load_feature_extractor`
parses the spec). FIDs are comparable to published ones only with pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (the TF FID graph's weights, :data:`FID_WEIGHTS_NAME`); any other Inception
weights give a different, self-consistent metric. Weights are read from local files only
(:func:`load_state_dict_file`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import inception as tv_inception

from common.files import sha256_file
from eval.features import ImageBatch, prepare_batch
from ldm.errors import UserError

__all__ = ["FID_WEIGHTS_NAME", "FID_WEIGHTS_URL", "InceptionV3Features", "load_state_dict_file"]

logger = logging.getLogger(__name__)

INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
_FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # the hash prefix in the file name, as torch.hub's check_hash reads it
_TF_NUM_CLASSES = 1008  # the TF FID graph's classifier has 1008 outputs; torchvision's ImageNet weights have 1000


# --------------------------------------------------------------------------------------------------------------------
# Weights files


def load_state_dict_file(path: str | Path, *, what: str = "weights") -> dict[str, Tensor]:
    """A state dict from a local file the user named: ``.safetensors``, or a ``.pth``/``.pt``/``.bin``/``.ckpt``
    pickle read with ``torch.load(weights_only=True)``. A ``state_dict`` entry and ``module.`` prefixes are
    unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what} file {path} not found; pass the path of a local .safetensors or .pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if path.suffix not in (".pth", ".pt", ".bin", ".ckpt"):
        raise UserError(f"{what} file {path} must be .safetensors or a PyTorch .pth/.pt/.bin file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{what} file {path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


# --------------------------------------------------------------------------------------------------------------------
# The network (pytorch-fid's TF FID pooling patch)


# The TF FID graph pools differently from torchvision's Inception-v3 in four kinds of block: its average pools
# exclude the padding, and the last block max-pools. These subclasses change only that line of torchvision's
# ``_forward`` (as pytorch-fid's FIDInceptionA/C/E_1/E_2 do); instances are switched to them by ``__class__``.
def _avg_pool_excluding_padding(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(tv_inception.InceptionA):
    def _forward(self, x: Tensor) -> list[Tensor]:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_avg_pool_excluding_padding(x))]


class _FIDInceptionC(tv_inception.InceptionC):
    def _forward(self, x: Tensor) -> list[Tensor]:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_avg_pool_excluding_padding(x))]


def _max_pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _FIDInceptionE(tv_inception.InceptionE):
    pool = staticmethod(_avg_pool_excluding_padding)

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(type(self).pool(x))]


class _FIDInceptionEMaxPool(_FIDInceptionE):
    pool = staticmethod(_max_pool)


_FID_BLOCKS = {
    "Mixed_5b": _FIDInceptionA,
    "Mixed_5c": _FIDInceptionA,
    "Mixed_5d": _FIDInceptionA,
    "Mixed_6b": _FIDInceptionC,
    "Mixed_6c": _FIDInceptionC,
    "Mixed_6d": _FIDInceptionC,
    "Mixed_6e": _FIDInceptionC,
    "Mixed_7b": _FIDInceptionE,
    "Mixed_7c": _FIDInceptionEMaxPool,
}
_INCEPTION_TRUNK = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "avgpool",
)


class InceptionV3Features:
    """Inception-v3 pool3 features (2048-d, before the classifier), the features of FID and KID.

    Preprocessing follows pytorch-fid: pixels in [0, 1] are resized to 299 x 299 with bilinear interpolation
    (``align_corners=False``, no antialiasing, aspect ratio not kept) and scaled to [-1, 1]. The network is
    torchvision's ``inception_v3(weights=None, aux_logits=True, init_weights=False)`` with ``state_dict`` loaded
    (the classifier and auxiliary head are dropped, only the trunk is needed). ``tf_pooling`` switches the pooling
    of the mixed blocks to the TF FID graph's (see ``_FID_BLOCKS``); ``None`` turns it on for 1008-class weights,
    the layout of pytorch-fid's ``pt_inception-2015-12-05`` file, and off for torchvision's 1000-class ImageNet
    weights.
    """

    dim = INCEPTION_DIM

    def __init__(
        self,
        state_dict: Mapping[str, Tensor],
        *,
        tf_pooling: bool | None = None,
        source: str = "state dict",
        device: torch.device | str = "cpu",
    ) -> None:
        fc = state_dict.get("fc.weight")
        if tf_pooling is None:
            tf_pooling = fc is not None and fc.shape[0] == _TF_NUM_CLASSES
        model = tv_inception.inception_v3(weights=None, aux_logits=True, init_weights=False)
        if tf_pooling:
            for block_name, block_class in _FID_BLOCKS.items():
                getattr(model, block_name).__class__ = block_class
        heads = ("fc.", "AuxLogits.")
        trunk = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
        missing, unexpected = model.load_state_dict(trunk, strict=False)
        missing = [k for k in missing if not k.startswith(heads) and not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise UserError(
                f"{source} is not an Inception-v3 state dict ({len(missing)} trunk weights missing, e.g. "
                f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); pass pytorch-fid's "
                f"{FID_WEIGHTS_NAME} ({FID_WEIGHTS_URL}) or torchvision's inception_v3 ImageNet weights"
            )
        self.trunk = nn.Sequential(*(getattr(model, name) for name in _INCEPTION_TRUNK)).to(device).eval()
        self.device = torch.device(device)
        self.tf_pooling = tf_pooling
        self.standard_weights = False  # verified to be pytorch-fid's FID weights (set by from_file)
        self.name = "inception-v3 pool3" + (" (TF FID pooling)" if tf_pooling else " (torchvision pooling)")

    @classmethod
    def from_file(cls, path: str | Path, *, device: torch.device | str = "cpu") -> InceptionV3Features:
        """Load from a local weights file, logging whether FIDs from it compare with published ones."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(
                f"Inception weights file {path} not found; download pytorch-fid's {FID_WEIGHTS_NAME} from "
                f"{FID_WEIGHTS_URL} (or convert it to .safetensors) and pass --features inception:/path/to/it"
            )
        extractor = cls(load_state_dict_file(path, what="Inception weights"), source=str(path), device=device)
        standard = path.suffix != ".safetensors" and sha256_file(path).startswith(_FID_WEIGHTS_SHA256_PREFIX)
        extractor.standard_weights = standard
        if standard:
            logger.info("%s: pytorch-fid's standard FID Inception weights (sha256 verified)", path)
        elif extractor.tf_pooling:
            logger.warning(
                "FID NOTE: %s has the TF FID graph's layout but its hash cannot be checked against %s (a converted "
                "or other file); FIDs are comparable to published ones only if these are exactly those weights",
                path,
                FID_WEIGHTS_NAME,
            )
        else:
            logger.warning(
                "FID WARNING: %s are not the standard FID Inception weights (%s); FIDs computed with them are "
                "self-consistent but NOT comparable to published FIDs",
                path,
                FID_WEIGHTS_NAME,
            )
        return extractor

    @staticmethod
    def _resize(x: Tensor) -> Tensor:
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    @torch.no_grad()
    def __call__(self, images: ImageBatch) -> Tensor:
        x = prepare_batch(images, self._resize, self.device)
        return self.trunk(x).flatten(1).float().cpu()
