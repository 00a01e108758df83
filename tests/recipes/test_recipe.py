"""The shapes recipe runs end to end at a toy size and yields a pipeline that loads in ours and in stock diffusers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from pipelines import LatentDiffusionPipeline
from pipelines.generation_defaults import GenerationDefaults
from recipes.shapes_card import fid_rows, sweep_fid_header
from recipes.shapes_model import FINAL_STAGE, GUIDANCE_INTERVAL, STAGES, choose_guidance, evaluate_stages, main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_toy_recipe_end_to_end(tmp_path):
    # the recipe's `python` is this interpreter, even where its environment is not activated
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "SCALE": "toy", "PYTHONPATH": str(REPO), "PATH": path}
    result = subprocess.run(
        ["bash", "recipes/shapes.sh", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = Path(result.stdout.strip().splitlines()[-1])
    assert final == tmp_path / "model"
    ours = LatentDiffusionPipeline.from_pretrained(final)
    assert ours.scheduler.config.prediction_type == "v_prediction" and ours.scheduler.config.rescale_betas_zero_snr
    assert ours.vae.config.scaling_factor != 0.18215  # measured by the autoencoder stage, not the SD default
    assert ours.tokenizer.vocab_size < 600  # the captions' vocabulary, not CLIP's 49,408 tokens
    # the default guidance is the sweep's best scale, applied in the noisier half of the steps
    sweep = json.loads((tmp_path / "eval" / "sweep" / "sweep.json").read_text())
    expected = GenerationDefaults(sweep["steps"], choose_guidance(sweep["rows"]), GUIDANCE_INTERVAL)
    assert ours.generation_defaults == expected and GUIDANCE_INTERVAL == (0.5, 1.0)
    image = ours("a red circle on the left", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert image[0].size == (64, 64)
    assert StableDiffusionPipeline.from_pretrained(final, safety_checker=None).unet is not None
    # the model card carries the figures the evaluation stages measured, and its pictures are there
    card = (final / "README.md").read_text()
    adherence = json.loads((tmp_path / "eval" / "adherence" / "adherence.json").read_text())["summary"]
    # one row per kind of prompt: one object, two objects of seen pairings, of held-out pairings
    one, seen, held = (adherence[k] for k in ("one_object", "two_object_seen", "two_object_held_out"))
    assert (one["images"], seen["images"], held["images"]) == (8, 8, 4)
    assert f"| one object | 8 | **{one['all_correct_rate']:.1%}** |" in card
    assert f"| two objects, pairings seen in training | 8 | **{seen['all_correct_rate']:.1%}** |" in card
    assert f"| two objects, held-out pairings (never seen together) | 4 | **{held['all_correct_rate']:.1%}** |" in card
    rows = [json.loads(line) for line in (tmp_path / "data" / "train" / "metadata.jsonl").read_text().splitlines()]
    pairs = [r for r in rows if r.get("objects") == 2]
    assert pairs and not any(r["held_out"] for r in pairs)  # training never shows a held-out pairing
    assert "pipeline_tag: text-to-image" in card and "PSNR" in card
    assert "| autoencoder, decoding the posterior mean |" in card  # the second autoencoder stage
    # the U-Net was trained on the second stage's latents: the shipped VAE is that one
    shipped_vae = (final / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert shipped_vae == (tmp_path / "vae_mean" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    # the shipped U-Net and text encoder are the last binding stage's, and the card scores every stage
    settle = tmp_path / FINAL_STAGE / "pipeline"
    for weights in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (final / weights).read_bytes() == (settle / weights).read_bytes()
    assert (final / "text_encoder/model.safetensors").read_bytes() != (
        tmp_path / "unet" / "pipeline" / "text_encoder/model.safetensors"
    ).read_bytes()  # trained in the binding stages
    grounded = [json.loads(line) for line in (tmp_path / "data_pairs" / "metadata.jsonl").read_text().splitlines()]
    assert sum(r.get("objects") == 2 for r in grounded) > len(grounded) / 2 and all(r["regions"] for r in grounded)
    stages = json.loads((tmp_path / "eval" / "stages.json").read_text())
    assert list(stages["stages"]) == [stage.name for stage in STAGES]
    assert "| after stage |" in card
    for stage in STAGES:  # a row of the stages' scores each, and one of the recipe table for each binding stage
        seen = stages["stages"][stage.name]["two_object_seen"]["all"]
        assert f"| {stage.words} | {seen:.1%} |" in card
        assert stage is STAGES[0] or f"| {stage.words} | `training.train_text_to_image --pretrained-model" in card
    assert (
        "features, not Inception FID (not comparable to published FIDs)" in card and "the real-vs-real floor" in card
    )
    assert "| two objects |" in card and "| CLIP-feature FID |" in card  # the sweep table's columns
    assert sweep["guidance_interval"] == list(GUIDANCE_INTERVAL)  # the sweep guides as the defaults will
    assert "guidance interval (0.5, 1)" in card and "steps, guided at t / T in [0.5, 1];" in card
    # the speed row times ours at its defaults too (guided in the interval), against stock guiding at every step
    bench = json.loads((tmp_path / "eval" / "benchmark.json").read_text())
    assert bench["guidance_interval"] == [0.5, 1.0]
    assert f"at its defaults, guided at t / T in [0.5, 1]: {bench['ours-interval']['seconds_per_call']:.2f} s" in card
    for figure in ("samples.png", "guidance_sweep.png", "loss.png"):
        assert f"]({figure})" in card and (final / figure).is_file()
    # a second run finds every stage done and only prints the model's folder again
    again = subprocess.run(
        ["bash", "recipes/shapes.sh", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == str(final)


def test_choose_guidance_takes_the_best_and_the_smallest_among_equals():
    rows = [{"guidance_scale": g, "all_correct": a} for g, a in [(1, 0.2), (3, 0.9), (5, 0.9), (7.5, 0.8)]]
    assert choose_guidance(rows) == 3
    assert choose_guidance(rows[:1]) == 1
    with pytest.raises(ValueError, match="no rows"):
        choose_guidance([])


def test_card_labels_the_clip_feature_fid_and_gives_its_ratio_to_the_real_floor():
    def result(fid: float, features: str, comparable: bool = False) -> dict:
        kid = {"mean": 0.0002, "std": 0.00001}
        counts = {"real": {"count": 300}, "fake": {"count": 300}}
        return {"fid": fid, "features": features, "comparable_to_published": comparable, "kid": kid, **counts}

    fid_row, kid_row = fid_rows(result(0.06, "clip:clip"), result(0.02, "clip:clip"))
    label, value = fid_row.split(" | ")[0], fid_row.split(" | ")[1]
    assert "FID in the recipe's contrastive CLIP image tower (clip:clip) features, not Inception FID" in label
    assert "not comparable to published FIDs" in label and value.startswith("3.0x the real-vs-real floor")
    assert kid_row.startswith("| KID in the same features")
    # with the standard Inception weights the FID is shown on the published scale
    inception = "inception-v3 pool3 (TF FID pooling)"
    fid_row, _ = fid_rows(result(12.5, inception, True), result(1.5, inception, True))
    assert "comparable to published FIDs" in fid_row and "| 12.50 (real-vs-real floor 1.50" in fid_row
    # the sweep's column names its feature space
    assert sweep_fid_header("clip:runs/shapes/clip/clip") == "CLIP-feature FID"
    assert sweep_fid_header("inception:/w/pt_inception-2015-12-05-6726825d.pth") == "Inception FID"


def test_evaluate_stages_scores_only_the_stages_not_yet_scored_on_the_same_prompts(tmp_path, monkeypatch):
    import recipes.shapes_measures as measures

    scored = []

    def fake_adherence(pipe, seen, held_out, one_object):
        scored.append(pipe)
        return {"two_object_seen": {"all": len(scored) / 10}}

    monkeypatch.setattr(measures, "candidate_adherence", fake_adherence)
    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", lambda folder: _Named(folder.parent.name))
    for stage in STAGES:
        (tmp_path / stage.name / "pipeline").mkdir(parents=True)
        (tmp_path / stage.name / "pipeline" / "model_index.json").write_text("{}")
    out = evaluate_stages(tmp_path, seen=4, held_out=2, one_object=3)
    assert [p.name for p in scored] == [stage.name for stage in STAGES]
    first = json.loads(out.read_text())
    assert first["prompts"] == {"seen": 4, "held_out": 2, "one_object": 3}
    # a stage added later (here: one removed from the file) is the only one scored again; the others keep theirs
    del first["stages"][FINAL_STAGE]
    out.write_text(json.dumps(first))
    scored.clear()
    second = json.loads(evaluate_stages(tmp_path, seen=4, held_out=2, one_object=3).read_text())
    assert [p.name for p in scored] == [FINAL_STAGE] and list(second["stages"]) == [s.name for s in STAGES]
    assert {k: v for k, v in second["stages"].items() if k != FINAL_STAGE} == first["stages"]
    # other prompt counts score every stage again
    scored.clear()
    evaluate_stages(tmp_path, seen=8, held_out=2, one_object=3)
    assert len(scored) == len(STAGES)


class _Named:
    """A stand-in pipeline that only knows its stage's name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def set_progress_bar_config(self, **kwargs) -> None:
        pass


