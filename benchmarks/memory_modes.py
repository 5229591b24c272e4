"""Memory modes of the frozen transformer (`quantize`, `group_offload`): what a Flow-DPO step needs per mode on
ContentV-8B, Wan2.1-T2V-1.3B / 14B and HunyuanVideo, and what the modes cost and save, measured on the CPU.

Part 1, arithmetic (no weights: each released transformer's shape built on the meta device from its config, as
benchmarks/full_size_step.py builds ContentV-8B; `--models` picks them): for one Flow-DPO step (one pair: winner
and loser in one policy forward with gradients + one reference forward without) at the model's video size
(ContentV: --frames x --height x --width; Wan2.1-1.3B: 81 x 480x832; Wan2.1-14B: 81 x 720x1280 and 480x832;
HunyuanVideo: 129 x 720x1280 and 544x960), the exact bytes of
- weights: every parameter, the blocks' linear weights (those `quantize` picks, rlhf.lowmem.block_linears) in the
  mode's storage (data + scales, counted by quantising a CPU tensor of each distinct shape with the same torchao
  call `quantize` uses);
- LoRA (fp32, the family's target modules), its gradients, AdamW's two moments (fp32);
- checkpointed activations: the tensors a gradient-checkpointed policy forward keeps for the backward pass (every
  block's inputs, plus what autograd saves outside the blocks: embedders, output head, loss), recorded from the
  real `dpo_step` on the meta model, which calls the transformer through its family (`rlhf.models.family`);
- the backward working set of one block (the largest kind: HunyuanVideo has dual- and single-stream blocks):
  what its recomputed forward saves (attention counted as flash / memory-efficient SDPA keeps it: q, k, v,
  output and the log-sum-exp, not the Tq x Tk scores), plus, for int8 / float8, the block's dequantised weights
  that the matmuls save.
Their sum is compared with 24, 48 and 80 GB cards (each taken as that many GiB, less a 1.5 GiB reserve for the
CUDA context and allocator fragmentation). HunyuanVideo goes through its family when one is registered; until
then its transformer is called as diffusers' HunyuanVideoPipeline calls it (encoder_attention_mask, pooled CLIP
projection, embedded guidance 6.0) and LoRA adapts the attention projections of both block kinds. The same
arithmetic for the mid-size CPU model is printed beside its measured peak tensor bytes.
Group offloading is for sampling only (README "Using the real ContentV-8B"): for generate the table gives the
weight bytes resident on the device with and without it.

Part 2, measured on the CPU (the modes one after another, the peak RSS reset before each) on a mid-size model built in code (random weights,
--mid-layers x --mid-heads x 64): peak RSS, wall and CPU time of one generate (--mid-steps Euler steps with CFG +
decode with the shapes world's VAE) and of one Flow-DPO optimiser step (after a warm-up step), the step's peak
tensor bytes (torch profiler), and the quality cost against the unquantised model: the PSNR of the decoded
frames, and the cosine between the LoRA gradients of the same DPO step. The same quality figures on the shipped
shapes-world model (trained weights) come from tests/test_lowmem.py's functions.

    python benchmarks/memory_modes.py [--record]
    python benchmarks/memory_modes.py --only arithmetic          # seconds; no CPU timing
    python benchmarks/memory_modes.py --only arithmetic --models all     # every family (a few minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import record  # noqa: E402

MODES = ("none", "int8_weight_only", "float8_weight_only", "nf4")
GIB = 2**30
CARDS_GB = (24, 48, 80)  # one consumer card, one workstation card, one A100 / H100
RESERVE_BYTES = int(1.5 * GIB)
TEXT_TOKENS, JOINT_DIM, POOLED_DIM = 77 + 256, 4096, 2048


# ---- shared pieces -------------------------------------------------------------------------------------------
def build_transformer(layers: int, heads: int, head_dim: int, device: str, dtype: torch.dtype, seed: int = 0):
    """ContentV's transformer class at the given size, built in `dtype` on `device` (random N(0, 0.02) weights)."""
    from rlhf.models.transformer import SD3Transformer3DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no fp32 copy of the weights
    try:
        with torch.device(device):
            model = SD3Transformer3DModel(num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim)
    finally:
        torch.set_default_dtype(previous)
    if device != "meta":
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(std=0.02)
    return model.requires_grad_(False)


