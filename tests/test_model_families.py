"""The model-family interface itself: the registry, how a folder and a loaded transformer find their family,
conditioning without pooled features, and that the family-free parts of the toolkit name no family."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf.errors import UserError
from rlhf.models.family import FAMILIES, PIPELINE_FAMILIES, family_for, family_named, transformer_family
from rlhf.sampling import FlowSchedule, PromptEmbeds
from tests.conftest import REPO

# Where no family may be named: the trainers, the rollout store, the rewards, the sampler and the training run.
FAMILY_FREE = ["dpo", "rollouts", "rewards", "rlhf/generation.py", "rlhf/training.py", "rlhf/evaluation.py"]


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, family_model) -> dict[str, Path]:
    from rlhf.models.tiny import TINY_FAMILIES

    return {name: tiny_model_dir if name == "contentv" else family_model(name) for name in TINY_FAMILIES}


def test_every_registered_family_loads_and_has_a_tiny_model(model_dirs):
    assert set(model_dirs) == set(FAMILIES)
    assert set(PIPELINE_FAMILIES.values()) <= set(FAMILIES)
    for name, folder in model_dirs.items():
        family = family_named(name)
        assert family.name == name and family_for(folder) is family
        assert set(family.sampling_defaults) - {"guidance_2"} == {"frames", "height", "width", "steps", "guidance",
                                                                 "negative_prompt", "fps"}
        assert ("guidance_2" in family.sampling_defaults) == (len(family.transformer_folders) > 1)
        assert family.lora_targets


def family_classes(folder: Path) -> set[str]:
    """The family-specific class names of a checkpoint: its pipeline and its diffusers components (transformer and
    VAE, from their configs; the flow scheduler is shared). Text encoders such as CLIP and T5 are not named here:
    scorers use CLIP too; UMT5 is Wan's and is added by the caller."""
    index = json.loads((folder / "model_index.json").read_text())
    names = {index["_class_name"]} | {spec[1] for spec in index.values()
                                      if isinstance(spec, list) and spec[0] == "diffusers" and spec[1]}
    names |= {json.loads((folder / sub / "config.json").read_text())["_class_name"] for sub in ("transformer", "vae")}
    return names - {"FlowMatchEulerDiscreteScheduler"}


def test_family_free_code_names_no_family_class(model_dirs):
    forbidden = set().union(*(family_classes(folder) for folder in model_dirs.values()))
    forbidden |= {family_named(name).lora_pipeline().__name__ for name in FAMILIES}
    forbidden |= {"UMT5EncoderModel", "load_contentv"}
    assert {"SD3Transformer3DModel", "WanTransformer3DModel", "AutoencoderKLWan", "ContentVPipeline",
            "WanPipeline", "StableDiffusion3Pipeline", "HunyuanVideoPipeline", "HunyuanVideoTransformer3DModel",
            "AutoencoderKLHunyuanVideo"} <= forbidden
    files = [p for entry in FAMILY_FREE for p in ([REPO / entry] if entry.endswith(".py")
                                                   else sorted((REPO / entry).rglob("*.py")))]
    found = [f"{path.relative_to(REPO)}: {name}" for path in files for name in sorted(forbidden)
             if name in path.read_text()]
    assert not found, found


def test_a_folder_of_an_unknown_pipeline_is_one_line(model_dirs, tmp_path):
    folder = shutil.copytree(model_dirs["wan2.1"], tmp_path / "m")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "HunyuanVideo15Pipeline"}))
    with pytest.raises(UserError, match="'HunyuanVideo15Pipeline' is not a supported pipeline .*--family"):
        family_for(folder)
    with pytest.raises(UserError, match="unknown model family 'hunyuan'"):
        family_for(folder, "hunyuan")
    assert family_for(folder, "wan2.1").name == "wan2.1"  # --family overrides the index