def test_model_steps_name_the_missing_stage(tmp_path, capsys):
    assert main(["folder", "--run", str(tmp_path)]) == 2
    assert "sweep.json is missing; run recipes/shapes.sh" in capsys.readouterr().err


POSITION_WORDS = ("on", "at", "in", "the", "left", "right", "top", "bottom", "center")  # every position phrase's words


def save_encoder_blind_to_position(out: Path) -> None:
    """The shipped text encoder and tokenizer, saved to ``out/text_encoder`` and ``out/tokenizer`` with every word of
    the position phrases given one embedding (their mean): "on the left" and "at the top" then encode alike."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipelines import DEFAULT_MODEL

    tokenizer = CLIPTokenizer.from_pretrained(Path(DEFAULT_MODEL) / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(Path(DEFAULT_MODEL) / "text_encoder")
    ids = [tokenizer(word, add_special_tokens=False).input_ids for word in POSITION_WORDS]
    assert all(len(i) == 1 for i in ids)  # one token each, so every position phrase is three tokens
    ids = [i[0] for i in ids]
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = table[ids].mean(0)
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")


def test_attribute_similarity_is_one_for_words_the_text_encoder_cannot_tell_apart(tmp_path):
    """The card's measure of what the text encoder separates: with every word of the position phrases given one
    embedding, captions differing only in position encode identically (1.0), while colour and shape stay apart."""
    from recipes.shapes_measures import attribute_similarity

    save_encoder_blind_to_position(tmp_path)
    similarity = attribute_similarity(tmp_path)
    assert similarity["position"] == pytest.approx(1.0, abs=1e-6)
    assert similarity["colour"] < 0.999 and similarity["shape"] < 0.999, similarity  # still told apart


def test_first_step_positions_needs_a_v_prediction_model_with_zero_terminal_snr(tiny_sd_dir):
    # an epsilon model's x_0 at t = T is undefined (alpha_T = 0 would divide by zero), and a schedule that keeps
    # signal at t = T does not make the first step decide the layout
    from recipes.shapes_measures import first_step_positions

    with pytest.raises(ValueError, match="v-prediction model with a zero-terminal-SNR schedule"):
        first_step_positions(Path(tiny_sd_dir))


def test_square_fill_tells_a_rounded_square_from_the_autoencoders_round_trip(tmp_path):
    # the card's reading of a weak shape score: the generated squares' median fill of their bounding box (from the
    # adherence records), against real held-out squares (about 1) and their round trip through the shipped VAE
    from pipelines import DEFAULT_MODEL
    from recipes.shapes_measures import square_fill
    from shapes.make_dataset import make_dataset

    make_dataset(tmp_path / "data", n=48, size=64, seed=1, progress=False)
    records = [
        {"asked": {"shape": shape}, "diagnostics": {"fill_ratio": fill}}
        for shape, fill in [("square", 0.8), ("square", 0.95), ("circle", 0.5), ("square", 0.9)]
    ]
    fill = square_fill(records, tmp_path / "data", Path(DEFAULT_MODEL), count=8)
    assert fill["generated"] == pytest.approx(0.9)  # the squares' median; the circle is not counted
    assert fill["real"] > 0.97
    assert 0.89 < fill["round_trip"] < fill["real"]  # corners survive the autoencoder, slightly softened
    with pytest.raises(ValueError, match="no squares to measure: 0 generated"):
        square_fill(records[2:3], tmp_path / "data", Path(DEFAULT_MODEL))


def test_round_trip_adherence_scores_the_autoencoders_reconstructions(tmp_path, monkeypatch):
    # the card's ceiling for generated images: held-out images through the VAE, scored like generated ones
    import numpy as np

    import recipes.shapes_measures as measures
    from pipelines import DEFAULT_MODEL
    from recipes.shapes_card import _round_trip_cell
    from shapes.make_dataset import make_dataset
    from shapes.world import canonical_scene

    make_dataset(tmp_path / "data", n=30, size=64, seed=1, progress=False, two_object_fraction=0.5)
    summary = measures.round_trip_adherence(tmp_path / "data", Path(DEFAULT_MODEL), limit=20, batch_size=8)
    assert summary["images"] == 20 and summary["one_object"]["images"] + summary["two_object_seen"]["images"] == 20
    assert summary["one_object"]["all_correct_rate"] >= 0.9  # the shipped VAE keeps one-object scenes
    cell = _round_trip_cell(summary)
    assert cell.startswith(f"one object {summary['one_object']['all_correct_rate']:.1%}, two objects ")

    # what is scored is the reconstruction: an autoencoder that draws every image as a blue square fails them all
    class Blue:
        def __init__(self):
            self.image = torch.from_numpy(np.asarray(canonical_scene("blue", "square", "center")))

        def __call__(self, vae, pixels):
            return self.image.permute(2, 0, 1).float().div(255).expand(len(pixels), -1, -1, -1)

    monkeypatch.setattr("training.train_autoencoder.reconstruct", Blue())
    summary = measures.round_trip_adherence(tmp_path / "data", Path(DEFAULT_MODEL), limit=20)
    assert summary["two_object_seen"]["all_correct_rate"] == 0.0


def test_candidate_adherence_scores_each_kind_of_prompt_on_fixed_prompts_and_seeds():
    from types import SimpleNamespace

    from recipes.shapes_measures import candidate_adherence
    from shapes.pairs import canonical_pair, parse_pair_prompt
    from shapes.world import canonical_scene, parse_prompt

    calls = []

    class Drawing:  # a stand-in pipeline drawing each prompt's scene, the colours swapped when asked
        def __init__(self, swap=False):
            self.swap = swap

        def __call__(self, prompts, generator, **kwargs):
            calls.append(([g.initial_seed() for g in generator], kwargs))
            images = []
            for prompt in prompts:
                pair = parse_pair_prompt(prompt)
                if pair is None:  # a one-object prompt
                    one = parse_prompt(prompt)
                    images.append(canonical_scene(one["colour"], one["shape"], one["position"]))
                    continue
                first, second = (
                    (pair["first"]["colour"], pair["first"]["shape"]),
                    (
                        pair["second"]["colour"],
                        pair["second"]["shape"],
                    ),
                )
                if self.swap:
                    first, second = (second[0], first[1]), (first[0], second[1])
                images.append(canonical_pair(first, pair["relation"], second))
            return SimpleNamespace(images=images)

    right = candidate_adherence(Drawing(), seen=6, held_out=4, one_object=3, batch_size=4)
    assert right["two_object_seen"]["all"] == right["two_object_held_out"]["all"] == 1.0
    assert right["one_object"]["all"] == right["one_object"]["position"] == 1.0
    seeds = [[1000, 1001, 1002, 1003], [1004, 1005, 1006, 1007], [1008, 1009, 1010, 1011], [1012]]
    assert [seeds for seeds, _ in calls] == seeds  # the one-object prompts come last, after the same pair seeds
    assert calls[0][1] == {"num_inference_steps": 25, "guidance_scale": 2.0, "guidance_interval": (0.5, 1.0)}
    swapped = candidate_adherence(Drawing(swap=True), seen=6, held_out=4)
    for group in ("two_object_seen", "two_object_held_out"):  # two objects drawn, never both bound right
        assert swapped[group]["all"] == 0.0 and swapped[group]["count"] == 1.0
    assert "one_object" not in swapped
