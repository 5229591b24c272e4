"""What the model-family test files share: the CLI chain that trains an adapter on a tiny checkpoint, our sampler
against the family's diffusers pipeline, the merged / exported-LoRA check, the check of a trained adapter, and the
refusal of an adapter by another family's base.

The session-scoped fixtures of tests/conftest.py (`family_model`, `family_run`) build one tiny checkpoint and one
trained adapter per family with `tiny_model` and `train_chain`, for every test file that needs them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import yaml

from tests.conftest import TRAIN_PROMPTS, call_cli

PROMPT, NEGATIVE = "a red ball rolls over the green grass", "blurry, static"
SAMPLING = dict(frames=5, height=64, width=64)  # multiples of 32: Wan2.2 TI2V's VAE compresses 16x, its patch is 2
TINY_VIDEO = ["--frames", "5", "--height", "64", "--width", "64"]
TOLERANCE = 1e-4  # fp32 on CPU: the two paths differ by operation order only
EVAL_PROMPTS = TRAIN_PROMPTS[:2]

# The shipped online-trainer configs, sized down (the parameters of each family's online-trainer test).
ONLINE_TRAINERS = pytest.mark.parametrize(("config", "sizes"), [
    ("grpo.yaml", dict(max_steps=2, group_size=2, prompts_per_round=1)),
    ("nft.yaml", dict(max_steps=2, group_size=2, prompts_per_round=1)),
    ("reward_gradient.yaml", dict(max_steps=1, gradient_accumulation_steps=1, num_decode_frames=2)),
])

# family -> what its chain does differently: the rollout's guidance (HunyuanVideo's trainer test checks that the
# store's is embedded) and extra `train` flags (A14B: 4 steps from uniform sigmas, so both experts are trained).
CHAIN_OPTIONS: dict[str, dict[str, Any]] = {
    "hunyuanvideo": {"guidance": 5},
    "wan2.2-a14b": {"train": ["--max-steps", "4", "--sigma-sampler", "uniform"]},
}


def tiny_model(out: Path, family: str) -> Path:
    """`contentv-rlhf tiny-model OUT --family FAMILY`."""
    from rlhf.cli import main

    assert main(["tiny-model", str(out), "--family", family]) == 0
    return out


def write_inputs(root: Path, prompts: list[str] = TRAIN_PROMPTS) -> tuple[Path, Path]:
    """A prompt file and a weight-free rewards config (brightness) in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    prompt_file, rewards = root / "prompts.txt", root / "rewards.yaml"
    prompt_file.write_text("\n".join(prompts) + "\n")
    rewards.write_text(yaml.safe_dump({"scorers": {"brightness": {"weight": 1.0}}, "device": "cpu"}))
    return prompt_file, rewards


class TrainedRun(NamedTuple):
    """The folders `train_chain` writes (all in one root: `store.parent / "pairs"` is the pairs dataset)."""

    store: Path
    pairs: Path
    adapter: Path
    merged: Path
    evaluation: Path


def train_chain(model_dir: Path, root: Path, guidance: float = 3, train: tuple[str, ...] | list[str] = ()
                ) -> TrainedRun:
    """rollout -> score -> pairs -> train (Flow-DPO) -> merge -> eval (base vs the adapter, from a YAML config, on
    EVAL_PROMPTS) on a tiny checkpoint, through the CLI."""
    from rlhf.cli import main

    prompts, rewards = write_inputs(root)
    eval_prompts = root / "eval_prompts.txt"
    eval_prompts.write_text("\n".join(EVAL_PROMPTS) + "\n")
    store, pairs, run, merged, evaluation = (root / name for name in ("store", "pairs", "run", "merged", "eval"))
    eval_config = root / "eval.yaml"
    eval_config.write_text(yaml.safe_dump({
        "model": str(model_dir), "prompts": str(eval_prompts), "seeds": 1, "batch_size": 2, "rewards": str(rewards),
        "out": str(evaluation), **SAMPLING, "steps": 2, "adapters": [str(run / "adapter")], "dtype": "fp32",
        "device": "cpu"}))
    commands = [
        ["rollout", "--model", model_dir, "--prompts", prompts, "--out", store, *TINY_VIDEO, "--steps", "2",
         "--guidance", guidance, "--samples-per-prompt", "2", "--batch-size", "2", "--save-frames", "2",
         "--dtype", "fp32"],
        ["score", "--store", store, "--config", rewards],
        ["pairs", "--store", store, "--out", pairs, "--min-margin", "0"],
        ["train", "--pairs", pairs, "--output-dir", run, "--dtype", "fp32", "--mixed-precision", "no",
         "--lora-rank", "4", "--lora-alpha", "8", "--report-to", "none", "--no-gradient-checkpointing",
         "--max-steps", "3", "--learning-rate", "0.01", "--batch-size", "2", *train],
        ["merge", "--model", model_dir, "--adapter", run / "adapter", "--out", merged],
        ["eval", "--config", eval_config],
    ]
    for command in commands:
        assert main([str(a) for a in command]) == 0, command[0]
    return TrainedRun(store, pairs, run / "adapter", merged, evaluation)