def dpo_batch(shape: tuple[int, ...], text_tokens: int, text_dim: int = JOINT_DIM, pooled_dim: int = POOLED_DIM,
              token_mask: bool = False, seed: int = 0):
    """One pair of random latents with random text (`pooled_dim` 0: a family without a pooled embedding;
    `token_mask`: with the prompt's token mask, all tokens kept, for a transformer that takes it)."""
    from dpo.data import PairBatch
    from rlhf.sampling import PromptEmbeds

    g = torch.Generator().manual_seed(seed)
    text = PromptEmbeds(torch.randn(1, text_tokens, text_dim, generator=g),
                        torch.randn(1, pooled_dim, generator=g) if pooled_dim else None)
    if token_mask:
        text.mask = torch.ones(1, text_tokens, dtype=torch.long)
    return PairBatch(latents_w=torch.randn(1, *shape, generator=g), latents_l=torch.randn(1, *shape, generator=g),
                     text=text, weights=torch.ones(1), pair_ids=["w>l"])


def tensor_set_bytes(tensors: dict[int, torch.Tensor]) -> int:
    from rlhf.lowmem import tensor_bytes

    return sum(tensor_bytes(t) for t in tensors.values())


# ---- part 1: arithmetic on the meta device ------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One released transformer: its family (rlhf.models.family; None where no family module is registered),
    its config (the released checkpoint's transformer/config.json values), the text it is conditioned on and
    the videos its pipeline samples."""

    title: str
    family: str | None
    config: dict
    text_tokens: int
    videos: tuple[tuple[int, int, int], ...]  # (frames, height, width)
    token_mask: bool = False  # the transformer takes the prompt's token mask (HunyuanVideo's encoder_attention_mask)


# Wan2.1 T2V releases (Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers, transformer/config.json); the 14B is sampled at
# 720p and 480p, the 1.3B at 480p only (its model card).
WAN21 = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
             freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# HunyuanVideo's released transformer (hunyuanvideo-community/HunyuanVideo, transformer/config.json): 20
# dual-stream + 40 single-stream blocks, 24 heads x 128, Llama text 4096 wide, CLIP-L pooled 768.
HUNYUAN = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
               num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
               qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
               rope_theta=256.0, rope_axes_dim=(16, 56, 56))
HUNYUAN_TEXT_TOKENS = 256  # HunyuanVideoPipeline's max_sequence_length (after its chat template's prefix is cut)
HUNYUAN_GUIDANCE = 6.0  # HunyuanVideoPipeline's default embedded guidance_scale
# The attention projections of both block kinds (what LoRA adapts when no HunyuanVideo family sets targets).
HUNYUAN_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                        "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
SPECS = {
    "contentv": ModelSpec("ContentV-8B", "contentv", dict(num_layers=38, num_attention_heads=38,
                                                          attention_head_dim=64), TEXT_TOKENS, ((49, 432, 768),)),
    "wan2.1-1.3b": ModelSpec("Wan2.1-T2V-1.3B", "wan2.1", dict(WAN21, num_attention_heads=12, ffn_dim=8960,
                                                                num_layers=30), 512, ((81, 480, 832),)),
    "wan2.1-14b": ModelSpec("Wan2.1-T2V-14B", "wan2.1", dict(WAN21, num_attention_heads=40, ffn_dim=13824,
                                                              num_layers=40), 512, ((81, 720, 1280), (81, 480, 832))),
    "hunyuanvideo": ModelSpec("HunyuanVideo", None, HUNYUAN, HUNYUAN_TEXT_TOKENS, ((129, 720, 1280), (129, 544, 960)),
                              token_mask=True),
}


def registered_family(class_name: str):
    """The registered family whose transformer class is `class_name`, or None (e.g. no HunyuanVideo module yet)."""
    from rlhf.models.family import FAMILIES, family_named

    for name in FAMILIES:
        family = family_named(name)
        if family.transformer_class_name == class_name:
            return family
    return None


def spec_family(spec: ModelSpec):
    """The spec's family object, or None where none is registered for its transformer (HunyuanVideo, today)."""
    from rlhf.models.family import family_named

    if spec.family is not None:
        return family_named(spec.family)
    return registered_family("HunyuanVideoTransformer3DModel")


def build_meta(spec: ModelSpec) -> torch.nn.Module:
    """The spec's transformer on the meta device in bf16 (the checkpoints' dtype); no memory is allocated."""
    family = spec_family(spec)
    if family is not None:
        cls = family.transformer_class()
    else:
        from diffusers import HunyuanVideoTransformer3DModel as cls
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return cls(**spec.config).requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)


