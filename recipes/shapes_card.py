"""The shapes model's card: ``RUN/model/README.md`` written from what ``recipes/shapes.sh`` measured (the stages'
metrics, the guidance sweep, prompt adherence, FID, the benchmark) and from the measures of
``recipes.shapes_measures``; ``python -m recipes.shapes_model card --run RUN`` writes it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from eval.fid import reader_fid
from pipelines.generation_defaults import GenerationDefaults
from recipes.shapes_measures import attribute_similarity, first_step_positions, round_trip_adherence, square_fill
from recipes.shapes_model import SAMPLE_PROMPTS, SAMPLE_SEED, STAGES, UNET_STAGES, read_json


def _minutes(metrics: dict[str, Any]) -> float:
    return metrics["steps"] / metrics["train_steps_per_s"] / 60


def _parameters(folder: Path) -> dict[str, float]:
    """Millions of parameters per component, read from the safetensors headers."""
    from safetensors import safe_open

    counts = {}
    for name in ("unet", "vae", "text_encoder"):
        total = 0
        for file in (folder / name).glob("*.safetensors"):
            with safe_open(file, "pt") as weights:
                total += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())  # noqa: SIM118
        counts[name] = total / 1e6
    return counts


def _weak_parts_bullet(
    parts: dict[str, float], steps: int, records: list[dict[str, Any]], run: Path, folder: Path
) -> list[str]:
    """The card's Limits bullet for colour or shape below 95 % (none when both reach it); for shape, what
    :func:`square_fill` measured of the squares."""
    weak = [name for name in ("colour", "shape") if parts[name] < 0.95]
    if not weak:
        return []
    bullet = (
        f"- **Below 95 %**: {', '.join(f'{name} {parts[name]:.1%}' for name in weak)} of images right at the "
        f"defaults after {steps} U-Net steps."
    )
    if "shape" in weak:
        fill = square_fill(records, run / "data" / "test", folder)
        bullet += (
            f" The squares it draws have rounded corners: they fill {fill['generated']:.2f} of their bounding box "
            f"(median), where held-out squares fill {fill['real']:.2f}, and {fill['round_trip']:.2f} after the "
            "autoencoder's round trip, so the U-Net, not the autoencoder, rounds them; higher guidance rounds them "
            "further (the sweep's shape column), and guidance rescale did not help (90 prompts at guidance 2: shape "
            "0.90 with phi 0.7, 0.92 without)."
        )
        if steps > 3000:
            bullet += (
                " Training length helps: the first run of this recipe stopped at 3000 U-Net steps with shape "
                "80.7 % and all three right 80.0 % (squares filling 0.88)."
            )
    return [bullet]


def _position_bullet(parts: dict[str, float], after: dict[str, float], ucfg: dict[str, Any]) -> list[str]:
    """The card's Limits bullet when position is right less than 95 % of the time (none otherwise), with the two
    measured causes: the text encoder's position similarity and, if used, min-SNR weighting."""
    if parts["position"] >= 0.95:
        return []
    bullet = (
        f"- **Position words are not followed yet**: position is right {parts['position']:.0%} of the time (chance "
        "20 %), while colour and shape follow the prompt; where the object lands is set by the initial noise. Two "
        "causes are measured: the text encoder hardly separates the position words (similarity "
        f"{after['position']:.3f} above), and "
    )
    if ucfg.get("snr_gamma"):
        bullet += (
            f"min-SNR-gamma weighting (gamma {ucfg['snr_gamma']:g}) gave the noisiest timesteps, where only the "
            "prompt can say where the object goes, almost no weight (with v-prediction a step weighs "
            "min(SNR, gamma) / (SNR + 1), 0 at zero SNR): from pure noise at t = T the U-Net predicts a sharp object "
            "wherever the noise suggests, not the prompt's conditional mean."
        )
    else:
        bullet += "the U-Net has not learned to combine the position words with where it is in the image."
    return [bullet]


def binding_rows(stages: dict[str, dict[str, Any]]) -> list[str]:
    """The recipe table's rows of the binding stages present in ``stages`` (name -> the stage's metrics.json)."""
    return [
        f"| {stage.words} | `training.train_text_to_image --pretrained-model ... {stage.flags}` | "
        f"{stages[stage.name]['steps']} x {stages[stage.name]['config'].get('train_batch_size', '?')} | "
        f"{_minutes(stages[stage.name]):.0f} min |"
        for stage in STAGES[1:]  # the U-Net stage before them has its own row
        if stage.name in stages
    ]


