"""What the online trainers that sample in rounds share (GRPO, DiffusionNFT): the frozen parts, each round's
prompts and video slots, and the group-relative advantages of a round's scored videos.

A round samples `group_size` videos for each of `prompts_per_round` prompts. Its prompts, the order of its videos
and every video's noise depend only on (seed, round, video slot), never on the process count: with W processes
the round's videos are cut into updates_per_round x W equal blocks, process r samples blocks u W + r
(u = 0..U-1), the rewards are gathered so every process computes the advantages of whole groups, and update u
trains on blocks u W .. u W + W - 1, i.e. the same videos as update u of one process.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from dpo.losses import group_advantages
from dpo.reward_gradient import FrozenParts, load_online_parts, prompt_indices
from rlhf.errors import UserError
from rlhf.training import TrainingRun, step_generator

logger = logging.getLogger("contentv-rlhf")


class RoundSettings(Protocol):
    """The config fields that shape rounds (GRPOConfig and NFTConfig have them)."""

    method: str
    seed: int
    group_size: int
    prompts_per_round: int
    updates_per_round: int


class OnlineSettings(RoundSettings, Protocol):
    """The config fields `load_parts` reads."""

    model: str
    prompts: str
    rewards: str
    dtype: str
    vae_dtype: str
    max_sequence_length: int | None
    guidance: float
    negative_prompt: str


def load_parts(config: OnlineSettings, device: torch.device) -> FrozenParts:
    """Prompts, scorers, VAE and the prompt-embedding cache (`load_online_parts`); any scorer with a weight."""
    def check(scorers: dict) -> None:
        if not any(s.weight != 0 for s in scorers.values()):
            raise UserError(f"{config.rewards}: every scorer has weight 0; {config.method} needs a reward to "
                            "optimise")

    return load_online_parts(config, device, check)


def start_round_run(config: OnlineSettings) -> tuple[TrainingRun, FrozenParts]:
    """The training run (single process or DDP: a round's forwards bypass the wrapper) and its frozen parts.
    The text encoders are freed before the caller loads the transformer (peak memory)."""
    run = TrainingRun(config, config, config.device, config)
    if run.layout != "replicated":
        raise UserError(f"method {config.method} runs single-process or under DDP, not under {run.layout} launches")
    parts = load_parts(config, run.device)
    run.round_steps = ("updates_per_round", config.updates_per_round)  # a resume starts a round (checked in prepare)
    return run, parts


def round_prompts(round_index: int, config: RoundSettings, num_prompts: int) -> list[int]:
    """The prompt indices of round `round_index` (the same for every process)."""
    return prompt_indices(round_index, config.prompts_per_round, 0, 1, num_prompts, config.seed)


def prompts_of_rounds(rounds: int, config: RoundSettings, num_prompts: int) -> set[int]:
    """The prompt indices that rounds 0..rounds-1 trained on (flow_grpo's history_prompts), for a resume."""
    return {i for r in range(rounds) for i in round_prompts(r, config, num_prompts)}


def round_blocks(round_index: int, config: RoundSettings, rank: int, world: int) -> list[list[int]]:
    """Video slots (0..P G - 1; slot s is sample s % G of the round's prompt s // G) of process `rank`, one list
    per update: the slots at positions of blocks u W + rank of a seeded permutation of the round's slots."""
    total = config.prompts_per_round * config.group_size
    if total % (config.updates_per_round * world):
        raise UserError(f"prompts_per_round x group_size ({total}) must be a multiple of updates_per_round x "
                        f"processes ({config.updates_per_round} x {world})")
    order = torch.randperm(total, generator=step_generator(config.seed, round_index, -3)).tolist()
    block = total // (config.updates_per_round * world)
    return [order[(u * world + rank) * block:(u * world + rank + 1) * block] for u in range(config.updates_per_round)]


def assign_advantages(run: TrainingRun, parts: FrozenParts, chunks: list, prompts: list[int], group_size: int,
                      clip: float) -> dict[str, float]:
    """Set each chunk's `advantages` (one per video, from its `rewards` (B, K) of `parts.scorers`) and return the
    round's reward statistics, both computed from the whole round: the (slot, rewards) rows of every process are
    gathered, so each process normalises whole groups (`dpo.losses.group_advantages`) and logs the same metrics.

    `prompts` are the round's prompt indices (slot s belongs to prompts[s // group_size]).
    """
    slots = [s for c in chunks for s in c.slots]
    rows = torch.cat([torch.tensor(slots, dtype=torch.float64)[:, None], torch.cat([c.rewards for c in chunks])], 1)
    rows = run.accelerator.gather(rows.to(run.device)).cpu()  # (P G, 1 + K)
    everyone = torch.empty(len(rows), rows.shape[1] - 1, dtype=torch.float64)
    everyone[rows[:, 0].long()] = rows[:, 1:]  # (P G, K) in slot order
    groups = torch.tensor([prompts[s // group_size] for s in range(len(rows))])
    weights = torch.tensor([w for _, w in parts.scorers.values()], dtype=torch.float64)
    advantages = group_advantages(everyone, groups, weights, clip=clip)
    for chunk in chunks:
        chunk.advantages = advantages[chunk.slots]
    total = everyone @ weights
    metrics = {"reward_mean": total.mean(), "reward_std": total.std(unbiased=False),
               "advantage_abs_mean": advantages.abs().mean(),
               "tied_groups": sum(bool((total[groups == g] == total[groups == g][0]).all()) for g in groups.unique())
               / len(groups.unique())}
    for k, name in enumerate(parts.scorers):
        metrics[f"reward_{name}"], metrics[f"reward_{name}_std"] = everyone[:, k].mean(), everyone[:, k].std(
            unbiased=False)
    return {k: float(v) for k, v in metrics.items()}