def load_pipeline(pipeline_class: type, folder: Path):
    """`pipeline_class.from_pretrained(folder)` in fp32, without progress bars."""
    pipeline = pipeline_class.from_pretrained(folder, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@dataclass(frozen=True)
class Sampling:
    """One sampling of PROMPT at SAMPLING's size, through our generate/rollout path and through a pipeline.

    `negative` None: our sampler's negative prompt is "" and the pipeline is given none (HunyuanVideo: its true CFG
    is off); `guidance_2` None: the pipeline is not given `guidance_scale_2` (its default: `guidance_scale`)."""

    steps: int
    guidance: float
    guidance_2: float | None = None
    negative: str | None = NEGATIVE

    def ours(self, model_dir, seed: int = 7, adapter=None, generators: list | None = None, **model_options
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(initial noise, final latents) for PROMPT (`generators` receives the VideoGenerator)."""
        from rlhf.generation import VideoGenerator
        from rlhf.options import ModelOptions, SamplingOptions
        from rlhf.sampling import initial_noise

        generator = VideoGenerator(ModelOptions(model=str(model_dir), device="cpu", dtype="fp32", adapter=adapter,
                                                **model_options), load_vae=False)
        if generators is not None:
            generators.append(generator)
        negative = self.negative or ""
        sampling = SamplingOptions(**SAMPLING, steps=self.steps, guidance=self.guidance, guidance_2=self.guidance_2,
                                   negative_prompt=negative)
        embeds = generator.encode_prompts([PROMPT, negative])
        latents = generator.sample_latents(embeds.select(0), embeds.select(1), [seed], sampling, progress=False)
        shape = generator.family.latent_shape(sampling.frames, sampling.height, sampling.width,
                                              generator.transformer.config)
        return initial_noise(shape, [seed]), latents

    def pipeline(self, pipeline, noise: torch.Tensor) -> torch.Tensor:
        """The pipeline's final latents from `noise`."""
        extra: dict[str, Any] = {}
        if self.negative is not None:
            extra["negative_prompt"] = self.negative
        if self.guidance_2 is not None:
            extra["guidance_scale_2"] = self.guidance_2
        return pipeline(prompt=PROMPT, num_frames=SAMPLING["frames"], height=SAMPLING["height"],
                        width=SAMPLING["width"], num_inference_steps=self.steps, guidance_scale=self.guidance,
                        latents=noise.clone(), output_type="latent", **extra).frames


def check_merged_and_exported_lora(pipeline_class: type, model_dir: Path, trained: TrainedRun, sampling: Sampling,
                                   load_lora=None) -> None:
    """The merged folder loads in the family's pipeline and samples what base + adapter samples through our sampler
    (as does our sampler on it), and so does the base pipeline with the exported LoRA loaded by `load_lora(pipeline,
    adapter, noise, adapted)` (default: `pipeline.load_lora_weights(adapter)`)."""
    noise, base = sampling.ours(model_dir)
    _, adapted = sampling.ours(model_dir, adapter=str(trained.adapter))
    assert (adapted - base).abs().max() > 100 * TOLERANCE  # the adapter changes the samples

    merged_pipe = load_pipeline(pipeline_class, trained.merged)
    torch.testing.assert_close(sampling.pipeline(merged_pipe, noise), adapted, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(sampling.ours(trained.merged)[1], adapted, atol=TOLERANCE, rtol=0)

    lora_pipe = load_pipeline(pipeline_class, model_dir)
    if load_lora is None:
        lora_pipe.load_lora_weights(str(trained.adapter))
    else:
        load_lora(lora_pipe, trained.adapter, noise, adapted)
    torch.testing.assert_close(sampling.pipeline(lora_pipe, noise), adapted, atol=TOLERANCE, rtol=0)


def lora_b_weights(adapter: Path) -> dict[str, torch.Tensor]:
    """The lora_B tensors of an adapter folder's peft weights, by key."""
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in k}


def check_trained_adapter(adapter: Path, family: str) -> dict[str, torch.Tensor]:
    """The adapter records its family and targets the family's LoRA modules, and was trained away from the zero
    init of lora_B; returns its lora_B tensors."""
    from rlhf.models.family import family_named

    assert json.loads((adapter / "base_model.json").read_text())["family"] == family
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(family_named(family).lora_targets)
    lora_b = lora_b_weights(adapter)
    assert lora_b and any(v.abs().max() > 0 for v in lora_b.values())  # trained away from the zero init
    return lora_b


def train_online_config(model_dir: Path, tmp_path: Path, config: str, sizes: dict) -> Path:
    """Train with the shipped online-trainer `config`, sized down, on the tiny checkpoint; returns the adapter."""
    from tests.test_configs import as_run, run

    out = tmp_path / "run"
    run("train", "--config", as_run(config, tmp_path, model=str(model_dir), output_dir=str(out), **SAMPLING,
                                    steps=2, **sizes))
    return out / "adapter"


def check_refused(capsys, adapter: Path, model: Path, tmp_path: Path, names: tuple[str, ...], height: int = 64
                  ) -> None:
    """`generate` and `merge` with `adapter` on another family's base `model` exit 2 with one line naming
    base_model.json and `names` (both families)."""
    for command in (["generate", "--model", model, "--adapter", adapter, "--prompt", "x", "--out", tmp_path / "x.mp4",
                     "--frames", "5", "--height", height, "--width", height, "--steps", "1"],
                    ["merge", "--model", model, "--adapter", adapter, "--out", tmp_path / "merged"]):
        code, _, err = call_cli(capsys, *command)
        assert code == 2, err
        line = err.strip()
        assert "\n" not in line and "base_model.json" in line and all(n in line for n in names), line
