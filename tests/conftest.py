"""Shared fixtures: one tiny ContentV checkpoint per test session, built by the project itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from rlhf.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """family name -> its tiny checkpoint (`tiny-model --family`), built once per session for every test file."""
    from tests.family_checks import tiny_model

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny_model(tmp_path_factory.mktemp(family) / "model", family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def family_run(family_model, tmp_path_factory):
    """family name -> `tests.family_checks.train_chain` on its tiny checkpoint (store, pairs, a Flow-DPO adapter, the
    merged folder, an eval), run once per session for every test file."""
    from tests.family_checks import CHAIN_OPTIONS, train_chain

    runs: dict = {}

    def get(family: str):
        if family not in runs:
            runs[family] = train_chain(family_model(family), tmp_path_factory.mktemp(f"{family}-run"),
                                       **CHAIN_OPTIONS.get(family, {}))
        return runs[family]

    return get


def random_adapter(model_dir, out: Path, std: float) -> Path:
    """A rank-4 adapter on the tiny transformer with lora_B drawn from N(0, std^2), saved by `save_adapter`."""
    import torch

    from rlhf.lora import add_lora, save_adapter
    from rlhf.models.loader import load_contentv

    transformer = load_contentv(model_dir, dtype="fp32", load_vae=False, load_text_encoders=False).transformer
    add_lora(transformer, rank=4, alpha=4)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(std=std)
    return save_adapter(transformer, out)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real `contentv-rlhf` entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "rlhf.cli", *map(str, args)],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def call_cli(capsys, *args) -> tuple[int, str, str]:
    """Run `contentv-rlhf` in this process (fast: no re-import of torch); returns (code, stdout, stderr)."""
    from rlhf.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:  # argparse errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


TRAIN_PROMPTS = ["a red ball", "a blue lake", "a green field", "a yellow sun", "a white cloud", "a black cat"]


@pytest.fixture(scope="session")
def tiny_store(tiny_model_dir, tmp_path_factory):
    """A small rollout store: 6 prompts x 4 samples of 5 frames at 32x32, with 4 decoded frames each."""
    from rlhf.cli import main

    root = tmp_path_factory.mktemp("store")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(TRAIN_PROMPTS) + "\n")
    out = root / "store"
    code = main([
        "rollout", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out),
        "--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--guidance", "3",
        "--samples-per-prompt", "4", "--batch-size", "4", "--save-frames", "4", "--dtype", "fp32",
    ])
    assert code == 0
    from rollouts.store import RolloutStore

    return RolloutStore(out)


@pytest.fixture(scope="session")
def tiny_pairs(tiny_store, tmp_path_factory):
    """Best-vs-worst pairs under a synthetic reward (mean latent value), saved as a pairs dataset."""
    from rewards.pairs import PairsConfig, build_pairs, save_pairs

    rows = [
        {"sample_id": r["sample_id"], "prompt_id": r["prompt_id"],
         "scores": {"latent_mean": float(tiny_store.load_sample(r["sample_id"])["latents"].float().mean())}}
        for r in tiny_store.manifest()
    ]
    pairs, summary = build_pairs(rows, PairsConfig(min_margin=0.0))
    return save_pairs(pairs, summary, tmp_path_factory.mktemp("pairs") / "pairs", {"store": str(tiny_store.root)})


def tiny_forward(model):
    """The tiny transformer's output for fixed random inputs (to compare models and adapters)."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g),
            encoder_hidden_states=torch.randn(1, 333, 32, generator=g),
            pooled_projections=torch.randn(1, 24, generator=g),
            timestep=torch.tensor([400.0]),
        ).sample
