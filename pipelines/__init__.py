"""The Diffusers pipelines (:class:`LatentDiffusionPipeline` for text-to-image, :class:`LatentDiffusionImg2ImgPipeline`
and :class:`LatentDiffusionInpaintPipeline` for editing, :class:`LatentDiffusionXLPipeline`,
:class:`LatentDiffusionXLImg2ImgPipeline` and :class:`LatentDiffusionXLInpaintPipeline` for SDXL text-to-image,
image-to-image, the refiner and inpainting) and the generation command lines."""

from .cli import DEFAULT_MODEL
from .masks import outpaint_canvas
from .pipeline_img2img import LatentDiffusionImg2ImgPipeline
from .pipeline_img2img_xl import LatentDiffusionXLImg2ImgPipeline
from .pipeline_inpaint import LatentDiffusionInpaintPipeline
from .pipeline_inpaint_xl import LatentDiffusionXLInpaintPipeline
from .pipeline_latent_diffusion import LatentDiffusionPipeline, LatentDiffusionPipelineOutput
from .pipeline_latent_diffusion_xl import LatentDiffusionXLPipeline

__all__ = [
    "DEFAULT_MODEL",
    "LatentDiffusionImg2ImgPipeline",
    "LatentDiffusionInpaintPipeline",
    "LatentDiffusionPipeline",
    "LatentDiffusionPipelineOutput",
    "LatentDiffusionXLImg2ImgPipeline",
    "LatentDiffusionXLInpaintPipeline",
    "LatentDiffusionXLPipeline",
    "outpaint_canvas",
]
