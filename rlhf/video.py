"""Decoding latents to pixels and reading/writing mp4 files (H.264 via PyAV's bundled FFmpeg).

Every write goes to a temporary file in the destination folder and is renamed into place, so a crash
never leaves a truncated video under the final name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from rlhf.errors import UserError
from rlhf.io import atomic_path
from rlhf.options import VAE_TEMPORAL_FACTOR


def denormalize_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """Undo the Wan VAE's per-channel latent normalisation: `latents * std + mean` (B, C, T, H, W)."""
    channels = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1)
    return latents * std.to(latents) + mean.to(latents)


def latent_frame_of(frame: int) -> int:
    """The latent frame whose decoder pass outputs video frame `frame` (the Wan VAE: 1 frame, then 4 per latent)."""
    return 0 if frame == 0 else (frame - 1) // VAE_TEMPORAL_FACTOR + 1


def _decode_wan_chunk(decoder: torch.nn.Module, x: torch.Tensor, *cache, first_chunk: bool) -> tuple:
    """One latent frame through the causal decoder; the feature cache goes in and out explicitly, so the call
    is a pure function that gradient checkpointing can recompute."""
    cache = list(cache)
    out = decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first_chunk)
    return (out, *cache)


def decode_wan_frames(vae, latents: torch.Tensor, frames: Sequence[int], checkpoint: bool = False) -> torch.Tensor:
    """Differentiably decode video frames `frames` of normalised latents (B, C, t, h, w) with the Wan VAE ->
    (B, n, 3, H, W) in [0, 1].

    The Wan VAE is causal: the latent prefix up to the last requested frame's latent frame goes through the decoder
    one latent frame at a time, its feature cache carried along, as `vae.decode` does. With `checkpoint`, each latent
    frame's decoder pass is recomputed in the backward pass instead of keeping its activations.
    """
    import functools

    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

    needed = latent_frame_of(max(frames)) + 1
    vae_dtype = next(vae.parameters()).dtype
    z = denormalize_latents(latents[:, :, :needed].to(vae.device, vae_dtype), vae)  # (B, C, needed, h, w)
    x = vae.post_quant_conv(z)
    cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    chunks = []
    for i in range(needed):
        step = functools.partial(_decode_wan_chunk, vae.decoder, first_chunk=i == 0)
        if checkpoint and torch.is_grad_enabled():
            out, *cache = torch.utils.checkpoint.checkpoint(step, x[:, :, i:i + 1], *cache, use_reentrant=False)
        else:
            out, *cache = step(x[:, :, i:i + 1], *cache)
        chunks.append(out)  # (B, 3, 1 or 4, H, W)
    video = torch.cat(chunks, dim=2)  # (B, 3, T', H, W)
    if vae.config.patch_size is not None:
        video = unpatchify(video, patch_size=vae.config.patch_size)
    video = video.clamp(-1, 1)[:, :, list(frames)]  # (B, 3, n, H, W)
    return ((video.float() + 1) / 2).permute(0, 2, 1, 3, 4)  # (B, n, 3, H, W)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents `(B, C, t, h, w)` -> video `(B, 3, T, H, W)` in [-1, 1], in the VAE's dtype."""
    vae_dtype = next(vae.parameters()).dtype
    latents = denormalize_latents(latents.to(vae.device, vae_dtype), vae)
    return vae.decode(latents, return_dict=False)[0].clamp(-1, 1)


def to_scorer_frames(videos: torch.Tensor) -> torch.Tensor:
    """Decoded videos `(B, 3, T, H, W)` in [-1, 1] -> the frames scorers read, `(B, T, 3, H, W)` in [0, 1]."""
    return ((videos + 1) / 2).permute(0, 2, 1, 3, 4)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """One video `(3, T, H, W)` in [-1, 1] -> `(T, H, W, 3)` uint8."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 24, crf: int = 18) -> Path:
    """Write `(T, H, W, 3)` uint8 frames as an H.264 mp4 at `fps`, atomically."""
    import av

    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 (yuv420p) needs even frame sizes, got {frames.shape[2]}x{frames.shape[1]}")
    height, width = frames.shape[1:3]
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and size of a video file (frames counted by decoding)."""
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = sum(1 for _ in container.decode(stream))
            return VideoInfo(frames, float(stream.average_rate), stream.width, stream.height)
    except (av.error.FFmpegError, IndexError, OSError) as err:
        raise UserError(f"{path}: not a readable video ({err})") from None


def read_video(path: str | Path) -> np.ndarray:
    """Decode a video file to `(T, H, W, 3)` uint8 frames."""
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    except (av.error.FFmpegError, ValueError, OSError) as err:
        raise UserError(f"{path}: not a readable video ({err})") from None
