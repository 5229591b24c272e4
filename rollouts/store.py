"""The rollout store: sampled latents, prompt embeddings, videos and an index, in a documented layout.

Layout (format version 1, see docs/formats.md):

    STORE/
      store.json                       format, version, settings that produced the samples, latent shape
      prompts.jsonl                    {"prompt_id": "p00000", "prompt": "..."} per line
      embeds/<prompt_id>.safetensors   prompt_embeds (L, D) [+ pooled (P,)] [+ mask (L,)]   -- once per prompt;
                                       pooled and mask for the model families that have them (pooled: ContentV,
                                       HunyuanVideo; mask: HunyuanVideo)
      embeds/negative.safetensors      the negative prompt's embeddings (when guidance > 1)
      samples/<prompt_id>/<sample_id>.safetensors
                                       latents (C, T, H, W) bf16 [+ frames (F, H, W, 3) uint8];
                                       metadata: sample_id, prompt_id, sample_index, seed, frame_indices
      videos/<sample_id>.mp4           decoded video (save_videos: true)
      manifest.parquet                 one row per sample (written when the rollout completes)
      scores/<scorer>.json             {"info": {...}, "weight": w, "scores": {sample_id: float or null}}

Every file is written atomically, and a sample file is written last for its sample, so "the sample file
exists" means "the sample is complete". Later stages read the store without loading the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from rlhf import io
from rlhf.errors import UserError
from rlhf.sampling import PromptEmbeds

FORMAT = "contentv-rlhf.rollout"
VERSION = 1
NEGATIVE = "negative"
MANIFEST_COLUMNS = ("sample_id", "prompt_id", "prompt", "sample_index", "seed", "latents", "video")


def sample_id(prompt_id: str, index: int) -> str:
    return f"{prompt_id}_s{index:03d}"


class RolloutStore:
    """Read (and, for the rollout stage, write) one store directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- paths -------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / "store.json"

    @property
    def prompts_path(self) -> Path:
        return self.root / "prompts.jsonl"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.parquet"

    def embeds_path(self, prompt_id: str) -> Path:
        return self.root / "embeds" / f"{prompt_id}.safetensors"

    def sample_path(self, sample: str) -> Path:
        return self.root / "samples" / sample.rsplit("_s", 1)[0] / f"{sample}.safetensors"

    def video_path(self, sample: str) -> Path:
        return self.root / "videos" / f"{sample}.mp4"

    # ---- metadata ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.meta_path.exists()

    def read_meta(self) -> dict[str, Any]:
        """store.json, checked for format and version."""
        if not self.root.is_dir():
            raise UserError(f"{self.root}: rollout store not found")
        try:
            meta = json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.meta_path}: missing; {self.root} is not a rollout store") from None
        except (OSError, ValueError) as err:
            raise UserError(f"{self.meta_path}: corrupt store metadata ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{self.meta_path}: not a contentv-rlhf rollout store (format {meta.get('format')!r})")
        if meta.get("version") != VERSION:
            raise UserError(f"{self.meta_path}: store format version {meta.get('version')} is not supported "
                            f"(this tool reads version {VERSION})")
        return meta

    @property
    def settings(self) -> dict[str, Any]:
        return self.read_meta()["settings"]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.read_meta()["latent_shape"])

    def read_prompts(self) -> dict[str, str]:
        """prompt_id -> prompt, in order."""
        try:
            lines = self.prompts_path.read_text(encoding="utf-8").splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
            return {r["prompt_id"]: r["prompt"] for r in records}
        except FileNotFoundError:
            raise UserError(f"{self.prompts_path}: missing from the rollout store") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{self.prompts_path}: corrupt prompt list ({err})") from None

    def write_header(self, settings: Mapping[str, Any], latent_shape: tuple[int, ...], prompts: Mapping[str, str]):
        io.write_json(self.meta_path, {
            "format": FORMAT, "version": VERSION, "settings": dict(settings), "latent_shape": list(latent_shape),
        })
        io.write_text(self.prompts_path, "".join(
            json.dumps({"prompt_id": pid, "prompt": text}, ensure_ascii=False) + "\n" for pid, text in prompts.items()
        ))

    # ---- tensors -----------------------------------------------------------------------------
    def write_embeds(self, prompt_id: str, embeds: PromptEmbeds) -> None:
        tensors = {"prompt_embeds": embeds.prompt_embeds[0].cpu()}
        if embeds.pooled is not None:
            tensors["pooled"] = embeds.pooled[0].cpu()
        if embeds.mask is not None:  # only a family whose transformer takes it: other stores are unchanged
            tensors["mask"] = embeds.mask[0].cpu()
        io.save_tensors(self.embeds_path(prompt_id), tensors)

    def load_embeds(self, prompt_id: str) -> PromptEmbeds:
        """One prompt's embeddings as a batch of one."""
        tensors = _load(self.embeds_path(prompt_id))
        pooled, mask = tensors.get("pooled"), tensors.get("mask")
        return PromptEmbeds(tensors["prompt_embeds"][None], None if pooled is None else pooled[None],
                            None if mask is None else mask[None])

    def write_sample(self, sample: str, latents: torch.Tensor, metadata: Mapping[str, Any],
                     frames: torch.Tensor | None = None) -> None:
        tensors = {"latents": latents.to(torch.bfloat16).cpu()}
        if frames is not None:
            tensors["frames"] = frames.cpu()
        io.save_tensors(self.sample_path(sample), tensors, {k: json.dumps(v) for k, v in metadata.items()})

    def sample_metadata(self, sample: str) -> dict[str, Any]:
        """A sample file's metadata, reading only its header (raises UserError if unreadable)."""
        path = self.sample_path(sample)
        try:
            with safe_open(str(path), framework="pt") as handle:
                if "latents" not in handle.keys():
                    raise UserError(f"{path}: corrupt sample file (no 'latents' tensor)")
                return {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{path}: corrupt sample file ({err}); delete it to regenerate the sample") from None

    def load_sample(self, sample: str) -> dict[str, torch.Tensor]:
        """{'latents': (C, T, H, W) bf16, optionally 'frames': (F, H, W, 3) uint8}."""
        return _load(self.sample_path(sample))

    def saved_frames(self, sample: str) -> tuple[torch.Tensor | None, list[int] | None]:
        """The decoded frames the sample file keeps, `(F, 3, H, W)` float in [0, 1], and the video frame index
        of each (metadata `frame_indices`); (None, None) when it keeps none, indices None if unrecorded."""
        tensors = self.load_sample(sample)
        if "frames" not in tensors:
            return None, None
        frames = tensors["frames"]
        indices = self.sample_metadata(sample).get("frame_indices")
        if not isinstance(indices, list) or len(indices) != frames.shape[0]:
            indices = None
        return frames.permute(0, 3, 1, 2).float() / 255.0, indices

    def load_video(self, sample: str) -> torch.Tensor | None:
        """Every frame of the sample's mp4 as `(T, 3, H, W)` float in [0, 1], or None without an mp4."""
        if not self.video_path(sample).exists():
            return None
        from rlhf.video import read_video

        return torch.from_numpy(read_video(self.video_path(sample))).permute(0, 3, 1, 2).float() / 255.0

    def load_frames(self, sample: str) -> torch.Tensor:
        """The frames kept for scoring as `(F, 3, H, W)` float in [0, 1] (the saved subset, else the mp4)."""
        tensors = self.load_sample(sample)
        if "frames" in tensors:
            frames = tensors["frames"]
        elif self.video_path(sample).exists():
            from rlhf.video import read_video

            frames = torch.from_numpy(read_video(self.video_path(sample)))
        else:
            raise UserError(f"{self.sample_path(sample)}: no decoded frames or video for this sample; rerun the "
                            "rollout with save_frames > 0 or save_videos: true")
        return frames.permute(0, 3, 1, 2).float() / 255.0  # (F, 3, H, W)

    # ---- scores ------------------------------------------------------------------------------
    @property
    def scores_dir(self) -> Path:
        return self.root / "scores"

    def score_path(self, name: str) -> Path:
        return self.scores_dir / f"{name}.json"

    def read_scores(self, name: str) -> dict[str, Any]:
        """`{"info": {...}, "scores": {sample_id: float | None}}` of one scorer ({} if not scored yet)."""
        path = self.score_path(name)
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            if not isinstance(data.get("scores"), dict):
                raise ValueError("no 'scores' mapping")
            return data
        except (OSError, ValueError, AttributeError) as err:
            raise UserError(f"{path}: corrupt score file ({err}); delete it to rescore") from None

    def write_scores(self, name: str, info: Mapping[str, Any], weight: float,
                     scores: Mapping[str, float | None]) -> None:
        io.write_json(self.score_path(name), {"info": dict(info), "weight": weight, "scores": dict(scores)})

    def scored_dimensions(self) -> list[str]:
        return sorted(p.stem for p in self.scores_dir.glob("*.json")) if self.scores_dir.is_dir() else []

    # ---- index -------------------------------------------------------------------------------
    def write_manifest(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=pa.schema([
            ("sample_id", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
            ("sample_index", pa.int32()), ("seed", pa.int64()), ("latents", pa.string()), ("video", pa.string()),
        ]))
        with io.atomic_path(self.manifest_path) as tmp:
            pq.write_table(table, tmp)

    def manifest(self) -> list[dict[str, Any]]:
        """The manifest rows (requires a completed rollout)."""
        import pyarrow.parquet as pq

        if not self.manifest_path.exists():
            self.read_meta()
            raise UserError(f"{self.manifest_path}: missing; the rollout into {self.root} has not completed "
                            "(rerun `contentv-rlhf rollout` with the same config to finish it)")
        try:
            return pq.read_table(self.manifest_path).to_pylist()
        except Exception as err:  # pyarrow raises several unrelated types for a damaged file
            raise UserError(f"{self.manifest_path}: corrupt manifest ({err})") from None


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: missing from the rollout store") from None
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: corrupt tensor file ({err})") from None