@functools.cache
def quantized_bytes(shape: tuple[int, int], mode: str) -> int:
    """Bytes of one bf16 linear weight of `shape` stored in `mode` (quantised for real on the CPU, then counted)."""
    from rlhf.lowmem import nf4_fits, quantize_transformer, tensor_bytes

    if mode == "none":
        return shape[0] * shape[1] * 2
    holder = torch.nn.Module()
    holder.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(shape[1], shape[0], bias=False,
                                                                     dtype=torch.bfloat16)])
    if mode == "nf4" and not nf4_fits(holder.transformer_blocks[0].weight):
        return shape[0] * shape[1] * 2
    quantize_transformer(holder, mode)
    return tensor_bytes(holder.transformer_blocks[0].weight)


def weight_bytes(model: torch.nn.Module, mode: str) -> tuple[int, int, int]:
    """(all weights, the largest block's, all blocks') in `mode`, bf16 elsewhere (the checkpoint's dtype). The
    layers stored in `mode` are those `quantize_transformer` picks (rlhf.lowmem.block_linears)."""
    from rlhf.lowmem import block_linears, block_list_name

    quantised = {id(m.weight) for _, m in block_linears(model)}
    total, blocks = 0, {}
    for name, param in model.named_parameters():
        size = quantized_bytes(tuple(param.shape), mode) if id(param) in quantised else param.numel() * 2
        total += size
        if block_list_name(name) is not None:
            key = tuple(name.split(".")[:2])  # (list, index): one block
            blocks[key] = blocks.get(key, 0) + size
    return total, max(blocks.values()), sum(blocks.values())


def block_lists(model: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """The model's lists of repeated blocks (what gradient checkpointing wraps and `quantize` quantises)."""
    from rlhf.lowmem import BLOCK_LISTS

    return {name: getattr(model, name) for name in BLOCK_LISTS
            if isinstance(getattr(model, name, None), torch.nn.ModuleList) and len(getattr(model, name))}


class SavedTensors:
    """Tensors autograd saves for the backward pass while active (outside checkpointed regions), by identity."""

    def __init__(self):
        self.tensors: dict[int, torch.Tensor] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tensors[id(tensor)] = tensor
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def flash_equivalent_bytes(saved: SavedTensors, queries: set[int], keys: set[int],
                           parameters: set[int]) -> tuple[int, int]:
    """Saved bytes with any (.., Tq, Tk) attention-score tensor (Tq in `queries`, Tk in `keys`: the sequence
    lengths of the family's self-, joint- and cross-attention) replaced by the fp32 log-sum-exp (B, H, Tq) that
    flash / memory-efficient SDPA keeps (the meta device runs the math SDPA, which saves the scores), the model's
    own parameters left out (counted as weights); and how many score tensors were replaced."""
    total, replaced = 0, 0
    for tensor in saved.tensors.values():
        if id(tensor) in parameters:
            continue
        if tensor.dim() >= 3 and tensor.shape[-2] in queries and tensor.shape[-1] in keys:
            total += math.prod(tensor.shape[:-1]) * 4
            replaced += 1
        else:
            total += tensor.numel() * tensor.element_size()
    return total, replaced


def tensors_in(value) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def pipeline_call(spec: ModelSpec):
    """Where no family is registered for the spec's transformer (HunyuanVideo), `dpo_step` calls it as diffusers'
    HunyuanVideoPipeline does: every other spec goes through its family's `velocity`, unchanged."""
    if spec_family(spec) is not None:
        yield
        return
    import dpo.trainer

    def hunyuan_velocity(model, latents, timestep, text, guidance=None):
        batch = latents.shape[0]
        mask = getattr(text, "mask", None)
        if mask is None:
            mask = torch.ones(text.prompt_embeds.shape[:2], device=latents.device, dtype=torch.bool)
        scale = HUNYUAN_GUIDANCE if guidance is None else guidance
        embedded = torch.full((batch,), scale * 1000.0, device=latents.device, dtype=latents.dtype)
        return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text.prompt_embeds,
                     encoder_attention_mask=mask, pooled_projections=text.pooled, guidance=embedded,
                     return_dict=False)[0]

    original = dpo.trainer.family_velocity
    dpo.trainer.family_velocity = hunyuan_velocity
    try:
        yield
    finally:
        dpo.trainer.family_velocity = original