def test_a_transformer_is_recognised_through_wrappers(model_dirs):
    from peft import LoraConfig, get_peft_model

    from rlhf.models.loader import load_model

    for name, folder in model_dirs.items():
        transformer = load_model(folder, dtype="fp32", load_vae=False, load_text_encoders=False).transformer
        assert transformer_family(transformer).name == name
        assert transformer_family(torch.compile(transformer)).name == name  # OptimizedModule._orig_mod
        wrapped = get_peft_model(transformer, LoraConfig(r=2, target_modules=list(family_named(name).lora_targets)))
        assert transformer_family(wrapped).name == name
    with pytest.raises(TypeError, match="Linear is not the transformer of a known model family"):
        transformer_family(torch.nn.Linear(2, 2))


def test_conditioning_without_pooled_features():
    tokens = torch.randn(2, 5, 4)
    text = PromptEmbeds(tokens, None)
    assert text.select(1).pooled is None and torch.equal(text.select(1).prompt_embeds, tokens[1:])
    assert PromptEmbeds.cat([text, text]).prompt_embeds.shape == (4, 5, 4)
    assert text.select(0).expand(3).prompt_embeds.shape == (3, 5, 4)
    assert text.to("cpu", torch.float64).prompt_embeds.dtype == torch.float64
    with pytest.raises(ValueError, match="with and without pooled"):
        PromptEmbeds.cat([text, PromptEmbeds(tokens, torch.randn(2, 3))])


def test_conditioning_with_a_token_mask():
    """A family whose transformer takes the token mask (HunyuanVideo): the mask follows every row operation."""
    tokens, pooled = torch.randn(2, 5, 4), torch.randn(2, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    text = PromptEmbeds(tokens, pooled, mask)
    assert torch.equal(text.select(1).mask, mask[1:]) and torch.equal(text.select(1).prompt_embeds, tokens[1:])
    assert torch.equal(PromptEmbeds.cat([text, text.select(0)]).mask, mask[[0, 1, 0]])
    assert text.select(0).expand(3).mask.tolist() == [[1, 1, 1, 0, 0]] * 3
    assert text.to("cpu", torch.float64).mask.dtype == torch.float64  # as the pipeline casts it
    assert PromptEmbeds(tokens, pooled).mask is None  # the other families' have none
    with pytest.raises(ValueError, match="with and without token masks"):
        PromptEmbeds.cat([text, PromptEmbeds(tokens, pooled)])


def test_sigma_spacings_are_the_schedulers(tmp_path):
    """`to_zero` is what ContentV passes as `sigmas=`; `scheduler_default` is `set_timesteps(steps)` alone."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0, 7.0):
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        scheduler.set_timesteps(7)
        torch.testing.assert_close(FlowSchedule(shift, spacing="scheduler_default").sigmas(7), scheduler.sigmas,
                                   atol=1e-6, rtol=0)
        scheduler.set_timesteps(sigmas=torch.linspace(1, 0, 8)[:-1].tolist())
        torch.testing.assert_close(FlowSchedule(shift).sigmas(7), scheduler.sigmas, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="spacing"):
        FlowSchedule(spacing="karras")


def test_the_store_caches_a_token_mask_only_for_a_family_that_has_one(tmp_path):
    """A ContentV or Wan store's embedding files are what they were before the mask existed: no `mask` key."""
    from safetensors import safe_open

    from rollouts.store import RolloutStore

    store = RolloutStore(tmp_path)
    (tmp_path / "embeds").mkdir()
    tokens, pooled, mask = torch.randn(1, 5, 4), torch.randn(1, 3), torch.tensor([[1, 1, 0, 0, 0]])
    for prompt_id, embeds in (("wan", PromptEmbeds(tokens, None)), ("contentv", PromptEmbeds(tokens, pooled)),
                              ("hunyuan", PromptEmbeds(tokens, pooled, mask))):
        store.write_embeds(prompt_id, embeds)
        with safe_open(str(store.embeds_path(prompt_id)), "pt") as f:
            keys = set(f.keys())
        loaded = store.load_embeds(prompt_id)
        assert keys == {"prompt_embeds"} | ({"pooled"} if embeds.pooled is not None else set()) | (
            {"mask"} if embeds.mask is not None else set())
        assert (loaded.mask is None) == (embeds.mask is None)
        if embeds.mask is not None:
            assert torch.equal(loaded.mask, mask)
