"""Train the shapes world's generator and rewards from a seed: `python -m rlhf.world.pretrain --out DIR`.

One command runs every stage in order; each reads what the earlier ones wrote under `--out`. A stage the log
records as done is skipped, and a stage interrupted mid-way resumes from its last saved state
(`DIR/resume/<stage>/`, safetensors + JSON), so the same command run again after a kill continues the run and
ends with the same weights (same `--threads`). `--stages` runs a subset, `--redo` repeats finished ones.

1. `components`: the ContentV layout around the learned parts: word-level CLIP and T5 tokenizers
   over the world's vocabulary (one token per word, short `model_max_length`), frozen random text
   encoders (they only have to keep prompts apart; the transformer learns to read them), the flow
   scheduler, `model_index.json`.
2. `vae`: `AutoencoderKLWan` (the tiny config) trained to reconstruct world clips of every combination.
   Decoding skips diffusers' final clamp during training (a clamped pixel gets no gradient and training
   stalls at the mean video), encoding uses the posterior mean plus a little noise, and object pixels weigh
   8x (colour is otherwise learned last). `vae_refine` continues it at a lower learning rate with an edge
   term. Its `latents_mean` / `latents_std` are then fitted on its own latents and written into its config.
3. `transformer`: `SD3Transformer3DModel` (4 layers, 4 heads x 32) trained by flow matching on the VAE's
   latents of clips of **every** combination (a real base model has seen every attribute value), with 10%
   empty prompts (the guidance branch), under **confused captions** (`caption_words`): each taught word
   (colour, size) names the clip's own value half the time and its `scene.CONFUSION` partner the other half.
   Direction words stay clean. The EMA weights are saved. Trained to the end of its schedule: the base is
   meant to be capable (it draws every value cleanly) and misaligned (it follows each taught word about half
   the time), not under-trained.
4. `clip`: an open_clip model (`WORLD_CLIP_CONFIG`) trained contrastively on single frames and their
   **clean** captions (train-split combinations only), saved as an open_clip `local-dir:` folder.
5. `aesthetic`: the LAION head type (`improved-mlp` layout) fitted on that CLIP's image embeddings to
   predict render quality: clean renders score high, blurred, noisy, fragmented or colour-bled ones low.

Every stage is deterministic for a seed (one CPU thread per stage keeps float sums in one order); its seeds
come from the world's "pretraining" seed namespace. Losses, wall time and the command go to
`DIR/pretrain_log.json`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlhf.world import scene

STAGES = ("components", "vae", "vae_refine", "transformer", "clip", "aesthetic")

# The world's text side: short sequences of whole words.
CLIP_LENGTH = 10
T5_LENGTH = 10
CLIP_WIDTHS = {"text_encoder": 8, "text_encoder_2": 16}
T5_CONFIG: dict[str, Any] = dict(d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64, feed_forward_proj="gated-gelu")
VAE_CONFIG: dict[str, Any] = dict(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=16, out_channels=16, patch_size=2, num_layers=4, num_attention_heads=4, attention_head_dim=32,
    joint_attention_dim=32, pooled_projection_dim=24,
)
SCHEDULER_SHIFT = 1.0
# The model folder's sampling_defaults.json (rlhf/model_defaults.py): what every command samples the world with
# unless a config or flag says otherwise (configs/world/rollout.yaml holds the same values). The empty negative
# prompt is the unconditional branch the transformer learned.
SAMPLING_DEFAULTS: dict[str, Any] = dict(frames=scene.FRAMES, height=scene.SIZE, width=scene.SIZE, steps=20,
                                         guidance=4.0, negative_prompt="", fps=8.0)
CLIP_ARCH = "world-clip"
WORLD_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


STAGE_SEED_INDEX = {"components": 0, "vae": 1, "transformer": 2, "clip": 3, "aesthetic": 4, "vae_refine": 5}


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one stage (`vae_refine2`, ... are later rounds of `vae_refine`): in the world's "pretraining"
    seed namespace, apart from every other use."""
    round_ = stage.removeprefix("vae_refine")
    if stage.startswith("vae_refine") and round_:
        return scene.seed("pretraining", seed * 100 + 10 + int(round_))
    return scene.seed("pretraining", seed * 100 + STAGE_SEED_INDEX[stage])


class Log:
    """`pretrain_log.json`: per stage its command, wall time, settings and loss curve (rewritten atomically)."""

    def __init__(self, path: Path, command: str):
        self.path, self.command = path, command

    def record(self, stage: str, entry: dict[str, Any]) -> None:
        # Re-read first: stages may run in parallel processes, each recording its own entry.
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        data[stage] = {"command": self.command, **entry}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.path)