def activation_bytes(model: torch.nn.Module, spec: ModelSpec, latent: tuple[int, ...],
                     text_sizes: tuple[int, int]) -> dict:
    """Checkpointed activations of one DPO step's policy forward, and the backward working set of each kind of
    block (meta tensors), from the real `dpo_step` on the meta model."""
    from torch.utils._pytree import tree_map

    from dpo.config import DPOConfig
    from dpo.trainer import dpo_step
    from rlhf.sampling import FlowSchedule
    from rlhf.training import BareRun, step_generator

    device = torch.device("meta")
    lists = block_lists(model)
    block_inputs: dict[int, torch.Tensor] = {}
    calls: dict[tuple[str, int], tuple] = {}

    def keep_inputs(name: str, index: int):
        def hook(_module, args, kwargs):
            if torch.is_grad_enabled():  # the policy forward (the reference forward keeps nothing)
                for tensor in tensors_in((args, kwargs)):
                    block_inputs[id(tensor)] = tensor
                calls[(name, index)] = (args, kwargs)
        return hook

    handles = [block.register_forward_pre_hook(keep_inputs(name, index), with_kwargs=True)
               for name, blocks in lists.items() for index, block in enumerate(blocks)]
    outside = SavedTensors()
    model.enable_gradient_checkpointing()
    config = DPOConfig(pairs="-", output_dir="-", beta=500.0)
    batch = dpo_batch(latent, spec.text_tokens, *text_sizes, token_mask=spec.token_mask)
    with outside.hooks(), pipeline_call(spec):
        dpo_step(BareRun(model, device), batch, config, FlowSchedule(shift=3.0), step_generator(0, 0))
    for handle in handles:
        handle.remove()
    parameters = {id(p) for p in model.parameters()}
    checkpointed = tensor_set_bytes(block_inputs) + tensor_set_bytes(
        {k: t for k, t in outside.tensors.items() if k not in block_inputs and k not in parameters})

    # Each kind of block's recomputed forward (what its backward holds), with the inputs the policy forward gave
    # its second block (the first block's inputs may carry no gradient; the second's carry what every later
    # one's do).
    video = math.prod(latent[1:]) // 4  # (T, H/2, W/2) tokens
    tokens = video + spec.text_tokens
    # Queries are the video tokens (Wan's self- and cross-attention) or video + text (joint attention); keys
    # are those, or the text alone (cross-attention).
    queries, keys = {video, tokens}, {video, tokens, spec.text_tokens}
    per_kind, replaced = {}, 0
    for name, blocks in lists.items():
        index = min(1, len(blocks) - 1)
        args, kwargs = calls[(name, index)]
        fresh = {}

        def detach(value, fresh=fresh):
            if isinstance(value, torch.Tensor):
                fresh[id(value)] = value.detach().requires_grad_(value.requires_grad)
                return fresh[id(value)]
            return value

        args, kwargs = tree_map(detach, (args, kwargs))
        inside = SavedTensors()
        with inside.hooks():
            out = blocks[index](*args, **kwargs)
        recompute, count = flash_equivalent_bytes(inside, queries, keys, parameters)
        replaced += count
        # Its backward also holds the gradients arriving at the block's outputs and leaving to its inputs.
        gradients = sum(t.numel() * t.element_size() for t in tensors_in(out) if t.requires_grad) + \
            sum(t.numel() * t.element_size() for t in fresh.values() if t.requires_grad)
        per_kind[name] = recompute + gradients
    return {"checkpointed": checkpointed, "block_recompute": per_kind, "tokens": tokens,
            "attention_score_tensors_replaced": replaced}


