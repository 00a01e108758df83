"""The one generate-and-save path (:mod:`pipelines.generate`) as the commands use it: every generation command has
every shared flag; ``--lora`` (diffusers and kohya files), ``--embedding`` (diffusers and AUTOMATIC1111 files) and
``--prompt-weighting`` give stock diffusers' images with the same weights; the A1111 ``parameters`` chunk reads back;
only user errors become one line."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ldm.errors import UserError
from ldm.presets import build_components
from pipelines import img2img, inpaint, txt2img
from pipelines.cli import embedding_arg, lora_arg
from pipelines.generate import GenerationRequest, TextToImage, generate
from pipelines.infotext import format_parameters
from pipelines.kohya_lora import export_kohya_lora
from pipelines.loading import Embedding, LoraWeights, ModelSettings, load_model
from pipelines.pipeline_inpaint import LatentDiffusionInpaintPipeline

from .a1111 import parse_parameters

SIZE = 64
SEED = 3


def run(capsys, main, *argv: str) -> tuple[int, list[Path], str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, [Path(line) for line in captured.out.splitlines()], captured.err


def pixels(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def fast(model: str, out: Path, *extra: str) -> list[str]:
    return ["--model", model, "--out", str(out), "--steps", "2", "--seed", str(SEED), "--device", "cpu", *extra]


def stock_image(model: str, prompt: str, prepare=None, **kwargs) -> np.ndarray:
    """Stock ``StableDiffusionPipeline`` on the same folder, seed and settings as ``fast`` (PIL output)."""
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if prepare is not None:
        prepare(pipe)
    image = pipe(
        prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(SEED), output_type="pil", **kwargs
    ).images[0]
    return np.asarray(image).astype(int)


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    # ours equals stock to < 1e-4 in floats; after rounding to 8 bits a value may land one step apart
    assert a.shape == b.shape and np.abs(a - b).max() <= 1, np.abs(a - b).max()


# ---------------------------------------------------------------------------------------------------- flags


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def test_every_generation_command_has_every_shared_flag() -> None:
    shared = {
        "--prompt",
        "--prompt-file",
        "--negative-prompt",
        "--batch-size",
        "--prompt-weighting",
        "--no-prompt-weighting",
        "--long-prompts",
        "--no-long-prompts",
        "--model",
        "--device",
        "--dtype",
        "--attention",
        "--lora",
        "--embedding",
        "--scheduler",
        "--steps",
        "--guidance-scale",
        "--guidance-interval",
        "--guidance-rescale",
        "--clip-skip",
        "--eta",
        "--seed",
        "--num-images",
        "--out",
    }
    for module in (txt2img, img2img, inpaint):
        assert shared <= option_strings(module.build_parser()), module.__name__
    assert "--keep-unmasked-pixels" in option_strings(inpaint.build_parser())
    assert "default: on" in txt2img.build_parser().format_help().replace("\n", " ").replace("  ", " ")


def test_lora_and_embedding_arguments() -> None:
    assert lora_arg("a/b.safetensors") == LoraWeights(Path("a/b.safetensors"), 1.0)
    assert lora_arg("a/b.safetensors:0.5") == LoraWeights(Path("a/b.safetensors"), 0.5)
    assert lora_arg("C:\\loras\\b.safetensors") == LoraWeights(Path("C:\\loras\\b.safetensors"), 1.0)
    assert embedding_arg("e/cat.pt") == Embedding(Path("e/cat.pt"))
    assert embedding_arg("e/cat.pt:<cat>") == Embedding(Path("e/cat.pt"), "<cat>")
    assert embedding_arg("C:\\e\\cat.pt") == Embedding(Path("C:\\e\\cat.pt"))


# -------------------------------------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny LoRA saved twice: in diffusers' format (a folder) and in kohya's layout (one file)."""
    unet = build_components("tiny", seed=0)["unet"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # peft starts the up-projections at 0: give the LoRA an effect
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    kohya = export_kohya_lora(unet, folder.parent / "kohya_lora.safetensors")
    return folder, kohya


def test_lora_in_diffusers_and_kohya_layout_gives_stocks_image(capsys, tiny_sd_dir, tmp_path, lora_files) -> None:
    folder, kohya = lora_files

    def with_lora(pipe: StableDiffusionPipeline) -> None:
        pipe.load_lora_weights(str(folder), adapter_name="a")
        pipe.set_adapters(["a"], adapter_weights=[0.5])

    reference = stock_image(tiny_sd_dir, "a fox", with_lora)
    plain = stock_image(tiny_sd_dir, "a fox")
    assert np.abs(reference - plain).max() > 3  # the LoRA does change the image

    for lora in (f"{folder}:0.5", f"{kohya}:0.5", f"{folder / 'pytorch_lora_weights.safetensors'}:0.5"):
        code, paths, err = run(
            capsys, txt2img.main, *fast(tiny_sd_dir, tmp_path / lora[-20:], "--prompt", "a fox", "--lora", lora)
        )
        assert code == 0, err
        assert_same_image(pixels(paths[0]), reference)
        with PIL.Image.open(paths[0]) as image:
            assert image.text["loras"] == lora
            assert parse_parameters(image.text["parameters"])[2]["Loras"] == lora  # a value with ':' is quoted


def test_a_missing_lora_is_one_line(capsys, tiny_sd_dir, tmp_path) -> None:
    code, _, err = run(capsys, txt2img.main, *fast(tiny_sd_dir, tmp_path, "--prompt", "x", "--lora", "nope.bin"))
    assert code == 2 and err.count("\n") == 1 and "--lora nope.bin: no such .safetensors file" in err


# -------------------------------------------------------------------------------------------------- embeddings


def test_embeddings_in_diffusers_and_a1111_format_give_stocks_image(capsys, tiny_sd_dir, tmp_path) -> None:
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    save_file({"<cat>": vectors[:1]}, tmp_path / "learned_embeds.safetensors")  # diffusers: {token: (1, D)}
    # AUTOMATIC1111: a .pt with string_to_param; its token is the file's name
    torch.save({"string_to_param": {"*": vectors}, "name": "trained-name", "step": 100}, tmp_path / "shapey.pt")
    save_file({"emb_params": vectors}, tmp_path / "blob.safetensors")  # A1111's safetensors layout

    cases = [
        (
            "learned_embeds.safetensors",
            "a <cat> on the left",
            lambda p: p.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors")),
        ),
        (
            "shapey.pt",
            "a shapey at the top",
            lambda p: p.load_textual_inversion({"string_to_param": {"*": vectors}, "name": "x"}, token="shapey"),
        ),
        (
            "blob.safetensors:<blob>",
            "a <blob>",
            lambda p: p.load_textual_inversion(str(tmp_path / "blob.safetensors"), token="<blob>"),
        ),
    ]
    for i, (spec, prompt, load) in enumerate(cases):
        reference = stock_image(tiny_sd_dir, prompt, load)
        out = tmp_path / f"out{i}"
        code, paths, err = run(
            capsys, txt2img.main, *fast(tiny_sd_dir, out, "--prompt", prompt, "--embedding", str(tmp_path / spec))
        )
        assert code == 0, err
        assert_same_image(pixels(paths[0]), reference)
        assert np.abs(reference - stock_image(tiny_sd_dir, prompt)).max() > 3  # the embedding matters


# ---------------------------------------------------------------------------------------------- prompt weighting


def test_prompt_weighting_is_on_by_default_and_off_gives_stocks_image(capsys, tiny_sd_dir, tmp_path) -> None:
    prompt = "a (red:1.5) car"
    _, weighted, _ = run(capsys, txt2img.main, *fast(tiny_sd_dir, tmp_path / "on", "--prompt", prompt))
    _, plain, _ = run(
        capsys, txt2img.main, *fast(tiny_sd_dir, tmp_path / "off", "--prompt", prompt, "--no-prompt-weighting")
    )
    assert_same_image(pixels(plain[0]), stock_image(tiny_sd_dir, prompt))  # parentheses read as text
    assert np.abs(pixels(weighted[0]) - pixels(plain[0])).max() > 3
    assert PIL.Image.open(plain[0]).text["prompt_weighting"] == "false"
    assert PIL.Image.open(weighted[0]).text["prompt_weighting"] == "true"


def test_no_long_prompts_truncates_as_stock(capsys, tiny_sd_dir, tmp_path) -> None:
    prompt = "a red circle on the left, " * 20 + "green"  # past the 77-token limit
    flags = ["--prompt", prompt, "--no-prompt-weighting"]
    _, chunked, _ = run(capsys, txt2img.main, *fast(tiny_sd_dir, tmp_path / "on", *flags))
    _, cut, _ = run(capsys, txt2img.main, *fast(tiny_sd_dir, tmp_path / "off", *flags, "--no-long-prompts"))
    assert_same_image(pixels(cut[0]), stock_image(tiny_sd_dir, prompt))
    assert np.abs(pixels(chunked[0]) - pixels(cut[0])).max() > 3
    assert PIL.Image.open(cut[0]).text["long_prompts"] == "false"
    assert PIL.Image.open(chunked[0]).text["long_prompts"] == "true"


# --------------------------------------------------------------------------------------- editing and metadata


def random_image(seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def test_img2img_takes_every_shared_flag_and_writes_a1111_parameters(capsys, tiny_sd_dir, tmp_path) -> None:
    random_image().save(tmp_path / "in.png")
    extra = ["--image", str(tmp_path / "in.png"), "--prompt", "a fox, at night", "--negative-prompt", "blur"]
    extra += ["--strength", "0.5", "--guidance-rescale", "0.3", "--clip-skip", "1", "--scheduler", "dpmpp_2m_karras"]
    code, paths, err = run(capsys, img2img.main, *fast(tiny_sd_dir, tmp_path / "out", *extra))
    assert code == 0, err
    text = PIL.Image.open(paths[0]).text
    assert text["mode"] == "img2img" and text["guidance_rescale"] == "0.3" and text["clip_skip"] == "1"
    prompt, negative, settings = parse_parameters(text["parameters"])
    assert (prompt, negative) == ("a fox, at night", "blur")
    assert settings == {
        "Steps": "2",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7.5",
        "Seed": str(SEED),
        "Size": f"{SIZE}x{SIZE}",
        "Model": Path(tiny_sd_dir).name,
        "Denoising strength": "0.5",
        "Clip skip": "2",  # A1111 counts the last layer as 1
        "Guidance rescale": "0.3",
    }


def test_inpaint_without_keeping_pixels_is_the_pipelines_stock_image(capsys, tiny_sd_dir, tmp_path) -> None:
    image = random_image()
    image.save(tmp_path / "in.png")
    mask = PIL.Image.new("L", (SIZE, SIZE))
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    args = ["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", "a fox"]
    _, kept, _ = run(capsys, inpaint.main, *fast(tiny_sd_dir, tmp_path / "kept", *args, "--mask-blur", "2"))
    code, loose, err = run(
        capsys, inpaint.main, *fast(tiny_sd_dir, tmp_path / "loose", *args, "--no-keep-unmasked-pixels")
    )
    assert code == 0, err

    pipe = LatentDiffusionInpaintPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        "a fox",
        image=image,
        mask_image=mask,
        num_inference_steps=2,
        output_type="pil",
        generator=[torch.Generator().manual_seed(SEED)],
        keep_unmasked_pixels=False,
    ).images[0]
    assert_same_image(pixels(loose[0]), np.asarray(reference).astype(int))
    outside = np.ones((SIZE, SIZE), bool)
    outside[8:56, 8:56] = False  # farther than the feathering (mask blur 2) reaches from the mask
    np.testing.assert_array_equal(pixels(kept[0])[outside], np.asarray(image).astype(int)[outside])
    assert PIL.Image.open(loose[0]).text["keep_unmasked_pixels"] == "false"
    settings = parse_parameters(PIL.Image.open(kept[0]).text["parameters"])[2]
    assert settings["Mask blur"] == "2" and settings["Denoising strength"] == "1"


def test_parameters_quote_values_as_a1111_does() -> None:
    text = format_parameters("a\nb", "", {"Steps": "2", "Lora": "x:1", "Note": 'say "hi", then', "Skip": None})
    assert text == 'a\nb\nSteps: 2, Lora: "x:1", Note: "say \\"hi\\", then"'
    assert parse_parameters(text) == ("a\nb", "", {"Steps": "2", "Lora": "x:1", "Note": 'say "hi", then'})


# ------------------------------------------------------------------------------------------ errors and loading


def test_only_user_errors_become_one_line(capsys, monkeypatch, tiny_sd_dir, tmp_path) -> None:
    import pipelines.cli

    def broken(*args, **kwargs):
        raise ValueError("a bug in the library")

    monkeypatch.setattr(pipelines.cli, "generate", broken)
    with pytest.raises(ValueError, match="a bug in the library"):  # keeps its traceback
        txt2img.main(fast(tiny_sd_dir, tmp_path, "--prompt", "x"))

    def refused(*args, **kwargs):
        raise UserError("pass a better input")

    monkeypatch.setattr(pipelines.cli, "generate", refused)
    assert txt2img.main(fast(tiny_sd_dir, tmp_path, "--prompt", "x")) == 2
    assert capsys.readouterr().err == "error: pass a better input\n"


def test_the_model_is_loaded_once_and_a_request_names_its_fix(tiny_sd_dir, tmp_path) -> None:
    settings = ModelSettings(tiny_sd_dir, device="cpu")
    assert load_model(settings) is load_model(settings)
    request = GenerationRequest(("a fox",), TextToImage(height=60), steps=1, seed=0)
    with pytest.raises(UserError, match="--height 60 must be a multiple of 8 .* try 64"):
        generate(request, settings, tmp_path)
    with pytest.raises(UserError, match="unknown scheduler 'fast'"):
        generate(GenerationRequest(("a fox",), scheduler="fast"), settings, tmp_path)
    assert not any(tmp_path.iterdir())
