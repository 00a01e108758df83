"""Publish a pipeline folder to the Hugging Face Hub: ``python -m pipelines.publish --model DIR --repo-id NAME``.

Builds the repository in a staging folder first: the pipeline re-saved with safetensors weights, a ``README.md``
model card with the front matter the Hub reads (an existing card's metadata and body are kept and merged, not
duplicated; the model's family adds its tags, such as SDXL's ``stable-diffusion-xl``; ``--base-model`` names the
model it was made from where the card does not), the sample grid (``samples.png``, or a small grid drawn now with
fixed prompts and seeds) and the training loss figure (``loss.png``) when the folder has one. Then it creates the
repository (``exist_ok``) and uploads the folder. ``--dry-run OUT`` writes the staging folder to ``OUT`` and uploads
nothing.

``--space`` publishes a Gradio Space instead: the web demo (``pipelines/app.py`` as ``app.py``), the model beside it
in ``model/`` (where the app looks first), the ``ldm`` and ``pipelines`` packages it imports, ``requirements.txt``
and a ``README.md`` with the front matter a Space reads (``sdk: gradio``, ``app_file: app.py``).

The token is huggingface_hub's business (``HF_TOKEN`` or ``hf auth login``): this module passes ``token=None`` and
never reads, prints, logs or writes it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, SpaceCard, SpaceCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ldm.errors import OneLineParser, UserError, check_writable_folder, run_reporting
from pipelines.cli import int_at_least
from pipelines.families import (
    STABLE_DIFFUSION,
    STABLE_DIFFUSION_XL,
    ModelFamily,
    require_supported_model,
    text_to_image_pipeline,
)
from pipelines.grid import sample_grid
from pipelines.loading import loading_bars_hidden
from pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline

logger = logging.getLogger(__name__)

REQUIRED_TAGS = ("text-to-image", "diffusers")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
SAMPLE_PROMPTS = ("a red circle on the left", "a blue square at the top")
SAMPLE_SEED = 0
SAMPLE_GUIDANCE_SCALE = 7.5
FIGURES = ("loss.png",)
REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE_PACKAGES = ("ldm", "pipelines")
"""The project's packages the Space's app imports (copied as they are, without caches)."""
SPACE_MODEL_FOLDER = "model"


class PublishError(UserError):
    """A publishing step failed; the message says what and what to do."""


@dataclass(frozen=True)
class FamilyCard:
    """What a model card says of a model family.

    Attributes:
        tags: the Hub tags a card of the family carries besides :data:`REQUIRED_TAGS` (the ones diffusers'
            training scripts give the family's models, by which the Hub lists them).
        base_model_example: for a card that names no base model, the Hub id a warning suggests to pass as
            ``--base-model`` (None: no warning; the project trains such models from scratch).
    """

    tags: tuple[str, ...] = ()
    base_model_example: str | None = None


FAMILY_CARDS: dict[ModelFamily, FamilyCard] = {
    # The project's own SD-architecture models are not Stable Diffusion: their cards keep the tags training wrote.
    STABLE_DIFFUSION: FamilyCard(),
    STABLE_DIFFUSION_XL: FamilyCard(
        tags=("stable-diffusion-xl", "stable-diffusion-xl-diffusers"),
        base_model_example="stabilityai/stable-diffusion-xl-base-1.0",
    ),
}


@dataclass
class PublishConfig:
    """What to publish and where."""

    model: str
    repo_id: str
    private: bool = False
    license: str | None = None
    commit_message: str = "Upload text-to-image pipeline"
    allow_pickle: bool = False
    base_model: str | None = None
    samples: bool = True
    sample_steps: int = 25
    space: bool = False
    trigger_words: str | None = None


# ------------------------------------------------------------------------------------------------------- staging


def check_repo_id(repo_id: str) -> None:
    """Raises :class:`PublishError` unless ``repo_id`` is a valid ``namespace/name`` (or ``name``) Hub id."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishError(f"--repo-id {repo_id!r} is not a valid Hub repository id: {err}") from None


def pickle_only_components(model_dir: Path) -> list[str]:
    """The folders of ``model_dir`` with pickle weights (.bin, .ckpt, ...) and no safetensors beside them."""
    found = []
    for folder in [model_dir, *sorted(p for p in model_dir.iterdir() if p.is_dir())]:
        files = [p for p in folder.iterdir() if p.is_file()]
        if any(p.suffix in PICKLE_SUFFIXES for p in files) and not any(p.suffix == ".safetensors" for p in files):
            found.append(folder.name if folder != model_dir else ".")
    return found


def load_for_publishing(model_dir: Path, allow_pickle: bool) -> LatentDiffusionPipeline:
    """Load the pipeline (its family's text-to-image class) from safetensors weights; pickle weights only with
    ``allow_pickle`` (never remote code).

    Raises:
        PublishError: no such pipeline folder, pickle-only weights without ``allow_pickle``, or a failed load.
        UserError: a model of a family this version does not run.
    """
    if not model_dir.exists():
        raise PublishError(f"--model {model_dir}: no such folder; pass a diffusers pipeline folder")
    if not model_dir.is_dir() or not (model_dir / "model_index.json").is_file():
        raise PublishError(f"--model {model_dir} is not a diffusers pipeline folder (no model_index.json)")
    pipeline_class = text_to_image_pipeline(require_supported_model(str(model_dir)))
    pickled = pickle_only_components(model_dir)
    if pickled and not allow_pickle:
        raise PublishError(
            f"--model {model_dir} has pickle weights ({', '.join(pickled)}): loading them can run code; convert them "
            "to safetensors, or pass --allow-pickle if you trust the files"
        )
    try:
        return pipeline_class.from_pretrained(str(model_dir), use_safetensors=None if pickled else True)
    except OSError as err:
        raise PublishError(f"could not load --model {model_dir}: {err}; pass a complete pipeline folder") from err


def read_card(
    model_dir: Path, repo_id: str, pipeline_class: type = LatentDiffusionPipeline
) -> tuple[ModelCardData, str]:
    """The metadata and body of the folder's ``README.md`` (as ``training.validation.write_model_card`` writes it),
    or empty metadata and a short body with the code that loads it with ``pipeline_class`` when there is no card.

    Raises:
        PublishError: the card's YAML front matter does not parse.
    """
    existing = model_dir / "README.md"
    if not existing.is_file():
        use = [
            "## Use",
            "",
            "```python",
            f"from {pipeline_class.__module__.split('.')[0]} import {pipeline_class.__name__}",
            "",
            f'pipe = {pipeline_class.__name__}.from_pretrained("{repo_id}")',
            "```",
        ]
        return ModelCardData(), "\n".join([f"# {repo_id.split('/')[-1]}", "", *use, ""])
    try:
        card = ModelCard(existing.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError) as err:
        message = " ".join(str(err).split())
        raise PublishError(f"{existing} has a malformed YAML front matter ({message}); fix or remove it") from err
    return card.data, card.text.rstrip("\n") + "\n"


def model_card(
    data: ModelCardData,
    body: str,
    license: str | None,
    files: list[str],
    family: ModelFamily = STABLE_DIFFUSION,
    base_model: str | None = None,
) -> ModelCard:
    """The card with the Hub metadata a text-to-image diffusers model of ``family`` needs merged into ``data`` (the
    license: ``license``, else the card's, else "other"; ``base_model``, else the card's; the family's tags; the
    card's other keys kept), and sections for the figures in ``files`` that ``body`` does not show yet."""
    data.license = license or data.license or "other"
    data.library_name = "diffusers"
    data.pipeline_tag = "text-to-image"
    data.base_model = base_model or data.base_model
    data.tags = list(dict.fromkeys([*(data.tags or []), *REQUIRED_TAGS, *FAMILY_CARDS[family].tags]))
    captions = {"samples.png": ("Samples", "samples"), "loss.png": ("Training loss", "training loss")}
    for file in files:
        if file in captions and f"({file})" not in body:
            title, alt = captions[file]
            body += f"\n## {title}\n\n![{alt}]({file})\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


ADAPTER_FILES = {
    "pytorch_lora_weights.safetensors": "lora",
    "kohya_lora.safetensors": "lora",
    "learned_embeds.safetensors": "textual_inversion",
}
"""The files of a LoRA or textual-inversion folder (as training writes them) and the Hub tag each adds."""


def adapter_files(model_dir: Path) -> list[Path]:
    """The adapter weights of a LoRA / textual-inversion folder: :data:`ADAPTER_FILES` and, beside a
    ``learned_embeds.safetensors``, the AUTOMATIC1111 embedding named after its token."""
    files = [model_dir / name for name in ADAPTER_FILES if (model_dir / name).is_file()]
    if (model_dir / "learned_embeds.safetensors").is_file():
        files += [p for p in model_dir.glob("*.safetensors") if p not in files]
    return files


def stage_adapter(config: PublishConfig, model_dir: Path, staging: Path) -> Path:
    """Write the repository of a LoRA or textual-inversion folder: its safetensors weights as they are, its figures,
    and a card naming the base model (required: an adapter is nothing without it) and the trigger words.

    Raises:
        PublishError: no base model in the card or ``--base-model``.
    """
    data, body = read_card(model_dir, config.repo_id)
    base_model = config.base_model or data.base_model
    if not base_model:
        raise PublishError(
            f"--model {model_dir} is a LoRA / embedding folder whose card names no base model; pass --base-model "
            "with the Hub id of the model it was trained on"
        )
    files = adapter_files(model_dir)
    staging.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copyfile(path, staging / path.name)
    figures = [name for name in ("samples.png", *FIGURES) if (model_dir / name).is_file()]
    for name in figures:
        shutil.copyfile(model_dir / name, staging / name)
    if config.trigger_words:
        data.instance_prompt = config.trigger_words
    extra = sorted({ADAPTER_FILES[p.name] for p in files if p.name in ADAPTER_FILES})
    data.tags = list(dict.fromkeys([*(data.tags or []), *extra]))
    model_card(data, body, config.license, figures, family_of_card(data), base_model).save(staging / "README.md")
    return staging


def family_of_card(data: ModelCardData) -> ModelFamily:
    """The family an adapter's card names by its tags (SDXL's), else Stable Diffusion."""
    return STABLE_DIFFUSION_XL if "stable-diffusion-xl" in (data.tags or []) else STABLE_DIFFUSION


def stage(config: PublishConfig, staging: Path) -> Path:
    """Write the repository content for ``config.model`` into ``staging``; returns ``staging``. A LoRA or
    textual-inversion folder (no ``model_index.json``, adapter weights) is staged by :func:`stage_adapter`.

    Raises:
        PublishError: the model folder cannot be published as it is.
    """
    model_dir = Path(config.model).expanduser()
    if model_dir.is_dir() and not (model_dir / "model_index.json").is_file() and adapter_files(model_dir):
        return stage_adapter(config, model_dir, staging)
    with loading_bars_hidden():  # stderr keeps room for the one-line error
        pipe = load_for_publishing(model_dir, config.allow_pickle)
        family = require_supported_model(str(model_dir))
        data, body = read_card(model_dir, config.repo_id, type(pipe))  # fails before anything is written
        staging.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(staging, safe_serialization=True)
    files = []
    if (model_dir / "samples.png").is_file():
        shutil.copyfile(model_dir / "samples.png", staging / "samples.png")
        files.append("samples.png")
    elif config.samples:
        grid = sample_grid(
            pipe,
            list(SAMPLE_PROMPTS),
            seed=SAMPLE_SEED,
            num_inference_steps=config.sample_steps,
            guidance_scale=SAMPLE_GUIDANCE_SCALE,
        )
        grid.save(staging / "samples.png")
        files.append("samples.png")
    for figure in FIGURES:
        if (model_dir / figure).is_file():
            shutil.copyfile(model_dir / figure, staging / figure)
            files.append(figure)
    example = FAMILY_CARDS[family].base_model_example
    if not (config.base_model or data.base_model) and example:
        logger.warning(
            "the card names no base model; pass --base-model with the Hub id of the model this one was made from "
            "(e.g. %s)",
            example,
        )
    model_card(data, body, config.license, files, family, config.base_model).save(staging / "README.md")
    return staging


def space_requirements() -> str:
    """The project's runtime requirements for the Space, less ``gradio``: the front matter's ``sdk_version`` pins
    it and the Space installs that version itself."""
    lines = (REPO_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.lower().startswith("gradio")) + "\n"


def space_card(config: PublishConfig) -> SpaceCard:
    """The Space's ``README.md``: the front matter a Gradio Space needs and how to run the demo elsewhere.

    Raises:
        PublishError: gradio is not installed (the card names the version the Space runs).
    """
    try:
        gradio_version = importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        raise PublishError("--space needs gradio installed (pip install -r requirements.txt)") from None
    name = config.repo_id.split("/")[-1]
    data = SpaceCardData(
        title=name,
        sdk="gradio",
        sdk_version=gradio_version,
        app_file="app.py",
        license=config.license or "other",
        tags=list(REQUIRED_TAGS),
    )
    body = (
        f"# {name}\n\nA text-to-image demo: the model in `{SPACE_MODEL_FOLDER}/` served by `app.py` (text to image, "
        "img2img, inpainting, outpainting). To run it elsewhere: `pip install -r requirements.txt gradio` and "
        "`python app.py`.\n"
    )
    return SpaceCard(f"---\n{data.to_yaml()}\n---\n{body}")


def stage_space(config: PublishConfig, staging: Path) -> Path:
    """Write a Gradio Space for ``config.model`` into ``staging``: ``app.py``, the model in ``model/``, the packages
    the app imports, ``requirements.txt`` and ``README.md``; returns ``staging``.

    Raises:
        PublishError: the model folder cannot be published as it is.
    """
    card = space_card(config)
    with loading_bars_hidden():
        pipe = load_for_publishing(Path(config.model).expanduser(), config.allow_pickle)
        staging.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(staging / SPACE_MODEL_FOLDER, safe_serialization=True)
    shutil.copyfile(REPO_ROOT / "pipelines" / "app.py", staging / "app.py")
    for package in SPACE_PACKAGES:
        shutil.copytree(REPO_ROOT / package, staging / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (staging / "requirements.txt").write_text(space_requirements(), encoding="utf-8")
    card.save(staging / "README.md")
    return staging


# ------------------------------------------------------------------------------------------------------- publish


def upload(staging: Path, config: PublishConfig) -> str:
    """Create the Hub repository (if missing) and upload ``staging`` to it; returns the commit URL.

    Raises:
        PublishError: the Hub refused or could not be reached (the message never holds the token).
    """
    api = HfApi()
    kind = {"repo_type": "space"} if config.space else {}  # the Hub's default kind is a model repository
    sdk = {"space_sdk": "gradio"} if config.space else {}
    try:
        api.create_repo(config.repo_id, private=config.private, exist_ok=True, token=None, **kind, **sdk)
        info = api.upload_folder(
            repo_id=config.repo_id, folder_path=staging, commit_message=config.commit_message, token=None, **kind
        )
    except (OSError, ValueError) as err:  # HfHubHTTPError and connection errors are OSErrors
        raise PublishError(f"could not upload to {config.repo_id}: {type(err).__name__}: {err}") from err
    return str(getattr(info, "commit_url", info))


def publish(config: PublishConfig, dry_run: str | Path | None = None) -> str:
    """Stage ``config.model`` and upload it to ``config.repo_id``; with ``dry_run``, write the staging folder
    there and upload nothing. Returns the dry-run folder or the commit URL.

    Raises:
        PublishError: naming what to change.
    """
    check_repo_id(config.repo_id)
    stage_repo = stage_space if config.space else stage
    if dry_run is not None:
        out = Path(dry_run)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise PublishError(f"--dry-run {out} exists and is not an empty folder; pass a new folder")
        check_writable_folder(out.parent, f"--dry-run {out}: its folder")
        return str(stage_repo(config, out))
    with tempfile.TemporaryDirectory(prefix="publish-") as tmp:
        return upload(stage_repo(config, Path(tmp)), config)


# ---------------------------------------------------------------------------------------------------------- main


def build_parser() -> OneLineParser:
    """The ``publish`` argument parser (errors: one line on stderr, exit status 2)."""
    parser = OneLineParser(prog="python -m pipelines.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        required=True,
        metavar="FOLDER",
        help="a diffusers pipeline folder, or a LoRA / textual-inversion folder as training writes it",
    )
    parser.add_argument(
        "--trigger-words", metavar="TEXT", help="a LoRA's or embedding's trigger words, for the card (instance_prompt)"
    )
    parser.add_argument("--repo-id", required=True, metavar="NAME", help="Hub repository, e.g. user/my-model")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--license", metavar="ID", help="license id for the card (default: the card's, or other)")
    parser.add_argument(
        "--base-model",
        metavar="HUB_ID",
        help="the model this one was made from, for the card's base_model (default: the card's)",
    )
    parser.add_argument(
        "--commit-message", default=PublishConfig.commit_message, metavar="TEXT", help="message of the Hub commit"
    )
    parser.add_argument("--dry-run", type=Path, metavar="OUT", help="write the repository to OUT; upload nothing")
    parser.add_argument("--allow-pickle", action="store_true", help="accept .bin/.ckpt weights (they can run code)")
    parser.add_argument("--no-samples", action="store_true", help="do not draw a sample grid when there is none")
    parser.add_argument(
        "--space",
        action="store_true",
        help="publish a Gradio Space (the web demo with the model) instead of the model",
    )
    parser.add_argument(
        "--sample-steps",
        type=int_at_least(1),
        default=PublishConfig.sample_steps,
        metavar="N",
        help=f"sampling steps of a drawn sample grid (default {PublishConfig.sample_steps})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; prints the dry-run folder or the commit URL. Errors: one line, exit status 2."""
    args = build_parser().parse_or_status(argv)
    if isinstance(args, int):
        return args
    config = PublishConfig(
        model=args.model,
        repo_id=args.repo_id,
        private=args.private,
        license=args.license,
        commit_message=args.commit_message,
        allow_pickle=args.allow_pickle,
        base_model=args.base_model,
        samples=not args.no_samples,
        sample_steps=args.sample_steps,
        space=args.space,
        trigger_words=args.trigger_words,
    )
    return run_reporting(lambda: print(publish(config, dry_run=args.dry_run), flush=True), "publishing")


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    sys.exit(main())
