"""The Diffusers pipelines (:class:`LatentDiffusionPipeline` for text-to-image, :class:`LatentDiffusionImg2ImgPipeline`
and :class:`LatentDiffusionInpaintPipeline` for editing) and the generation command lines."""

from .cli import DEFAULT_MODEL
from .masks import outpaint_canvas
from .pipeline_img2img import LatentDiffusionImg2ImgPipeline
from .pipeline_inpaint import LatentDiffusionInpaintPipeline
from .pipeline_latent_diffusion import LatentDiffusionPipeline, LatentDiffusionPipelineOutput

__all__ = [
    "DEFAULT_MODEL",
    "LatentDiffusionImg2ImgPipeline",
    "LatentDiffusionInpaintPipeline",
    "LatentDiffusionPipeline",
    "LatentDiffusionPipelineOutput",
    "outpaint_canvas",
]
