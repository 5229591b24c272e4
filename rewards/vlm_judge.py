"""`vlm_judge`: a pointwise video judge read from a Qwen2-VL / Qwen2.5-VL instruct model's rating logits.

The model sees N frames of the video (the middles of N equal segments, resized to `frame_size`) and a user
message built from `template` (`{prompt}` replaced by the video's text prompt), wrapped by the model's own chat
template with the video before the text, then the assistant turn opened and `answer_prefix` appended. One
forward pass, no generation: with `l_k` the logit of rating token k (`rating_tokens`, e.g. "1".."5") at the last
position, the position that predicts the answer's first token,

    p_k = exp(l_k) / sum_j exp(l_j)          (softmax over the K rating tokens only)
    score = sum_k p_k * v_k                  (v_k = `rating_values`, default 1, 2, ..., K)

the judge's expected rating, a continuous score without parsing free text (the logit-weighted scoring of
G-Eval, Liu et al. 2023, and of Q-Align, Wu et al. 2024). UnifiedReward-style and VideoScore-style pointwise
judges plug in by config: their model folder, their question as `template`, their rating scale as
`rating_tokens` / `rating_values`.

Batches are left-padded (the last position is every row's answer position) and carry attention masks, so a
video scores the same alone or in a batch (up to float rounding). Frames are handed to the processor as floats
in [0, 1] at `frame_size` (no rescale, no resize there), each side a multiple of the model's patch size times
its spatial merge size (28 for both families). Weights, processor and chat template load from the local folder
only. Not differentiable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rewards.base import ModelCache, Scorer, sample_frames, segment_middles
from rlhf.config import ConfigError, option
from rlhf.errors import UserError, one_line
from rlhf.options import DTypeName

# config.json `model_type` -> the transformers class that runs it.
MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
DEFAULT_TEMPLATE = (
    "You are shown a video generated from the text prompt below. Rate the video on a scale from 1 (very poor) "
    "to 5 (excellent), considering how well it follows the prompt and its visual quality.\n"
    "Prompt: {prompt}\nAnswer with a single digit."
)
PLACEHOLDER = re.compile(r"\{(\w*)\}")


@dataclass
class VlmJudgeOptions:
    """Options of the `vlm_judge` scorer."""

    model: str | None = option(
        None, "Local folder of a Qwen2-VL or Qwen2.5-VL instruct model (config.json, weights, processor and "
        "tokenizer files, a chat template), e.g. a UnifiedReward or VideoScore checkpoint. Never downloaded."
    )
    template: str = option(
        DEFAULT_TEMPLATE, "User message sent with the video; {prompt} becomes the video's text prompt (the only "
        "placeholder). Wrapped by the model's chat template, the video placed before it."
    )
    answer_prefix: str = option(
        "", "Text put after the opened assistant turn, before the rating (e.g. 'Score: '); the rating token is "
        "read at the position right after it."
    )
    rating_tokens: list[str] = option(
        ["1", "2", "3", "4", "5"], "The answers read, each a single token of the model's tokenizer."
    )
    rating_values: list[float] | None = option(
        None, "The value of each rating token, in the same order (default 1, 2, ..., K); the score is their "
        "expectation under the softmax over the rating tokens' logits."
    )
    num_frames: int = option(8, "Frames shown per video, the middles of equal segments (VBench sampling).")
    frame_size: list[int] = option(
        [336, 588], "Height and width the frames are resized to (bilinear, antialiased), each a multiple of the "
        "model's patch size x spatial merge size (28 for Qwen2-VL and Qwen2.5-VL)."
    )
    dtype: DTypeName = option("bf16", "Precision of the judge's weights (bf16, fp16 or fp32).")
    batch_size: int = option(4, "Videos per forward pass of the judge (lower it if memory runs out).")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model", "is required: the local folder of a Qwen2-VL / Qwen2.5-VL instruct model")
        unknown = sorted({name for name in PLACEHOLDER.findall(self.template) if name != "prompt"})
        if unknown:
            raise ConfigError("template", f"has unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
                              "the only placeholder is {prompt}")
        if len(self.rating_tokens) < 2 or len(set(self.rating_tokens)) != len(self.rating_tokens):
            raise ConfigError("rating_tokens", f"needs at least 2 distinct tokens, got {self.rating_tokens}")
        if self.rating_values is not None and len(self.rating_values) != len(self.rating_tokens):
            raise ConfigError("rating_values", f"needs one value per rating token ({len(self.rating_tokens)}), "
                              f"got {len(self.rating_values)}")
        if len(self.frame_size) != 2 or min(self.frame_size) < 1:
            raise ConfigError("frame_size", f"expects [height, width], two positive integers, got {self.frame_size}")
        if self.num_frames < 1:
            raise ConfigError("num_frames", f"must be >= 1, got {self.num_frames}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")

    @property
    def values(self) -> list[float]:
        """`rating_values`, or 1, 2, ..., K."""
        return list(self.rating_values) if self.rating_values is not None else [
            float(k) for k in range(1, len(self.rating_tokens) + 1)]


def expected_rating(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`(B, K)` rating-token logits and `(K,)` values -> `(B,)`: `sum_k softmax(logits)_k * values_k`."""
    return (logits.float().softmax(-1) * values.to(logits.device, torch.float32)).sum(-1)


