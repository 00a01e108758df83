"""The Diffusers pipeline (:class:`LatentDiffusionPipeline`) and the generation command lines."""

from .pipeline_latent_diffusion import LatentDiffusionPipeline, LatentDiffusionPipelineOutput

__all__ = ["LatentDiffusionPipeline", "LatentDiffusionPipelineOutput"]