def lora_bytes(model: torch.nn.Module, rank: int, targets: tuple[str, ...] | None) -> int:
    from rlhf.lora import add_lora

    add_lora(model, rank=rank, alpha=rank, targets=targets)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return trainable * 4  # fp32


def spec_arithmetic(spec: ModelSpec, frames: int, height: int, width: int, rank: int) -> dict:
    """Bytes of one Flow-DPO step per mode for `spec`'s transformer at frames x height x width (no weights are
    allocated), and whether it fits each card of CARDS_GB."""
    from rlhf.sampling import latent_shape

    model = build_meta(spec)
    family = spec_family(spec)
    params = sum(p.numel() for p in model.parameters())
    per_mode_weights = {mode: weight_bytes(model, mode) for mode in MODES}
    lists = block_lists(model)
    # Each kind of block's linear weights in bf16: the dequantised copies int8 / float8 matmuls save.
    linear_bf16 = {name: sum(m.weight.numel() * 2 for m in blocks[0].modules() if type(m) is torch.nn.Linear)
                   for name, blocks in lists.items()}
    lora = lora_bytes(model, rank, None if family is not None else HUNYUAN_LORA_TARGETS)
    for name, param in model.named_parameters():  # LoRA computes in bf16 under autocast: measure it so
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
            param.requires_grad_(True)
    if family is not None:
        latent = family.latent_shape(frames, height, width, model.config)
        sizes = family.text_sizes(model.config)
        text_sizes = (sizes["text feature size"], sizes["pooled text size"])
    else:  # HunyuanVideo's VAE: 16 channels, 4x temporal and 8x spatial compression (as Wan's)
        latent = latent_shape(frames, height, width, model.config.patch_size, model.config.in_channels)
        text_sizes = (model.config.text_embed_dim, model.config.pooled_projection_dim)
    acts = activation_bytes(model, spec, latent, text_sizes)
    rows = {}
    for mode in MODES:
        weights, block, blocks = per_mode_weights[mode]
        dequantises = mode in ("int8_weight_only", "float8_weight_only")
        block_backward = max(acts["block_recompute"][name] + (linear_bf16[name] if dequantises else 0)
                             for name in lists)
        parts = {"weights": weights, "lora_fp32": lora, "lora_grads": lora, "adamw_moments": 2 * lora,
                 "checkpointed_activations": acts["checkpointed"], "block_backward": block_backward}
        total = sum(parts.values())
        rows[mode] = {**parts, "total": total, "total_gib": round(total / GIB, 2),
                      **{f"fits_{gb}gb": total <= gb * GIB - RESERVE_BYTES for gb in CARDS_GB},
                      "generate_weights_on_device_gib": round(weights / GIB, 2),
                      # group offload: the non-block modules + the running block + the one being prefetched
                      "generate_weights_on_device_group_offload_gib": round(
                          (weights - blocks + 2 * block) / GIB, 3)}
    blocks_text = " + ".join(f"{len(b)} {name}" for name, b in lists.items())
    return {"model": spec.title, "family": family.name if family is not None else
            "none registered: HunyuanVideoTransformer3DModel called as HunyuanVideoPipeline calls it",
            "shape": f"{blocks_text}, {model.config.num_attention_heads} heads x {model.config.attention_head_dim}",
            "parameters": params,
            "video": f"{frames} frames {height}x{width}, latent {list(latent)}, {acts['tokens']} tokens",
            "lora_rank": rank, "attention": f"flash-SDPA saves ({acts['attention_score_tensors_replaced']} "
            "T x T score tensors of the meta run replaced by their log-sum-exp)", "modes": rows}


