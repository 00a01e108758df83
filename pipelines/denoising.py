"""The denoising loop of every pipeline of ours: at each timestep the U-Net's (guided) noise prediction, then the
scheduler's step x_t -> x_{t-1}, with stock's ``callback_on_step_end`` protocol.

:class:`DenoisingLoopMixin` gives :class:`~pipelines.LatentDiffusionPipeline` and its subclasses :meth:`denoise`
(classifier-free guidance with an interval and rescale, :func:`ldm.guidance.guide`; an LCM U-Net's guidance embedding;
the conditioning of :mod:`pipelines.prompt_conditioning`); a :class:`StepHook` adds what image editing needs to each
step (inpainting's extra U-Net channels, the known region put back, RePaint resampling).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

from ldm.guidance import guide
from pipelines.generation_defaults import FULL_INTERVAL
from pipelines.prompt_conditioning import TextConditioning, concat_added_conditions


class StepHook:
    """What a pipeline adds to each step of LatentDiffusionPipeline.denoise; this base adds nothing."""

    resamples: int = 0  # redo each step this many more times from renoise(i, latents) (RePaint)

    def unet_input(self, model_input: torch.Tensor, guided: bool) -> torch.Tensor:
        """The U-Net's input after ``scale_model_input``; may concat channels (doubled when ``guided``)."""
        return model_input

    def after_step(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """The latents after step ``i`` (inpainting puts the known region back)."""
        return latents

    def renoise(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """Step ``i``'s result noised back to its timestep, to redo the step (needed when ``resamples`` > 0)."""
        raise NotImplementedError

    def callback_tensors(self, guided: bool) -> dict[str, torch.Tensor]:
        """The hook's tensors a ``callback_on_step_end`` may ask for by name (stock inpainting's ``mask``, ...)."""
        return {}

    def set_callback_tensors(self, tensors: dict[str, torch.Tensor], guided: bool) -> None:
        """Take back the hook's tensors among those a ``callback_on_step_end`` returned."""


class DenoisingLoopMixin:
    """Step 4 of a call (:meth:`denoise`). Reads the pipeline's ``unet``, ``scheduler``, ``progress_bar`` and its
    call state (``guidance_scale``, ``do_classifier_free_guidance``, ``interrupt``)."""

    # Callback tensor names that are added conditions: name -> (added_cond_kwargs key, which half). "both" is
    # [negative; positive] at a guided step (the positive alone otherwise), "negative" the negative half.
    _callback_added_conditions: dict[str, tuple[str, Literal["both", "negative"]]] = {}

    get_guidance_scale_embedding = StableDiffusionPipeline.get_guidance_scale_embedding

    def guidance_embedding(self, num_images: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """An LCM U-Net's guidance condition (``unet.config.time_cond_proj_dim`` set): the embedding of g - 1 that
        stock passes as ``timestep_cond``; None for other U-Nets."""
        dim = self.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        scale = torch.tensor(self.guidance_scale - 1).repeat(num_images)
        return self.get_guidance_scale_embedding(scale, embedding_dim=dim).to(device=device, dtype=dtype)

    def _scheduler_step_kwargs(
        self, generator: torch.Generator | list[torch.Generator] | None, eta: float
    ) -> dict[str, Any]:
        """``eta`` (DDIM's stochasticity) and ``generator`` for the schedulers whose ``step`` takes them."""
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        num_inference_steps: int,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        *,
        guidance_scale: float,
        guidance_rescale: float,
        step_kwargs: dict[str, Any],
        guidance_interval: tuple[float, float] = FULL_INTERVAL,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        step_hook: StepHook | None = None,
        timestep_cond: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        callback: Callable | None = None,
        callback_steps: int | None = None,
        negative_added_cond_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The sampling loop: at each timestep the U-Net's guided prediction, then the scheduler's step x_t -> x_{t-1}.

        With guidance the unconditional and conditional passes go through the U-Net as one batch ``[neg; pos]``, at
        the timesteps t with ``lo <= t / T <= hi`` for ``guidance_interval`` (lo, hi) (Kynkaanniemi et al. 2024);
        at the others the conditional pass alone. ``negative_prompt_embeds`` None means no guidance (a single
        conditional pass). ``self.guidance_scale`` is read at every step, so ``callback_on_step_end`` may change it
        (to 1 or below it drops guidance for the remaining steps); ``self.interrupt`` skips the remaining steps.

        The callback sees stock's tensors: ``prompt_embeds`` is ``[neg; pos]`` at guided steps; returned tensors
        replace ours (a ``prompt_embeds`` of the doubled batch is split back into the two halves).

        ``step_hook`` (a :class:`StepHook`) adds what image editing needs: channels concatenated to the U-Net input,
        a replacement of the latents after each step, and RePaint resampling of each step.
        ``timestep_cond`` (LCM's guidance embedding) goes to the U-Net as in stock; ``added_cond_kwargs`` and
        ``negative_added_cond_kwargs`` (IP-Adapter image embeddings, SDXL's pooled embedding and size/crop ids) of
        the prompts and negative prompts go as ``[negative; positive]`` at guided steps, the positive alone at the
        others. ``prompt_attention_mask`` / ``negative_attention_mask`` ``(B, L)`` mask padded positions of the
        embeddings (a batch of prompts with different chunk counts); None attends to all.
        """
        hook = step_hook or StepHook()
        run_unet = self.unet_runner()  # the whole U-Net at each step, or DeepCache's (pipelines.step_cache)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        lo, hi = (bound * num_train_timesteps for bound in guidance_interval)

        cond = TextConditioning(
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            added_cond_kwargs,
            negative_added_cond_kwargs,
        )

        # The timesteps as numbers, read once: float(t) of a CUDA tensor at every step would make the CPU wait for
        # the GPU before launching the next step (SDXL at 1024² was 22 % slower than stock with it).
        timestep_values = timesteps.tolist() if torch.is_tensor(timesteps) else [float(t) for t in timesteps]

        def guided_at(i: int) -> bool:
            return (
                cond.negative_prompt_embeds is not None
                and self.do_classifier_free_guidance
                and lo <= timestep_values[i] <= hi
            )

        def step(i: int, t: torch.Tensor, latents: torch.Tensor, guided: bool) -> torch.Tensor:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = hook.unet_input(self.scheduler.scale_model_input(model_input, t), guided)
            embeds = torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]) if guided else cond.prompt_embeds
            mask = prompt_attention_mask
            if guided and prompt_attention_mask is not None:
                mask = torch.cat([negative_attention_mask, prompt_attention_mask])
            cond_kwargs = cond.added_cond_kwargs
            if guided:
                cond_kwargs = concat_added_conditions(cond.negative_added_cond_kwargs, cond.added_cond_kwargs)
            noise_pred = run_unet(
                i,
                model_input,
                t,
                encoder_hidden_states=embeds,
                timestep_cond=timestep_cond,
                cross_attention_kwargs=cross_attention_kwargs,
                added_cond_kwargs=cond_kwargs,
                encoder_attention_mask=mask,
            )
            if guided:
                noise_pred = guide(noise_pred, self._guidance_scale, self._guidance_rescale)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            return hook.after_step(i, latents)

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                guided = guided_at(i)
                latents = step(i, t, latents, guided)
                for _ in range(hook.resamples):
                    latents = step(i, t, hook.renoise(i, latents), guided)

                if callback_on_step_end is not None:
                    latents = self._step_end_callback(
                        callback_on_step_end, tensor_inputs, i, t, guided, latents, cond, hook
                    )

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % (callback_steps or 1) == 0:
                        callback(i // getattr(self.scheduler, "order", 1), t, latents)
        return latents

    def _step_end_callback(
        self,
        callback_on_step_end: Callable,
        tensor_inputs: list[str],
        i: int,
        t: torch.Tensor,
        guided: bool,
        latents: torch.Tensor,
        cond: TextConditioning,
        hook: StepHook,
    ) -> torch.Tensor:
        """Call ``callback_on_step_end(pipe, i, t, tensors)`` with the tensors it names, as stock passes them
        (``prompt_embeds`` and the added conditions such as SDXL's ``add_text_embeds`` are ``[negative; positive]`` at
        a guided step), and take back the ones it returns: the latents are returned, the conditioning is updated in
        ``cond`` (a returned tensor of the doubled batch is split back into the two halves)."""
        negative_added = cond.negative_added_cond_kwargs or {}
        # name -> (negative, positive) for the tensors stock passes as [negative; positive] at a guided step
        pairs = {"prompt_embeds": (cond.negative_prompt_embeds, cond.prompt_embeds)}
        tensors: dict[str, Any] = {"latents": latents, "negative_prompt_embeds": cond.negative_prompt_embeds}
        for name, (key, which) in self._callback_added_conditions.items():
            if which == "negative":
                tensors[name] = negative_added.get(key)
            else:
                pairs[name] = (negative_added.get(key), cond.added_cond_kwargs[key])
        passed = {
            name: torch.cat([negative, positive]) if guided else positive
            for name, (negative, positive) in pairs.items()
            if name in tensor_inputs
        }
        tensors.update(passed)
        tensors.update(hook.callback_tensors(guided))
        outputs = callback_on_step_end(self, i, t, {name: tensors[name] for name in tensor_inputs})

        latents = outputs.pop("latents", latents)
        if "negative_prompt_embeds" in outputs:
            cond.negative_prompt_embeds = outputs.pop("negative_prompt_embeds")
        for name, (key, which) in self._callback_added_conditions.items():
            if which == "negative" and name in outputs:
                cond.negative_added_cond_kwargs[key] = outputs.pop(name)
        for name, (negative, positive) in pairs.items():
            returned = outputs.pop(name, None)
            if returned is None or returned is passed.get(name):
                continue
            if guided and returned.shape[0] == 2 * positive.shape[0]:
                negative, positive = returned.chunk(2)
            else:
                positive = returned
            if name == "prompt_embeds":
                cond.negative_prompt_embeds, cond.prompt_embeds = negative, positive
            else:
                key = self._callback_added_conditions[name][0]
                cond.added_cond_kwargs[key] = positive
                if cond.negative_added_cond_kwargs is not None:
                    cond.negative_added_cond_kwargs[key] = negative
        hook.set_callback_tensors(outputs, guided)
        return latents
