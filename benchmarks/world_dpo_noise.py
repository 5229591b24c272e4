"""Why does Flow-DPO move a misaligned base so little? Where, in noise level, it satisfies its loss.

On the world, a sample's taught attributes (which colour, which size) are decided in the first, high-noise
sampling steps; the low-noise steps only refine a disc already placed. Flow-DPO's loss, `-log sigmoid(-beta/2 *
((e_w - e_w_ref) - (e_l - e_l_ref)))`, is averaged over the noise levels its sigma sampler draws. If the policy
can push that margin up where it is cheap (fitting the winners' and losers' exact pixels at low noise), the
sigmoid saturates without the high-noise predictions that pick the colour moving at all.

First, where the attributes are decided (`decision_by_sigma`): the base samples validation prompts and, at each
sampling step, its current prediction of the clean clip `x0 = x_t - sigma * v` is decoded and read by the oracle;
the row gives, per step's sigma, the share of samples whose attributes there already read as in the final clip,
and the share of each sigma sampler's training draws above sigma 0.85 (`draws_above_0.85`).

Which text channel carries the colour word (`text_channel`): the validation prompts are sampled with the
token features of the prompt and the pooled features of the same prompt in the opposite colour (red <-> cyan,
yellow <-> blue, green <-> magenta), and the other way round; the row gives the share of samples drawn in the
colour (or its confusion partner) of the token prompt and of the pooled prompt. `token_compositionality` gives
the cosine between the token-feature differences `red - yellow` of the same prompt at each pair of sizes: near 1,
a word's features do not depend on its neighbours, so what is learned on some combinations can carry to others.

Then it measures the trainer. On one rollout and its learned-reward pairs (the validation protocol: settings are chosen on
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
DECISION_SIGMA = 0.85  # the sigma from which `draws_above` counts a sampler's training draws


@torch.no_grad()
def decision_by_sigma(evaluator: WorldEvaluator, prompts: list[str], seeds: list[int]) -> dict[str, dict]:
    """Per sampling step (keyed by its sigma): the share of samples whose oracle reading of the predicted clean
    clip `x_t - sigma * v` already equals the final clip's, per attribute (an unreadable final reading counts
    as not decided)."""
    from rlhf.sampling import euler_step, initial_noise, latent_shape, predict_velocity
    from rlhf.video import to_uint8_frames
    from rlhf.world.oracle import read_clip

    generator, sampling = evaluator.generator, evaluator.sampling
    embeds = generator.encode_prompts([*prompts, sampling.negative_prompt])
    cond = embeds.select([index for index in range(len(prompts)) for _ in seeds])
    uncond = embeds.select(len(prompts))
    shape = latent_shape(sampling.frames, sampling.height, sampling.width, generator.transformer.config.patch_size)
    latents = initial_noise(shape, [seed for _ in prompts for seed in seeds]).float()
    sigmas = generator.schedule.sigmas(sampling.steps)
    predicted = []
    for index in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
        velocity = predict_velocity(generator.transformer, latents, sigma, cond, uncond, sampling.guidance,
                                    sampling.batch_cfg, generator.schedule.num_train_timesteps)
        predicted.append((sigma, [read_clip(to_uint8_frames(v)) for v in generator.decode(latents - sigma * velocity)]))
        latents = euler_step(latents, velocity, sigma, sigma_next)
    final = [read_clip(to_uint8_frames(v)) for v in generator.decode(latents)]
    return {f"{sigma:.2f}": {attribute: sum(getattr(r, attribute) is not None and getattr(r, attribute) ==
                                             getattr(f, attribute) for r, f in zip(readings, final, strict=True))
                             / len(final) for attribute in ("colour", "size", "direction")}
            for sigma, readings in predicted}


@torch.no_grad()
def text_channel(evaluator: WorldEvaluator, prompts: list[str], seeds: list[int]) -> dict[str, dict[str, float]]:
    """Per swap (`pooled_swapped`: tokens of the prompt, pooled features of its opposite-colour twin;
    `tokens_swapped`: the reverse): the share of samples drawn in the token prompt's colour or its confusion
    partner (`follows_tokens`) and in the pooled prompt's (`follows_pooled`)."""
    from rlhf.sampling import PromptEmbeds
    from rlhf.video import to_uint8_frames
    from rlhf.world import scene
    from rlhf.world.oracle import read_clip

    names = list(scene.COLOURS)
    opposite = [text.replace(colour, names[(names.index(colour) + 3) % len(names)])
                for text in prompts for colour in [scene.parse_prompt(text)[0]]]
    generator, sampling = evaluator.generator, evaluator.sampling
    embeds = generator.encode_prompts([*prompts, *opposite, sampling.negative_prompt])
    count, uncond = len(prompts), embeds.select(2 * len(prompts))
    rows = [index for index in range(count) for _ in seeds]

    def drawn_in(text: str, colour: str | None) -> bool:
        asked = scene.parse_prompt(text)[0]
        return colour in (asked, scene.CONFUSION["colour"][asked])

    shares = {}
    for swap, (token_rows, pooled_rows) in {"pooled_swapped": (rows, [count + i for i in rows]),
                                            "tokens_swapped": ([count + i for i in rows], rows)}.items():
        cond = PromptEmbeds(embeds.prompt_embeds[token_rows], embeds.pooled[pooled_rows])
        latents = generator.sample_latents(cond, uncond, [seed for _ in range(count) for seed in seeds], sampling,
                                           progress=False)
        colours = [read_clip(to_uint8_frames(v)).colour for v in generator.decode(latents)]
        texts = [*prompts, *opposite]
        shares[swap] = {
            "follows_tokens": sum(drawn_in(texts[t], c) for t, c in zip(token_rows, colours, strict=True)) / len(rows),
            "follows_pooled": sum(drawn_in(texts[p], c) for p, c in zip(pooled_rows, colours, strict=True)) / len(rows)}
    return shares