def stages_table(scores: dict[str, Any]) -> list[str]:
    """``recipes.shapes_model stages``' JSON as Markdown table lines: each stage's fully-right rates and the parts
    of the seen two-object prompts."""
    counts = scores["prompts"]
    words = {stage.name: stage.words for stage in STAGES}
    lines = [
        f"| after stage | two objects, seen ({counts['seen']}) | held-out ({counts['held_out']}) | one object "
        f"({counts['one_object']}) | seen: colour | shape | relation |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, groups in scores["stages"].items():
        seen, held, one = (groups.get(k, {}) for k in ("two_object_seen", "two_object_held_out", "one_object"))
        cells = [seen.get("all"), held.get("all"), one.get("all")]
        cells += [seen.get("colour"), seen.get("shape"), seen.get("relation")]
        lines.append(f"| {words.get(name, name)} | " + " | ".join(_percent(v) for v in cells) + " |")
    return lines


def _binding_section(scores: dict[str, Any] | None) -> list[str]:
    """The card's paragraph on the binding stages, with the stages' scores when the run has them."""
    text = (
        "After the U-Net stage the model drew two objects in about the right layout but mixed up which colour and "
        "shape belong to which (an object's pixels read both colour words: blue and red came out purple). The "
        "binding stages continue it with the token grounding loss of TokenCompose (Wang et al. 2024, "
        "`--grounding-loss-weight`): the cross-attention of each caption phrase naming an object, and of a "
        "one-object caption's position word, is pulled into the object's box (the `regions` of the data). With the "
        "text encoder frozen the layout came right but the colours did not: the frozen random encoder's output for "
        "the second object's colour word hardly depends on the word (cosine 0.97 between `blue` and `green` in `a "
        "red circle to the left of a blue square`), so the U-Net, now attending to the right token, could not read "
        "it. Trained with the grounding loss, the encoder tells them apart within 1000 steps. The first two stages "
        "ran on scenes three in four of which hold two objects; trained longer there, the second forgot one-object "
        "position words (at 4000 steps one-object prompts fell to 76 % fully right, position 80 %), so the third "
        "stage runs on the half-and-half training data again, its learning rate decaying to zero. Its commonest "
        "two-object fault was then an object drawn twice (three objects found, each the right colour and shape: "
        "the model unsure which of two places to use, and using both). Two more decaying rounds at lower rates, "
        "first on the half-and-half data, then on the two-object scenes (one-object captions keep their position "
        "words' boxes there, so the one-object prompts hold), made that rare."
    )
    if scores is None:
        return [text, ""]
    return [
        text + " Each stage's pipeline on the same prompts and seeds (`recipes.shapes_model stages`, guidance 2 at "
        "t / T in [0.5, 1], 25 steps):",
        "",
        *stages_table(scores),
        "",
    ]


def _interval_words(interval: list[float]) -> str:
    """``[0, 1]`` -> ``"guided at every step"``; ``[0.5, 1]`` -> ``"guided at t / T in [0.5, 1]"``."""
    lo, hi = interval
    return "guided at every step" if (lo, hi) == (0, 1) else f"guided at t / T in [{lo:g}, {hi:g}]"


def _psnr_at(vae: dict[str, Any], step: int) -> str:
    """``", where 8 groups had X dB"`` when the autoencoder's history has ``step``, else nothing."""
    values = [entry["psnr"] for entry in vae["history"] if entry["step"] == step]
    return f", where 8 groups had {values[0]:.1f} dB" if values else ""


CLIP_FEATURES_NAME = "the recipe's contrastive CLIP image tower"


def fid_rows(fid: dict[str, Any], fid_floor: dict[str, Any]) -> list[str]:
    """The card's FID and KID rows (``| figure | value | command |``) from ``eval.fid``'s JSON for the generated images
    and for two real sets (the floor): Inception FID with the standard weights as is, any other FID named by its
    features and as a multiple of its real-vs-real floor (:func:`eval.fid.reader_fid`)."""
    name = CLIP_FEATURES_NAME if str(fid["features"]).startswith("clip:") else None
    shown = reader_fid(fid, fid_floor, features_name=name)
    kid = f"{fid['kid']['mean']:.4f} +- {fid['kid']['std']:.4f}"
    return [
        f"| {shown.label} | {shown.value} | `eval.fid --features ...` on generated vs held-out images, and on "
        "training vs held-out images for the floor |",
        f"| KID in the same features, generated vs held-out | {kid} | `eval.fid` |",
    ]


def sweep_fid_header(features: str | None) -> str:
    """The FID column's name in the sweep table, from the sweep's ``--features`` spec: its feature space."""
    kind = (features or "").partition(":")[0]
    return {"inception": "Inception FID", "clip": "CLIP-feature FID", "open_clip": "CLIP-feature FID"}.get(kind, "FID")


SWEEP_COLUMNS = {
    "all_correct": "all parts",
    "one_object": "one object",
    "two_object": "two objects",
    "colour": "colour",
    "shape": "shape",
    "position": "position",
    "relation": "relation",
}


def sweep_table(rows: list[dict[str, Any]], fid_header: str) -> list[str]:
    """The guidance sweep as Markdown table lines: the columns the sweep has (one- and two-object rates with
    ``--pair-prompts``), then the FID."""
    columns = [key for key in SWEEP_COLUMNS if key in rows[0]]
    lines = [
        "| guidance | " + " | ".join(SWEEP_COLUMNS[key] for key in columns) + f" | {fid_header} |",
        "|---:|" + "---:|" * (len(columns) + 1),
    ]
    for row in rows:
        cells = [f"{row[key]:.3f}" if row[key] is not None else "-" for key in columns]
        fid_cell = f"{row['fid']:.2f}" if "fid" in row else "-"
        lines.append(f"| {row['guidance_scale']:g} | " + " | ".join(cells) + f" | {fid_cell} |")
    return lines


ADHERENCE_GROUPS = {
    "one_object": "one object",
    "two_object_seen": "two objects, pairings seen in training",
    "two_object_held_out": "two objects, held-out pairings (never seen together)",
}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def adherence_table(summary: dict[str, Any]) -> list[str]:
    """The adherence figures per kind of prompt (one object; two objects, seen and held-out pairings) as Markdown
    table lines; a summary without the groups (a one-object evaluation) gives its one row."""
    groups = {key: summary[key] for key in ADHERENCE_GROUPS if summary.get(key, {}).get("images")}
    if not groups:
        groups = {"one_object": summary}
    lines = [
        "| prompts | images | fully right | colour | shape | position | relation | exactly two objects |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, figures in groups.items():
        parts = figures["part_accuracy"]
        cells = [_percent(parts.get(name)) for name in ("colour", "shape", "position", "relation", "count")]
        lines.append(
            f"| {ADHERENCE_GROUPS[key]} | {figures['images']} | **{_percent(figures['all_correct_rate'])}** | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def one_object_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The one-object figures of an adherence summary (the whole summary for a one-object evaluation)."""
    return summary["one_object"] if summary.get("one_object", {}).get("images") else summary


def _round_trip_cell(summary: dict[str, Any]) -> str:
    """``one object 100.0 %, two objects 97.5 %`` (the groups present) of an adherence summary."""
    names = {"one_object": "one object", "two_object_seen": "two objects", "two_object_held_out": "held-out pairs"}
    cells = [
        f"{name} {_percent(summary[key]['all_correct_rate'])}"
        for key, name in names.items()
        if summary.get(key, {}).get("images")
    ]
    return ", ".join(cells) or _percent(summary["all_correct_rate"])


def _two_object_bullet(summary: dict[str, Any]) -> list[str]:
    """The Limits bullet when two-object prompts are fully right less than 90 % of the time, with what the misses
    get wrong (none otherwise)."""
    groups = {key: summary.get(key, {}) for key in ("two_object_seen", "two_object_held_out")}
    rates = {key: group.get("all_correct_rate") for key, group in groups.items() if group.get("images")}
    if not rates or min(rates.values()) >= 0.9:
        return []
    parts = groups["two_object_seen"].get("part_accuracy") or groups["two_object_held_out"]["part_accuracy"]
    names = {"count": "exactly two objects", "colour": "colour", "shape": "shape", "relation": "relation"}
    weakest = sorted((parts[name], words) for name, words in names.items() if name in parts)[:3]
    return [
        "- **Two objects are not always right**: "
        + ", ".join(f"{ADHERENCE_GROUPS[key].split(', ')[1]} {value:.1%}" for key, value in rates.items())
        + " fully right at the defaults; the parts most often missed: "
        + ", ".join(f"{words} {value:.1%}" for value, words in weakest)
        + " (a two-object image is right only when all of them are)."
    ]


def _held_out_bullet(summary: dict[str, Any]) -> list[str]:
    """The Limits bullet when held-out pairings score clearly below seen ones (none otherwise)."""
    seen = summary.get("two_object_seen", {}).get("all_correct_rate")
    held = summary.get("two_object_held_out", {}).get("all_correct_rate")
    if seen is None or held is None or held >= seen - 0.05:
        return []
    return [
        f"- **Composition is weaker than memory**: pairings it never saw together (a purple object with a triangle) "
        f"come out fully right {held:.1%} of the time, against {seen:.1%} for pairings in the training data."
    ]


def card_text(run: Path, folder: Path) -> str:
    """The model card (Markdown with the Hub's YAML metadata) from the figures the recipe wrote under ``run``."""
    vae = read_json(run / "vae" / "metrics.json")
    clip = read_json(run / "clip" / "metrics.json")
    stages = {name: read_json(run / name / "metrics.json") for name in UNET_STAGES if (run / name).is_dir()}
    unet = stages["unet"]
    stage_scores = read_json(run / "eval" / "stages.json") if (run / "eval" / "stages.json").is_file() else None
    sweep = read_json(run / "eval" / "sweep" / "sweep.json")
    adherence_file = read_json(run / "eval" / "adherence" / "adherence.json")
    adherence = adherence_file["summary"]
    fid = read_json(run / "eval" / "fid.json")
    fid_floor = read_json(run / "eval" / "fid_floor.json")
    bench = read_json(run / "eval" / "benchmark.json")
    defaults = GenerationDefaults.load(folder)
    params = _parameters(folder)
    size_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
    vocab = len(json.loads((folder / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    one = one_object_figures(adherence)
    parts = one["part_accuracy"]
    ucfg = unet.get("config", {})
    # the text encoder trained with the U-Net in any stage (the binding stages train it)
    joint = any(stage.get("config", {}).get("train_text_encoder") for stage in stages.values())
    binding = [stage.name for stage in STAGES[1:] if stage.name in stages]
    unet_steps = sum(stage["steps"] for stage in stages.values())
    fresh = ucfg.get("text_encoder_init") == "random"
    joint_flags = (" --train-text-encoder" if ucfg.get("train_text_encoder") else "") + (
        " --text-encoder-init random" if fresh else ""
    )
    before = attribute_similarity(run / "clip")
    # a frozen, loaded text encoder is the contrastive one
    after = attribute_similarity(folder) if joint or fresh else before
    first_step = first_step_positions(folder)
    ceiling = round_trip_adherence(run / "data" / "test", folder)
    # the second autoencoder stage (decoding the posterior mean), in runs that have it
    vae_mean = read_json(run / "vae_mean" / "metrics.json") if (run / "vae_mean").is_dir() else None
    held_out_images = len((run / "data" / "test" / "metadata.jsonl").read_text(encoding="utf-8").splitlines())
    sampled_ceiling = round_trip_adherence(run / "data" / "test", run / "vae") if vae_mean else None
    if fresh and binding and joint:
        encoder_text = (
            "a fresh seeded initialisation, frozen while the U-Net learned from nothing, then trained with it in the "
            "binding stages (the contrastive CLIP of the recipe gives the vocabulary and the FID features)"
        )
    elif fresh and joint:
        encoder_text = (
            "trained with the U-Net from a fresh initialisation (the contrastive CLIP of the recipe gives "
            "the vocabulary and the FID features)"
        )
    elif fresh:
        encoder_text = (
            "a fresh seeded initialisation, frozen: a fixed random encoding that keeps every word apart "
            "(the contrastive CLIP of the recipe gives the vocabulary and the FID features; see Recipe "
            "for why it is not the encoder)"
        )
    else:
        encoder_text = "trained contrastively with a small ViT" + (", then fine-tuned with the U-Net" if joint else "")
    encoder_name = {
        (True, True): "trained with the U-Net from a fresh initialisation"
        + (" in the binding stages" if binding else ""),
        (False, True): "the frozen fresh initialisation",
        (True, False): "fine-tuned with the U-Net",
    }.get((joint, fresh), "")

    fid_header = sweep_fid_header(sweep.get("features"))
    sweep_rows = sweep_table(sweep["rows"], fid_header)
    speed = (
        f"{bench['ours']['seconds_per_call']:.2f} s for {bench['batch_size']} images "
        f"({bench['steps']} steps, guidance {bench['guidance_scale']:g} at every step, {bench['device']}); stock "
        f"`StableDiffusionPipeline` on the same folder, side by side: {bench['stock']['seconds_per_call']:.2f} s "
        f"(ours / stock speed {bench['speed_ratio_ours_over_stock']:.2f})"
    )
    if "ours-interval" in bench:  # the defaults guide only in their interval, which stock cannot
        interval = bench["ours-interval"]
        speed += (
            f"; at its defaults, {_interval_words(bench['guidance_interval'])}: "
            f"{interval['seconds_per_call']:.2f} s ({interval['speed_vs_stock']:.2f}x stock)"
        )
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "license: other",
        "tags:",
        "- text-to-image",
        "- diffusers",
        "- latent-diffusion",
        "- from-scratch",
        "---",
        "",
        "# shapes: a small text-to-image model trained from nothing on 2 CPU cores",
        "",
        "Draws one or two coloured shapes on a plain background at 64x64 pixels, from prompts such as "
        "`a red circle on the left` or `a red circle to the left of a blue square`. It is the project's default "
        'model, so `python -m pipelines.txt2img --prompt "..."` works on a fresh machine with no download.',
        "",
        "![samples at the defaults](samples.png)",
        "",
        f"Rows: {'; '.join(SAMPLE_PROMPTS)}. Four seeds ({SAMPLE_SEED}..{SAMPLE_SEED + 3}) each, at the defaults.",
        "",
        "## The model",
        "",
        "| component | what | parameters |",
        "|---|---|---:|",
        f"| `vae` | `AutoencoderKL` (32/64/64 channels, GroupNorm of 8 groups), 64x64x3 images to 16x16x4 latents "
        f"(factor 4), scaling factor {(vae_mean or vae).get('scaling_factor', 0):.3f} measured on the training "
        "images | "
        f"{params['vae']:.2f} M |",
        f"| `text_encoder` | `CLIPTextModel` (width 256, 2 layers), {encoder_text}; vocabulary: CLIP's BPE "
        f"reduced to the {vocab} tokens the captions need | "
        f"{params['text_encoder']:.2f} M |",
        f"| `unet` | `UNet2DConditionModel` (32/64/128 channels, GroupNorm of 8 groups, cross-attention at 16x16 "
        f"and 8x8), v-prediction, EMA weights | {params['unet']:.2f} M |",
        "| `scheduler` | `DDIMScheduler`, trailing timesteps, the training schedule rescaled to zero terminal SNR "
        "(Lin et al. 2023) | - |",
        "",
        f"{size_mb:.1f} MB in all (float32 safetensors). Defaults (`generation_defaults.json`): "
        f"{defaults.num_inference_steps} DDIM steps, guidance scale {defaults.guidance_scale:g} (the best of the "
        f"guidance sweep below) applied only at the timesteps t >= {defaults.guidance_interval[0]:g} T (guidance "
        f"interval ({defaults.guidance_interval[0]:g}, {defaults.guidance_interval[1]:g}), Kynkaanniemi et al. 2024: "
        "guidance at the low-noise steps rounds the squares' corners; the other steps skip the unconditional pass), "
        "64x64.",
        "",
        "## Data",
        "",
        "`python -m shapes.make_dataset --two-object-fraction 0.5`: half the scenes hold one circle, axis-aligned "
        "square or upward triangle in one of six colours (the shade varied), at one of five positions (left, right, "
        "top, bottom, center, with jitter), 0.3-0.4 of the image side, captioned `a {colour} {shape} {position}` or "
        "a short form (`a red circle`, `a circle on the left`, `a red shape on the left`); the other half hold two "
        "objects of different colours, 0.2-0.3 of the side each, captioned `a {colour} {shape} {relation} a "
        "{colour} {shape}` with the relation `to the left of`, `to the right of`, `above` or `below` (the centres "
        "at least 0.35 of the side apart along the relation's axis and farther apart along it than across it, so "
        "the objects never overlap). All on a light or dark plain background. **Held-out pairings**: no training "
        "scene shows a purple object together with a triangle (so no purple triangle beside anything either); the "
        f"evaluation reports those pairings apart. {vae['data']['used']} training images (seed 0); {held_out_images} "
        "held-out images (seed 1, every pairing)."
        + (
            " Every row also gives each object's phrase (and a one-object caption's position word) with its "
            "bounding box (`regions`), for the grounding loss of the binding stages; three of them (`ground`, `bind`, "
            "`focus`) read a second set of as many images, three in four of them two-object scenes (seed 5)."
            if binding
            else ""
        ),
        "",
        "## Recipe",
        "",
        "`bash recipes/shapes.sh` reproduces this folder from nothing (every stage checkpoints; run it "
        "again to resume). On 2 CPU cores:",
        "",
        "| stage | command | steps x batch | wall time |",
        "|---|---|---:|---:|",
        f"| autoencoder | `training.train_autoencoder` | {vae['steps']} x {vae['config']['train_batch_size']} | "
        f"{_minutes(vae):.0f} min |",
        *(
            [
                f"| autoencoder, decoding the posterior mean | `training.train_autoencoder --pretrained-vae ... "
                f"--no-sample-posterior` | {vae_mean['steps']} x {vae_mean['config']['train_batch_size']} | "
                f"{_minutes(vae_mean):.0f} min |"
            ]
            if vae_mean
            else []
        ),
        f"| text encoder | `training.train_text_encoder --vocabulary captions` | {clip['steps']} x "
        f"{clip['config']['train_batch_size']} | {_minutes(clip):.0f} min |",
        f"| U-Net{' and text encoder' if ucfg.get('train_text_encoder') else ''} | "
        "`training.train_text_to_image --prediction-type "
        f"v_prediction --zero-terminal-snr --caption-dropout {ucfg.get('caption_dropout', 0.1)} --cache"
        f"{joint_flags}` | {unet['steps']} x {ucfg.get('train_batch_size', '?')} | "
        f"{_minutes(unet):.0f} min |",
        *binding_rows(stages),
        "",
        "The zero-terminal-SNR schedule matters: with Stable Diffusion's plain `scaled_linear` schedule the last "
        "training step keeps about 7 % of the signal, and a prototype learned to read the object's position from "
        "that leftover signal instead of the prompt (position right 19 % of the time, chance 20 %); rescaled to zero "
        "terminal SNR, position was right every time. `tests/ldm/test_diffusion.py` checks that the schedule "
        "reaches zero.",
        "",
        "How far apart the text encoder puts captions that differ in one word (the mean cosine similarity of their "
        "embeddings, `recipes.shapes_measures.attribute_similarity`; 1.0: the U-Net cannot tell them apart): "
        f"after contrastive training, position {before['position']:.3f}, colour {before['colour']:.3f}, shape "
        f"{before['shape']:.3f}"
        + (
            f"; the shipped text encoder, {encoder_name}: position {after['position']:.3f}, colour "
            f"{after['colour']:.3f}, shape {after['shape']:.3f}"
            if encoder_name
            else ""
        )
        + ".",
        "",
        "Position is decided at the first sampling step. At t = T the schedule leaves no signal, so the U-Net's x_0 "
        "prediction there is its estimate of the mean image for the prompt; "
        "`recipes.shapes_measures.first_step_positions` decodes it for 90 prompts and reads where the "
        f"blurred object sits: at the prompt's position **{first_step:.0%}** of the time for this model (chance 20 "
        "%). An earlier one-object model of this recipe used the contrastive text encoder, frozen, and "
        "min-SNR-gamma 5 weighting, and scored 20 % there (23 % position in the final images): the contrastive "
        "encoder hardly separates the "
        "position words (similarity 0.996 above), and with v-prediction min-SNR-gamma weighs a step min(SNR, gamma) "
        "/ (SNR + 1), which is 0 at t = T. A 400-step probe trained only at t = T, with everything else equal, put "
        "the object at the right position 76 % of the time with a frozen random text encoder and 19 % with the "
        "frozen contrastive one; so this recipe drops min-SNR and conditions on a fixed random encoding of the "
        "caption.",
        "",
        "GroupNorm matters too: with Stable Diffusion's 32 groups, the 32-channel layers normalise each channel on "
        "its own (instance normalisation), which erases each feature map's mean; a first autoencoder trained that "
        "way drifted colours (red read back orange) and grew bright blobs inside objects (StyleGAN2's droplet "
        f"artifact), and reached 23.3 dB held-out PSNR after 600 steps{_psnr_at(vae, 600)}.",
        "",
        *(
            [
                "The autoencoder trains in two stages. Decoding posterior samples, as Stable Diffusion's does, the "
                "posterior noise stays large this early in training (a standard deviation of 0.2-0.6 against latent "
                "spreads of 0.4-3.6), so the decoder learns to ignore fine differences between latents, and small "
                "objects came back in a neighbouring colour (blue as purple, red as orange): after the first stage "
                f"({vae['steps']} steps, {vae['final_psnr']:.1f} dB) the round trip of held-out images kept "
                f"{_round_trip_cell(sampled_ceiling)} fully right. A second stage decodes the posterior mean "
                f"({vae_mean['steps']} steps): {vae_mean['final_psnr']:.1f} dB and {_round_trip_cell(ceiling)}.",
                "",
            ]
            if vae_mean
            else []
        ),
        *(_binding_section(stage_scores) if binding else []),
        "![training loss of the U-Net stage](loss.png)",
        "",
        "## Evaluation",
        "",
        "Prompt adherence (`eval.adherence`: every object's colour and shape, the one object's position, the two "
        "objects' relation and their count read from the pixels, no learned model; a two-object image is fully "
        "right only when exactly two objects are there, each the named colour and shape, in the named relation), "
        "on held-out prompts and seeds at the defaults:",
        "",
        *adherence_table(adherence),
        "",
        "The guidance interval comes from the one-object model shipped before this one: guided at every step, its "
        "6000-step U-Net scored 89.7 % fully right (shape 90.0 %), with the interval 94.7 % (shape 95.0 %); its "
        "squares came out with rounded corners, more so the stronger the guidance.",
        "",
        f"The guidance sweep ({sweep['num_prompts']} prompts"
        + (f", {sweep['pair_prompts']} of them two-object" if sweep.get("pair_prompts") else "")
        + f", {sweep['steps']} steps, "
        f"{_interval_words(sweep.get('guidance_interval', [0, 1]))}; {fid_header} of those images against the "
        "held-out set"
        + ("" if fid_header == "Inception FID" else ", to compare the rows with one another, not with published FIDs")
        + "):",
        "",
        *sweep_rows,
        "",
        "![guidance sweep](guidance_sweep.png)",
        "",
        "| figure | value | command |",
        "|---|---:|---|",
        f"| autoencoder PSNR on held-out images | {(vae_mean or vae)['final_psnr']:.2f} dB | "
        "`training.train_autoencoder` (`--validation-dataset`) |",
        f"| prompt adherence of held-out images after the autoencoder's round trip (the ceiling for generated "
        f"images), {ceiling['images']} images | {_round_trip_cell(ceiling)} | "
        "`recipes.shapes_measures.round_trip_adherence` |",
        f"| text encoder zero-shot caption retrieval, held-out, top-1 | {clip['final_top1']:.3f} (chance "
        f"{clip['chance_top1']:.3f}) | `training.train_text_encoder` |",
        *fid_rows(fid, fid_floor),
        f"| speed | {speed} | `eval.benchmark --model ...` |",
        "",
        "## Limits",
        "",
        *_position_bullet(parts, after, ucfg),
        *_weak_parts_bullet(parts, unet_steps, adherence_file["records"], run, folder),
        *_two_object_bullet(adherence),
        *_held_out_bullet(adherence),
        "- It knows one world: one or two shapes of six colours and three kinds, five positions for one object and "
        "four relations for two, at 64x64. Other words still tokenize (into byte pieces) but mean nothing to it; "
        "three objects, sizes or textures are out of reach.",
        "- Editing (img2img, inpainting) works with it, within the same world.",
        "- Made to show the toolkit end to end and to test it, not for photographs.",
        "",
        "## Use",
        "",
        "```bash",
        'python -m pipelines.txt2img --prompt "a blue square at the top" --num-images 4 --seed 0',
        'python -m pipelines.txt2img --prompt "a red circle to the left of a blue square" --num-images 4 --seed 0',
        "```",
        "",
        "```python",
        "from pipelines import DEFAULT_MODEL, LatentDiffusionPipeline",
        "",
        "pipe = LatentDiffusionPipeline.from_pretrained(DEFAULT_MODEL)  # or diffusers' StableDiffusionPipeline",
        'image = pipe("a green triangle on the right").images[0]',
        "```",
        "",
    ]
    return "\n".join(lines)