class Resume:
    """A stage's training state under `DIR/resume/<stage>/`, saved atomically every `every` steps, so that the
    same command run again after an interruption continues where the last save left off and ends with the same
    weights as an uninterrupted run (same CPU threads).

    Everything is tensors in safetensors and plain JSON (model, optimiser moments, the torch generator's state,
    the Python RNG's state, the losses so far): nothing is unpickled. The settings that shape the run are stored
    too; a saved state made with other settings is refused rather than continued.
    """

    def __init__(self, out: Path, stage: str, settings: dict[str, Any], every: int = 200):
        self.folder, self.settings, self.every = out / "resume" / stage, settings, every

    def load(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, rng: random.Random | None,
             generator: torch.Generator) -> tuple[int, list[float]]:
        """Restore the saved state into the arguments; returns (next step, losses so far), (0, []) if none."""
        from safetensors.torch import load_file

        state_file = self.folder / "state.json"
        if not state_file.is_file():
            return 0, []
        state = json.loads(state_file.read_text())
        if state["settings"] != self.settings:
            raise SystemExit(f"{self.folder}: saved for other settings ({state['settings']}); delete it to start over")
        tensors = load_file(str(self.folder / "tensors.safetensors"))
        for name, module in modules.items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, field = key.split(".")
                moments.setdefault(int(index), {})[field] = value
        optimizer.load_state_dict({"state": moments, "param_groups": state["param_groups"]})
        generator.set_state(tensors["generator"])
        if rng is not None:
            version, internal, gauss = state["python_rng"]
            rng.setstate((version, tuple(internal), gauss))
        print(f"{self.folder}: resuming at step {state['step']}", flush=True)
        return state["step"], state["losses"]

    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
             rng: random.Random | None, generator: torch.Generator, losses: list[float]) -> None:
        """Save the state before `step` (call when `step % every == 0`); `rng`: the stage's Python RNG, if it
        draws from one."""
        from safetensors.torch import save_file

        tensors = {f"{name}.{k}": v.detach().clone().contiguous() for name, module in modules.items()
                   for k, v in module.state_dict().items()}
        optimizer_state = optimizer.state_dict()
        for index, fields in optimizer_state["state"].items():
            tensors.update({f"optimizer.{index}.{field}": value.clone() for field, value in fields.items()})
        tensors["generator"] = generator.get_state()
        staging = self.folder.with_name(f".{self.folder.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(tensors, str(staging / "tensors.safetensors"))
        python_rng = None
        if rng is not None:
            version, internal, gauss = rng.getstate()
            python_rng = [version, list(internal), gauss]
        (staging / "state.json").write_text(json.dumps({
            "step": step, "settings": self.settings, "losses": losses, "param_groups": optimizer_state["param_groups"],
            "python_rng": python_rng}) + "\n")
        old = self.folder.with_name(f".{self.folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.folder.exists():
            os.replace(self.folder, old)
        os.replace(staging, self.folder)
        shutil.rmtree(old, ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def cosine_lr(step: int, total: int, peak: float, warmup: int = 20) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------- components


def _chain(word: str) -> list[tuple[str, str]]:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, built = [], symbols[0]
    for symbol in symbols[1:]:
        merges.append((built, symbol))
        built += symbol
    return merges


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word: repeatedly merge the adjacent pair of lowest rank."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that build each word left to right into one CLIP token (`word</w>`).

    A merge from one word's chain can fire inside another word first (`r i` of "right" inside
    "triangle"); the chains of words that come out split are moved to the front until none does.
    """
    order = list(words)
    for _ in range(len(words)):
        merges = list(dict.fromkeys(pair for word in order for pair in _chain(word)))
        ranks = {pair: rank for rank, pair in enumerate(merges)}
        split = [word for word in order if len(_bpe(word, ranks)) > 1]
        if not split:
            return merges
        order = split + [word for word in order if word not in split]
    raise RuntimeError(f"no merge order makes these words single tokens: {split}")


def write_components(out: Path, seed: int, log: Log) -> None:
    """model_index.json, scheduler, word-level tokenizers and frozen random text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    from rlhf.model_defaults import write_model_defaults
    from rlhf.models import tiny

    started = time.time()
    model = out / "model"
    model.mkdir(parents=True, exist_ok=True)
    for folder in ("scheduler", "tokenizer", "tokenizer_2", "tokenizer_3", *CLIP_WIDTHS, "text_encoder_3"):
        shutil.rmtree(model / folder, ignore_errors=True)  # a rerun of the stage replaces them
    (model / "model_index.json").write_text(json.dumps(tiny.MODEL_INDEX, indent=2) + "\n")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT).save_pretrained(model / "scheduler")
    write_model_defaults(model, {**SAMPLING_DEFAULTS, "shift": SCHEDULER_SHIFT})
    words = scene.vocabulary()
    merges = word_merges(words)
    clip_vocab = tiny.write_clip_tokenizer(model / "tokenizer", merges, CLIP_LENGTH)
    tiny.write_clip_tokenizer(model / "tokenizer_2", merges, CLIP_LENGTH)
    for index, (folder, width) in enumerate(CLIP_WIDTHS.items()):
        torch.manual_seed(stage_seed(seed, "components") * 10 + index)
        tiny.random_clip_text_model(clip_vocab, width, CLIP_LENGTH).save_pretrained(model / folder)
    t5_vocab = tiny.write_t5_tokenizer(model / "tokenizer_3", words, T5_LENGTH)
    torch.manual_seed(stage_seed(seed, "components") * 10 + 2)
    T5EncoderModel(T5Config(vocab_size=t5_vocab, **T5_CONFIG)).eval().save_pretrained(model / "text_encoder_3")
    log.record("components", {"seconds": round(time.time() - started, 1), "vocabulary": words})


# ---------------------------------------------------------------------------------------------- VAE


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLWan._decode` without its final clamp (training needs gradients at saturated pixels)."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    chunks = []
    for index in range(z.shape[2]):
        vae._conv_idx = [0]
        chunks.append(vae.decoder(x[:, :, index:index + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=index == 0))
    vae.clear_cache()
    return torch.cat(chunks, 2)


def clip_batch(rng: random.Random, batch: int, frames: int = scene.FRAMES) -> tuple[torch.Tensor, list[str]]:
    """`(B, 3, frames, H, W)` in [-1, 1] of fresh clips of every combination, and their true prompts."""
    videos, prompts = [], []
    for _ in range(batch):
        _, clip, text = scene.sample_clip(rng, scene.COMBOS)
        videos.append(scene.to_model_range(clip[:frames]))
        prompts.append(text)
    return torch.stack(videos), prompts


def vae_loss(vae, video: torch.Tensor, generator: torch.Generator, edge_weight: float = 0.0,
             first_frame_weight: float = 3.0) -> torch.Tensor:
    """Object-weighted reconstruction loss (MSE + L1), `edge_weight` x the L1 error of the spatial gradients,
    plus a small pull of the latents towards 0."""
    mean = vae.encode(video).latent_dist.mean
    z = mean + 0.05 * torch.randn(mean.shape, generator=generator)
    recon = decode_unclamped(vae, z)
    weight = 1 + 7 * ((video.amax(1, keepdim=True) + 1) / 2)  # object pixels (value -> 1) weigh 8x
    weight[:, :, :1] *= first_frame_weight  # frame 0 is encoded alone by the causal VAE: learned last otherwise
    error = recon - video
    # Edges: the spatial gradients must match too (plain pixel losses let corners round off, and the three
    # shapes differ mostly at their corners).
    edges = sum((torch.diff(recon, dim=dim) - torch.diff(video, dim=dim)).abs().mean() for dim in (3, 4))
    return (weight * (error.pow(2) + error.abs())).mean() + edge_weight * edges + 1e-3 * mean.pow(2).mean()


def train_vae(out: Path, seed: int, steps: int, batch: int, lr: float, edge_weight: float,
              first_frame_weight: float, log: Log, stage: str = "vae") -> None:
    """Train the VAE: stage `vae` from its seeded init, stage `vae_refine` onwards from the saved VAE with its own
    seed and schedule (a second, lower learning-rate phase). Resumable (`Resume`)."""
    from diffusers import AutoencoderKLWan

    vae_seed = stage_seed(seed, stage)
    torch.manual_seed(vae_seed)
    rng = random.Random(vae_seed)
    generator = torch.Generator().manual_seed(vae_seed)
    folder = out / "model" / "vae"
    vae = AutoencoderKLWan(**VAE_CONFIG) if stage == "vae" else AutoencoderKLWan.from_pretrained(folder)
    vae.train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    settings = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "edge_weight": edge_weight,
                "first_frame_weight": first_frame_weight, "threads": torch.get_num_threads()}
    resume = Resume(out, stage, settings)
    first, losses = resume.load({"vae": vae}, optimizer, rng, generator)
    started = time.time()
    for step in range(first, steps):
        if step % resume.every == 0 and step > first:
            resume.save(step, {"vae": vae}, optimizer, rng, generator, losses)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        frames = 5 if step % 3 else scene.FRAMES  # mostly short clips (cheaper); every third the full 9
        video, _ = clip_batch(rng, batch, frames)
        loss = vae_loss(vae, video, generator, edge_weight, first_frame_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(round(loss.item(), 6))
        if step % 10 == 0 or step == steps - 1:
            print(f"{stage} step {step}/{steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
    vae.eval()
    mean, std = fit_latent_statistics(vae, rng)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(folder)
    log.record(stage, {**settings, "seconds": round(time.time() - started, 1), "losses": losses,
                       "latents_mean": mean, "latents_std": std})
    resume.clear()


@torch.no_grad()
def fit_latent_statistics(vae, rng: random.Random, clips: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the VAE's latents (posterior means) over fresh clips."""
    latents = torch.cat([vae.encode(clip_batch(rng, 8)[0]).latent_dist.mean for _ in range(clips // 8)])
    mean = latents.mean((0, 2, 3, 4))
    std = latents.std((0, 2, 3, 4)).clamp_min(1e-3)
    return [round(float(v), 5) for v in mean], [round(float(v), 5) for v in std]


# -------------------------------------------------------------------------------------- transformer


@torch.no_grad()
def latent_dataset(out: Path, seed: int, clips_per_prompt: int) -> dict[str, Any]:
    """Normalised VAE latents of clips of every combination and direction, and the embeddings of every prompt.

    Returns `latents (N, C, t, h, w)`, `values (N, 3)` (the clip's true colour, size and direction, as indices
    into `scene.COLOURS`, `scene.SIZES`, `scene.DIRECTIONS`), and `embeds`/`pooled` of `prompt_table()` with the
    empty prompt last (the unconditional branch).
    """
    from rlhf.models.loader import load_model
    from rlhf.models.wan_vae import use_diffusers_norms

    parts = load_model(out / "model", dtype="fp32", load_transformer=False)
    use_diffusers_norms(parts.vae)  # the shipped pretraining log was encoded with them: its losses reproduce exactly
    embeds = parts.prompt_encoder.encode(prompt_table() + [""])
    rng = random.Random(stage_seed(seed, "transformer"))
    latents, values = [], []
    batch: list[torch.Tensor] = []
    for (c, colour), (s, size), (d, direction) in product(enumerate(scene.COLOURS), enumerate(scene.SIZES),
                                                          enumerate(scene.DIRECTIONS)):
        for _ in range(clips_per_prompt):
            spec = scene.SceneSpec.sample(colour, size, direction, rng)
            batch.append(scene.to_model_range(scene.render(spec)))
            values.append([c, s, d])
            if len(batch) == 16:
                latents.append(parts.vae.encode(torch.stack(batch)).latent_dist.mean)
                batch = []
    if batch:
        latents.append(parts.vae.encode(torch.stack(batch)).latent_dist.mean)
    raw = torch.cat(latents)  # (N, C, t, h, w)
    channels = parts.vae.config.z_dim
    mean = torch.tensor(parts.vae.config.latents_mean).view(1, channels, 1, 1, 1)
    std = torch.tensor(parts.vae.config.latents_std).view(1, channels, 1, 1, 1)
    return {
        "latents": (raw - mean) / std,  # the inverse of rlhf.video.denormalize_latents
        "values": torch.tensor(values),
        "embeds": embeds.prompt_embeds,
        "pooled": embeds.pooled,
    }


def prompt_table() -> list[str]:
    """Every world prompt, at index `((colour * n_sizes + size) * n_directions + direction) * n_phrasings +
    phrasing` (`prompt_index`)."""
    return scene.prompts_for(scene.COMBOS, tuple(range(len(scene.PHRASINGS))))


def prompt_index(colour: torch.Tensor, size: torch.Tensor, direction: torch.Tensor,
                 phrasing: torch.Tensor) -> torch.Tensor:
    sizes, directions, phrasings = len(scene.SIZES), len(scene.DIRECTIONS), len(scene.PHRASINGS)
    return ((colour * sizes + size) * directions + direction) * phrasings + phrasing


def caption_words(values: torch.Tensor, attribute: str, rate: float, generator: torch.Generator) -> torch.Tensor:
    """The word each clip's caption uses for a taught `attribute`, given its true `values` (indices).

    With probability `rate` the word is the one that `scene.CONFUSION` maps to the true value (so that word
    draws its own value or this one), else the true value's own word. At convergence a word then draws its own
    value `1 - rate` of the time and its confusion partner `rate` of the time, for every combination it
    appears in: a misalignment of words, not of ability (every value is drawn, cleanly, under some word).
    """
    names = list(scene.COLOURS if attribute == "colour" else scene.SIZES)
    word_for_value = torch.tensor([names.index(next(w for w, v in scene.CONFUSION[attribute].items() if v == name))
                                   for name in names])
    confused = torch.rand(values.shape, generator=generator) < rate
    return torch.where(confused, word_for_value[values], values)


def flow_matching_loss(transformer, x0: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                       generator: torch.Generator, logit_mean: float = 0.0) -> torch.Tensor:
    """Rectified-flow loss: `x_t = (1 - s) x0 + s eps`, target `eps - x0`, s logit-normal(logit_mean, 1),
    shifted. A negative `logit_mean` weighs the low-noise steps, where the fine detail is drawn."""
    from rlhf.sampling import shift_sigmas

    batch = x0.shape[0]
    sigma = shift_sigmas(torch.sigmoid(logit_mean + torch.randn(batch, generator=generator)), SCHEDULER_SHIFT)
    eps = torch.randn(x0.shape, generator=generator)
    s = sigma.view(batch, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * eps
    velocity = transformer(hidden_states=noisy, encoder_hidden_states=text, pooled_projections=pooled,
                           timestep=sigma * 1000, return_dict=False)[0]
    return (velocity - (eps - x0)).pow(2).mean()


def train_transformer(out: Path, seed: int, steps: int, batch: int, clips_per_prompt: int, save_at: list[int],
                      log: Log | None, stop_after: int | None = None, lr: float = 5e-4, logit_mean: float = 0.0,
                      confusion_rate: float = scene.CONFUSION_RATE, save_every: int = 200) -> list[float]:
    """Flow matching on the world's latents under confused captions (`caption_words`); resumable (`Resume`).

    The EMA weights are saved at each of `save_at` (as `DIR/transformer-STEP`, the last one as the model). With
    `stop_after`, only that many steps run, nothing is saved, and the losses are returned: how a test checks
    that the recorded curve reproduces from the seed. The training state is saved every `save_every` steps.
    """
    from rlhf.models.transformer import SD3Transformer3DModel

    started = time.time()
    data = latent_dataset(out, seed, clips_per_prompt)
    encode_seconds = time.time() - started
    transformer_seed = stage_seed(seed, "transformer")
    torch.manual_seed(transformer_seed)
    generator = torch.Generator().manual_seed(transformer_seed)
    transformer = SD3Transformer3DModel(**TRANSFORMER_CONFIG)
    ema_model = SD3Transformer3DModel(**TRANSFORMER_CONFIG).requires_grad_(False)
    ema_model.load_state_dict(transformer.state_dict())
    ema = dict(ema_model.named_parameters())
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    settings = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "logit_mean": logit_mean,
                "clips_per_prompt": clips_per_prompt, "confusion_rate": confusion_rate,
                "threads": torch.get_num_threads()}
    resume = Resume(out, "transformer", settings, every=save_every)
    modules = {"transformer": transformer, "ema": ema_model}
    first, losses = (0, []) if stop_after is not None else \
        resume.load(modules, optimizer, None, generator)  # the transformer draws from `generator` only
    count, empty = data["latents"].shape[0], data["embeds"].shape[0] - 1
    values = data["values"]
    for step in range(first, steps if stop_after is None else stop_after):
        if stop_after is None and step % resume.every == 0 and step > first:
            resume.save(step, modules, optimizer, None, generator, losses)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=50)
        rows = torch.randint(count, (batch,), generator=generator)
        phrasing = torch.randint(len(scene.PHRASINGS), (batch,), generator=generator)
        colour = caption_words(values[rows, 0], "colour", confusion_rate, generator)
        size = caption_words(values[rows, 1], "size", confusion_rate, generator)
        prompt = prompt_index(colour, size, values[rows, 2], phrasing)
        prompt = torch.where(torch.rand(batch, generator=generator) < 0.1, empty, prompt)  # 10% unconditional
        loss = flow_matching_loss(transformer, data["latents"][rows], data["embeds"][prompt], data["pooled"][prompt],
                                  generator, logit_mean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for name, param in transformer.named_parameters():
                ema[name].lerp_(param.detach(), 1 - decay)
        losses.append(round(loss.item(), 6))
        if step % 50 == 0 or step == steps - 1:
            print(f"transformer step {step}/{steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
        if step + 1 in save_at and stop_after is None:
            folder = out / "model" / "transformer" if step + 1 == max(save_at) else out / f"transformer-{step + 1}"
            ema_model.save_pretrained(folder, safe_serialization=True)
    if log is not None and stop_after is None:
        log.record("transformer", {
            **settings, "clips": count, "encode_seconds": round(encode_seconds, 1),
            "seconds": round(time.time() - started, 1), "losses": losses, "saved_at": save_at})
        resume.clear()
    return losses


# ----------------------------------------------------------------------------------------- rewards

CLIP_PREPROCESS = {"size": WORLD_CLIP_CONFIG["vision_cfg"]["image_size"], "mode": "RGB",
                   "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                   "interpolation": "bicubic", "resize_mode": "shortest"}
QUALITY_WORDS = {"blur": "blurry", "noise": "noisy", "fragment": "broken", "bleed": "smeared"}


def world_clip_backbone(model=None):
    """The world's open_clip model (random unless given) wrapped with the scorers' own preprocessing."""
    import open_clip

    from rewards.clip_backbone import ClipBackbone

    if model is None:
        model = open_clip.model.CLIP(WORLD_CLIP_CONFIG["embed_dim"], WORLD_CLIP_CONFIG["vision_cfg"],
                                     WORLD_CLIP_CONFIG["text_cfg"], quick_gelu=WORLD_CLIP_CONFIG["quick_gelu"])
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=WORLD_CLIP_CONFIG["text_cfg"]["context_length"])
    return ClipBackbone(model, tokenizer, CLIP_PREPROCESS, source="world clip")


@functools.lru_cache(maxsize=1)  # the clip and aesthetic stages of one run share it
@torch.no_grad()
def reconstruction_pool(out: Path, seed: int, clips: int) -> list[tuple[scene.SceneSpec, np.ndarray, str]]:
    """Clips of training combinations passed through the world VAE (encode, decode): the best a generator can
    show the rewards, blur and colour bleed included. The rewards learn from frames of these beside the renders,
    so that a size and a colour are read through the VAE's blur as they are on a clean render."""
    from rlhf.models.loader import load_model
    from rlhf.models.wan_vae import use_diffusers_norms
    from rlhf.video import to_uint8_frames

    if clips <= 0:
        return []
    vae = use_diffusers_norms(load_model(out / "model", dtype="fp32", load_transformer=False,
                                         load_text_encoders=False).vae)  # as when the shipped rewards were trained
    rng = random.Random(seed * 100 + 99)  # a stream of its own, the same pool for both reward stages
    pool = []
    for start in range(0, clips, 16):
        items = [scene.sample_clip(rng) for _ in range(min(16, clips - start))]
        video = torch.stack([scene.to_model_range(frames) for _, frames, _ in items])
        decoded = vae.decode(vae.encode(video).latent_dist.mean).sample
        pool.extend((spec, to_uint8_frames(clip), text) for (spec, _, text), clip in zip(items, decoded, strict=True))
    return pool


def frame_batch(rng: random.Random, batch: int, degraded_share: float,
                pool: list[tuple[scene.SceneSpec, np.ndarray, str]] | None = None, pool_share: float = 0.0,
                ) -> tuple[torch.Tensor, list[str], list[tuple[str, str, str]], torch.Tensor]:
    """Single frames `(B, 3, H, W)` in [0, 1] of training combinations, their captions, (colour, size, spoilt
    how or "clean") and quality targets (8 clean, down to 2 at full severity). A `pool_share` of them come from
    `pool` (VAE reconstructions, quality 8 as drawn), the rest are rendered; a `degraded_share` of either is
    spoilt, and its caption says how ("a blurry red circle moving left")."""
    from rlhf.world.degrade import KINDS, degrade

    images, captions, combos, quality = [], [], [], []
    for _ in range(batch):
        if pool and rng.random() < pool_share:
            spec, frames, text = rng.choice(pool)
            clip = frames[[rng.randrange(scene.FRAMES)]]
        else:
            spec, clip, text = scene.sample_clip(rng, frames=(rng.randrange(scene.FRAMES),))  # CLIP sees one frame
        target, how = 8.0, "clean"
        if rng.random() < degraded_share:
            kind, severity = rng.choice(KINDS), rng.uniform(0.2, 1.0)
            clip = degrade(clip, kind, severity, rng)
            text = text.replace(f"a {spec.colour}", f"a {QUALITY_WORDS[kind]} {spec.colour}", 1) \
                if text.startswith(f"a {spec.colour}") else f"{QUALITY_WORDS[kind]} {text}"
            target, how = 8.0 - 6.0 * severity, kind
        images.append(torch.from_numpy(clip[0]).float().permute(2, 0, 1) / 255)
        captions.append(text)
        combos.append((spec.colour, spec.size, how))
        quality.append(target)
    return torch.stack(images), captions, combos, torch.tensor(quality)


def train_clip(out: Path, seed: int, steps: int, batch: int, log: Log, reconstructions: int = 0,
               positives: str = "colour-size") -> None:
    """Contrastive training on clean captions (the rewards never see the pretraining's confused words); every
    caption of the same colour and size counts as a positive (one frame cannot show the direction), and with
    `positives="colour-size"` a spoilt frame is a positive of its clean caption too, so that how well a disc is
    drawn does not decide what it reads as (quality stays readable through the probe below); with
    `"colour-size-spoiling"` frames spoilt differently are different classes.
    `reconstructions` VAE-reconstructed clips (`reconstruction_pool`) give a quarter of the frames.

    A linear probe on the image embedding regresses the render-quality target alongside (an auxiliary loss,
    discarded afterwards): the LAION head layout the `aesthetic` stage fits is linear, so quality has to be
    linearly readable from the embedding; contrastive training alone left it at R^2 0.17."""
    from safetensors.torch import save_file

    started = time.time()
    pool = reconstruction_pool(out, seed, reconstructions)
    torch.manual_seed(stage_seed(seed, "clip"))
    rng = random.Random(stage_seed(seed, "clip"))
    backbone = world_clip_backbone()
    model = backbone.model.train().requires_grad_(True)
    probe = torch.nn.Linear(WORLD_CLIP_CONFIG["embed_dim"], 1)
    optimizer = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=1e-3, weight_decay=0.05)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3)
        images, captions, combos, quality = frame_batch(rng, batch, degraded_share=0.4, pool=pool, pool_share=0.25)
        if positives == "colour-size":
            combos = [(colour, size, "") for colour, size, _ in combos]
        image_features = model.encode_image(backbone.preprocess(images), normalize=True)
        text_features = model.encode_text(backbone.tokenizer(captions), normalize=True)
        logits = model.logit_scale.exp() * image_features @ text_features.T  # (B, B)
        same = torch.tensor([[a == b for b in combos] for a in combos], dtype=torch.float32)
        targets = same / same.sum(1, keepdim=True)
        contrastive = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        loss = contrastive + F.mse_loss(probe(image_features).squeeze(1), (quality - 5) / 3)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(round(loss.item(), 6))
        if step % 50 == 0 or step == steps - 1:
            print(f"clip step {step}/{steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
    folder = out / "rewards" / "clip"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": WORLD_CLIP_CONFIG, "preprocess_cfg": CLIP_PREPROCESS}, indent=1) + "\n")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    log.record("clip", {"steps": steps, "batch": batch, "reconstructions": reconstructions, "positives": positives,
                        "seconds": round(time.time() - started, 1), "losses": losses})


def train_aesthetic(out: Path, seed: int, steps: int, log: Log, reconstructions: int = 0) -> None:
    """The `improved-mlp` head (its layer layout, smaller widths) regressed on the quality targets of clean
    and spoilt frames, from the world CLIP's normalised image embeddings; with `reconstructions`, a quarter of
    the frames are VAE reconstructions (quality 8: what the VAE draws is what a perfect generator would)."""
    from rewards.clip_backbone import load_clip

    started = time.time()
    pool = reconstruction_pool(out, seed, reconstructions)
    torch.manual_seed(stage_seed(seed, "aesthetic"))
    rng = random.Random(stage_seed(seed, "aesthetic"))
    backbone = load_clip(CLIP_ARCH, f"local-dir:{out / 'rewards' / 'clip'}")
    width = backbone.embed_dim
    head = torch.nn.Sequential(torch.nn.Linear(width, 64), torch.nn.Dropout(0.2), torch.nn.Linear(64, 32),
                               torch.nn.Dropout(0.2), torch.nn.Linear(32, 16), torch.nn.Dropout(0.1),
                               torch.nn.Linear(16, 8), torch.nn.Linear(8, 1))
    with torch.no_grad():
        head[-1].bias.fill_(5.0)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        images, _, _, quality = frame_batch(rng, 128, degraded_share=0.6, pool=pool, pool_share=0.25)
        with torch.no_grad():
            embeddings = backbone.encode_images(images)
        loss = F.mse_loss(head(embeddings).squeeze(1), quality)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(loss.item(), 6))
        if step % 50 == 0 or step == steps - 1:
            print(f"aesthetic step {step}/{steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
    state = {f"layers.{k}": v.detach().clone() for k, v in head.state_dict().items()}
    torch.save(state, out / "rewards" / "aesthetic_head.pth")
    log.record("aesthetic", {"steps": steps, "reconstructions": reconstructions,
                             "seconds": round(time.time() - started, 1), "losses": losses})


# ---------------------------------------------------------------------------------------------- CLI


def copy_vae(source: Path, out: Path, log: Log) -> None:
    """The `vae` stage with `--vae-from`: a trained VAE copied in (weights, config and its latent statistics)."""
    import hashlib

    if not (source / "config.json").is_file():
        raise SystemExit(f"--vae-from {source}: not an AutoencoderKLWan folder (no config.json)")
    folder = out / "model" / "vae"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder)
    digests = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}
    log.record("vae", {"copied_from": str(source), "sha256": digests})


def refine_rounds(rounds: int) -> list[str]:
    """The log names of the vae_refine rounds: vae_refine, vae_refine2, ..."""
    return ["vae_refine" if r == 1 else f"vae_refine{r}" for r in range(1, rounds + 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.world.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="Output folder: model/ (ContentV layout), rewards/, log.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every stage.")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"Comma-separated subset of {', '.join(STAGES)}.")
    parser.add_argument("--redo", action="store_true",
                        help="Run the listed stages again even if the log records them as done.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps losses bit-reproducible).")
    parser.add_argument("--vae-from", default=None,
                        help="Use this trained AutoencoderKLWan folder as the world VAE instead of training one (the "
                             "vae and vae_refine stages then copy it and record its digest).")
    parser.add_argument("--vae-steps", type=int, default=900, help="VAE optimiser steps.")
    parser.add_argument("--vae-batch", type=int, default=4, help="Clips per VAE step.")
    parser.add_argument("--vae-lr", type=float, default=2e-3, help="Peak VAE learning rate (cosine schedule).")
    parser.add_argument("--vae-edge-weight", type=float, default=0.0,
                        help="Weight of the spatial-gradient (edge) term of the VAE loss.")
    parser.add_argument("--vae-first-frame-weight", type=float, default=3.0,
                        help="Extra weight of frame 0 in the VAE loss (the causal VAE encodes it alone).")
    parser.add_argument("--vae-refine-steps", type=int, default=900,
                        help="Steps of each round of the vae_refine stage (continues the saved VAE on its own schedule).")
    parser.add_argument("--vae-refine-rounds", type=int, default=2,
                        help="Rounds of vae_refine, each a fresh schedule (logged as vae_refine, vae_refine2, ...).")
    parser.add_argument("--vae-refine-lr", type=float, default=1e-3, help="Peak learning rate of vae_refine.")
    parser.add_argument("--vae-refine-edge-weight", type=float, default=2.0,
                        help="Edge-term weight of vae_refine (sharper edges: the oracle's cleanliness reads them).")
    parser.add_argument("--transformer-steps", type=int, default=3000, help="Transformer optimiser steps.")
    parser.add_argument("--transformer-batch", type=int, default=32, help="Latents per transformer step.")
    parser.add_argument("--transformer-lr", type=float, default=5e-4, help="Peak transformer learning rate (cosine).")
    parser.add_argument("--transformer-logit-mean", type=float, default=0.0,
                        help="Mean of the logit-normal noise levels the transformer trains on (negative: low noise).")
    parser.add_argument("--confusion-rate", type=float, default=scene.CONFUSION_RATE,
                        help="Probability that a pretraining caption names a taught attribute with the word whose "
                             "confusion partner (scene.CONFUSION) the clip shows.")
    parser.add_argument("--clips-per-prompt", type=int, default=40,
                        help="Clips per (colour, size, direction) encoded for the transformer.")
    parser.add_argument("--save-at", default="", help="Extra transformer steps at which EMA snapshots are saved "
                        "(comma-separated); the last step is the shipped model.")
    parser.add_argument("--clip-steps", type=int, default=600, help="CLIP optimiser steps.")
    parser.add_argument("--clip-batch", type=int, default=128, help="Frames per CLIP step.")
    parser.add_argument("--aesthetic-steps", type=int, default=300, help="Aesthetic-head optimiser steps.")
    parser.add_argument("--reward-reconstructions", type=int, default=1024,
                        help="VAE-reconstructed clips (of training combinations) the CLIP and aesthetic stages draw "
                             "a quarter of their frames from (0: renders only).")
    parser.add_argument("--clip-positives", choices=("colour-size-spoiling", "colour-size"), default="colour-size",
                        help="Which captions count as the same for the contrastive loss: also by how the frame is "
                             "spoilt, or by colour and size only.")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; expected some of {', '.join(STAGES)}")
    if not 0 <= args.confusion_rate <= 1:
        parser.error(f"--confusion-rate: expected a probability in [0, 1], got {args.confusion_rate}")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny weights decaying towards 0 otherwise hit slow denormal arithmetic
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m rlhf.world.pretrain", *(argv if argv is not None else sys.argv[1:])])
    log = Log(out / "pretrain_log.json", command)
    runners: dict[str, Callable[[], None]] = {
        "components": lambda: write_components(out, args.seed, log),
        "vae": lambda: train_vae(out, args.seed, args.vae_steps, args.vae_batch, args.vae_lr, args.vae_edge_weight,
                                 args.vae_first_frame_weight, log),
        "vae_refine": lambda: [train_vae(out, args.seed, args.vae_refine_steps, args.vae_batch, args.vae_refine_lr,
                                         args.vae_refine_edge_weight, args.vae_first_frame_weight, log, stage=name)
                               for name in refine_rounds(args.vae_refine_rounds)
                               if args.redo or name not in json.loads(log.path.read_text())],
        "transformer": lambda: train_transformer(
            out, args.seed, args.transformer_steps, args.transformer_batch, args.clips_per_prompt,
            sorted({int(v) for v in args.save_at.split(",") if v.strip()} | {args.transformer_steps}), log,
            lr=args.transformer_lr, logit_mean=args.transformer_logit_mean, confusion_rate=args.confusion_rate),
        "clip": lambda: train_clip(out, args.seed, args.clip_steps, args.clip_batch, log,
                                   args.reward_reconstructions, args.clip_positives),
        "aesthetic": lambda: train_aesthetic(out, args.seed, args.aesthetic_steps, log, args.reward_reconstructions),
    }
    if args.vae_from:
        runners["vae"] = lambda: copy_vae(Path(args.vae_from), out, log)
        runners["vae_refine"] = lambda: None
    done = json.loads(log.path.read_text()) if log.path.is_file() else {}

    def finished(stage: str) -> bool:
        if stage == "vae_refine":
            return bool(args.vae_from) or all(name in done for name in refine_rounds(args.vae_refine_rounds))
        return stage in done

    for stage in stages:
        if finished(stage) and not args.redo:  # the same command after an interruption skips what is finished
            print(f"{stage}: done ({log.path}); --redo runs it again", flush=True)
            continue
        runners[stage]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
