"""A CPU-friendly RMS norm for the Wan VAE (`AutoencoderKLWan`: ContentV's, Wan2.1's and Wan2.2's).

On the CPU, diffusers' `WanRMS_norm` is a third of the VAE's time: it normalises with `F.normalize(x, dim=1)`,
whose CPU kernel reduces across the channels of a channels-first tensor slowly (the shapes world's decode:
0.26 s -> 0.16 s per 4 clips on 2 cores with the sum of squares written out). `use_cpu_friendly_norms` gives
every such norm a forward that computes the same formula that way on CPU tensors and calls diffusers' own on any
other device, so GPU and NPU numerics stay exactly diffusers'. Only the class changes: parameters and state dict
keys are untouched.
"""

from __future__ import annotations

import functools

import torch


def use_cpu_friendly_norms(vae: torch.nn.Module) -> int:
    """Turn every `WanRMS_norm` of `vae` into a `CpuFriendlyRMSNorm`; returns how many."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    norms = [module for module in vae.modules() if type(module) is WanRMS_norm]
    for module in norms:
        module.__class__ = cpu_friendly_rms_norm()
    return len(norms)


def use_diffusers_norms(vae: torch.nn.Module) -> torch.nn.Module:
    """Undo `use_cpu_friendly_norms`: for work whose recorded numbers were made with diffusers' own norm and must
    reproduce bit for bit (the shapes world's pretraining log). Returns `vae`."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    for module in vae.modules():
        if type(module) is cpu_friendly_rms_norm():
            module.__class__ = WanRMS_norm
    return vae


@functools.cache
def cpu_friendly_rms_norm() -> type[torch.nn.Module]:
    """The subclass of diffusers' `WanRMS_norm` (built on first use: diffusers is imported lazily)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    class CpuFriendlyRMSNorm(WanRMS_norm):
        """`WanRMS_norm`, with x / max(||x||, 1e-12) written as a sum of squares on CPU tensors."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cpu":
                return super().forward(x)
            values = x.float()  # diffusers normalises half and 8-bit inputs in float32 too
            norm = values.pow(2).sum(1 if self.channel_first else -1, keepdim=True).sqrt().clamp_min(1e-12)
            return (values / norm).to(x.dtype) * self.scale * self.gamma + self.bias

    return CpuFriendlyRMSNorm