def arithmetic(layers: int, heads: int, head_dim: int, frames: int, height: int, width: int, rank: int,
               text_tokens: int = TEXT_TOKENS) -> dict:
    """`spec_arithmetic` for a ContentV-shaped transformer of the given size (the 8B: 38 x 38 x 64)."""
    spec = ModelSpec(f"ContentV-shaped {layers} x {heads} x {head_dim}", "contentv",
                     dict(num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim),
                     text_tokens, ((frames, height, width),))
    result = spec_arithmetic(spec, frames, height, width, rank)
    result["shape"] = f"{layers} layers x {heads} heads x {head_dim}"
    return result


# ---- part 2: measured on the CPU -----------------------------------------------------------------------------
def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def settle() -> int:
    """Free what can be freed, return it to the OS, reset the peak RSS; the RSS now."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    return rss_bytes("VmRSS")


def measure_mode(task: str, mode: str, args, out: Path) -> dict:
    """One task (generate or dpo) in one mode, in this process. Tensors for the quality figures go to `out`."""
    from benchmarks.dpo_step import peak_tensor_bytes
    from dpo.config import DPOConfig
    from dpo.trainer import dpo_step
    from rlhf.lora import add_lora
    from rlhf.lowmem import parameter_bytes, quantize_transformer
    from rlhf.sampling import FlowSchedule, PromptEmbeds, denoise, initial_noise, latent_shape
    from rlhf.training import BareRun, step_generator

    torch.set_num_threads(args.threads)
    model = build_transformer(args.mid_layers, args.mid_heads, 64, "cpu", torch.bfloat16)
    quantize_transformer(model, mode)
    shape = latent_shape(args.mid_frames, args.mid_size, args.mid_size)
    result = {"weights_mib": round(parameter_bytes(model) / 2**20, 1)}
    if task == "generate":
        from diffusers import AutoencoderKLWan

        from rlhf.video import decode_latents
        from rlhf.world import MODEL_DIR

        vae = AutoencoderKLWan.from_pretrained(MODEL_DIR, subfolder="vae", local_files_only=True).eval()
        g = torch.Generator().manual_seed(1)
        cond = PromptEmbeds(torch.randn(1, args.mid_text, JOINT_DIM, generator=g), torch.randn(1, POOLED_DIM,
                                                                                              generator=g))
        uncond = PromptEmbeds(torch.zeros(1, args.mid_text, JOINT_DIM), torch.zeros(1, POOLED_DIM))
        sigmas = FlowSchedule(shift=3.0).sigmas(args.mid_steps)
        before = settle()
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.no_grad():
            latents = denoise(model, initial_noise(shape, [0]), sigmas, cond.to("cpu", torch.bfloat16),
                              uncond.to("cpu", torch.bfloat16), guidance_scale=4.0, batch_cfg=True,
                              num_train_timesteps=1000)
            video = decode_latents(vae, latents.float())
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        torch.save(video, out)
    else:
        add_lora(model, rank=args.mid_rank, alpha=args.mid_rank)
        g = torch.Generator().manual_seed(2)
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                if "lora_B" in name:  # non-zero, the same in every mode: lora_A gets gradients too
                    param.data = torch.randn(param.shape, generator=g) * 0.02
                param.data = param.data.float()
                param.requires_grad_(True)
        model.enable_gradient_checkpointing()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        config = DPOConfig(pairs="-", output_dir="-", beta=500.0)
        run = BareRun(model)
        batch = dpo_batch(shape, args.mid_text)

        def step(index: int, keep_grads: bool = False) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # as accelerate's autocast wraps the trainer's step
                loss, _ = dpo_step(run, batch, config, FlowSchedule(shift=3.0), step_generator(0, index))
            loss.backward()
            if keep_grads:
                torch.save(torch.cat([p.grad.flatten() for p in params]), out)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step(0, keep_grads=True)  # warm-up (optimiser state allocated); its gradients are the quality figure
        before = settle()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(1)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        peak_after_step = rss_bytes("VmHWM")
        result["step_peak_tensor_mib"] = round(peak_tensor_bytes(lambda: step(2)) / 2**20, 1)
        result.update(peak_rss_mib=round(peak_after_step / 2**20, 1),
                      peak_rss_above_start_mib=round((peak_after_step - before) / 2**20, 1),
                      rss_before_mib=round(before / 2**20, 1), seconds=round(seconds, 2),
                      cpu_seconds=round(cpu_seconds, 2))
        return result
    peak = rss_bytes("VmHWM")
    result.update(peak_rss_mib=round(peak / 2**20, 1), peak_rss_above_start_mib=round((peak - before) / 2**20, 1),
                  rss_before_mib=round(before / 2**20, 1), seconds=round(seconds, 2),
                  cpu_seconds=round(cpu_seconds, 2))
    return result


def measured(args) -> dict:
    results: dict = {"generate": {}, "dpo": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for task in ("generate", "dpo"):
            for mode in MODES:
                # One process for all: the peak RSS is reset (/proc/self/clear_refs) before each measured run, after
                # the previous mode's model is freed and returned to the OS (malloc_trim).
                results[task][mode] = measure_mode(task, mode, args, Path(tmp) / f"{task}-{mode}.pt")
            reference = torch.load(Path(tmp) / f"{task}-none.pt")
            for mode in MODES[1:]:
                other = torch.load(Path(tmp) / f"{task}-{mode}.pt")
                if task == "generate":
                    from rlhf.lowmem import video_psnr

                    results[task][mode]["psnr_db_vs_none"] = round(video_psnr(reference, other), 2)
                else:
                    cosine = torch.nn.functional.cosine_similarity(reference.double(), other.double(), dim=0)
                    results[task][mode]["grad_cosine_vs_none"] = round(cosine.item(), 5)
    return results


def world_quality() -> dict:
    """PSNR and DPO-gradient cosine on the shipped shapes-world model (trained weights), via the tests' helpers."""
    from rlhf.lowmem import video_psnr
    from rlhf.world import MODEL_DIR
    from tests.test_lowmem import dpo_lora_gradients, world_video

    reference = world_video()[1]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        full = dpo_lora_gradients(MODEL_DIR, "none", Path(tmp) / "none")
        for mode in MODES[1:]:
            grads = dpo_lora_gradients(MODEL_DIR, mode, Path(tmp) / mode)
            rows[mode] = {"psnr_db_vs_none": round(video_psnr(reference, world_video(mode)[1]), 2),
                          "grad_cosine_vs_none": round(torch.nn.functional.cosine_similarity(
                              full, grads, dim=0).item(), 5)}
    return rows


