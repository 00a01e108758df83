"""A model's recommended sampling settings, saved beside it as ``generation_defaults.json``.

Stable Diffusion's defaults (50 steps, guidance 7.5) suit Stable Diffusion; a small model trained here is best at
other settings (the shapes model: 25 DDIM steps at guidance 2, guided only in the noisier half of the schedule). The
folder records them, and
:class:`~pipelines.LatentDiffusionPipeline` and the generation commands use them for every argument the caller
leaves out. Stock diffusers ignores the file, so the folder still loads in ``StableDiffusionPipeline`` unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ldm.errors import UserError

FILENAME = "generation_defaults.json"
FULL_INTERVAL = (0.0, 1.0)


def check_guidance_interval(interval: object) -> tuple[float, float]:
    """``(lo, hi)`` with 0 <= lo < hi <= 1 as a tuple of floats.

    Raises:
        UserError: anything else, naming the fix.
    """
    if (
        not isinstance(interval, (tuple, list))
        or len(interval) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)
        or not 0 <= interval[0] < interval[1] <= 1
    ):
        raise UserError(
            "guidance_interval must be (lo, hi) with 0 <= lo < hi <= 1: guidance is applied at the timesteps t with "
            f"lo <= t / T <= hi ((0, 1): every step; (0.5, 1): the noisier half); got {interval!r}"
        )
    return float(interval[0]), float(interval[1])


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampling arguments a model recommends (Stable Diffusion's when the folder names none)."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    guidance_interval: tuple[float, float] = FULL_INTERVAL

    def __post_init__(self) -> None:
        if isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int):
            raise UserError(f"num_inference_steps must be an integer >= 1; got {self.num_inference_steps!r}")
        if self.num_inference_steps < 1:
            raise UserError(f"num_inference_steps must be an integer >= 1; got {self.num_inference_steps}")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
            raise UserError(f"guidance_scale must be a number >= 0; got {self.guidance_scale!r}")
        if not 0 <= self.guidance_scale < math.inf:
            raise UserError(f"guidance_scale must be a finite number >= 0; got {self.guidance_scale}")
        object.__setattr__(self, "guidance_interval", check_guidance_interval(self.guidance_interval))

    @classmethod
    def load(cls, folder: str | Path) -> GenerationDefaults:
        """The defaults saved in ``folder`` (Stable Diffusion's if it has no ``generation_defaults.json``).

        Raises:
            UserError: the file is not a JSON object of known keys with valid values (the message names the file).
        """
        path = Path(folder) / FILENAME
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not valid JSON ({err}); fix or delete it") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            unknown = sorted(set(data) - known) if isinstance(data, dict) else data
            raise UserError(f"{path}: unknown settings {unknown}; the known ones are {sorted(known)}")
        try:
            return cls(**data)
        except ValueError as err:
            raise UserError(f"{path}: {err}") from None

    def save(self, folder: str | Path) -> Path:
        """Write ``generation_defaults.json`` into ``folder``; returns its path."""
        path = Path(folder) / FILENAME
        data = asdict(self)
        if self.guidance_interval == FULL_INTERVAL:
            del data["guidance_interval"]  # the files of models that guide every step stay as they were
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path