def load_judge(folder: str, dtype: str) -> tuple[torch.nn.Module, Any]:
    """The model and processor of a local Qwen2-VL / Qwen2.5-VL folder; UserErrors name the `model` option."""
    import transformers

    from rlhf.devices import parse_dtype

    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"model: no config.json in {folder}; expected the local folder of a Qwen2-VL or "
                        "Qwen2.5-VL instruct model (downloaded beforehand, e.g. with huggingface-cli download)")
    try:
        model_type = transformers.AutoConfig.from_pretrained(path, local_files_only=True).model_type
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"model: cannot read {path / 'config.json'} ({one_line(err)})") from None
    if model_type not in MODEL_CLASSES:
        raise UserError(f"model: {folder} is a {model_type!r} model; vlm_judge runs "
                        f"{', '.join(MODEL_CLASSES)} (Qwen2-VL / Qwen2.5-VL instruct models)")
    try:
        processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        model = getattr(transformers, MODEL_CLASSES[model_type]).from_pretrained(
            path, dtype=parse_dtype(dtype), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"model: cannot load {folder} ({one_line(err)})") from None
    if not getattr(processor, "chat_template", None):
        raise UserError(f"model: {folder} has no chat template (chat_template.jinja / .json); an instruct "
                        "model's folder ships one")
    processor.tokenizer.padding_side = "left"  # the last position is every row's answer position
    return model.eval(), processor


def rating_token_ids(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """The id of each rating token; a UserError for a token the tokenizer splits into several."""
    ids = []
    for token in tokens:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise UserError(f"rating_tokens: {token!r} is {len(encoded)} tokens for this model's tokenizer; "
                            "each rating must be a single token")
        ids.append(encoded[0])
    return ids


class VlmJudgeScorer(Scorer):
    """Expected rating of a Qwen2-VL-family judge, read from its rating tokens' logits in one forward pass."""

    name = "vlm_judge"
    Options = VlmJudgeOptions

    def __init__(self, options: VlmJudgeOptions, cache: ModelCache | None = None):
        super().__init__(options, cache)
        load = lambda: load_judge(options.model, options.dtype)  # noqa: E731
        key = ("vlm_judge", str(Path(options.model).expanduser().resolve()), options.dtype)
        self.model, self.processor = load() if cache is None else cache.get(key, load)
        self.rating_ids = rating_token_ids(self.processor.tokenizer, options.rating_tokens)
        self.register_buffer("values", torch.tensor(options.values, dtype=torch.float32), persistent=False)
        video = self.processor.video_processor
        factor = video.patch_size * video.merge_size
        if any(side % factor for side in options.frame_size):
            raise UserError(f"frame_size: {options.frame_size} must be multiples of {factor} for {options.model} "
                            f"(patch size {video.patch_size} x merge size {video.merge_size})")

    def frame_positions(self, num_frames: int) -> list[int]:
        return segment_middles(num_frames, self.options.num_frames)

    def conversation(self, prompt: str) -> list[dict[str, Any]]:
        """The chat the judge answers: one user turn, the video then the template's text."""
        text = self.options.template.replace("{prompt}", prompt)
        return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        picked = sample_frames(frames, self.options.num_frames)  # (B, N, 3, H, W)
        size = self.options.frame_size
        chunks = []
        for start in range(0, picked.shape[0], self.options.batch_size):
            videos = picked[start:start + self.options.batch_size]
            batch, count = videos.shape[:2]
            resized = F.interpolate(videos.flatten(0, 1).float(), size=tuple(size), mode="bilinear",
                                    antialias=True, align_corners=False).clamp(0, 1)
            resized = resized.view(batch, count, 3, *size).cpu()  # (b, N, 3, h, w)
            texts = self.processor.apply_chat_template(
                [self.conversation(p) for p in prompts[start:start + batch]], add_generation_prompt=True,
                tokenize=False)
            inputs = self.processor(text=[t + self.options.answer_prefix for t in texts], videos=list(resized),
                                    padding=True, return_tensors="pt", do_resize=False, do_rescale=False)
            logits = self.model(**inputs.to(self.values.device), logits_to_keep=1).logits[:, -1]  # (b, V)
            chunks.append(expected_rating(logits[:, self.rating_ids], self.values))
        return torch.cat(chunks)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "rating_values": self.options.values, "model_type": self.model.config.model_type}
