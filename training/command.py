"""What the training commands built on :mod:`training.loop` share besides the loop: their common settings
(:class:`LoopConfig`), the set-up (:func:`start_run`: accelerator, generator, resume; data with a held-out part, LR
schedule, the loop and its ``metrics.json``), the step logs, evaluation mode, and ``main``.

A command's config extends :class:`LoopConfig` with its model and objective settings (and may redeclare a field to
change its default); its ``train(config)`` reads top to bottom: set-up, data, model, optimizer, the loop, the final
model; its ``main`` is :func:`run_command`, which reports bad input (:class:`ldm.errors.UserError`) in one line.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import errno
import importlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader

from ldm.errors import UserError, check_writable_folder, run_reporting
from training import launch
from training.buckets import BucketBatchSampler, make_generator
from training.checkpoint import Stateful
from training.checkpoint_folders import resolve_resume
from training.config import ConfigError, help_field, parse_config, to_dict
from training.data import ImageCaptionDataset, collate
from training.loop import TrainLoop
from training.record_formats import ImageCaptionRecords
from training.records import load_image_caption_records
from training.resume_guard import check_resume
from training.run_lock import acquire_output_lock, release_output_lock

logger = logging.getLogger("training")

T = TypeVar("T")

# diffusers' get_scheduler names
LR_SCHEDULES = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]

OPTIMIZERS = Literal["adamw", "adamw8bit", "adafactor", "prodigy", "lion"]

# --optimizer NAME -> (module, class, the pip package that provides it)
OPTIMIZER_CLASSES: dict[str, tuple[str, str, str]] = {
    "adamw": ("torch.optim", "AdamW", "torch"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "adafactor": ("transformers.optimization", "Adafactor", "transformers"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
}

ADAMW_FIELDS = ("adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon")


@dataclass
class LoopConfig:
    """Data, optimisation, checkpoint, held-out evaluation and log settings shared by the training commands (a
    command's config extends it and may redeclare a field to change its default)."""

    RESUME_FIELDS: ClassVar[tuple[str, ...]] = (
        "train_batch_size",
        "gradient_accumulation_steps",
        "dataset",
        "optimizer",
        "use_8bit_adam",
        "fingerprint.data",
    )
    """What ``--resume`` must find unchanged (config fields, and ``fingerprint.NAME`` of the run's fingerprint);
    a command's config adds its model and method fields."""

    # data
    dataset: str = help_field(
        "", "image folder (metadata.jsonl or .txt captions), save_to_disk folder, parquet or Hub id"
    )
    image_column: str | None = help_field(None, "dataset column with the images (default: guessed)")
    caption_column: str | None = help_field(None, "dataset column with the captions (default: guessed)")
    dataloader_workers: int = help_field(0, "data loading processes")
    # optimisation
    learning_rate: float = help_field(1e-4, "peak learning rate")
    lr_scheduler: LR_SCHEDULES = help_field("constant_with_warmup", "learning-rate schedule")
    lr_warmup_steps: int = help_field(100, "linear warm-up steps")
    adam_beta1: float = help_field(0.9, "AdamW beta1")
    adam_beta2: float = help_field(0.999, "AdamW beta2")
    adam_weight_decay: float = help_field(1e-2, "AdamW weight decay")
    adam_epsilon: float = help_field(1e-8, "AdamW epsilon")
    optimizer: OPTIMIZERS = help_field(
        "adamw",
        "adamw (torch), adamw8bit (bitsandbytes), adafactor (transformers, fixed learning rate), prodigy "
        "(prodigyopt; --learning-rate is its multiplier, 1.0 is usual) or lion (lion-pytorch)",
    )
    optimizer_args: list[str] = help_field(
        [],
        "extra keyword arguments of the optimizer as key=value (numbers, true/false, tuples such as "
        "betas=(0.9,0.99)), e.g. weight_decay=0.01 d_coef=2; the adam_* flags are AdamW's only",
    )
    use_8bit_adam: bool = help_field(False, "the same as --optimizer adamw8bit (kept for existing configs)")
    max_grad_norm: float = help_field(1.0, "gradient clipping norm")
    train_batch_size: int = help_field(16, "images per process per step")
    gradient_accumulation_steps: int = help_field(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = help_field(False, "recompute activations in the backward pass (less memory)")
    mixed_precision: Literal["no", "fp16", "bf16"] = help_field("no", "autocast precision (fp16 needs CUDA)")
    max_train_steps: int = help_field(1000, "optimizer steps in all")
    seed: int = help_field(0, "seed of the initialisation, data order and every random draw")
    # checkpoints
    output_dir: str = help_field("runs/train", "where checkpoints, metrics, logs and the model go")
    checkpointing_steps: int = help_field(500, "write a checkpoint every N steps")
    checkpoints_total_limit: int | None = help_field(None, "keep only the newest N checkpoints")
    resume: str | None = help_field(None, "'latest' or a checkpoint folder to continue from")
    resume_allow_changes: bool = help_field(
        False, "resume even where the batch size, accumulation, data, model or method differ from the checkpoint's"
    )
    max_nan_steps: int = help_field(5, "stop after this many non-finite losses in a row")
    # held-out evaluation and logs
    validation_dataset: str | None = help_field(None, "held-out image-caption data to evaluate on")
    validation_split: float = help_field(0.0, "or hold out this fraction of --dataset (a fixed, seeded choice)")
    validation_steps: int = help_field(500, "evaluate on the held-out data every N steps")
    max_validation_images: int = help_field(256, "evaluate on at most the first N held-out images")
    log_steps: int = help_field(10, "log loss, lr, grad norm and step rate every N steps")
    report_to: Literal["tensorboard", "none"] = help_field("tensorboard", "experiment tracker")

    def validate(self) -> None:
        """Checks of the shared settings, each naming the fix; a command's ``validate`` calls this first."""
        if not self.dataset:
            raise ConfigError("dataset is required: an image folder, save_to_disk folder, parquet file or Hub id")
        positive = (
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "checkpointing_steps",
            "validation_steps",
            "max_validation_images",
            "log_steps",
            "max_nan_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.dataloader_workers < 0:
            raise ConfigError(f"dataloader_workers must be >= 0; got {self.dataloader_workers}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(f"checkpoints_total_limit must be >= 1; got {self.checkpoints_total_limit}")
        if not 0.0 <= self.validation_split < 1.0:
            raise ConfigError(f"validation_split must be in [0, 1) (0: no split); got {self.validation_split}")
        if self.validation_split and self.validation_dataset:
            raise ConfigError("pass one of --validation-dataset and --validation-split, not both")
        if self.use_8bit_adam and self.optimizer not in ("adamw", "adamw8bit"):
            raise ConfigError(f"use_8bit_adam means --optimizer adamw8bit; drop it with --optimizer {self.optimizer}")
        optimizer_args = parse_optimizer_args(self.optimizer_args)
        reserved = sorted({"params", "lr"} & optimizer_args.keys())
        if reserved:
            raise ConfigError(f"optimizer_args cannot set {', '.join(reserved)}: the learning rate is --learning-rate")
        if optimizer_name(self) not in ("adamw", "adamw8bit"):
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            changed = [name for name in ADAMW_FIELDS if getattr(self, name) != defaults[name]]
            if changed:
                raise ConfigError(
                    f"{', '.join(changed)}: settings of AdamW, not of --optimizer {self.optimizer}; pass its own "
                    "through --optimizer-args, e.g. weight_decay=0.01 or betas=(0.9,0.99)"
                )


# --------------------------------------------------------------------------------------------------------------------
# Set-up and data


@dataclass
class Run:
    """What every training command sets up first (:func:`start_run`): the accelerator, the one generator of every
    random draw of the loop (its state is in each checkpoint), the folders and the checkpoint to resume from."""

    config: LoopConfig
    accelerator: Accelerator
    generator: torch.Generator
    output_dir: Path
    checkpoints_dir: Path
    resume_from: Path | None

    def start_loop(
        self,
        dataloader: DataLoader,
        stateful: Mapping[str, Stateful],
        epoch_setters: Sequence[Any] = (),
        fingerprint: Mapping[str, str] | None = None,
    ) -> tuple[TrainLoop, MetricsFile]:
        """The run's :class:`TrainLoop` over the prepared ``dataloader``, resumed from :attr:`resume_from` when set,
        and its ``metrics.json`` (a resumed run keeps the history up to its step). ``fingerprint`` (e.g. the data's
        hash) goes into every checkpoint; resuming checks it and the config's ``RESUME_FIELDS`` against the
        checkpoint's (:func:`training.resume_guard.check_resume`)."""
        fingerprint = dict(fingerprint or {})
        if self.resume_from is not None:
            current = {"config": to_dict(self.config), "fingerprint": fingerprint}
            fields = type(self.config).RESUME_FIELDS
            check_resume(self.resume_from, current, fields, allow_changes=self.config.resume_allow_changes)
        loop = TrainLoop(
            self.accelerator,
            dataloader,
            self.config,
            checkpoints_dir=self.checkpoints_dir,
            stateful=stateful,
            generators={"train": self.generator},
            epoch_setters=epoch_setters,
            fingerprint=fingerprint,
        )
        loop.resume(self.resume_from)
        return loop, MetricsFile(self.output_dir / "metrics.json", resumed_step=loop.resumed_step)


def start_run(config: LoopConfig, project: str) -> Run:
    """Validate ``config``, check that the output folder is writable, start the accelerator (:func:`make_accelerator`,
    tracker ``project``), lock the output folder against a second run (:mod:`training.run_lock`), seed the loop's
    generator per process (``seed + process index``) and find the checkpoint ``config.resume`` names."""
    config.validate()
    output_dir = check_writable_folder(config.output_dir, "--output-dir")  # now, not at the first checkpoint
    accelerator = make_accelerator(config, project)
    if accelerator.is_main_process:  # one run per output folder: a second one is refused here
        acquire_output_lock(output_dir)
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)
    checkpoints_dir = output_dir / "checkpoints"
    resume_from = resolve_resume(checkpoints_dir, config.resume)
    return Run(config, accelerator, generator, output_dir, checkpoints_dir, resume_from)


def step_logs(lr_scheduler: Any, grad_norm: float | None, **values: float) -> dict[str, float]:
    """The values logged at the end of an optimizer step: ``values``, the learning rate (of the first parameter
    group) and the gradient norm when it was clipped."""
    logs = values | {"lr": lr_scheduler.get_last_lr()[0]}
    return logs | ({} if grad_norm is None else {"grad_norm": grad_norm})


def make_accelerator(config: LoopConfig, project: str) -> Accelerator:
    """The run's ``Accelerator`` with its tracker started as ``project`` (logs under ``output_dir/logs``), and
    logging set up: INFO on the main process, warnings on the others."""
    output_dir = Path(config.output_dir)
    accelerator = launch.make_accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers(project, config={k: str(v) for k, v in to_dict(config).items()})
    return accelerator


def load_records(config: LoopConfig) -> tuple[ImageCaptionRecords, ImageCaptionRecords | None]:
    """``(train, held_out)`` records: ``dataset`` and ``validation_dataset``, or ``dataset`` split by
    ``validation_split`` (:func:`split_validation`); ``held_out`` is None when neither is given."""
    columns = {"image_column": config.image_column, "caption_column": config.caption_column}
    records = load_image_caption_records(config.dataset, **columns)
    if config.validation_split:
        return split_validation(records, config.validation_split, config.seed)
    if config.validation_dataset:
        return records, load_image_caption_records(config.validation_dataset, **columns)
    logger.info("no held-out images: pass --validation-dataset or --validation-split to evaluate during training")
    return records, None


def split_validation(
    records: ImageCaptionRecords, fraction: float, seed: int
) -> tuple[ImageCaptionRecords, ImageCaptionRecords]:
    """``(train, held_out)``: ``round(fraction * n)`` records (at least one) chosen by a permutation seeded by
    ``seed``, in their original order; the same records and seed always give the same split."""
    n = len(records)
    count = max(1, round(fraction * n))
    if count >= n:
        raise ConfigError(
            f"validation_split={fraction} holds out {count} of {n} images and leaves none to train on; lower it or "
            "pass --validation-dataset"
        )
    held = set(torch.randperm(n, generator=make_generator(seed, "validation-split"))[:count].tolist())
    train = [r for i, r in enumerate(records.records) if i not in held]
    held_out = [r for i, r in enumerate(records.records) if i in held]
    return dataclasses.replace(records, records=train), dataclasses.replace(records, records=held_out)


def make_train_dataloader(
    dataset: Any, config: LoopConfig, accelerator: Accelerator, collate_fn: Callable = collate
) -> tuple[DataLoader, BucketBatchSampler]:
    """Batches of one bucket each, reshuffled per epoch from ``config.seed``; full batches with several processes
    (accelerate drops a group of batches whose last one is short)."""
    batch_sampler = BucketBatchSampler(
        dataset.bucket_of_index, config.train_batch_size, seed=config.seed, drop_last=accelerator.num_processes > 1
    )
    dataloader = DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=config.dataloader_workers
    )
    return dataloader, batch_sampler


def optimizer_name(config: LoopConfig) -> str:
    """The optimizer a config asks for: ``config.optimizer``, or ``adamw8bit`` with the older ``--use-8bit-adam``."""
    return "adamw8bit" if config.use_8bit_adam else config.optimizer


def parse_optimizer_args(items: Sequence[str]) -> dict[str, Any]:
    """``--optimizer-args`` (``["weight_decay=0.01", "betas=(0.9,0.99)", "decouple=true"]``) as keyword arguments:
    ``true``/``false``/``none`` (any case) are bools and None, other values are Python literals (numbers, tuples,
    quoted strings) where they parse as one and strings otherwise.

    Raises:
        ConfigError: an item is not ``key=value`` with an identifier key, or a key is given twice.
    """
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep or not key.isidentifier():
            raise ConfigError(f"optimizer_args must be key=value items such as weight_decay=0.01; got {item!r}")
        if key in kwargs:
            raise ConfigError(f"optimizer_args gives {key} twice")
        words = {"true": True, "false": False, "none": None}
        if text.lower() in words:
            kwargs[key] = words[text.lower()]
            continue
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class of ``--optimizer NAME`` (:data:`OPTIMIZER_CLASSES`), imported now.

    Raises:
        ConfigError: its package is not installed; the message is the ``pip install`` that fixes it.
    """
    module, class_name, package = OPTIMIZER_CLASSES[name]
    try:
        return getattr(importlib.import_module(module), class_name)
    except ImportError:
        raise ConfigError(
            f"optimizer {name} needs the {package} package: pip install {package}, or pick another --optimizer"
        ) from None


def make_optimizer(params: Any, config: LoopConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names (:func:`optimizer_name`) over ``params`` (parameters or parameter groups) at
    ``config.learning_rate``, with ``--optimizer-args`` as keyword arguments. AdamW and 8-bit AdamW start from the
    ``adam_*`` settings; Adafactor runs at the given (scheduled) learning rate: ``relative_step``,
    ``scale_parameter`` and ``warmup_init`` are off. An error names the ``pip install`` of a missing package."""
    name = optimizer_name(config)
    cls = optimizer_class(name)
    kwargs = parse_optimizer_args(config.optimizer_args)
    if name in ("adamw", "adamw8bit"):
        adamw = {"betas": (config.adam_beta1, config.adam_beta2), "weight_decay": config.adam_weight_decay}
        kwargs = adamw | {"eps": config.adam_epsilon} | kwargs
    elif name == "adafactor":
        kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False} | kwargs
        if kwargs["relative_step"] or kwargs["warmup_init"]:
            # Adafactor then sets its own step size and ignores the learning rate that --lr-scheduler schedules.
            raise ConfigError("optimizer_args relative_step and warmup_init are not supported; drop them")
    elif name == "prodigy" and config.learning_rate < 0.1:
        logger.warning(
            "prodigy estimates the step size itself and --learning-rate %g scales it; 1.0 is the usual value",
            config.learning_rate,
        )
    try:
        return cls(params, lr=config.learning_rate, **kwargs)
    except TypeError as err:  # an unknown keyword of --optimizer-args
        raise ConfigError(f"optimizer_args do not fit optimizer {name}: {err}") from None


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: LoopConfig, accelerator: Accelerator) -> Any:
    """diffusers' ``get_scheduler(config.lr_scheduler)`` with the warm-up and length in optimizer steps (accelerate's
    prepared scheduler steps once per process, hence the factor)."""
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )


