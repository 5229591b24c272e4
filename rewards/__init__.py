"""Reward scorers for generated videos: one interface, a small registry, strict configs.

- `rewards.base`: the `Scorer` interface (`scorer(frames (B, T, 3, H, W) in [0, 1], prompts) -> (B,)`).
- `rewards.registry`: `SCORERS`, the `{name: "module:Class"}` mapping configs pick from.
- `rewards.config`: `RewardsConfig`, the `rewards` config section, validated strictly.
- `rewards.build`: `build_scorers`, `score_videos`, `weighted_reward`.
- Scorers: `clip` (text-video alignment), `aesthetic` (LAION predictor), `motion` (optical-flow
  dynamic degree with a warp-error penalty), and the weight-free `brightness`, `contrast`,
  `colorfulness`, `frame_diff_motion` (`rewards.analytic`); optical flow in `rewards.flow`; `vlm_judge`
  (`rewards.vlm_judge`: a Qwen2-VL-family judge's expected rating from its rating tokens' logits).
- `rewards.server` (`contentv-rlhf reward-server`), `rewards.remote` (the `remote: http://host:port` entries
  that score there) and `rewards.wire` (their safetensors wire format).
- `rewards.scoring` (the score stage over a rollout store) and `rewards.pairs` (preference pairs
  from the scores) build on these.

This package file imports nothing heavy, so configs can name `rewards.config.RewardsConfig` cheaply.
"""
