"""Preference pairs joined with the rollout store: cached latents and prompt embeddings, no model needed.

`PairData` checks everything up front (pairs that name missing samples, a store whose latents or
embeddings do not fit the transformer) so a bad input fails before training starts, in one clear line.
Batches are drawn by a stateless rule: micro-batch m of epoch e takes positions of a permutation seeded by
(seed, e), so the data a step sees depends only on the step index (exact resume, any process count).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rlhf.errors import UserError, one_line
from rlhf.sampling import PromptEmbeds
from rlhf.training import step_generator
from rollouts.store import RolloutStore


@dataclass
class PairBatch:
    latents_w: torch.Tensor  # (B, C, T, H, W)
    latents_l: torch.Tensor  # (B, C, T, H, W)
    text: PromptEmbeds  # (B, L, D), (B, P)
    weights: torch.Tensor  # (B,)
    pair_ids: list[str]  # "chosen>rejected" for messages


def pairs_store_path(pairs_dir: Path) -> str | None:
    """The rollout store recorded in a pairs dataset's summary.json, if any."""
    try:
        summary = json.loads((pairs_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return (summary.get("metadata") or {}).get("store")


def check_store_files(store: RolloutStore, sample_ids: Iterable[str], prompt_ids: Iterable[str], user: str) -> None:
    """Every sample and prompt-embedding file a trainer will read must be present and complete (its header read
    back, which safetensors checks against the file's size): a bad one fails now, not at step N. `user` names
    what reads them in the message ("the pairs DIR")."""
    samples = {store.sample_path(sample) for sample in sample_ids}
    embeds = {store.embeds_path(prompt) for prompt in prompt_ids}
    for path, tensor in [*((p, "latents") for p in sorted(samples)), *((p, "prompt_embeds") for p in sorted(embeds))]:
        if not path.is_file():
            raise UserError(f"{path}: missing from the rollout store ({user} use it); rerun the rollout into "
                            f"{store.root} with its config to regenerate it")
        try:
            with safe_open(str(path), framework="pt") as handle:
                present = tensor in handle.keys()
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: truncated or corrupt ({one_line(err)}); delete it and rerun the rollout into "
                            f"{store.root} to regenerate it") from None
        if not present:
            raise UserError(f"{path}: has no {tensor!r} tensor; delete it and rerun the rollout into {store.root}")


def store_family(store: RolloutStore) -> str | None:
    """The model family the store was sampled with, when the rollout recorded one (any but ContentV)."""
    return store.settings.get("family")


def check_store_fits(store: RolloutStore, prompt_id: str, model_dir: str | Path) -> None:
    """The store's latents and embeddings (those of `prompt_id`) must match the input sizes of the transformer in
    `model_dir` (of the store's model family)."""
    from rlhf.models.family import family_for
    from rlhf.models.loader import read_transformer_config

    family = store_family(store)
    config = read_transformer_config(model_dir, family)
    sizes = family_for(model_dir, family).text_sizes(config)
    text = store.load_embeds(prompt_id)
    expected = {
        "latent channels": (store.latent_shape[0], config["in_channels"]),
        "text feature size": (text.prompt_embeds.shape[-1], sizes["text feature size"]),
        "pooled text size": (0 if text.pooled is None else text.pooled.shape[-1], sizes["pooled text size"]),
    }
    for what, (found, wanted) in expected.items():
        if found != wanted:
            raise UserError(f"{store.meta_path}: the store's {what} is {found} but the transformer in "
                            f"{model_dir} expects {wanted}; the store was made with another model")


def epoch_batch(size: int, micro_batch: int, batch_size: int, rank: int, world_size: int, seed: int) -> list[int]:
    """Indices into `size` items of global micro-batch `micro_batch` for process `rank`: micro-batch m of epoch e
    takes positions of a permutation seeded by (seed, e). The caller checks that one global batch fits."""
    per_epoch = size // (batch_size * world_size)
    epoch, position = divmod(micro_batch, per_epoch)
    order = torch.randperm(size, generator=step_generator(seed, epoch, -1)).tolist()
    start = (position * world_size + rank) * batch_size
    return order[start : start + batch_size]


class PairData:
    def __init__(self, pairs_dir: str | Path, store: RolloutStore, weighting: str = "none"):
        from datasets import load_from_disk

        self.pairs_dir = Path(pairs_dir)
        try:
            dataset = load_from_disk(str(self.pairs_dir))
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"{self.pairs_dir}: not a pairs dataset ({err})") from None
        missing = {"prompt_id", "chosen_id", "rejected_id", "margin"} - set(dataset.column_names)
        if missing:
            raise UserError(f"{self.pairs_dir}: pairs dataset lacks columns {sorted(missing)}")
        if len(dataset) == 0:
            raise UserError(f"{self.pairs_dir}: the pairs dataset is empty; nothing to train on")
        self.store = store
        self.rows = dataset.select_columns(["prompt_id", "chosen_id", "rejected_id", "margin"]).to_list()
        known = {row["sample_id"] for row in store.manifest()}
        absent = sorted({r[k] for r in self.rows for k in ("chosen_id", "rejected_id")} - known)
        if absent:
            raise UserError(f"{self.pairs_dir}: {len(absent)} pair sample(s) are not in the rollout store "
                            f"{store.root} (e.g. {absent[0]}); were the pairs built from another store?")
        margins = torch.tensor([float(r["margin"]) for r in self.rows], dtype=torch.float64)
        if weighting == "margin":
            self._check_margins(margins)
            self.weights = (margins / margins.mean()).float()
        else:
            self.weights = torch.ones(len(self.rows))

    def _check_margins(self, margins: torch.Tensor) -> None:
        """Margin weighting needs every margin finite and > 0: a NaN spreads to every weight through the mean, a
        zero drops its pair, and a negative one turns its pair's preference around."""
        bad = (~torch.isfinite(margins) | (margins <= 0)).nonzero().flatten().tolist()
        if bad:
            row = self.rows[bad[0]]
            raise UserError(f"{self.pairs_dir}: pair_weighting margin needs every margin finite and > 0, but "
                            f"{len(bad)} of {len(self.rows)} pair(s) have another (e.g. {row['chosen_id']}>"
                            f"{row['rejected_id']}: margin {row['margin']}); use pair_weighting none or rebuild "
                            "the pairs with min_margin > 0")

    def digest(self) -> str:
        """sha256 of the pairs (ids and margins, in order): the data a run trains on, recorded in checkpoints."""
        return hashlib.sha256(json.dumps(self.rows, sort_keys=True).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.rows)

    def check_files(self) -> None:
        """Every sample and prompt-embedding file the pairs reference is present and complete."""
        check_store_files(self.store, (row[side] for row in self.rows for side in ("chosen_id", "rejected_id")),
                          (row["prompt_id"] for row in self.rows), f"the pairs {self.pairs_dir}")

    def check_fits(self, model_dir: str | Path) -> None:
        """The store's latents and embeddings must match the input sizes of the transformer in `model_dir`."""
        check_store_fits(self.store, self.rows[0]["prompt_id"], model_dir)

    def batches_per_epoch(self, batch_size: int, world_size: int) -> int:
        count = len(self) // (batch_size * world_size)
        if count == 0:
            raise UserError(f"{self.pairs_dir}: {len(self)} pair(s) are fewer than one global batch "
                            f"(batch_size {batch_size} x {world_size} process(es))")
        return count

    def indices(self, micro_batch: int, batch_size: int, rank: int, world_size: int, seed: int) -> list[int]:
        """Pair indices of global micro-batch `micro_batch` for process `rank`."""
        self.batches_per_epoch(batch_size, world_size)  # raises unless one global batch fits
        return epoch_batch(len(self), micro_batch, batch_size, rank, world_size, seed)

    def batch(self, indices: list[int]) -> PairBatch:
        rows = [self.rows[i] for i in indices]
        w = torch.stack([self.store.load_sample(r["chosen_id"])["latents"] for r in rows])
        lo = torch.stack([self.store.load_sample(r["rejected_id"])["latents"] for r in rows])
        text = PromptEmbeds.cat([self.store.load_embeds(r["prompt_id"]) for r in rows])
        return PairBatch(w, lo, text, self.weights[indices], [f"{r['chosen_id']}>{r['rejected_id']}" for r in rows])
