"""Why does Flow-DPO move a misaligned base so little? Where, in noise level, it satisfies its loss.

On the world, a sample's taught attributes (which colour, which size) are decided in the first, high-noise
sampling steps; the low-noise steps only refine a disc already placed. Flow-DPO's loss, `-log sigmoid(-beta/2 *
((e_w - e_w_ref) - (e_l - e_l_ref)))`, is averaged over the noise levels its sigma sampler draws. If the policy
can push that margin up where it is cheap (fitting the winners' and losers' exact pixels at low noise), the
sigmoid saturates without the high-noise predictions that pick the colour moving at all.

This measures it. On one rollout and its learned-reward pairs (the validation protocol: settings are chosen on
the validation split, never the test split), it trains Flow-DPO with the shipped config at each sigma
setting (`--logit-means`) and reports for each:

- the implicit reward margin per noise level: `(e_w_ref - e_w) - (e_l_ref - e_l)` averaged over pairs at sigma
  in each of `BINS` (fixed noise per pair): where the trained policy prefers the winners;
- the oracle's taught accuracy on the validation split (seeds of the validation namespace) against the base.

    python benchmarks/world_dpo_noise.py [--logit-means 0,1.5] [--record]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import emit_rows  # noqa: E402
from benchmarks.world_alignment import CONFIGS, WorldEvaluator, evaluation_splits, run_stage  # noqa: E402

BINS = (0.1, 0.3, 0.5, 0.7, 0.9)  # sigma at which the margin is measured (1 = pure noise)
MARGIN_PAIRS = 64


@torch.no_grad()
def margin_by_sigma(pairs_dir: Path, adapter: Path) -> dict[str, float]:
    """The trained policy's implicit reward margin on the first `MARGIN_PAIRS` pairs at each sigma of `BINS`."""
    from dpo.data import PairData
    from dpo.losses import flow_matching_error
    from dpo.trainer import velocity
    from rlhf.lora import load_adapter, use_adapter
    from rlhf.models.loader import load_contentv
    from rlhf.world import MODEL_DIR
    from rollouts.store import RolloutStore

    data = PairData(pairs_dir, RolloutStore(pairs_dir.parent / "rollout"))
    batch = data.batch(list(range(min(MARGIN_PAIRS, len(data)))))
    transformer = load_contentv(MODEL_DIR, dtype="fp32", load_text_encoders=False).transformer
    load_adapter(transformer, str(adapter), adapter_name="policy")
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(batch.latents_w.shape, generator=generator)
    margins = {}
    for sigma in BINS:
        errors = {}
        for side, x0 in (("w", batch.latents_w.float()), ("l", batch.latents_l.float())):
            x_t = (1 - sigma) * x0 + sigma * noise
            sigmas = torch.full((x0.shape[0],), sigma)
            for name in ("policy", None):
                use_adapter(transformer, name)
                errors[side, name] = flow_matching_error(velocity(transformer, x_t, sigmas, batch.text, 1000), noise, x0)
        margin = (errors["w", None] - errors["w", "policy"]) - (errors["l", None] - errors["l", "policy"])
        margins[f"{sigma:.1f}"] = float(margin.mean())
    return margins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--logit-means", default="0,1.5",
                        help="Flow-DPO sigma sampler logit means to compare (0: the default, centred on sigma 0.5; "
                             "positive: high noise)")
    parser.add_argument("--seeds", type=int, default=4, help="validation seeds per prompt (default: 4)")
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    args = parser.parse_args()
    from rlhf.world import scene

    started = time.perf_counter()
    means = [float(v) for v in args.logit_means.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        store = out / "rollout"
        run_stage(["rollout", "--config", CONFIGS / "rollout.yaml", "--out", store, "--device", args.device,
                   "--seed", scene.seed("rollout", 900)])
        run_stage(["score", "--store", store, "--config", CONFIGS / "rewards.yaml"])
        run_stage(["pairs", "--store", store, "--out", out / "pairs", "--config", CONFIGS / "pairs.yaml"])
        adapters = {}
        for mean in means:
            name = f"logit_mean_{mean:g}".replace(".", "p")  # adapter names may not contain "."
            run_stage(["train", "--config", CONFIGS / "dpo.yaml", "--pairs", out / "pairs", "--output-dir", out / name,
                       "--overwrite", "--device", args.device, "--logit-mean", mean,
                       "--seed", scene.seed("training", 900)])
            adapters[name] = out / name / "adapter"
        evaluator = WorldEvaluator(adapters, args.device)
        prompts, seeds = evaluation_splits("validation", args.seeds, 1)["validation"]
        evaluator.use(None)
        base = evaluator.sample(prompts, seeds)
        rows = [{"benchmark": "world_dpo_noise", "method": "base", "split": "validation",
                 "taught": float(base["taught"].mean()), "cleanliness": float(base["cleanliness"].mean())}]
        for name, adapter in adapters.items():
            evaluator.use(name)
            scores = evaluator.sample(prompts, seeds)
            rows.append({"benchmark": "world_dpo_noise", "method": f"dpo {name}", "split": "validation",
                         "taught": float(scores["taught"].mean()),
                         "taught_gain": float((scores["taught"] - base["taught"]).mean()),
                         "cleanliness": float(scores["cleanliness"].mean()),
                         "margin_by_sigma": margin_by_sigma(out / "pairs", adapter)})
    emit_rows("world_dpo_noise", rows, time.perf_counter() - started, args.record)


if __name__ == "__main__":
    main()
