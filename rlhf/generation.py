"""Text-to-video generation from a loaded checkpoint: encode prompts once, denoise, decode.

`VideoGenerator` is what `generate`, `rollout` and `eval` share. It keeps the three phases apart so
callers can cache prompt embeddings (one encode per prompt, not per sample), free the text encoders before
sampling, and decode only what they need.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from rlhf import devices
from rlhf.base_model import check_adapter_base
from rlhf.compiling import CompileTimer, compile_blocks
from rlhf.errors import UserError
from rlhf.lora import load_adapter
from rlhf.models.loader import load_model
from rlhf.options import ModelOptions, SamplingOptions
from rlhf.progress import Progress
from rlhf.sampling import PromptEmbeds, denoise, initial_noise

logger = logging.getLogger(__name__)


class VideoGenerator:
    """A checkpoint of any model family ready to sample from, honouring the memory options of `ModelOptions`."""

    def __init__(self, options: ModelOptions, load_text_encoders: bool = True, load_vae: bool = True,
                 max_sequence_length: int | None = None):
        self.options = options
        if options.adapter:  # an adapter trained on another base fails now, not after minutes of loading
            check_adapter_base(options.adapter, options.model, family=options.family)
        self.device = devices.resolve_device(options.device)
        self.dtype = devices.parse_dtype(options.dtype)
        # With CPU offload every model lives on the CPU and visits the device only while it runs; with group
        # offload the transformer lives on the CPU and its blocks visit the device one at a time.
        home = torch.device("cpu") if options.cpu_offload or options.group_offload else self.device
        parts = load_model(
            options.model,
            family=options.family,
            dtype=self.dtype,
            device=home,
            vae_dtype=options.vae_dtype,
            load_vae=load_vae,
            load_text_encoders=load_text_encoders,
            max_sequence_length=max_sequence_length,
            quantize=options.quantize,
        )
        if options.group_offload:  # only the transformer stays on the CPU
            for part in (parts.vae, *(parts.prompt_encoder.text_encoders if parts.prompt_encoder else ())):
                if part is not None:
                    part.to(self.device)
        self._offloading = False  # group offloading is applied at the first sample, once adapters are attached
        self.family = parts.family
        self.schedule = parts.schedule
        self.transformer = parts.transformer
        self.vae = parts.vae
        self.prompt_encoder = parts.prompt_encoder
        if options.adapter:
            load_adapter(self.transformer, options.adapter, scale=options.adapter_scale)
            self.transformer.requires_grad_(False)
        self.compile_timer: CompileTimer | None = None
        if options.compile:  # once the adapter is attached: its layers are part of the compiled blocks
            compile_blocks(self.transformer)
            self.compile_timer = CompileTimer()
        if self.vae is not None:
            if options.vae_tiling:
                self.vae.enable_tiling()
            if options.vae_slicing:
                self.vae.enable_slicing()

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module) -> Iterator[None]:
        """Move `module` to the device for the duration of the block when CPU offload is on."""
        if not self.options.cpu_offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            devices.empty_cache(self.device)

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Prompt embeddings on the CPU (cache them; move with `.to(device, dtype)` when sampling)."""
        if self.prompt_encoder is None or not self.prompt_encoder.text_encoders:
            raise RuntimeError("text encoders are not loaded (or were freed); encode prompts first")
        encoders = self.prompt_encoder.text_encoders
        with contextlib.ExitStack() as stack:
            for encoder in encoders:
                stack.enter_context(self._on_device(encoder))
            return self.prompt_encoder.encode(prompts).to("cpu")

    def free_text_encoders(self) -> None:
        if self.prompt_encoder is not None:
            self.prompt_encoder.release()
            self.prompt_encoder = None

    @torch.no_grad()
    def sample_latents(
        self,
        cond: PromptEmbeds,
        uncond: PromptEmbeds | None,
        seeds: Sequence[int],
        sampling: SamplingOptions,
        progress: bool = True,
    ) -> torch.Tensor:
        """Denoise one video per seed; `cond` has one row per seed (or one row for all). float32, on CPU."""
        try:
            shape = self.family.latent_shape(sampling.frames, sampling.height, sampling.width, self.transformer.config)
        except ValueError as err:  # a size the options allow but this family's VAE and patch cannot take
            raise UserError(f"{self.options.model}: {err}") from None
        noise = initial_noise(shape, seeds).to(self.device)  # (B, C, T, H, W)
        batch = len(seeds)
        cond = cond.to(self.device, self.dtype).expand(batch)
        uncond = uncond.to(self.device, self.dtype) if uncond is not None else None
        sigmas = self.schedule.sigmas(sampling.steps)
        # A bar on a terminal, a log line every 30 s elsewhere: a redirected run is not silent for minutes.
        bar = Progress(total=sampling.steps, desc="denoise", unit="step", enabled=progress)
        if self.options.group_offload and not self._offloading:
            from rlhf.lowmem import enable_block_offload

            streamed = enable_block_offload(self.transformer, self.device)
            self._offloading = True
            logger.info("group offload: transformer blocks visit %s one at a time%s", self.device,
                        " (next block prefetched on a side stream)" if streamed else "")
        timer = self.compile_timer or contextlib.nullcontext()
        with self._on_device(self.transformer), bar, timer:
            latents = denoise(
                self.transformer,
                noise,
                sigmas,
                cond,
                uncond,
                guidance_scale=sampling.guidance,
                guidance_scale_2=sampling.guidance_2,
                batch_cfg=sampling.batch_cfg,
                num_train_timesteps=self.schedule.num_train_timesteps,
                on_step=lambda _: bar.update(),
            )
        if self.compile_timer is not None and (seconds := self.compile_timer.take()) > 0:
            logger.info("compile: %.1f s of this sampling spent compiling the transformer blocks", seconds)
        return latents.cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, t, h, w) -> float32 video (B, 3, T, H, W) in [-1, 1] on the CPU."""
        with self._on_device(self.vae):
            return self.family.decode(self.vae, latents).float().cpu()