@torch.no_grad()
def token_compositionality(evaluator: WorldEvaluator) -> dict[str, float]:
    """Cosine between the token-feature differences `red - yellow` of "a SIZE COLOUR circle moving left" for each
    pair of sizes."""
    from itertools import combinations

    from rlhf.world import scene

    def features(colour: str, size: str) -> torch.Tensor:
        return evaluator.generator.encode_prompts([f"a {size} {colour} circle moving left"]).prompt_embeds.flatten()

    differences = {size: torch.nn.functional.normalize(features("red", size) - features("yellow", size), dim=0)
                   for size in scene.SIZES}
    return {f"{a}/{b}": round(float(differences[a] @ differences[b]), 3) for a, b in combinations(scene.SIZES, 2)}


def draws_above(logit_mean: float, logit_std: float = 1.0, sigma: float = DECISION_SIGMA) -> float:
    """The share of logit-normal(`logit_mean`, `logit_std`) training sigmas above `sigma` (no shift: the world
    scheduler's is 1): 1 - Phi((logit(sigma) - mean) / std)."""
    import math

    z = (math.log(sigma / (1 - sigma)) - logit_mean) / logit_std
    return 0.5 * math.erfc(z / math.sqrt(2))


@torch.no_grad()
def margin_by_sigma(pairs_dir: Path, adapter: Path) -> dict[str, float]:
    """The trained policy's implicit reward margin on the first `MARGIN_PAIRS` pairs at each sigma of `BINS`."""
    from dpo.data import PairData
    from dpo.losses import flow_matching_error
    from dpo.trainer import velocity
    from rlhf.lora import load_adapter, use_adapter
    from rlhf.models.loader import load_model
    from rlhf.world import MODEL_DIR
    from rollouts.store import RolloutStore

    data = PairData(pairs_dir, RolloutStore(pairs_dir.parent / "rollout"))
    batch = data.batch(list(range(min(MARGIN_PAIRS, len(data)))))
    transformer = load_model(MODEL_DIR, dtype="fp32", load_text_encoders=False).transformer
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
                 "taught": float(base["taught"].mean()), "cleanliness": float(base["cleanliness"].mean()),
                 "decided_by_sigma": decision_by_sigma(evaluator, prompts, seeds),
                 "text_channel": text_channel(evaluator, prompts, seeds),
                 "token_compositionality": token_compositionality(evaluator),
                 f"draws_above_{DECISION_SIGMA}": {f"logit_mean {mean:g}": round(draws_above(mean), 3)
                                                   for mean in means}}]
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
