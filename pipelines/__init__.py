"""The Diffusers pipelines (:class:`LatentDiffusionPipeline`, :class:`LatentDiffusionEditPipeline`) and the generation
command lines."""

from .cli import DEFAULT_MODEL
from .pipeline_latent_diffusion import LatentDiffusionPipeline, LatentDiffusionPipelineOutput
from .pipeline_latent_diffusion_edit import LatentDiffusionEditPipeline, outpaint_canvas

__all__ = [
    "DEFAULT_MODEL",
    "LatentDiffusionEditPipeline",
    "LatentDiffusionPipeline",
    "LatentDiffusionPipelineOutput",
    "outpaint_canvas",
]
