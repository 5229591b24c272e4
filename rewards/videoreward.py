"""`videoreward`: VideoReward (VideoAlign), a Qwen2-VL-2B reward model scoring visual quality, motion quality and
text alignment of a generated video, read exactly as VideoAlign's own inference code does.

Model: Liu et al., "Improving Video Generation with Human Feedback" (2025), code github.com/KwaiVGI/VideoAlign
(MIT; inference.py `VideoVLMRewardInference`, trainer.py `Qwen2VLRewardModelBT`, vision_process.py, at commit
219ab9d), weights KlingTeam/VideoReward (formerly KwaiVGI/VideoReward, Apache-2.0) on top of Qwen2-VL-2B-Instruct.
Everything loads from two local folders (never downloaded): `checkpoint` (the VideoReward folder: model_config.json
and checkpoint-<step>/model.pth) and `base_model` (Qwen2-VL-2B-Instruct: config, processor, tokenizer, chat
template; its weights are not read, model.pth holds every weight).

What VideoAlign computes, and this scorer with it (settings from model_config.json's sections):

1. Frames (`data_config.fps` 2, `sample_type` "uniform"): a T-frame video at `video_fps` is read at
   n = round_2(clip(T / video_fps * fps, 4, floor_2(min(768, T)))) frames (round_2: nearest multiple of 2, Python
   rounding; n <= T), at indices round(linspace(0, T - 1, n)); `data_config.num_frames`, when set, gives n =
   round_2(num_frames) instead. (VideoAlign decodes 8-bit frames with decord; this scorer rounds the [0, 1]
   frames it gets to 8 bits first, so frames that came from an 8-bit video are read exactly as VideoAlign reads
   them.)
2. Resolution (`data_config.max_frame_pixels` 448*448): qwen-vl-utils' `smart_resize` with factor 28,
   min_pixels 128*28*28 and max_pixels = max_frame_pixels: h' = max(28, round_28(h)), w' likewise; if
   h'w' > max_pixels, beta = sqrt(hw / max_pixels) and h' = floor_28(h / beta), w' = floor_28(w / beta); if
   h'w' < min_pixels, beta = sqrt(min_pixels / hw) and h' = ceil_28(h * beta), w' = ceil_28(w * beta).
   Frames are resized to (h', w') bicubic with antialiasing on the 0-255 values, then rounded and clamped to
   0-255 (torchvision's resize of uint8 frames); the Qwen2-VL processor then rescales by 1/255, normalises with
   the CLIP mean / std and cuts 2x14x14 patches.
3. Prompt (`prompt_template_type` "detailed_special"): one user turn `[video, text]` through Qwen2-VL's chat
   template (its default system turn included) with the generation prompt added, the text being VideoAlign's
   `DETAILED_PROMPT_WITH_SPECIAL_TOKEN` with the video's prompt in it. The template ends the visual-quality,
   motion-quality and text-alignment paragraphs with the added special tokens <|VQ_reward|>, <|MQ_reward|>,
   <|TA_reward|> (the tokenizer gets them with `add_special_tokens`, ids after the base vocabulary).
4. Read-out (`model_config.reward_token` "special", `output_dim` 1): r = h W^T with h the last hidden states of
   the language model (after its final norm) at the three special tokens, in sequence order, and W the bias-free
   `rm_head` (1 x hidden): raw (VQ, MQ, TA). (`output_dim` 3: the diagonal of the 3 x 3 read-out.)
   `Qwen2VLRewardModelBT.forward` merges the video embeddings itself and calls the language model without
   position ids, so every token, video tokens included, sits at its plain sequence position 0..L-1 in all three
   M-RoPE sections (not Qwen2-VL's 3D video positions); right padding, no effect on the tokens read.
5. Normalisation (`inference_config`, `use_norm=True`, VideoAlign's default): d = (r_d - mean_d) / std_d for
   d in VQ, MQ, TA (released: VQ 3.6757 / 2.2476, MQ 1.1646 / 1.3811, TA 2.8105 / 2.5121); Overall = VQ + MQ + TA
   (of the normalised values; of the raw ones with `normalize: false`).

Weights: model.pth is the full state dict of the PEFT-wrapped model (`base_model.model.` prefixes, LoRA on the
language model's Linear layers). LoRA is merged once at load, W = W_0 + (alpha / r) B A (alpha / sqrt(r) with
rsLoRA), in float32, then cast to `dtype`; VideoAlign keeps it unmerged (equal up to rounding). Attention runs
transformers' default kernel (VideoAlign asks for flash-attention 2: the same function).

Columns: one entry scores one `dimension` (vq, mq, ta or overall). Declare one entry per dimension you want as a
reward column, each with its weight (configs/rewards_video.yaml); the entries share one loaded model, and a batch
that the previous entry just scored (same 8-bit frames, same prompts) is not run again.
Not differentiable.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from rewards.base import ModelCache, Scorer
from rlhf.config import ConfigError, option
from rlhf.errors import UserError, one_line
from rlhf.options import DTypeName

Dimension = Literal["vq", "mq", "ta", "overall"]
COLUMNS = ("vq", "mq", "ta", "overall")
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
FACTOR = 28  # qwen-vl-utils IMAGE_FACTOR: patch 14 x spatial merge 2
MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils VIDEO_MIN_PIXELS (VideoAlign sets only max_pixels)
MAX_RATIO = 200
FRAME_FACTOR, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2, 4, 768

# VideoAlign's prompt_template.DETAILED_PROMPT_WITH_SPECIAL_TOKEN (MIT, Copyright (c) 2025 Kling Team, Kuaishou
# Technology), line by line: trailing spaces are part of the model's input.
DETAILED_PROMPT_LINES = (
    "",
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion "
    "Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being "
    "the worst and 10 being the best. Each evaluation should be independent of the others.",
    "",
    "**Visual Quality:**  ",
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions "
    "should be considered:",
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.",
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.",
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).",
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.",
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. ",
    "",
    "Please provide the ratings of Visual Quality: <|VQ_reward|>",
    "END",
    "",
    "**Motion Quality:**  ",
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:",
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural "
    "jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body "
    "parts).",
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should "
    "flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth "
    "movements).",
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or "
    "camera angles should be seamless, and the overall dynamic feel should be visually pleasing.",
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with "
    "the background, without obvious artifacts or the feeling of cut-and-paste effects.",
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the "
    "video might have blurry or unsteady sections that hinder visual continuity.",
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.",
    "",
    "Please provide the ratings of Motion Quality: <|MQ_reward|>",
    "END",
    "",
    "**Text Alignment:**  ",
    "Assess how well the video matches the textual prompt across the following sub-dimensions:",
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.",
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like "
    "talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, "
    "scale, and direction.",
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if "
    "real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  ",
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "video adheres to this style.",
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are "
    "consistent with the expected behavior from the prompt.",
    "",
    "Textual prompt - {text_prompt}",
    "Please provide the ratings of Text Alignment: <|TA_reward|>",
    "END",
    "",
)
DETAILED_PROMPT = "\n".join(DETAILED_PROMPT_LINES)


@dataclass
class VideoRewardOptions:
    """Options of the `videoreward` scorer."""

    checkpoint: str | None = option(
        None, "Local VideoReward folder (KlingTeam/VideoReward): model_config.json and checkpoint-<step>/model.pth. "
        "Never downloaded."
    )
    base_model: str | None = option(
        None, "Local Qwen2-VL-2B-Instruct folder (config.json, preprocessor_config.json, tokenizer files, chat "
        "template): the architecture, processor and tokenizer VideoReward was trained on; its weights are not read."
    )
    dimension: Dimension = option(
        "overall", "Which score this entry returns: vq (visual quality), mq (motion quality), ta (text alignment) or "
        "overall (their sum). One entry per dimension gives one reward column each; the entries share one model."
    )
    video_fps: float = option(
        24.0, "Frame rate of the scored videos (the rollout's fps): VideoAlign reads data_config.fps (2) frames per "
        "second of video, at least 4."
    )
    checkpoint_step: int | None = option(
        None, "Which checkpoint-<step> folder to load; default: the highest step, as VideoAlign's inference does."
    )
    normalize: bool = option(
        True, "Standardise VQ, MQ and TA with model_config.json's inference_config means and stds (VideoAlign's "
        "use_norm=True default); false: the raw reward-head outputs."
    )
    dtype: DTypeName = option("bf16", "Precision of the model's weights (bf16, as VideoAlign's inference; fp32).")
    batch_size: int = option(2, "Videos per forward pass (lower it if memory runs out).")

    def __post_init__(self) -> None:
        for name in ("checkpoint", "base_model"):
            if not getattr(self, name):
                raise ConfigError(name, "is required: " + ("the local VideoReward folder (model_config.json, "
                                  "checkpoint-<step>/model.pth)" if name == "checkpoint" else
                                  "the local Qwen2-VL-2B-Instruct folder"))
        if not math.isfinite(self.video_fps) or self.video_fps <= 0:
            raise ConfigError("video_fps", f"must be a positive frame rate, got {self.video_fps}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")


def round_by_factor(number: float, factor: int) -> int:
    """The multiple of `factor` nearest to `number` (Python's round: halves to even)."""
    return round(number / factor) * factor


def smart_resize(height: int, width: int, max_pixels: int, min_pixels: int = MIN_PIXELS,
                 factor: int = FACTOR) -> tuple[int, int]:
    """qwen-vl-utils' frame size for a `height` x `width` video: sides multiples of `factor`, area in
    [min_pixels, max_pixels], aspect ratio kept as far as rounding allows (the formula in the module docstring)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"videoreward: aspect ratio {max(height, width) / min(height, width):.0f} is over "
                         f"{MAX_RATIO} (frames {height}x{width})")
    h = max(factor, round_by_factor(height, factor))
    w = max(factor, round_by_factor(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def frame_count(total: int, video_fps: float, fps: float | None, num_frames: float | None) -> int:
    """How many frames VideoAlign reads of a `total`-frame video (qwen-vl-utils `smart_nframes`, formula in step 1)."""
    if num_frames is not None:
        count = round_by_factor(num_frames, FRAME_FACTOR)
    else:
        low = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        count = round_by_factor(min(max(total / video_fps * fps, low), high), FRAME_FACTOR)
    count = min(count, total)
    if count < FRAME_FACTOR:
        raise ValueError(f"videoreward reads at least {FRAME_FACTOR} frames; a {total}-frame video gives {count}")
    return count


def frame_indices(total: int, count: int) -> list[int]:
    """round(linspace(0, total - 1, count)) with torch's rounding (halves to even), as VideoAlign samples."""
    return torch.linspace(0, total - 1, count).round().long().tolist()


def merge_lora(state: Mapping[str, torch.Tensor], scaling: float,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A PEFT state dict with LoRA layers -> plain weights in `dtype`: `M.weight = W_0 + scaling * B @ A` computed
    in float32, where W_0 = `M.base_layer.weight`, A = `M.lora_A.default.weight` (r x in), B =
    `M.lora_B.default.weight` (out x r); `M.base_layer.bias` -> `M.bias`; the `base_model.model.` prefix dropped;
    other keys unchanged but for the dtype."""
    merged = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.")
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." in key:
            module, _, leaf = key.partition(".base_layer.")
            value = value.float()
            if leaf == "weight":
                lora_a = state.get(f"base_model.model.{module}.lora_A.default.weight")
                lora_b = state.get(f"base_model.model.{module}.lora_B.default.weight")
                if lora_a is None or lora_b is None:
                    raise UserError(f"checkpoint: model.pth has {module}.base_layer.weight without its "
                                    "lora_A / lora_B weights")
                value = value + scaling * (lora_b.float() @ lora_a.float())
            key = f"{module}.{leaf}"
        merged[key] = value.to(dtype)
    return merged


def transformers_keys(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """VideoAlign's (transformers 4.45) keys -> `Qwen2VLModel`'s (`visual.*`, `language_model.*`) and the rm_head
    weight; lm_head (tied to the embedding, unused by the reward) is dropped."""
    if "rm_head.weight" not in state:
        raise UserError("checkpoint: model.pth has no rm_head.weight; expected a VideoAlign reward model")
    model = {}
    for key, value in state.items():
        if key.startswith("visual."):
            model[key] = value
        elif key.startswith("model."):
            model["language_model." + key.removeprefix("model.")] = value
        elif key not in ("lm_head.weight", "rm_head.weight"):
            raise UserError(f"checkpoint: unexpected weight {key!r} in model.pth (modules_to_save or another "
                            "architecture?); expected visual.*, model.*, lm_head and rm_head")
    return model, state["rm_head.weight"]


def normalized(raw: torch.Tensor, inference_config: Mapping[str, float] | None) -> torch.Tensor:
    """`(B, 3)` raw (VQ, MQ, TA) -> `(B, 4)`: each (raw_d - mean_d) / std_d (unchanged without a config), then
    overall = VQ + MQ + TA."""
    scores = raw.double()
    if inference_config is not None:
        mean = torch.tensor([inference_config[f"{d}_mean"] for d in ("VQ", "MQ", "TA")], dtype=torch.float64)
        std = torch.tensor([inference_config[f"{d}_std"] for d in ("VQ", "MQ", "TA")], dtype=torch.float64)
        scores = (scores - mean.to(scores.device)) / std.to(scores.device)
    return torch.cat([scores, scores.sum(1, keepdim=True)], 1)


def videoalign_prompt(prompt: str) -> str:
    """VideoAlign's `build_prompt(prompt, ["VQ", "MQ", "TA"], "detailed_special")`."""
    return DETAILED_PROMPT.format(text_prompt=prompt)


@dataclass
class VideoAlignSettings:
    """What model_config.json says about reading frames and scores (see the module docstring)."""

    fps: float | None
    num_frames: float | None
    max_pixels: int
    output_dim: int
    lora_scaling: float | None  # None: model.pth has no LoRA layers
    inference_config: dict[str, float] | None


def read_model_config(folder: Path) -> VideoAlignSettings:
    """Parse and check `folder/model_config.json`; a setting this scorer does not implement is a UserError."""
    path = folder / "model_config.json"
    if not path.is_file():
        raise UserError(f"checkpoint: no model_config.json in {folder}; expected the VideoReward folder "
                        "(model_config.json, checkpoint-<step>/model.pth)")
    try:
        config = json.loads(path.read_text())
        data, model, lora = config["data_config"], config["model_config"], config["peft_lora_config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"checkpoint: cannot read {path} ({one_line(err)}); expected VideoAlign's model_config.json "
                        "with data_config, model_config and peft_lora_config") from None
    expected = {("data_config", "sample_type"): "uniform", ("data_config", "prompt_template_type"): "detailed_special",
                ("model_config", "use_special_tokens"): True, ("model_config", "reward_token"): "special"}
    for (section, name), value in expected.items():
        if config[section].get(name) != value:
            raise UserError(f"checkpoint: {path}: {section}.{name} is {config[section].get(name)!r}; videoreward "
                            f"implements VideoAlign's released setting {value!r}")
    if list(data.get("eval_dim") or []) != ["VQ", "MQ", "TA"]:
        raise UserError(f"checkpoint: {path}: data_config.eval_dim is {data.get('eval_dim')!r}, expected "
                        "['VQ', 'MQ', 'TA']")
    if model.get("output_dim") not in (1, 3):
        raise UserError(f"checkpoint: {path}: model_config.output_dim is {model.get('output_dim')!r}, expected 1 or 3")
    scaling = None
    if lora.get("lora_enable"):
        rank, alpha = lora["lora_r"], lora["lora_alpha"]
        scaling = alpha / math.sqrt(rank) if lora.get("use_rslora") else alpha / rank
    inference = config.get("inference_config")
    # Defaults where a field is absent: VideoAlign's DataConfig (fps 2.0, num_frames None, max_frame_pixels 240*320).
    return VideoAlignSettings(fps=data.get("fps", 2.0), num_frames=data.get("num_frames"),
                              max_pixels=int(data.get("max_frame_pixels", 240 * 320)), output_dim=int(model["output_dim"]),
                              lora_scaling=scaling, inference_config=dict(inference) if inference else None)


def checkpoint_file(folder: Path, step: int | None) -> Path:
    """`folder/checkpoint-<step>/model.pth`, the highest step by default (VideoAlign's `load_model_from_checkpoint`)."""
    steps = sorted(int(m.group(1)) for p in folder.glob("checkpoint-*")
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    if not steps:
        raise UserError(f"checkpoint: no checkpoint-<step> folder in {folder}")
    if step is not None and step not in steps:
        raise UserError(f"checkpoint_step: {folder} has no checkpoint-{step}; it has steps {steps}")
    chosen = folder / f"checkpoint-{steps[-1] if step is None else step}"
    if not (chosen / "model.pth").is_file():
        extra = (" (a LoRA-only checkpoint: adapter_model.safetensors + non_lora_state_dict.pth is not supported; "
                 "the released checkpoint has model.pth)" if (chosen / "adapter_model.safetensors").is_file() else "")
        raise UserError(f"checkpoint: no model.pth in {chosen}{extra}")
    return chosen / "model.pth"


class VideoRewardModel(nn.Module):
    """The loaded VideoReward: `model(frames (B, n, 3, H, W) in [0, 1], prompts) -> (B, 4)` float64 scores
    (VQ, MQ, TA, overall) of the sampled frames; remembers the last batch it scored."""

    def __init__(self, checkpoint: str, base_model: str, step: int | None, dtype: str, normalize: bool):
        super().__init__()
        import accelerate
        import transformers

        from rlhf.devices import parse_dtype

        folder, base = Path(checkpoint).expanduser(), Path(base_model).expanduser()
        self.settings = read_model_config(folder)
        if not normalize:
            self.settings.inference_config = None
        if not (base / "config.json").is_file():
            raise UserError(f"base_model: no config.json in {base_model}; expected the local Qwen2-VL-2B-Instruct "
                            "folder (downloaded beforehand)")
        try:
            config = transformers.AutoConfig.from_pretrained(base, local_files_only=True)
            self.processor = transformers.AutoProcessor.from_pretrained(base, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"base_model: cannot load {base_model} ({one_line(err)})") from None
        if config.model_type != "qwen2_vl":
            raise UserError(f"base_model: {base_model} is a {config.model_type!r} model; VideoReward is built on "
                            "Qwen2-VL-2B-Instruct (qwen2_vl)")
        tokenizer = self.processor.tokenizer
        tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
        tokenizer.padding_side = "right"  # as VideoAlign's processor; the reward tokens' positions are read per row
        self.reward_ids = tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
        path = checkpoint_file(folder, step)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # a pickle error, a truncated download
            raise UserError(f"checkpoint: cannot read {path} ({one_line(err)})") from None
        torch_dtype = parse_dtype(dtype)
        if self.settings.lora_scaling is not None:
            state = merge_lora(state, self.settings.lora_scaling, torch_dtype)
        weights, head = transformers_keys(state)
        vocab = weights["language_model.embed_tokens.weight"].shape[0]
        if vocab != len(tokenizer):
            raise UserError(f"checkpoint: {path} has {vocab} token embeddings but the tokenizer of {base_model} with "
                            f"the 3 reward tokens has {len(tokenizer)}; is base_model the model VideoReward was "
                            "trained on?")
        config.text_config.vocab_size = vocab
        with accelerate.init_empty_weights():  # parameters on the meta device, buffers (rotary) computed
            self.model = transformers.Qwen2VLModel._from_config(config, attn_implementation="sdpa")
        try:
            self.model.load_state_dict({k: v.to(torch_dtype) for k, v in weights.items()}, strict=True, assign=True)
        except RuntimeError as err:
            raise UserError(f"checkpoint: {path} does not fit {base / 'config.json'} ({one_line(err)[:300]})") from None
        self.model.eval()
        self.rm_head = nn.Linear(head.shape[1], head.shape[0], bias=False, dtype=torch_dtype)
        self.rm_head.weight.data.copy_(head.to(torch_dtype))
        if self.rm_head.out_features != self.settings.output_dim:
            raise UserError(f"checkpoint: rm_head has {self.rm_head.out_features} outputs but output_dim is "
                            f"{self.settings.output_dim}")
        self._last: tuple[torch.Tensor, tuple[str, ...], torch.Tensor] | None = None

    def frame_positions(self, num_frames: int, video_fps: float) -> list[int]:
        """Indices of the frames VideoAlign reads of a `num_frames`-frame video at `video_fps`."""
        count = frame_count(num_frames, video_fps, self.settings.fps, self.settings.num_frames)
        return frame_indices(num_frames, count)

    def pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """`(B, n, 3, H, W)` in [0, 1] -> `(B, n, 3, h', w')` 0-255 integer values: 8-bit frames resized as
        VideoAlign resizes its decoded uint8 frames (bicubic, antialiased, rounded and clamped)."""
        batch, count, _, height, width = frames.shape
        size = smart_resize(height, width, self.settings.max_pixels)
        frames = (frames.float() * 255).round().clamp(0, 255).flatten(0, 1)  # (B*n, 3, H, W)
        if size != (height, width):
            frames = F.interpolate(frames, size=size, mode="bicubic", antialias=True, align_corners=False)
        return frames.round().clamp(0, 255).view(batch, count, 3, *size)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
        pixels = self.pixels(frames)
        key = (pixels, tuple(prompts))
        if self._last is not None and self._last[1] == key[1] and self._last[0].shape == pixels.shape \
                and self._last[0].device == pixels.device and torch.equal(self._last[0], pixels):
            return self._last[2]
        chunks = [self.score_pixels(pixels[i:i + batch_size], prompts[i:i + batch_size])
                  for i in range(0, pixels.shape[0], batch_size)]
        scores = normalized(torch.cat(chunks), self.settings.inference_config)
        self._last = (pixels, key[1], scores)
        return scores

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Raw `(b, 3)` (VQ, MQ, TA) of `(b, n, 3, h, w)` 0-255 frames: steps 3 and 4 of the module docstring."""
        chats = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": videoalign_prompt(p)}]}]
                 for p in prompts]
        texts = self.processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=texts, videos=list(pixels.cpu()), padding=True, return_tensors="pt",
                                do_resize=False, do_rescale=True)
        device, dtype = self.rm_head.weight.device, self.rm_head.weight.dtype
        input_ids = inputs["input_ids"].to(device)
        # VideoAlign's forward leaves position_ids None for the language model: positions 0..L-1 in all three
        # M-RoPE sections (the video tokens' 3D positions are not used), padding or not.
        positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)  # (b, L)
        hidden = self.model(input_ids=input_ids, attention_mask=inputs["attention_mask"].to(device),
                            position_ids=positions, pixel_values_videos=inputs["pixel_values_videos"].to(device, dtype),
                            video_grid_thw=inputs["video_grid_thw"].to(device)).last_hidden_state  # (b, L, D)
        is_reward = torch.isin(input_ids, torch.tensor(self.reward_ids, device=device))  # (b, L)
        counts = is_reward.sum(1)
        if (counts != 3).any():
            row = int((counts != 3).nonzero()[0])
            raise ValueError(f"videoreward: the prompt {prompts[row]!r} gives {int(counts[row])} reward tokens, "
                             f"expected 3 (a prompt must not contain {', '.join(REWARD_TOKENS)})")
        read = self.rm_head(hidden[is_reward]).view(len(prompts), 3, -1).float()  # (b, 3, output_dim)
        return read[:, :, 0] if read.shape[2] == 1 else read.diagonal(dim1=1, dim2=2)


class VideoRewardScorer(Scorer):
    """One VideoReward dimension (vq, mq, ta or overall), computed as VideoAlign's inference computes it."""

    name = "videoreward"
    Options = VideoRewardOptions

    def __init__(self, options: VideoRewardOptions, cache: ModelCache | None = None):
        super().__init__(options, cache)
        load = lambda: VideoRewardModel(options.checkpoint, options.base_model, options.checkpoint_step,  # noqa: E731
                                        options.dtype, options.normalize)
        key = ("videoreward", str(Path(options.checkpoint).expanduser().resolve()),
               str(Path(options.base_model).expanduser().resolve()), options.checkpoint_step, options.dtype,
               options.normalize)
        self.reward_model = load() if cache is None else cache.get(key, load)

    def frame_positions(self, num_frames: int) -> list[int]:
        return self.reward_model.frame_positions(num_frames, self.options.video_fps)

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        scores = self.reward_model(frames, prompts, self.options.batch_size)  # (B, 4) float64
        return scores[:, COLUMNS.index(self.options.dimension)].float()

    def info(self) -> dict[str, Any]:
        settings = self.reward_model.settings
        return {**super().info(), "sample_fps": settings.fps, "max_frame_pixels": settings.max_pixels,
                "normalization": settings.inference_config}