def table(arith: dict) -> str:
    lines = ["| mode | weights | LoRA + grads + AdamW | checkpointed acts | block backward | total | fits 24 GB |",
             "|---|---|---|---|---|---|---|"]
    for mode, row in arith["modes"].items():
        lora = row["lora_fp32"] + row["lora_grads"] + row["adamw_moments"]
        lines.append(f"| {mode} | {row['weights'] / GIB:.2f} GiB | {lora / GIB:.2f} GiB | "
                     f"{row['checkpointed_activations'] / GIB:.2f} GiB | {row['block_backward'] / GIB:.2f} GiB | "
                     f"{row['total'] / GIB:.2f} GiB | {'yes' if row['fits_24gb'] else 'no'} |")
    return "\n".join(lines)


def cards_table(entries: list[dict]) -> str:
    """One row per model x video x mode: the step's parts, its total and whether it fits each card."""
    cards = " | ".join(f"{gb} GB" for gb in CARDS_GB)
    lines = [f"| model | video | mode | weights | LoRA + grads + AdamW | checkpointed acts | block backward | total | "
             f"{cards} |", "|---|---|---|---|---|---|---|---|" + "---|" * len(CARDS_GB)]
    for entry in entries:
        video = entry["video"].split(",")[0]
        for mode, row in entry["modes"].items():
            lora = row["lora_fp32"] + row["lora_grads"] + row["adamw_moments"]
            fits = " | ".join("yes" if row[f"fits_{gb}gb"] else "no" for gb in CARDS_GB)
            lines.append(f"| {entry['model']} | {video} | {mode} | {row['weights'] / GIB:.2f} GiB | "
                         f"{lora / GIB:.2f} GiB | {row['checkpointed_activations'] / GIB:.2f} GiB | "
                         f"{row['block_backward'] / GIB:.2f} GiB | {row['total'] / GIB:.2f} GiB | {fits} |")
    return "\n".join(lines)


