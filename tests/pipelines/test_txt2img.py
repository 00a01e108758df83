"""``python -m pipelines.txt2img``: files and metadata, reproducible seeds, prompt files, agreement with the pipeline
called directly, and one-line errors for bad arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from pipelines import LatentDiffusionPipeline
from pipelines.cli import read_prompts
from pipelines.generate import slugify
from pipelines.txt2img import main

from .a1111 import parse_parameters

REPO_ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[Path], str]:
    """Run the CLI in-process; returns the exit status, the paths it printed, and its stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, [Path(line) for line in captured.out.splitlines()], captured.err


def fast_args(model: str, out: Path, *extra: str) -> list[str]:
    return ["--model", model, "--out", str(out), "--steps", "2", "--height", "64", "--width", "64", *extra]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_writes_pngs_with_metadata_and_prints_their_paths(capsys, tiny_sd_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = fast_args(tiny_sd_dir, out, "--prompt", "A red fox, (snow:1.2)!", "--negative-prompt", "blurry")
    args += ["--num-images", "2", "--seed", "7", "--scheduler", "ddim", "--guidance-scale", "5", "--eta", "0.5"]
    args += ["--guidance-interval", "0.25,1"]
    code, paths, _ = run(capsys, *args)

    assert code == 0
    assert sorted(out.iterdir()) == paths
    assert [p.name for p in paths] == ["00000-7-a-red-fox-snow-1-2.png", "00001-8-a-red-fox-snow-1-2.png"]
    for path, seed in zip(paths, (7, 8)):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 64)
            parameters = image.text.pop("parameters")
            assert image.text == {
                "mode": "txt2img",
                "prompt_weighting": "true",
                "long_prompts": "true",
                "prompt": "A red fox, (snow:1.2)!",
                "negative_prompt": "blurry",
                "seed": str(seed),
                "steps": "2",
                "guidance_scale": "5.0",
                "guidance_interval": "0.25,1",
                "guidance_rescale": "0.0",
                "eta": "0.5",
                "scheduler": "ddim",
                "height": "64",
                "width": "64",
                "model": tiny_sd_dir,
            }
            # AUTOMATIC1111's reading of the same image
            prompt, negative, settings = parse_parameters(parameters)
            assert (prompt, negative) == ("A red fox, (snow:1.2)!", "blurry")
            assert settings == {
                "Steps": "2",
                "Sampler": "DDIM",
                "Schedule type": "Uniform",
                "CFG scale": "5",
                "Seed": str(seed),
                "Size": "64x64",
                "Model": Path(tiny_sd_dir).name,
                "Guidance interval": "0.25,1",
                "Eta": "0.5",
            }


def test_same_seed_same_images_and_each_image_alone(capsys, tiny_sd_dir: str, tmp_path: Path) -> None:
    # euler-a draws noise at every step too, so the per-image generators are exercised beyond the initial latents.
    args = fast_args(tiny_sd_dir, tmp_path, "--prompt", "a lighthouse", "--scheduler", "euler-a")
    _, first, _ = run(capsys, *args, "--seed", "11", "--num-images", "3")
    _, again, _ = run(capsys, *args, "--seed", "11", "--num-images", "3")
    _, alone, _ = run(capsys, *args, "--seed", "13", "--num-images", "1")

    # A second run continues the numbering instead of overwriting.
    assert [p.name[:6] for p in first + again + alone] == [f"{i:05d}-" for i in range(7)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(pixels(a), pixels(b))
    # image 2 of the run, drawn alone: the same seed gives the same image, up to a pixel's rounding where the CPU's
    # batched and single float sums differ (on an AMD EPYC one channel of one pixel came out 169 instead of 170)
    assert np.abs(pixels(alone[0]).astype(int) - pixels(first[2]).astype(int)).max() <= 1
    assert (pixels(alone[0]) != pixels(first[2])).mean() < 0.001
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))  # the seeds do differ per image


