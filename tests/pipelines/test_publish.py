"""``python -m pipelines.publish``: the staged repository loads in stock diffusers, its card carries the Hub metadata,
the upload goes through ``HfApi.create_repo`` / ``upload_folder`` (replaced here, nothing leaves the machine), and
the token never reaches a file or the output."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import huggingface_hub
import PIL.Image
import pytest
import safetensors.torch
import torch
import yaml
from diffusers import StableDiffusionPipeline

from pipelines import LatentDiffusionPipeline
from pipelines.publish import PublishConfig, PublishError, main, publish
from training.validation import write_model_card

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "hf_test_SECRET_123"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def front_matter(readme: Path) -> tuple[dict, str]:
    """The YAML front matter of a model card (parsed independently of huggingface_hub) and the body after it."""
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def weight_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace the two HfApi calls that reach the network; record their arguments and the uploaded folder."""
    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls["upload_folder"] = kwargs
        calls["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        calls["contents"] = b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())
        calls["readme"] = front_matter(folder / "README.md")
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_dry_run_writes_a_folder_stock_diffusers_loads(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "repo"
    assert (
        main(["--model", tiny_sd_dir, "--repo-id", "me/tiny-ldm", "--dry-run", str(out), "--sample-steps", "2"]) == 0
    )
    assert capsys.readouterr().out.strip() == str(out)

    weights = weight_files(out)
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert isinstance(LatentDiffusionPipeline.from_pretrained(out), LatentDiffusionPipeline)
    assert isinstance(StableDiffusionPipeline.from_pretrained(out, safety_checker=None), StableDiffusionPipeline)

    meta, body = front_matter(out / "README.md")
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "other" and "base_model" not in meta
    assert {"text-to-image", "diffusers"} <= set(meta["tags"])
    # no samples.png in the folder: a grid of the fixed prompts (2 rows of 2 images) is drawn and shown in the card
    side = LatentDiffusionPipeline.from_pretrained(tiny_sd_dir).default_size
    assert PIL.Image.open(out / "samples.png").size == (2 * side, 2 * side)
    assert "](samples.png)" in body and 'from_pretrained("me/tiny-ldm")' in body


def test_existing_card_is_merged_not_duplicated(tiny_sd_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    PIL.Image.new("RGB", (8, 8), "red").save(model / "samples.png")
    PIL.Image.new("RGB", (8, 8), "blue").save(model / "loss.png")
    write_model_card(
        model,
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        data={"images": 3},
        config={"preset": "tiny"},
        steps=7,
        sample_grid_file="samples.png",
        kind="pipeline",
    )
    out = tmp_path / "repo"
    argv = ["--model", str(model), "--repo-id", "me/tiny", "--dry-run", str(out), "--license", "mit"]
    assert main(argv) == 0

    meta, body = front_matter(out / "README.md")
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["license"] == "mit"  # the flag wins over the card's "other"
    assert meta["tags"] == ["text-to-image", "diffusers", "latent-diffusion"]  # merged, no duplicates
    text = (out / "README.md").read_text(encoding="utf-8")
    assert text.count("library_name") == 1 and text.count("\n---\n") == 1
    assert body.count("## Data") == 1 and body.count("](samples.png)") == 1 and body.count("](loss.png)") == 1
    assert (out / "samples.png").read_bytes() == (model / "samples.png").read_bytes()
    assert (out / "loss.png").read_bytes() == (model / "loss.png").read_bytes()


def test_upload_goes_through_hfapi_and_never_shows_the_token(
    tiny_sd_dir, tmp_path, monkeypatch, fake_hub, capsys, caplog
):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    caplog.set_level(logging.DEBUG)
    argv = ["--model", tiny_sd_dir, "--repo-id", "me/tiny", "--private", "--no-samples", "--commit-message", "v1"]
    assert main(argv) == 0

    assert fake_hub["create_repo"] == {"repo_id": "me/tiny", "private": True, "exist_ok": True, "token": None}
    upload = fake_hub["upload_folder"]
    assert upload["repo_id"] == "me/tiny" and upload["commit_message"] == "v1" and upload["token"] is None
    assert "model_index.json" in fake_hub["files"] and "README.md" in fake_hub["files"]
    assert "unet/diffusion_pytorch_model.safetensors" in fake_hub["files"]
    assert "samples.png" not in fake_hub["files"]  # --no-samples, and the folder has none
    assert not any(f.endswith((".bin", ".ckpt")) for f in fake_hub["files"])
    assert {"text-to-image", "diffusers"} <= set(fake_hub["readme"][0]["tags"])
    assert not Path(upload["folder_path"]).exists()  # the staging folder is removed after the upload

    captured = capsys.readouterr()
    assert captured.out.strip() == "https://huggingface.co/me/tiny/commit/abc"
    assert SECRET.encode() not in fake_hub["contents"]
    assert SECRET not in captured.out + captured.err + caplog.text
    for path in [*tmp_path.rglob("*"), *Path(tiny_sd_dir).rglob("*")]:
        assert not path.is_file() or SECRET.encode() not in path.read_bytes()


def test_dry_run_never_writes_the_token(tiny_sd_dir, tmp_path, monkeypatch, fake_hub, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = tmp_path / "repo"
    assert main(["--model", tiny_sd_dir, "--repo-id", "me/tiny", "--no-samples", "--dry-run", str(out)]) == 0
    assert fake_hub == {}  # a dry run uploads nothing
    assert all(SECRET.encode() not in p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert SECRET not in "".join(capsys.readouterr())


def _http_error(status: int, message: str) -> Exception:
    """The error huggingface_hub raises for an HTTP error status (its response class comes from its HTTP client)."""
    response_class = huggingface_hub.errors.Response
    request = importlib.import_module(response_class.__module__).Request("POST", "https://huggingface.co/api/x")
    return huggingface_hub.errors.HfHubHTTPError(message, response=response_class(status, request=request))


@pytest.mark.parametrize(
    "error",
    [
        _http_error(403, "403 Forbidden: you cannot write to me/tiny"),
        huggingface_hub.errors.OfflineModeIsEnabled("403 Forbidden: offline\nsecond line"),
    ],
)
def test_upload_failure_exits_2_with_one_line(tiny_sd_dir, monkeypatch, fake_hub, capsys, error):
    def refuse(self, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    assert main(["--model", tiny_sd_dir, "--repo-id", "me/tiny", "--no-samples"]) == 2
    line = one_line_error(capsys)
    assert "could not upload to me/tiny" in line and "403 Forbidden" in line
    assert fake_hub["create_repo"]["repo_id"] == "me/tiny"


@pytest.mark.parametrize(
    ("repo_id", "model", "message"),
    [
        ("bad id//x", None, "not a valid Hub repository id"),
        ("me/tiny", "does-not-exist", "no such folder"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tiny_sd_dir, tmp_path, fake_hub, capsys, repo_id, model, message):
    model_dir = str(tmp_path / model) if model else tiny_sd_dir
    assert main(["--model", model_dir, "--repo-id", repo_id, "--dry-run", str(tmp_path / "out")]) == 2
    assert message in one_line_error(capsys)
    assert fake_hub == {} and not (tmp_path / "out").exists()


def test_pickle_weights_need_allow_pickle(tiny_sd_dir, tmp_path, capsys):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_sd_dir, model)
    pickle_names = {"model.safetensors": "pytorch_model.bin"}
    for path in weight_files(model):  # the layout older diffusers / transformers releases wrote
        torch.save(safetensors.torch.load_file(path), path.with_name(pickle_names.get(path.name, path.stem + ".bin")))
        path.unlink()
    assert weight_files(model) and all(p.suffix == ".bin" for p in weight_files(model))
    out = tmp_path / "repo"
    assert main(["--model", str(model), "--repo-id", "me/tiny", "--no-samples", "--dry-run", str(out)]) == 2
    assert "--allow-pickle" in one_line_error(capsys) and not out.exists()

    argv = ["--model", str(model), "--repo-id", "me/tiny", "--no-samples", "--dry-run", str(out), "--allow-pickle"]
    assert main(argv) == 0
    assert weight_files(out) and all(p.suffix == ".safetensors" for p in weight_files(out))


def test_dry_run_refuses_a_folder_with_files(tiny_sd_dir, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["--model", tiny_sd_dir, "--repo-id", "me/tiny", "--dry-run", str(tmp_path)]) == 2
    assert "not an empty folder" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_dry_run_into_a_folder_that_cannot_be_written_is_one_line(tiny_sd_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "repo"
    assert main(["--model", tiny_sd_dir, "--repo-id", "me/tiny", "--no-samples", "--dry-run", str(out)]) == 2
    assert f"--dry-run {out}: its folder {tmp_path / 'a-file'} is a file, not a folder" in one_line_error(capsys)


def test_a_malformed_card_is_named_before_anything_is_written(tiny_sd_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    (model / "README.md").write_text("---\nlicense: [mit\n---\n# body\n")
    out = tmp_path / "repo"
    assert main(["--model", str(model), "--repo-id", "me/tiny", "--dry-run", str(out)]) == 2
    assert "malformed YAML front matter" in one_line_error(capsys) and not out.exists()


def test_training_pushes_its_final_pipeline(tiny_sd_dir, tmp_path, monkeypatch, fake_hub, caplog):
    from tests.training.conftest import draw_shapes_folder
    from training.train_text_to_image import TrainConfig, train

    monkeypatch.setenv("HF_TOKEN", SECRET)
    config = TrainConfig(
        pretrained_model=tiny_sd_dir,
        dataset=str(draw_shapes_folder(tmp_path / "shapes")),
        output_dir=str(tmp_path / "run"),
        resolution=64,
        train_batch_size=4,
        max_train_steps=2,
        checkpointing_steps=2,
        lr_warmup_steps=1,
        report_to="none",
        validation_inference_steps=2,
        push_to_hub=True,
        hub_model_id="me/trained",
        hub_private=True,
    )
    final = train(config)

    assert fake_hub["create_repo"] == {"repo_id": "me/trained", "private": True, "exist_ok": True, "token": None}
    assert fake_hub["upload_folder"]["repo_id"] == "me/trained"
    assert {
        "model_index.json",
        "README.md",
        "loss.png",
        "samples.png",
        "unet/diffusion_pytorch_model.safetensors",
    } <= set(fake_hub["files"])
    meta, _ = fake_hub["readme"]
    assert meta["base_model"] == tiny_sd_dir and meta["pipeline_tag"] == "text-to-image"
    assert SECRET.encode() not in fake_hub["contents"] and SECRET not in caplog.text
    assert all(SECRET.encode() not in p.read_bytes() for p in final.parent.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({}, "needs --hub-model-id"), ({"hub_model_id": "bad id//x"}, "hub_model_id: --repo-id")],
)
def test_training_checks_the_hub_settings_before_training(tiny_sd_dir, overrides, message):
    from training.config import ConfigError
    from training.train_text_to_image import TrainConfig

    config = TrainConfig(pretrained_model=tiny_sd_dir, dataset="data", push_to_hub=True, **overrides)
    with pytest.raises(ConfigError, match=message):
        config.validate()


@pytest.mark.slow
def test_space_dry_run_is_a_self_contained_gradio_space(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "space"
    assert main(["--model", tiny_sd_dir, "--repo-id", "me/tiny-demo", "--space", "--dry-run", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)

    meta, body = front_matter(out / "README.md")
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["title"] == "tiny-demo"
    assert meta["sdk_version"] == importlib.metadata.version("gradio")
    assert (out / "app.py").read_bytes() == (REPO_ROOT / "pipelines" / "app.py").read_bytes()
    requirements = (out / "requirements.txt").read_text(encoding="utf-8").splitlines()
    assert "safetensors>=0.4" in requirements and not any(line.startswith("gradio") for line in requirements)
    weights = weight_files(out)
    assert weights and all(p.suffix == ".safetensors" and p.is_relative_to(out / "model") for p in weights)
    assert isinstance(
        StableDiffusionPipeline.from_pretrained(out / "model", safety_checker=None), StableDiffusionPipeline
    )
    assert not list(out.rglob("__pycache__"))

    # Run from the Space's folder alone, the app imports the Space's own packages and defaults to its model.
    probe = "import app, pipelines; print(app.default_model()); print(pipelines.__file__)"
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=out, env=env, capture_output=True, text=True, check=True
    )
    model, package = (Path(line).resolve() for line in result.stdout.split())
    assert model == (out / "model").resolve() and package == (out / "pipelines" / "__init__.py").resolve()


def test_space_upload_creates_a_gradio_space(tiny_sd_dir, fake_hub, capsys):
    assert main(["--model", tiny_sd_dir, "--repo-id", "me/demo", "--space", "--license", "mit"]) == 0
    assert fake_hub["create_repo"] == {
        "repo_id": "me/demo",
        "private": False,
        "exist_ok": True,
        "token": None,
        "repo_type": "space",
        "space_sdk": "gradio",
    }
    assert fake_hub["upload_folder"]["repo_type"] == "space"
    expected = {
        "app.py",
        "requirements.txt",
        "README.md",
        "model/model_index.json",
        "pipelines/studio.py",
        "pipelines/cli.py",
        "ldm/presets.py",
    }
    assert expected <= set(fake_hub["files"])
    assert fake_hub["readme"][0]["license"] == "mit"
    assert capsys.readouterr().out.strip() == "https://huggingface.co/me/demo/commit/abc"


def test_a_lora_folder_is_published_with_its_base_model_and_trigger_words(tmp_path):
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    from ldm.presets import build_components
    from training.models import LoraSpec, add_lora, save_lora

    folder = tmp_path / "lora"
    folder.mkdir()
    unet = build_components("tiny", seed=0)["unet"]
    add_lora(unet, LoraSpec(rank=2))
    save_lora(unet, folder)
    write_model_card(
        folder,
        base_model="",
        data={"source": "dogs"},
        config={"lora_rank": 2},
        steps=10,
        sample_grid_file=None,
        kind="lora",
    )
    config = PublishConfig(model=str(folder), repo_id="user/sks-lora", trigger_words="sks dog")
    with pytest.raises(PublishError, match="names no base model; pass --base-model"):
        publish(config, dry_run=tmp_path / "refused")

    out = publish(replace(config, base_model="user/base"), dry_run=tmp_path / "out")
    staged = Path(out)
    assert sorted(p.name for p in staged.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]
    assert (
        load_file(staged / "pytorch_lora_weights.safetensors").keys()
        == load_file(folder / "pytorch_lora_weights.safetensors").keys()
    )
    card = ModelCard.load(staged / "README.md")
    assert card.data.base_model == "user/base" and card.data.instance_prompt == "sks dog"
    assert {"lora", "text-to-image", "diffusers"} <= set(card.data.tags)
