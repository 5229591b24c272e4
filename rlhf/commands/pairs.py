"""`contentv-rlhf pairs`: rank each prompt's scored samples into preference pairs (a `datasets` dataset)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from rewards.pairs import PairsConfig
from rlhf.config import ConfigError, add_config_arguments, config_from_args, option
from rlhf.io import output_path_problem

HELP = "Build preference pairs from a scored rollout store and save them as a Hugging Face dataset."
EXAMPLES = """\
  contentv-rlhf pairs --store runs/rollout-r0 --out runs/pairs-r0
  contentv-rlhf pairs --store runs/rollout-r0 --out runs/pairs-r0 --config configs/pairs.yaml
  contentv-rlhf pairs --store runs/rollout-r0 --out runs/pairs-pareto --policy pareto --overwrite
  contentv-rlhf pairs --store runs/rollout-r0 --out runs/pairs-r1 --weights '{clip: 1, aesthetic: 0.5}'
Without --weights, each score keeps the weight it had in the rewards config used by `score` (set for raw
scores; pairs weights the normalised ones: see --weights).
"""


@dataclass
class PairsStageConfig(PairsConfig):
    """`pairs`: the pair policy plus where to read scores and write the dataset."""

    store: str | None = option(None, "Scored rollout store (see `contentv-rlhf score`).")
    out: str | None = option(None, "Output directory of the pairs dataset (datasets.save_to_disk).")
    overwrite: bool = option(False, "Replace an existing pairs dataset in `out` (never a folder of another kind).")

    def __post_init__(self) -> None:
        PairsConfig.__post_init__(self)
        if not self.store:
            raise ConfigError("store", "is required: the scored rollout store")
        if not self.out:
            raise ConfigError("out", "is required: the pairs dataset directory")
        if problem := output_path_problem(self.out, "dir"):
            raise ConfigError("out", problem)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PairsStageConfig)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from rewards.pairs import build_pairs, save_pairs
    from rewards.scoring import score_table, score_weights
    from rlhf.outputs import PAIRS_DATASET, check_output
    from rollouts.store import RolloutStore

    config = config_from_args(PairsStageConfig, args)
    check_output(config.out, field="field 'out'", kind=PAIRS_DATASET, inputs={"store": config.store},
                 overwrite=config.overwrite)
    store = RolloutStore(config.store)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(PairsConfig)}
    # Without explicit weights, each dimension keeps the weight it had in the rewards config that scored it.
    fields["weights"] = fields["weights"] or score_weights(store)
    pair_config = PairsConfig(**fields)
    pairs, summary = build_pairs(score_table(store), pair_config)
    out = save_pairs(pairs, summary, config.out, {"store": str(store.root.resolve())}, overwrite=config.overwrite)
    counts, dropped = summary["counts"], summary["dropped"]
    print(f"wrote {counts['pairs']} pairs from {counts['prompts']} prompts to {out} "
          f"(dropped: {', '.join(f'{k} {v}' for k, v in dropped.items())}; "
          f"excluded samples: {counts['excluded_samples']})")
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}")
    return 0
