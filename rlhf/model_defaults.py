"""Per-model sampling defaults: `MODEL_DIR/sampling_defaults.json`, beside `model_index.json`.

A model folder may say which sizes and settings it was made for (the shapes world: 9 frames of 64x64, 20
steps; ContentV-8B: 125 frames of 432x768, 50 steps). Every command that samples takes its sampling defaults
from that file, then the `--config` YAML, then the flags: file < config < flags. A folder without the file
gets its model family's defaults (`ModelFamily.sampling_defaults`, docs/models.md): for ContentV-8B these are
the defaults of `rlhf.options.SamplingOptions` / `VideoOptions`.

Every field is optional (an absent one keeps ContentV's default); docs/formats.md documents them:

    {"frames": 9, "height": 64, "width": 64, "steps": 20, "guidance": 4.0, "shift": 1.0, "fps": 8,
     "negative_prompt": ""}

`shift` states the scheduler's time shift for the reader; the sampler reads it from
`scheduler/scheduler_config.json`, and a file whose `shift` differs from that is refused (one source of truth).
Bad JSON, an unknown or ill-typed field, NaN, or a value out of range exits with status 2 and one line naming the
file and the field. Only the standard library and the config machinery are imported (`--help` stays instant).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError, config_from_dict, option
from rlhf.errors import UserError, one_line

FILENAME = "sampling_defaults.json"
# The fields that are sampling options of the commands (shift is the scheduler's, checked against it).
OPTION_FIELDS = ("frames", "height", "width", "steps", "guidance", "negative_prompt", "fps")
# Sampling options only some families' folders set (Wan2.2 A14B: its low-noise expert's guidance).
FAMILY_OPTION_FIELDS = ("guidance_2",)


@dataclass
class ModelDefaults:
    """The fields of `sampling_defaults.json`; None = not given (ContentV's default applies)."""

    frames: int | None = option(None, "Frames of a video (4k + 1).")
    height: int | None = option(None, "Frame height in pixels (a multiple of 16).")
    width: int | None = option(None, "Frame width in pixels (a multiple of 16).")
    steps: int | None = option(None, "Sampling (Euler) steps.")
    guidance: float | None = option(None, "Classifier-free guidance scale.")
    guidance_2: float | None = option(None, "Guidance scale of a two-expert model's low-noise expert (Wan2.2 A14B).")
    shift: float | None = option(None, "The scheduler's time shift (must equal scheduler/scheduler_config.json's).")
    fps: float | None = option(None, "Frame rate of written mp4 files.")
    negative_prompt: str | None = option(None, "Negative prompt of the unconditional branch.")

    def __post_init__(self) -> None:
        from rlhf.options import VideoOptions, round_frames

        given = self.options()
        if "frames" in given and given["frames"] >= 1 and round_frames(given["frames"]) != given["frames"]:
            raise ConfigError("frames", f"must be of the form 4k + 1, got {given['frames']}")
        VideoOptions(**given)  # the commands' own range checks (ConfigError names the field)
        if self.shift is not None and not (math.isfinite(self.shift) and self.shift > 0):
            raise ConfigError("shift", f"must be a positive number, got {self.shift}")

    def options(self) -> dict[str, Any]:
        """The sampling options the file sets (field -> value), shift excluded."""
        return {name: getattr(self, name) for name in (*OPTION_FIELDS, *FAMILY_OPTION_FIELDS)
                if getattr(self, name) is not None}


def read_model_defaults(model_dir: str | Path) -> tuple[str, dict[str, Any]] | None:
    """The sampling defaults of `model_dir` as (file path, {option: value}), or None without a file.

    A folder that does not exist (or has no file) gives None: the model loader reports a missing model itself.

    Raises:
        UserError: unreadable or invalid JSON, an unknown, ill-typed, non-finite or out-of-range field, or a
            `shift` that differs from the scheduler's; the message names the file and the field.
    """
    path = Path(model_dir) / FILENAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))  # NaN / Infinity parse; the field check refuses them
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path}: not a readable JSON file ({one_line(err)})") from None
    defaults = config_from_dict(ModelDefaults, data, source=str(path))
    if defaults.shift is not None:
        scheduler = _scheduler_shift(Path(model_dir))
        if scheduler is not None and scheduler != defaults.shift:
            raise UserError(f"{path}: field 'shift' is {defaults.shift:g} but scheduler/scheduler_config.json says "
                            f"{scheduler:g} (the sampler uses the scheduler's)")
    return str(path), defaults.options()


def defaults_for(cls: type, data: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The model-file defaults of the fields of config class `cls` not set in `data` (its YAML and flags merged),
    for the model folder `data["model"]`; None when there is none. Used by `rlhf.config` (`model_defaults` hook)."""
    model = data.get("model")
    if not isinstance(model, (str, Path)) or not str(model).strip():
        return None  # no model, or an ill-typed one: building the config reports it
    found = read_model_defaults(model) or family_defaults(model, data.get("family"))
    if found is None:
        return None
    path, values = found
    names = {f.name for f in fields(cls)}
    return path, {name: value for name, value in values.items() if name in names and name not in data}


def family_defaults(model_dir: str | Path, family: Any = None) -> tuple[str, dict[str, Any]] | None:
    """The sampling defaults of the model family of `model_dir` (`ModelFamily.sampling_defaults`) for a folder
    without sampling_defaults.json, as (where they come from, {option: value}). None for ContentV, whose defaults
    are the options' own, and for a folder whose family cannot be read (the model loader reports it)."""
    from rlhf.models.family import family_for

    try:
        model_family = family_for(model_dir, family if isinstance(family, str) else None)
    except UserError:
        return None
    if model_family.name == "contentv":
        return None
    return f"the {model_family.name} family's defaults (docs/models.md)", dict(model_family.sampling_defaults)


def write_model_defaults(model_dir: str | Path, values: Mapping[str, Any]) -> Path:
    """Write `values` (fields of ModelDefaults, checked) as `model_dir/sampling_defaults.json`."""
    from rlhf.io import write_json

    config_from_dict(ModelDefaults, values, source=FILENAME)
    return write_json(Path(model_dir) / FILENAME, dict(values))


def _scheduler_shift(model_dir: Path) -> float | None:
    try:
        shift = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text()).get("shift", 1.0)
    except (OSError, ValueError, AttributeError):
        return None  # the loader reports a missing or broken scheduler config
    return float(shift) if isinstance(shift, (int, float)) else None
