"""What the shapes model card measures of a model folder, beyond the recipe's own figures: how far its text encoder
separates captions that differ in one word (:func:`attribute_similarity`), where its first sampling step puts the
object (:func:`first_step_positions`), how square its squares are (:func:`square_fill`) and how much of prompt
adherence survives the autoencoder's round trip (:func:`round_trip_adherence`), and how a pipeline does on a fixed set
of prompts (:func:`candidate_adherence`), the yardstick that compares training candidates side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipelines import LatentDiffusionPipeline


@torch.no_grad()
def attribute_similarity(folder: Path) -> dict[str, float]:
    """How much the text encoder in ``folder`` (``text_encoder/`` and ``tokenizer/``) tells captions apart: for each
    attribute, the mean cosine similarity of the embeddings (77 x width, flattened) of full captions that differ in
    that attribute only. 1.0 means the U-Net cannot read that attribute from the prompt at all."""
    from itertools import combinations, product

    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.text import encode_prompts
    from shapes.world import COLOURS, POSITIONS, SHAPES, caption_from_attributes

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    scenes = list(product(COLOURS, SHAPES, POSITIONS))
    captions = [caption_from_attributes(dict(zip(("colour", "shape", "position"), scene))) for scene in scenes]
    embeds = torch.nn.functional.normalize(encode_prompts(text_encoder, tokenizer, captions).flatten(1), dim=1)
    similarity = embeds @ embeds.T
    result = {}
    for k, attribute in enumerate(("colour", "shape", "position")):
        pairs = [
            (i, j)
            for i, j in combinations(range(len(scenes)), 2)
            if [a != b for a, b in zip(scenes[i], scenes[j])] == [m == k for m in range(3)]
        ]
        result[attribute] = float(torch.stack([similarity[i, j] for i, j in pairs]).mean())
    return result


@torch.no_grad()
def first_step_positions(folder: Path, num_prompts: int = 90, seed: int = 0) -> float:
    """How often the first sampling step already puts the object where the prompt says.

    At t = T the zero-terminal-SNR schedule leaves no signal in x_T, so the (guided) U-Net's x_0 prediction there is
    its estimate of E[x_0 | prompt]: a blurred object where the prompt puts it, if the model reads the position word.
    Returns the fraction of ``num_prompts`` full prompts (``eval.adherence``'s) whose decoded first-step x_0 reads
    back (``shapes.analysis``) at the prompt's position. About 0.2 (chance) means the layout is left to the noise.
    """
    from eval.adherence import adherence_prompts
    from ldm.diffusion import v_to_x0
    from ldm.guidance import guide
    from shapes.analysis import analyze_image
    from shapes.world import parse_prompt

    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    if pipe.scheduler.config.prediction_type != "v_prediction" or pipe.scheduler.alphas_cumprod[-1] > 1e-6:
        raise ValueError("first_step_positions needs a v-prediction model with a zero-terminal-SNR schedule")
    prompts = adherence_prompts(num_prompts, seed=seed)
    embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
    last = pipe.scheduler.config.num_train_timesteps - 1
    size = pipe.default_size // pipe.vae_scale_factor
    x_T = torch.randn(
        (len(prompts), pipe.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed)
    )
    v = pipe.unet(torch.cat([x_T, x_T]), last, encoder_hidden_states=torch.cat([negative, embeds])).sample
    x0 = v_to_x0(guide(v, pipe.generation_defaults.guidance_scale), x_T, last, pipe.scheduler.alphas_cumprod)
    images = pipe.image_processor.postprocess(pipe.decode_latents(x0), output_type="pil")
    found = [analyze_image(image).position == parse_prompt(p)["position"] for image, p in zip(images, prompts)]
    return sum(found) / len(found)


@torch.no_grad()
def square_fill(records: list[dict[str, Any]], data: Path, folder: Path, count: int = 40) -> dict[str, float]:
    """How square the squares are: the median share of its bounding box that the object fills
    (``shapes.analysis``'s ``fill_ratio``: 1 for a square, pi/4 for a circle; the analyser reads more than 0.89 as
    a square) in the generated images asked for a square (``eval.adherence`` records), in ``count`` held-out squares
    of the image folder ``data``, and in those after a round trip through ``folder``'s autoencoder."""
    import statistics

    import numpy as np
    import PIL.Image
    from diffusers import AutoencoderKL

    from eval.prompted_images import load_prompted_images
    from shapes.analysis import analyze_image
    from shapes.pairs import parse_pair_prompt
    from shapes.world import parse_prompt
    from training.train_autoencoder import reconstruct

    drawn = [
        r["diagnostics"]["fill_ratio"]
        for r in records
        if r.get("objects", 1) == 1  # one-object images: their squares are the size the held-out ones are
        and r["asked"].get("shape") == "square"
        and r["diagnostics"].get("fill_ratio") is not None
    ]
    held_out = load_prompted_images(data)
    files = [
        file
        for file, caption in zip(held_out.files, held_out.prompts)
        if parse_pair_prompt(caption) is None and parse_prompt(caption).get("shape") == "square"
    ][:count]
    if not drawn or not files:
        raise ValueError(f"no squares to measure: {len(drawn)} generated, {len(files)} held-out in {data}")
    real = np.stack([np.asarray(PIL.Image.open(file).convert("RGB")) for file in files])
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    decoded = reconstruct(vae, torch.from_numpy(real).permute(0, 3, 1, 2).float() / 127.5 - 1)
    round_trip = (decoded * 255).round().byte().permute(0, 2, 3, 1).numpy()

    def median_fill(images) -> float:
        """The median over the images where an object was found (nan when none was: a barely trained VAE)."""
        fills = [analyze_image(PIL.Image.fromarray(image)).fill_ratio for image in images]
        found = [fill for fill in fills if fill is not None]
        return statistics.median(found) if found else float("nan")

    return {"generated": statistics.median(drawn), "real": median_fill(real), "round_trip": median_fill(round_trip)}


@torch.no_grad()
def round_trip_adherence(data: Path, folder: Path, limit: int = 300, batch_size: int = 50) -> dict[str, Any]:
    """The ceiling the autoencoder puts on prompt adherence: the first ``limit`` images of the held-out image folder
    ``data`` encoded and decoded by ``folder``'s autoencoder, then scored against their captions by
    ``eval.adherence`` (whose reading of the originals is right 99-100 % of the time). Returns the adherence
    summary (one-object and two-object figures apart) of the round trips."""
    import numpy as np
    import PIL.Image
    from diffusers import AutoencoderKL

    from eval.adherence import score_images
    from eval.prompted_images import load_prompted_images
    from training.train_autoencoder import reconstruct

    held_out = load_prompted_images(data)
    files, prompts = held_out.files[:limit], held_out.prompts[:limit]
    if not files:
        raise ValueError(f"no captioned images in {data}")
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    images = []
    for start in range(0, len(files), batch_size):
        real = np.stack([np.asarray(PIL.Image.open(f).convert("RGB")) for f in files[start : start + batch_size]])
        decoded = reconstruct(vae, torch.from_numpy(real).permute(0, 3, 1, 2).float() / 127.5 - 1)
        images += list((decoded * 255).round().byte().permute(0, 2, 3, 1).numpy())
    return score_images(images, prompts).summary()


@torch.no_grad()
def candidate_adherence(
    pipe: LatentDiffusionPipeline,
    seen: int = 48,
    held_out: int = 24,
    one_object: int = 0,
    seed: int = 7,
    num_inference_steps: int = 25,
    guidance_scale: float = 2.0,
    guidance_interval: tuple[float, float] = (0.5, 1.0),
    batch_size: int = 24,
) -> dict[str, dict[str, float]]:
    """Prompt adherence of ``pipe`` on a fixed prompt set, the yardstick that compares training candidates: ``seen``
    two-object prompts of pairings the training data has, ``held_out`` of the held-out ones, then ``one_object``
    one-object prompts (``eval.adherence.adherence_prompts`` with ``seed``); prompt i is drawn from seed 1000 + i,
    so two candidates see the same prompts and starting noise, and the two-object figures do not depend on
    ``one_object``. Returns, per group present (``two_object_seen``, ``two_object_held_out``, ``one_object``), the
    fully-right rate (``all``) and each part's accuracy."""
    from eval.adherence import adherence_prompts, score_images

    prompts = adherence_prompts(seen, seed=seed, objects=2, pairings="seen")
    prompts += adherence_prompts(held_out, seed=seed, objects=2, pairings="held_out")
    prompts += adherence_prompts(one_object, seed=seed) if one_object else []
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(1000 + start + k) for k in range(len(batch))]
        images += pipe(
            batch,
            generator=generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
        ).images
    summary = score_images(images, prompts).summary()
    return {
        group: {"all": summary[group]["all_correct_rate"], **summary[group]["part_accuracy"]}
        for group in ("two_object_seen", "two_object_held_out", "one_object")
        if summary.get(group, {}).get("images")
    }