def evaluation_batches(dataset: ImageCaptionDataset, batch_size: int, limit: int) -> Iterator[dict[str, Any]]:
    """The first ``limit`` samples of ``dataset`` in order (epoch 0), collated ``batch_size`` at a time."""
    count = min(limit, len(dataset))
    for start in range(0, count, batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, count))])


@contextlib.contextmanager
def evaluation_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in evaluation mode for the block, then back in the mode it was in (for a measurement mid-run)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class MetricsFile:
    """``metrics.json`` of a run: a ``history`` of evaluations (step and values) and summary fields, rewritten
    atomically after each change. A resumed run keeps the history up to the step it resumed from."""

    def __init__(self, path: str | Path, resumed_step: int | None = None) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"history": []}
        if resumed_step is not None and self.path.is_file():
            old = json.loads(self.path.read_text(encoding="utf-8"))
            self.data["history"] = [entry for entry in old.get("history", []) if entry["step"] <= resumed_step]

    def add(self, step: int, values: Mapping[str, float]) -> None:
        """Append one evaluation and write the file."""
        self.data["history"].append({"step": step, **values})
        self.write()

    def update(self, **fields: Any) -> None:
        """Set summary fields and write the file."""
        self.data.update(fields)
        self.write()

    def write(self) -> Path:
        """Write the file (a temporary sibling renamed into place) and return its path."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
        return self.path


# --------------------------------------------------------------------------------------------------------------------
# The command line


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write that failed for want of space: ``OSError`` ENOSPC, or safetensors' error for it."""
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    # safetensors reports the OS error in its text: "No space left on device (os error 28)" or "code: 28, kind: ..."
    full = re.search(r"os error 28|code: 28|No space left", str(err)) is not None
    return type(err).__name__ == "SafetensorError" and full