def test_prompt_file_in_batches_keeps_order_and_seeds(capsys, tiny_sd_dir: str, tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# animals\na cat\n\nan owl at night\n  # skipped too\na dog in the rain\n", "utf-8")
    assert read_prompts(prompt_file) == ["a cat", "an owl at night", "a dog in the rain"]

    args = fast_args(tiny_sd_dir, tmp_path / "out", "--prompt-file", str(prompt_file), "--batch-size", "2")
    code, paths, _ = run(capsys, *args, "--seed", "100")
    assert code == 0
    metadata = [Image.open(p).text for p in paths]
    assert [m["prompt"] for m in metadata] == ["a cat", "an owl at night", "a dog in the rain"]
    assert [m["seed"] for m in metadata] == ["100", "101", "102"]
    names = ["00000-100-a-cat.png", "00001-101-an-owl-at-night.png", "00002-102-a-dog-in-the-rain.png"]
    assert [p.name for p in paths] == names

    # The third image (second batch) is the one --prompt regenerates with its seed.
    _, alone, _ = run(
        capsys, *fast_args(tiny_sd_dir, tmp_path / "alone", "--prompt", "a dog in the rain", "--seed", "102")
    )
    np.testing.assert_array_equal(pixels(alone[0]), pixels(paths[2]))


def test_image_equals_the_pipeline_called_directly(capsys, tiny_sd_dir: str, tmp_path: Path) -> None:
    args = ["--prompt", "a castle", "--negative-prompt", "fog", "--seed", "5", "--scheduler", "dpm++"]
    args += ["--guidance-scale", "6", "--guidance-rescale", "0.3"]
    code, paths, _ = run(capsys, *fast_args(tiny_sd_dir, tmp_path, *args))
    assert code == 0

    pipe = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    reference = pipe(
        "a castle",
        negative_prompt="fog",
        num_inference_steps=2,
        guidance_scale=6.0,
        guidance_rescale=0.3,
        generator=torch.Generator().manual_seed(5),
        output_type="pil",
    ).images[0]
    np.testing.assert_array_equal(pixels(paths[0]), np.asarray(reference))


def test_module_entry_point_runs_in_a_subprocess(capsys, tiny_sd_dir: str, tmp_path: Path) -> None:
    args = fast_args(tiny_sd_dir, tmp_path / "sub", "--prompt", "a boat", "--seed", "3")
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.txt2img", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    printed = [Path(line) for line in result.stdout.splitlines()]
    assert printed == sorted((tmp_path / "sub").iterdir()) and len(printed) == 1

    # The same arguments in another process give the same image.
    _, in_process, _ = run(capsys, *fast_args(tiny_sd_dir, tmp_path / "in", "--prompt", "a boat", "--seed", "3"))
    np.testing.assert_array_equal(pixels(printed[0]), pixels(in_process[0]))


def test_random_seed_is_recorded(capsys, tiny_sd_dir: str, tmp_path: Path) -> None:
    _, paths, _ = run(capsys, *fast_args(tiny_sd_dir, tmp_path, "--prompt", "a kite", "--num-images", "2"))
    seeds = [int(Image.open(p).text["seed"]) for p in paths]
    assert seeds[1] == seeds[0] + 1
    assert paths[0].name.startswith(f"00000-{seeds[0]}-a-kite")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--prompt", "x", "--height", "65"], "multiple of 8"),
        (["--prompt", "x", "--steps", "0"], "--steps: must be an integer >= 1; got 0"),
        (["--prompt-file", "/nonexistent/prompts.txt"], "prompt file /nonexistent/prompts.txt does not exist"),
        ([], "pass exactly one of --prompt TEXT or --prompt-file FILE"),
        (["--prompt", "x", "--prompt-file", "p.txt"], "pass exactly one of --prompt TEXT or --prompt-file FILE"),
        (["--prompt", "x", "--attention", "xformers"], "use --attention sdpa"),
        (["--prompt", "x", "--guidance-rescale", "2"], "--guidance-rescale: must be a number in [0.0, 1.0]"),
        (["--prompt", "x", "--guidance-scale", "inf"], "--guidance-scale: must be a number >= 0.0; got inf"),
        (["--prompt", "x", "--guidance-scale", "nan"], "--guidance-scale: must be a number >= 0.0; got nan"),
        (["--prompt", "x", "--guidance-interval", "0.5"], "--guidance-interval: expected LO,HI with 0 <= LO < HI"),
        (["--prompt", "x", "--guidance-interval", "1,0"], "--guidance-interval: expected LO,HI with 0 <= LO < HI"),
    ],
)
def test_bad_arguments_fail_with_one_line(capsys, tiny_sd_dir: str, tmp_path: Path, extra, expected) -> None:
    code, paths, err = run(capsys, "--model", tiny_sd_dir, "--out", str(tmp_path / "out"), *extra)
    assert code == 2
    assert paths == []
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_image_of_nan_is_never_written(capsys, tiny_sd_dir: str, tmp_path: Path, monkeypatch) -> None:
    def overflowing(self, latents, generator=None):  # what float16 overflow or a huge guidance scale leads to
        return torch.full((latents.shape[0], 3, 64, 64), float("nan"))

    monkeypatch.setattr(LatentDiffusionPipeline, "decode_latents", overflowing)
    args = fast_args(tiny_sd_dir, tmp_path / "out", "--prompt", "a red circle", "--seed", "3")
    code, paths, err = run(capsys, *args)
    err = err.splitlines()[-1]  # after the denoising progress bar
    assert code == 2 and paths == []
    assert err.startswith("error: the model produced NaN or infinite values for 'a red circle' (seed 3); nothing was")
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("/nonexistent/tiny-sd", "--model /nonexistent/tiny-sd: no such folder"),
        ("nobody-here/no-such-model", "could not load --model nobody-here/no-such-model"),  # offline: a load error
    ],
)
def test_bad_model_fails_with_one_error_line(capsys, tmp_path: Path, model: str, expected: str) -> None:
    code, _, err = run(capsys, "--model", model, "--prompt", "x", "--out", str(tmp_path))
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and expected in error_lines[0], err
    assert "Traceback" not in err


def test_folder_without_model_index_is_refused(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "out"))
    assert code == 2 and "no model_index.json" in err and err.count("\n") == 1


def test_help_exits_zero(capsys) -> None:
    code, _, _ = run(capsys, "--help")
    assert code == 0


def test_slugify() -> None:
    assert slugify("  Ünïcode Café, (snow:1.2)!! ") == "unicode-cafe-snow-1-2"
    assert slugify("!!!") == "image"
    assert len(slugify("word " * 40)) <= 48
