"""The `vlm_judge` scorer on tiny random Qwen2-VL / Qwen2.5-VL checkpoints built here, offline.

References computed independently of the scorer: the chat text written out by hand (not the chat template),
one video per model call, the softmax over the rating tokens' logits and the expectation in float64.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rewards.build import build_scorers, score_videos
from rewards.config import load_rewards_config
from rlhf.config import help_problems
from rlhf.errors import UserError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
# A Qwen-style chat template: the turns between <|im_start|> and <|im_end|>, a video as its vision tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATE = "Rate this video for the prompt: {prompt}"
PREFIX = "Score: "
TOKENS = ["1", "2", "3", "4", "5"]
VALUES = [-2.0, -0.5, 0.0, 1.5, 4.0]


def build_tiny_judge(out, model_type: str):
    """A random 2-layer judge of `model_type` with a character-level tokenizer, saved like a hub folder."""
    from tokenizers import Tokenizer, models
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    chars = [chr(i) for i in range(32, 127)] + ["\n"]  # every character one token: "1".."5" are single tokens
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIALS}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
                eos_token_id=ids["<|im_end|>"],
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    vision = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_heads=2)
    if model_type == "qwen2_vl":
        config = Qwen2VLConfig(text_config=text, vision_config=dict(vision, depth=1, embed_dim=32, hidden_size=32,
                                                                    mlp_ratio=2), **tokens)
        model_cls, processor_cls = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:
        config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            vision, depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, window_size=56,
            fullatt_block_indexes=[1]), **tokens)
        model_cls, processor_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():  # random logits are nearly flat (std ~0.1): sharpen them so ratings differ by input
        model.lm_head.weight.mul_(40)
    model.save_pretrained(out)
    processor_cls(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
                  tokenizer=tokenizer, chat_template=CHAT_TEMPLATE).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def judge_dir(request, tmp_path_factory):
    return build_tiny_judge(tmp_path_factory.mktemp(request.param) / "judge", request.param)


def judge_config(folder, **options) -> dict:
    settings = dict(model=str(folder), template=TEMPLATE, answer_prefix=PREFIX, rating_tokens=TOKENS,
                    rating_values=VALUES, num_frames=4, frame_size=[56, 84], dtype="fp32", batch_size=8)
    return {"scorers": {"judge": {"class": "vlm_judge", "options": {**settings, **options}}}, "device": "cpu"}


def hand_score(folder, video: torch.Tensor, prompt: str) -> float:
    """The expected rating of one `(T, 3, H, W)` video, computed without the scorer."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    # VBench's middles of 4 equal segments of a 7-frame video: segments [0,1) [1,3) [3,5) [5,7).
    assert video.shape[0] == 7
    frames = video[[0, 1, 3, 5]]
    frames = F.interpolate(frames, size=(56, 84), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    text = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Rate this video for the prompt: "
            f"{prompt}<|im_end|>\n<|im_start|>assistant\nScore: ")
    inputs = processor(text=[text], videos=[frames], return_tensors="pt", do_resize=False, do_rescale=False)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].double()
    rating = logits[[processor.tokenizer.convert_tokens_to_ids(t) for t in TOKENS]]
    probs = rating.exp() / rating.exp().sum()
    return float((probs * torch.tensor(VALUES, dtype=torch.float64)).sum())


PROMPTS = ["a red ball", "a much longer prompt about a blue lake at dawn", "cat", "two green cubes spin", "sun"]


def videos(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 7, 3, 40, 60, generator=torch.Generator().manual_seed(seed))  # (B, T, 3, H, W)


def test_options_are_documented():
    from rewards.vlm_judge import VlmJudgeOptions

    assert help_problems(VlmJudgeOptions) == []


def test_score_is_the_expected_rating_from_the_logits(judge_dir):
    scorer = build_scorers(judge_config(judge_dir))["judge"].scorer
    frames = videos(2)
    scores = scorer(frames, PROMPTS[:2])
    expected = [hand_score(judge_dir, frames[i], PROMPTS[i]) for i in range(2)]
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    torch.testing.assert_close(scores.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    # The sharpened random judge is far from a flat softmax (mean 0.6) and tells the two inputs apart by far
    # more than the tolerance.
    assert abs(expected[0] - expected[1]) > 1e-3 and all(abs(e - sum(VALUES) / 5) > 0.1 for e in expected)


def test_a_batch_scores_as_one_video_at_a_time(judge_dir):
    frames = videos(5, seed=1)
    batched = build_scorers(judge_config(judge_dir, batch_size=5))["judge"].scorer(frames, PROMPTS)
    single = build_scorers(judge_config(judge_dir, batch_size=1))["judge"].scorer
    one_by_one = torch.cat([single(frames[i:i + 1], PROMPTS[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)
    assert batched.std() > 1e-3  # prompts of different lengths (left padding) and different videos


def test_declared_in_a_rewards_yaml_and_scored_in_chunks(judge_dir, tmp_path):
    path = tmp_path / "rewards.yaml"
    path.write_text(json.dumps({"scorers": {"vlm_judge": {"weight": 0.5, **judge_config(judge_dir)["scorers"]
                                                          ["judge"]["options"]}}, "device": "cpu"}))
    scorers = build_scorers(load_rewards_config(path))
    scorer, weight = scorers["vlm_judge"]
    frames = videos(3, seed=2)
    chunked = score_videos(scorers, frames, PROMPTS[:3], batch_size=2)["vlm_judge"]
    torch.testing.assert_close(chunked, scorer(frames, PROMPTS[:3]), atol=1e-5, rtol=0)
    assert weight == 0.5 and scorer.frame_positions(7) == [0, 1, 3, 5]
    assert scorer.info()["rating_values"] == VALUES and scorer.info()["model_type"] in ("qwen2_vl", "qwen2_5_vl")


@pytest.mark.parametrize("options, expected", [
    ({"rating_tokens": ["1", "10"], "rating_values": None}, "rating_tokens: '10' is 2 tokens"),
    ({"frame_size": [56, 80]}, "frame_size: [56, 80] must be multiples of 28"),
    ({"template": "Rate {promt}"}, "unknown placeholder(s) {promt}"),
    ({"rating_values": [1.0, 2.0]}, "rating_values' needs one value per rating token (5)"),
])
def test_bad_options_are_one_line_user_errors(judge_dir, options, expected):
    with pytest.raises(UserError, match="rewards.scorers.judge") as err:
        build_scorers(judge_config(judge_dir, **options))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_folder_that_is_not_a_qwen_vl_model(tmp_path):
    with pytest.raises(UserError, match="model: no config.json in"):
        build_scorers(judge_config(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="is a 'bert' model; vlm_judge runs qwen2_vl, qwen2_5_vl"):
        build_scorers(judge_config(tmp_path))
