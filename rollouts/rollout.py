"""The rollout stage: K samples per prompt from the base model (optionally + a LoRA) into a rollout store.

Work is cut into units of `batch_size` consecutive samples in (prompt, sample index) order, so a unit may span
prompts: with K samples per prompt a batch larger than K still fills the device. A unit's samples are computed
together, and nothing about a unit depends on which process runs it or on what else is pending: the units are a
function of the prompt list, K and batch_size alone, noise comes from each sample's own seed, and embeddings are
computed one prompt at a time. So a resumed run and an N-process run write the same latents as one uninterrupted
process on the same device type.

Order of work in each process: check/create the store -> encode the missing prompt embeddings (then free
the text encoders) -> sample the pending units -> (rank 0) write the manifest.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.errors import UserError, quote
from rollouts.config import RolloutConfig
from rollouts.store import sample_id

logger = logging.getLogger("contentv-rlhf")


def sample_seed(base_seed: int, prompt: str, index: int) -> int:
    """A 63-bit seed from (base seed, prompt text, sample index): stable under reordering of prompts."""
    digest = hashlib.sha256(f"{base_seed}\x00{prompt}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def frame_indices(total: int, count: int, stride: int = 0) -> list[int]:
    """Video frames a store keeps for scoring, increasing: the `count` segment middles out of `total` (the
    frames `clip` and `aesthetic` read with num_frames = count) and, when `stride` > 0, the frame pairs
    `rewards.base.frame_pairs(total, count, stride)` (what `motion` reads with num_pairs = count)."""
    from rewards.base import frame_pairs, segment_middles

    if count <= 0:
        return []
    kept = set(segment_middles(total, count))
    if stride > 0:
        kept.update(t for pair in frame_pairs(total, count, stride) for t in pair)
    return sorted(kept)


FINGERPRINT_CHUNKS = 16  # per weight file: chunks read at evenly spaced offsets, the last one ending the file
FINGERPRINT_CHUNK_BYTES = 1 << 16  # 64 KiB each: at most 1 MiB per file, whatever the model's size


def _file_digest(path: Path, digest: Any) -> None:
    """Feed `digest` with what identifies one file: a JSON file's whole content; a weight file's size, its
    safetensors header (every tensor's name, dtype, shape and offsets) and FINGERPRINT_CHUNKS strided chunks of
    its bytes, so that weights rewritten in place at the same size change the fingerprint too."""
    if path.suffix == ".json":
        digest.update(path.read_bytes())
        return
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as file:
        if path.suffix == ".safetensors" and size >= 8:
            length = int.from_bytes(file.read(8), "little")
            digest.update(file.read(min(length, size - 8)))
        last = max(0, size - FINGERPRINT_CHUNK_BYTES)
        for i in range(FINGERPRINT_CHUNKS):
            file.seek(last * i // (FINGERPRINT_CHUNKS - 1))
            digest.update(file.read(FINGERPRINT_CHUNK_BYTES))


def _fingerprint(folder: Path) -> str:
    """Identifies a model or adapter folder by its files' names and contents (`_file_digest`)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        _file_digest(path, digest)
    return digest.hexdigest()[:16]


def store_settings(config: RolloutConfig, frames: int, device_type: str) -> dict[str, Any]:
    """Everything that determines the samples' content: a store is only resumed under equal settings."""
    model = Path(config.model).resolve()
    adapter = Path(config.adapter).resolve() if config.adapter else None
    return {
        "model": str(model),
        "model_fingerprint": _fingerprint(model / "transformer") if (model / "transformer").is_dir() else None,
        "adapter": str(adapter) if adapter else None,
        "adapter_fingerprint": _fingerprint(adapter) if adapter and adapter.is_dir() else None,
        "adapter_scale": config.adapter_scale,
        "device_type": device_type,
        "dtype": config.dtype,
        "vae_dtype": config.vae_dtype,
        "frames": frames,
        "height": config.height,
        "width": config.width,
        "steps": config.steps,
        "guidance": config.guidance,
        # A two-expert model's low-noise guidance; recorded only when set, so stores written before it resume.
        **({"guidance_2": config.guidance_2} if config.guidance_2 is not None else {}),
        "negative_prompt": config.negative_prompt,
        "max_sequence_length": config.max_sequence_length,
        "batch_cfg": config.batch_cfg,
        "samples_per_prompt": config.samples_per_prompt,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "save_videos": config.save_videos,
        "save_frames": config.save_frames,
        "save_frame_stride": config.save_frame_stride,
        "fps": config.fps,
        # Quantised weights change the samples; recorded only when used, so stores written before it resume.
        **({"quantize": config.quantize} if config.quantize != "none" else {}),
    }


def _check_existing(store, settings: dict[str, Any], prompts: dict[str, str], overwrite: bool) -> bool:
    """True if `store` already holds a compatible (possibly partial) rollout; raises on a mismatch. A folder that
    is not a rollout store was refused by `check_output` (rlhf/outputs.py)."""
    if not store.exists():
        return False
    meta = store.read_meta()
    differing = sorted(k for k in settings.keys() | meta["settings"].keys()
                       if settings.get(k) != meta["settings"].get(k))
    if not differing and store.read_prompts() != prompts:
        differing = ["prompts"]
    if differing and not overwrite:
        shown = ", ".join(f"{k} (store: {quote(meta['settings'].get(k))}, now: {quote(settings.get(k))})" if k != "prompts"
                          else "the prompt list" for k in differing[:3])
        raise UserError(f"{store.meta_path}: store was made with other settings: {shown}; "
                        "use another --out or pass --overwrite")
    return not differing


def rollout_output(config: RolloutConfig) -> Path:
    """The store folder, resolved, once it is known not to destroy an input or a folder of another kind."""
    from rlhf.outputs import ROLLOUT_STORE, check_output

    inputs = {"model": config.model, "adapter": config.adapter, "prompts": config.prompts}
    return check_output(config.out, field="field 'out'", kind=ROLLOUT_STORE, inputs=inputs,
                        overwrite=config.overwrite, resumable=True)


@dataclass(frozen=True)
class Sample:
    prompt_id: str
    prompt: str
    index: int  # the sample's index among its prompt's K

    @property
    def id(self) -> str:
        return sample_id(self.prompt_id, self.index)


@dataclass
class Unit:
    """Up to `batch_size` consecutive samples in (prompt, sample index) order, computed together."""

    samples: list[Sample]


def plan_samples(prompts: dict[str, str], samples_per_prompt: int) -> list[Sample]:
    """Every sample of the rollout, in store order: prompt by prompt, K samples each."""
    return [Sample(pid, text, index) for pid, text in prompts.items() for index in range(samples_per_prompt)]


def plan_units(prompts: dict[str, str], samples_per_prompt: int, batch_size: int) -> list[Unit]:
    samples = plan_samples(prompts, samples_per_prompt)
    return [Unit(samples[start:start + batch_size]) for start in range(0, len(samples), batch_size)]


def run_rollout(config: RolloutConfig) -> Path:
    """Sample the missing units of the store at `config.out`; returns the store path."""
    from rlhf import devices
    from rlhf.distributed import Processes
    from rlhf.io import remove_stale_temporaries
    from rlhf.progress import Progress
    from rlhf.prompts import load_prompts
    from rollouts.store import RolloutStore

    root = rollout_output(config)
    prompt_list = load_prompts(config.prompts)
    device = devices.resolve_device(config.device)
    processes = Processes.init(cpu=device.type == "cpu")
    if processes.is_main and prompt_list.report():
        logger.warning(prompt_list.report())
    prompts = dict(zip(prompt_list.ids, prompt_list.prompts, strict=True))

    from rlhf.models.family import family_for
    from rlhf.models.loader import check_model_dir, read_transformer_config

    frames = config.frames  # already 4k + 1 (SamplingOptions rounds it)
    store = RolloutStore(root)
    if config.adapter:  # an adapter trained on another base is refused before the store is touched
        from rlhf.base_model import check_adapter_base

        check_adapter_base(config.adapter, config.model, family=config.family)
    # The model is checked before the store is touched: a store.json written for a model that then fails to load
    # would refuse the corrected command (other settings) until --overwrite.
    check_model_dir(config.model, vae=config.save_videos or config.save_frames > 0, text_encoders=not store.exists(),
                    family=config.family)
    family = family_for(config.model, config.family)
    try:
        shape = family.latent_shape(frames, config.height, config.width,
                                    read_transformer_config(config.model, config.family))
    except ValueError as err:
        raise UserError(f"{config.model}: {err}") from None
    settings = store_settings(config, frames, device.type)
    if family.name != "contentv":  # recorded for the other families only, so stores written before it resume
        settings["family"] = family.name
    # 1. Check or create the store (every rank checks, so all fail alike; rank 0 writes).
    resuming = _check_existing(store, settings, prompts, config.overwrite)
    # Every rank has read the store before rank 0 replaces or writes it: a rank still checking would otherwise find
    # a header half written (store.json without prompts.jsonl) and refuse it.
    processes.barrier()
    if processes.is_main:
        if not resuming and store.root.exists():
            shutil.rmtree(store.root)
        if resuming:
            removed = remove_stale_temporaries(store.root)
            if removed:
                logger.info("removed %d unfinished temporary file(s) from an interrupted run", removed)
        else:
            store.write_header(settings, shape, prompts)
    processes.barrier()

    # 2. What is left to do for this rank.
    units = processes.shard(plan_units(prompts, config.samples_per_prompt, config.batch_size))
    pending = [u for u in units if not all(store.sample_path(s.id).exists() for s in u.samples)]
    for unit in units:  # a complete unit's files must be readable: fail now rather than in training
        if unit not in pending:
            for sample in unit.samples:
                store.sample_metadata(sample.id)
    total = sum(len(u.samples) for u in units)
    done = total - sum(len(u.samples) for u in pending)
    if processes.is_main:
        logger.info("rollout: %d prompts x %d samples -> %s (%d process(es); this one: %d of %d done)",
                    len(prompts), config.samples_per_prompt, store.root, processes.world_size, done, total)

    if pending:
        _sample_units(config, store, pending, prompts, frames, Progress(
            total=total, initial=done, desc=f"rollout[rank {processes.rank}]", unit="sample",
        ))
    processes.barrier()

    # 3. The manifest, once every rank has finished.
    if processes.is_main:
        rows = []
        for sample in plan_samples(prompts, config.samples_per_prompt):
            sid = sample.id
            meta = store.sample_metadata(sid)
            rows.append({
                "sample_id": sid, "prompt_id": sample.prompt_id, "prompt": sample.prompt,
                "sample_index": sample.index, "seed": meta["seed"],
                "latents": str(store.sample_path(sid).relative_to(store.root)),
                "video": str(store.video_path(sid).relative_to(store.root)) if config.save_videos else None,
            })
        store.write_manifest(rows)
        logger.info("rollout complete: %d samples in %s", len(rows), store.root)
    processes.barrier()
    return store.root


def _sample_units(config: RolloutConfig, store, pending: list[Unit], prompts: dict[str, str], frames: int,
                  progress) -> None:
    from rlhf.generation import VideoGenerator
    from rlhf.options import uses_guidance
    from rlhf.sampling import PromptEmbeds
    from rlhf.video import to_uint8_frames, write_mp4
    from rollouts.store import NEGATIVE

    guided = uses_guidance(config.guidance)
    needed = sorted({s.prompt_id for u in pending for s in u.samples}) + ([NEGATIVE] if guided else [])
    missing = [pid for pid in needed if not store.embeds_path(pid).exists()]
    decode = config.save_videos or config.save_frames > 0
    generator = VideoGenerator(config, load_text_encoders=bool(missing), load_vae=decode,
                               max_sequence_length=config.max_sequence_length)

    # One prompt per encoder call, so an embedding does not depend on which prompts share its batch.
    for pid in missing:
        text = config.negative_prompt if pid == NEGATIVE else prompts[pid]
        store.write_embeds(pid, generator.encode_prompts([text]))
    if missing and config.free_text_encoders:
        generator.free_text_encoders()
    uncond = store.load_embeds(NEGATIVE) if guided else None

    kept = frame_indices(frames, config.save_frames, config.save_frame_stride)
    with progress:
        for unit in pending:
            seeds = [sample_seed(config.seed, s.prompt, s.index) for s in unit.samples]
            embeds = {pid: store.load_embeds(pid) for pid in dict.fromkeys(s.prompt_id for s in unit.samples)}
            cond = PromptEmbeds.cat([embeds[s.prompt_id] for s in unit.samples])  # a row per sample
            latents = generator.sample_latents(cond, uncond, seeds, config, progress=False)
            videos = generator.decode(latents) if decode else None  # (B, 3, T, H, W)
            for row, (sample, seed) in enumerate(zip(unit.samples, seeds, strict=True)):
                sid = sample.id
                frames_u8 = None
                if videos is not None:
                    pixels = to_uint8_frames(videos[row])  # (T, H, W, 3)
                    if config.save_videos:
                        write_mp4(store.video_path(sid), pixels, fps=config.fps)
                    frames_u8 = torch.from_numpy(pixels[kept]) if kept else None
                # The sample file is written last: its presence marks the sample complete.
                store.write_sample(sid, latents[row], {
                    "sample_id": sid, "prompt_id": sample.prompt_id, "sample_index": sample.index, "seed": seed,
                    "frame_indices": kept,
                }, frames=frames_u8)
            progress.update(len(unit.samples))