def parse_models(text: str) -> list[str]:
    names = list(SPECS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown or not names:
        raise SystemExit(f"--models: unknown {', '.join(unknown) or '(none given)'} (expected 'all' or a comma-"
                         f"separated list of {', '.join(SPECS)})")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="contentv",
                        help=f"part 1's models: 'all' or a comma-separated list of {', '.join(SPECS)} (ContentV-8B "
                             "at --frames x --height x --width, the others at their pipelines' sizes)")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=432)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--only", choices=["arithmetic", "measured"])
    parser.add_argument("--mid-layers", type=int, default=6)
    parser.add_argument("--mid-heads", type=int, default=8)
    parser.add_argument("--mid-frames", type=int, default=9)
    parser.add_argument("--mid-size", type=int, default=128)
    parser.add_argument("--mid-text", type=int, default=32, help="text tokens of the mid-size model")
    parser.add_argument("--mid-steps", type=int, default=4, help="Euler steps of the measured generate")
    parser.add_argument("--mid-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    models = parse_models(args.models)

    result: dict = {"benchmark": "memory_modes", "cpu_load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    entries: list[dict] = []
    if args.only != "measured":
        for name in models:
            spec = SPECS[name]
            videos = ((args.frames, args.height, args.width),) if name == "contentv" else spec.videos
            for video in videos:
                entries.append(spec_arithmetic(spec, *video, args.lora_rank))
                if name == "contentv":  # the key earlier entries of benchmarks/RESULTS.md use
                    result["contentv_8b_dpo_step"] = entries[-1]
                else:
                    result.setdefault("family_dpo_steps", []).append(entries[-1])
        result["budget"] = (f"{', '.join(str(gb) for gb in CARDS_GB)} GiB cards, each less {RESERVE_BYTES / GIB:g} "
                            "GiB reserve (CUDA context, fragmentation)")
    if args.only != "arithmetic":
        mid = arithmetic(args.mid_layers, args.mid_heads, 64, args.mid_frames, args.mid_size, args.mid_size,
                         args.mid_rank, text_tokens=args.mid_text)
        result["mid_size_arithmetic"] = mid
        result["mid_size_measured_cpu"] = measured(args)
        result["world_model_quality"] = world_quality()
        load = os.getloadavg()
        result["cpu_load_average_1_5_15"] = [round(x, 2) for x in load]
        result["timing_note"] = ("seconds: wall time; cpu_seconds: this process's CPU time (one thread), the "
                                 "figure to compare when other processes share the 2 cores (see the load average)")
    tables = []
    if "contentv_8b_dpo_step" in result:
        tables.append(table(result["contentv_8b_dpo_step"]))
    if "family_dpo_steps" in result:
        tables.append(cards_table(entries))
    print(json.dumps(result, indent=2))
    print("\n\n".join(tables))
    if args.record:
        record("memory_modes", None, text="\n\n".join([*tables, json.dumps(result, indent=2)]))


if __name__ == "__main__":
    main()