def disk_full_error(output_dir: Path) -> UserError:
    """One line for a run stopped by a full disk: where, how much is free, about how much one more checkpoint needs
    (the newest one's size), and that the checkpoints written so far are intact."""
    free = shutil.disk_usage(output_dir).free if output_dir.exists() else 0
    checkpoints = sorted((output_dir / "checkpoints").glob("step-*"))
    needed = sum(f.stat().st_size for f in checkpoints[-1].rglob("*") if f.is_file()) if checkpoints else 0
    need = f"; a checkpoint needs about {needed / 2**20:.0f} MiB" if needed else ""
    return UserError(
        f"the disk of --output-dir {output_dir} is full ({free / 2**20:.0f} MiB free{need}); free some space and "
        "rerun with --resume latest: the checkpoints written before are intact"
    )


def run_command(config_cls: type[T], train: Callable[[T], Path], argv: list[str] | None, module: str, doc: str) -> int:
    """A training command's ``main``: parse the config (flags and/or ``--config FILE``; ``python -m module``, described
    by the first paragraph of the module's ``doc``), train, print the folder written. Bad input (a
    :class:`ldm.errors.UserError`: a config value, a dataset, a model folder) is one ``error:`` line and exit status 2
    (:func:`ldm.errors.run_reporting`); any other exception keeps its traceback."""
    prog = f"python -m {module}"

    def body() -> None:
        config = parse_config(config_cls, argv, prog=prog, description=doc.split("\n\n")[0])
        output_dir = Path(getattr(config, "output_dir", "."))
        try:
            folder = train(config)
        except Exception as err:
            if is_disk_full(err):
                raise disk_full_error(output_dir) from err
            raise
        finally:  # the output folder is free again for the next run, in this process or another
            release_output_lock(output_dir)
        if PartialState().is_main_process:  # under torchrun every process returns; one line is printed
            print(folder)

    return run_reporting(body, prog)
