"""`contentv-rlhf report`: a tiny real run (store, pairs, train, eval) rendered as one self-contained page,
checked as text (embedded media, escaping, no network references) and loaded in headless Chromium; and the
report of each other kind of run directory (a train run, an eval directory, an online run) checked against
the files those commands wrote."""

import html
import json
import re
import shutil

import pytest
import yaml

from rlhf.report import RUN_FILE, write_run_manifest
from tests.conftest import REPO, call_cli

EVIL = "<script>alert(1)</script> a \"quoted\" & 'single' cat"
EVAL_PROMPTS = ['a red "ball" & a cube', EVIL]
SEEDS = 2
EXAMPLES = 2  # pairs shown at each end of the margin range (the command's default)


@pytest.fixture(scope="module")
def tiny_run(tiny_store, tiny_pairs, tmp_path_factory):
    """run/ with rollout/ (a copy of the tiny store, one sample given an mp4), train/, eval/ and run.json;
    the pairs dataset stays outside the run directory (an absolute path in run.json)."""
    import numpy as np
    from datasets import load_from_disk

    from rlhf.cli import main
    from rlhf.video import write_mp4

    root = tmp_path_factory.mktemp("report")
    run = root / "run"
    store = run / "rollout"
    shutil.copytree(tiny_store.root, store)
    pairs = load_from_disk(str(tiny_pairs)).to_list()
    widest = max(pairs, key=lambda p: p["margin"])
    frames = tiny_store.load_sample(widest["chosen_id"])["frames"].numpy()  # (F, H, W, 3) uint8
    write_mp4(store / "videos" / f"{widest['chosen_id']}.mp4", np.ascontiguousarray(frames), fps=8)

    assert main(["train", "--pairs", str(tiny_pairs), "--output-dir", str(run / "train"), "--max-steps", "3",
                 "--dtype", "fp32", "--mixed-precision", "no", "--lora-rank", "4", "--lora-alpha", "4",
                 "--report-to", "none", "--no-gradient-checkpointing"]) == 0
    prompts = root / "eval_prompts.txt"
    prompts.write_text("\n".join(EVAL_PROMPTS) + "\n")
    rewards, held_out = root / "rewards.yaml", root / "held_out.yaml"
    rewards.write_text("device: cpu\nscorers:\n  brightness: {weight: 1.0}\n  colorfulness: {weight: 0.5}\n")
    held_out.write_text("device: cpu\nscorers:\n  contrast: {weight: 1.0}\n")
    assert main(["eval", "--model", tiny_store.settings["model"], "--adapters", str(run / "train" / "adapter"),
                 "--prompts", str(prompts), "--seeds", str(SEEDS), "--rewards", str(rewards),
                 "--held-out-rewards", str(held_out), "--out", str(run / "eval"), "--frames", "5",
                 "--height", "32", "--width", "32", "--steps", "2", "--dtype", "fp32"]) == 0
    write_run_manifest(run, store=store, pairs=tiny_pairs, train=run / "train", eval=run / "eval")
    shown = sorted(pairs, key=lambda p: p["margin"])
    shown = shown[:EXAMPLES] + shown[-EXAMPLES:] if len(shown) > 2 * EXAMPLES else shown
    return {"dir": run, "pairs_shown": len(shown)}


@pytest.fixture(scope="module")
def report_page(tiny_run):
    from rlhf.cli import main

    assert main(["report", "--run", str(tiny_run["dir"])]) == 0
    return (tiny_run["dir"] / "report.html").read_text(encoding="utf-8")


def test_run_manifest_paths_relative_inside_absolute_outside(tiny_run, tiny_pairs):
    data = json.loads((tiny_run["dir"] / RUN_FILE).read_text())
    assert data["kind"] == "contentv-rlhf.run"
    assert data["stages"] == {"store": "rollout", "train": "train", "eval": "eval", "pairs": str(tiny_pairs.resolve())}
    with pytest.raises(ValueError, match="unknown stage"):
        write_run_manifest(tiny_run["dir"], evaluation="eval")


def test_report_embeds_videos_plots_and_table(tiny_run, report_page):
    page = report_page
    eval_videos = len(EVAL_PROMPTS) * 2  # one row per prompt (each its own group): base and one candidate
    pair_media = 2 * tiny_run["pairs_shown"]  # chosen and rejected of each shown pair; one has an mp4
    videos = re.findall(r'<video [^>]*src="data:video/mp4;base64,[A-Za-z0-9+/=]+"', page)
    assert len(videos) == page.count("<video") == eval_videos + 1
    strips = re.findall(r'<img class="frames" src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)
    assert len(strips) == pair_media - 1
    logged = [json.loads(line) for line in (tiny_run["dir"] / "train" / "logs" / "metrics.jsonl").read_text()
              .splitlines()]
    for metric in ("loss", "implicit_accuracy", "reward_margin", "lr"):  # a plot if it changed, else a number
        varies = len({row[metric] for row in logged}) > 1
        plotted = re.search(f'<svg class="plot"[^>]* aria-label="{metric}">', page) is not None
        number = re.search(rf'<tr><td>{metric}</td><td class="constant">{re.escape(format(logged[0][metric], ".6g"))}'
                           "</td>", section(page, "training")) is not None
        assert (plotted, number) == (varies, not varies), metric
    table = page[page.index('<table class="eval">'):]
    table = table[:table.index("</table>")]
    for reward, kind in (("combined", "trained"), ("brightness", "trained"), ("colorfulness", "trained"),
                         ("contrast", "held_out")):
        assert re.search(rf"<td>{reward}</td><td><span class=\"kind {kind}\">", table), reward
    assert "Section skipped" not in page
    assert not list(tiny_run["dir"].glob(".*tmp-*"))  # written atomically, no temporary left behind


def test_report_escapes_prompts_and_references_nothing_outside(report_page):
    page = report_page
    assert "<script>alert" not in page and "alert(1)</script>" not in page
    assert html.escape(EVIL, quote=True) in page  # as text and inside title="..." attributes
    assert f'title="{html.escape(EVIL, quote=True)} | base | seed' in page
    assert 'red "ball"' not in page and "red &quot;ball&quot; &amp; a cube" in page
    assert not re.search(r"https?://", page)
    assert not re.search(r"""(?:src|href)\s*=\s*(?!["']?(?:data:|#))""", page)  # only data: URIs and anchors
    assert page.count("<script>") == 1  # the page's own status script, nothing else


def test_report_skips_missing_sections_with_a_note(tiny_run, tmp_path, capsys):
    write_run_manifest(tmp_path, eval=tiny_run["dir"] / "eval", train=tmp_path / "no-such-train")
    out = tmp_path / "sub" / "page.html"
    code, stdout, stderr = call_cli(capsys, "report", "--run", tmp_path, "--out", out)
    assert code == 0, stderr
    assert str(out) in stdout
    page = out.read_text()
    assert "Section skipped: no pairs stage in run.json" in page
    assert "Section skipped: " + html.escape(str(tmp_path / "no-such-train" / "logs" / "metrics.jsonl")) in page
    assert page.count("<video") == len(EVAL_PROMPTS) * 2  # a row per prompt: base | tuned
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("case", ["no-run-json", "corrupt", "other-kind", "no-eval-or-train-stage", "eval-missing",
                                  "not-a-dir"])
def test_report_bad_run_dir_is_one_line_exit_2(case, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    manifest = run / RUN_FILE
    if case == "corrupt":
        manifest.write_text('{"kind": "contentv-rlhf.run", "stages": ')
    elif case == "other-kind":
        manifest.write_text(json.dumps({"kind": "something-else", "stages": {"eval": "eval"}}))
    elif case == "no-eval-or-train-stage":
        manifest.write_text(json.dumps({"kind": "contentv-rlhf.run", "stages": {"store": "rollout"}}))
    elif case == "eval-missing":
        write_run_manifest(run, eval=run / "eval")
    elif case == "not-a-dir":
        run = tmp_path / "missing"
    code, stdout, stderr = call_cli(capsys, "report", "--run", run)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("contentv-rlhf report: error: ")
    assert str(run) in stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not (run / "report.html").exists()


# ---- other kinds of run directory ------------------------------------------------------------------------


def section(page: str, anchor: str) -> str:
    """The HTML of one `<section id=anchor>` of the page ('' if the page has none)."""
    start = page.find(f'<section id="{anchor}">')
    return "" if start < 0 else page[start:page.index("</section>", start)]


def curve_points(page: str, line: str) -> dict[int, str]:
    """step -> value label of the points of the plotted line named `line` in the loss plot."""
    plot = re.search(r'<svg class="plot"[^>]* aria-label="loss">.*?</svg>', page, re.S).group(0)
    return {int(step): value for step, value in re.findall(rf"<title>{re.escape(line)} step (\d+): ([^<]+)</title>",
                                                           plot)}


def logged_losses(train_dir) -> dict[int, str]:
    rows = [json.loads(line) for line in (train_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: f"{row['loss']:.6g}" for row in rows}


def report_of(capsys, run_dir, out) -> str:
    code, stdout, stderr = call_cli(capsys, "report", "--run", run_dir, "--out", out)
    assert code == 0, stderr
    assert str(out) in stdout
    return out.read_text(encoding="utf-8")


def test_report_of_a_train_run(tiny_run, tiny_pairs, tmp_path, capsys):
    """Curves from its metrics.jsonl, and the pairs (with the store) its summary.json names; no eval parts."""
    page = report_of(capsys, tiny_run["dir"] / "train", tmp_path / "train.html")
    assert "contentv-rlhf training run report" in page
    assert curve_points(page, "loss") == logged_losses(tiny_run["dir"] / "train")
    pairs = section(page, "pairs")
    assert pairs.count('<img class="frames"') == 2 * tiny_run["pairs_shown"]  # the store has no mp4s
    assert "Section skipped" not in page and "<video" not in page and not section(page, "eval")


def test_report_of_an_eval_directory(tiny_run, tmp_path, capsys):
    """The eval table and videos, plus the training run its candidate adapter came from."""
    page = report_of(capsys, tiny_run["dir"] / "eval", tmp_path / "eval.html")
    assert "contentv-rlhf evaluation report" in page
    assert page.count("<video") == len(EVAL_PROMPTS) * 2  # a row per prompt: base | tuned
    result = json.loads((tiny_run["dir"] / "eval" / "eval.json").read_text())
    diff = result["comparisons"]["candidate0"]["brightness"]["mean_diff"]
    assert re.search(rf'<td>brightness</td>.*?<td class="diff">{re.escape(format(diff, "+.3g"))}</td>',
                     section(page, "eval"))
    assert curve_points(page, "loss") == logged_losses(tiny_run["dir"] / "train")
    assert section(page, "pairs").count('<img class="frames"') == 2 * tiny_run["pairs_shown"]
    assert "Section skipped" not in page


@pytest.fixture(scope="module")
def online_run(tiny_model_dir, tmp_path_factory):
    from rlhf.cli import main
    from tests.test_online import online_config

    root = tmp_path_factory.mktemp("online")
    out = root / "online"
    config = online_config(root, tiny_model_dir, out)
    data = yaml.safe_load(config.read_text())
    data["train"].update(max_steps=3, save_every=3)  # fewer steps than test_online's resume test needs
    config.write_text(yaml.safe_dump(data))
    assert main(["online", "--config", str(config)]) == 0
    return out


def test_report_of_an_online_run(online_run, tmp_path, capsys):
    """One table row per round of rounds.json, every round's curves (one line each), the last round's pairs."""
    page = report_of(capsys, online_run, tmp_path / "online.html")
    assert "contentv-rlhf online run report" in page
    rows = json.loads((online_run / "rounds.json").read_text())
    table = section(page, "rounds")
    assert [int(r) for r in re.findall(r"<tr><td>(\d+)</td>", table)] == [row["round"] for row in rows] == [0, 1]
    for row in rows:
        cells = re.search(rf"<tr><td>{row['round']}</td>(.*?)</tr>", table).group(1)
        assert f"<td>{row['pairs']}</td>" in cells
        for value in row["mean_rewards"].values():
            assert f"<td>{value:.5g}</td>" in cells
    assert 'aria-label="mean reward per round"' in table
    for index in (0, 1):
        losses = logged_losses(online_run / f"round-{index:02d}" / "train")
        assert len(losses) == 3 and curve_points(page, f"round {index:02d}") == losses
    assert section(page, "pairs").count('<img class="frames"') > 0
    assert "Section skipped" not in page


# ---- the shapes world's test split: a row per group, the verdict, the oracle's accuracy -------------------

WORLD_PROMPTS = REPO / "configs" / "world" / "test_prompts.txt"
WORLD_GROUPS = ["large red", "small green", "medium cyan", "large magenta"]  # its colour-size combinations
ORACLE = ("oracle_colour", "oracle_size", "oracle_direction", "oracle_taught")


def test_spread_prompts_covers_every_group_with_varied_prompts():
    from rlhf.report_inputs import groups_of, spread_prompts

    prompts = [p for p in WORLD_PROMPTS.read_text().splitlines() if p.strip()]
    assert list(groups_of(prompts)) == WORLD_GROUPS
    four = spread_prompts(prompts, 4)
    assert [prompts[i] for i in four] == ["a large red circle moving left", "a small green circle moving right",
                                          "a medium cyan circle moving up", "a large magenta circle moving down"]
    assert spread_prompts(prompts, 2) == [0, 8]  # fewer than the groups: evenly spaced groups
    eight = spread_prompts(prompts, 8)
    assert sorted(i // 4 for i in eight) == [0, 0, 1, 1, 2, 2, 3, 3] and len(set(eight)) == 8
    assert spread_prompts(prompts, 40) == list(range(16)) and spread_prompts(prompts, 0) == []
    assert spread_prompts(["a", "b", "c", "d", "e"], 2) == [0, 2]  # other prompts: each its own group


@pytest.fixture(scope="module")
def world_eval(tiny_run, tiny_model_dir, tmp_path_factory):
    """A real `eval` of the world's 16 test prompts (4 groups x 4 directions) x 2 seeds on the tiny model, saving
    4 prompts' videos, with trained and held-out rewards and the shipped oracle's ground-truth metrics; its
    candidate is the tiny run's adapter, so its report has curves and pairs too."""
    from rlhf.cli import main

    root = tmp_path_factory.mktemp("world-eval")
    rewards, held_out, truth = root / "rewards.yaml", root / "held_out.yaml", root / "truth.yaml"
    # As many metrics as the quickstart's eval: 3 trained rewards, 2 held-out, the shipped oracle's 6.
    rewards.write_text("device: cpu\nscorers:\n  brightness: {weight: 1.0}\n  colorfulness: {weight: 0.5}\n"
                       "  motion: {weight: 0.25, backend: lucas_kanade}\n")
    held_out.write_text("device: cpu\nscorers:\n  contrast: {weight: 1.0}\n  frame_diff_motion: {weight: 1.0}\n")
    truth.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "configs" / "world" / "ground_truth.yaml").read_text()),
                                     "device": "cpu"}))
    out = root / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--adapters", str(tiny_run["dir"] / "train" / "adapter"),
                 "--prompts", str(WORLD_PROMPTS), "--seeds", "2", "--seed-offset", "7", "--rewards", str(rewards),
                 "--held-out-rewards", str(held_out), "--ground-truth", str(truth), "--out", str(out),
                 "--save-videos", "4", "--frames", "5", "--height", "32", "--width", "32", "--steps", "2",
                 "--dtype", "fp32"]) == 0
    assert main(["report", "--run", str(out)]) == 0
    return {"dir": out, "result": json.loads((out / "eval.json").read_text()),
            "page": (out / "report.html").read_text(encoding="utf-8")}


def test_eval_saves_one_prompt_per_group_and_report_shows_a_row_each(world_eval):
    result, page = world_eval["result"], world_eval["page"]
    assert sorted(int(p) for p in result["videos"]["base"]) == [0, 5, 10, 15]  # a group each, four directions
    assert result["videos"]["candidate0"].keys() == result["videos"]["base"].keys()
    rows = re.findall(r'<div class="vrow">(.*?</table>)</div>', section(page, "videos"), re.S)
    assert [re.search(r'<div class="group-name">(.*?)</div>', row).group(1) for row in rows] == WORLD_GROUPS
    for index, row in enumerate(rows):
        prompt = result["prompts"][[0, 5, 10, 15][index]]
        seed = result["seeds"][index * 2 // 4]  # 2 seeds over 4 rows: evenly
        titles = re.findall(r'<video [^>]*title="([^"]*)"', row)
        assert titles == [f"{prompt} | base | seed {seed}", f"{prompt} | candidate0 | seed {seed}"]
        # 32 px frames shown 6x larger (the largest whole factor within 192 px), pixels kept sharp
        assert len(re.findall(r'<video [^>]* width="192" height="192" data-pixelated="1"', row)) == 2
        # the row's table: the oracle's reading of each video as a tick or a cross, from eval's scores
        p, s = [0, 5, 10, 15][index], index * 2 // 4
        for name in ORACLE:
            marks = ["&#10003;" if result["scores"][m][name][p][s] else "&#10007;" for m in ("base", "candidate0")]
            assert re.search(rf'<td[^>]*>{name}</td><td class="\w+">{marks[0]}</td><td class="\w+">{marks[1]}</td>',
                             row), name
    assert "<figcaption" in page and ">tuned</figcaption>" in page and "No videos saved for" not in page


def test_eval_table_shows_the_oracle_accuracy_per_attribute(world_eval):
    result, table = world_eval["result"], section(world_eval["page"], "eval")
    for name in ORACLE:
        row = result["comparisons"]["candidate0"][name]
        assert re.search(rf'<td>{name}</td><td><span class="kind truth">truth</span></td>'
                         rf'<td>{re.escape(format(row["base_mean"], ".1%"))}</td>'
                         rf'<td>{re.escape(format(row["candidate_mean"], ".1%"))}</td>'
                         rf'<td class="diff">{re.escape(format(row["mean_diff"] * 100, "+.1f"))} pts</td>', table), name
    assert re.search(r'<td>brightness</td><td><span class="kind trained">trained</span></td><td>\d', table)


def test_report_page_is_at_most_three_screens_before_the_curves(world_eval):
    """Sections in reading order: the verdict, the videos, the table, then the curves and the pairs."""
    page = world_eval["page"]
    order = [page.index(f'<section id="{a}">') for a in ("verdict", "videos", "eval", "training", "pairs")]
    assert order == sorted(order)


def _paired(base, tuned) -> dict:
    import numpy as np

    from rlhf.stats import compare_paired

    return compare_paired(np.array(base, float), np.array(tuned, float), resamples=500).to_dict()


def verdict_result(held_out_tuned: list[float]) -> dict:
    """An eval result with a rising trained reward, a flat one, a logged one, a held-out reward with the given
    tuned scores, and a 0/1 ground-truth metric that falls; the rows computed by rlhf.stats as eval does."""
    n = 40
    base = [0.1 * (i % 7) for i in range(n)]
    scores = {
        "clip": (base, [b + 0.2 + 0.01 * (i % 3) for i, b in enumerate(base)]),
        "aesthetic": (base, [b + (0.05 if i % 2 else -0.05) for i, b in enumerate(base)]),
        "idle": (base, [b + 1 for b in base]),
        "contrast": (base, held_out_tuned),
        "oracle_size": ([1.0] * 30 + [0.0] * 10, [1.0] * 18 + [0.0] * 22),
    }
    kinds = {"clip": "trained", "aesthetic": "trained", "idle": "logged", "contrast": "held_out",
             "oracle_size": "truth"}
    rows = {name: _paired(*pair) for name, pair in scores.items()}
    rows["combined"] = _paired([2 * a + b for a, b in zip(scores["clip"][0], scores["aesthetic"][0], strict=True)],
                               [2 * a + b for a, b in zip(scores["clip"][1], scores["aesthetic"][1], strict=True)])
    return {"rewards": {**kinds, "combined": "trained"}, "candidates": {"candidate0": "run/adapter"},
            "weights": {"clip": 2.0, "aesthetic": 1.0}, "comparisons": {"candidate0": rows},
            "scores": {"base": {k: [v[0]] for k, v in scores.items()}, "candidate0": {k: [v[1]] for k, v in scores.items()}}}


def test_verdict_says_up_down_or_no_change_with_the_ci_and_warns_of_hacking():
    from rlhf.report import eval_table_section, verdict_section

    base = [0.1 * (i % 7) for i in range(40)]
    result = verdict_result([b - 0.3 for b in base])
    page = verdict_section(result)
    rows = result["comparisons"]["candidate0"]
    items = dict(re.findall(r'<li class="(?:up|down|same)"><b>(\w+)</b> \(([^<]*?)\): ', page))
    assert list(items) == ["combined", "aesthetic", "clip", "oracle_size", "contrast"]  # no verdict on `logged`
    assert items["oracle_size"] == "ground truth" and items["contrast"] == "held-out reward"
    clip, flat, size = rows["clip"], rows["aesthetic"], rows["oracle_size"]
    assert clip["ci_low"] > 0 and flat["ci_low"] < 0 < flat["ci_high"] and size["ci_high"] < 0
    assert (f'<b>clip</b> (trained reward): <span class="verdict up">up</span>, {clip["mean_diff"]:+.3g} '
            f'({clip["base_mean"]:.4g} &rarr; {clip["candidate_mean"]:.4g}; 95% CI {clip["ci_low"]:+.3g} to '
            f'{clip["ci_high"]:+.3g}).') in page
    assert (f'<b>aesthetic</b> (trained reward): <span class="verdict same">no change</span>, '
            f'{flat["mean_diff"]:+.3g}') in page and "includes 0)." in page
    assert (f'<b>oracle_size</b> (ground truth): <span class="verdict down">down</span>, '
            f'{size["mean_diff"] * 100:+.1f} points (75.0% &rarr; 45.0%; 95% CI {size["ci_low"] * 100:+.1f} to '
            f'{size["ci_high"] * 100:+.1f} points).') in page
    table = eval_table_section(result)  # the 0/1 metric in percent and points there too
    assert re.search(rf'<td>oracle_size</td><td><span class="kind truth">truth</span></td><td>75.0%</td>'
                     rf'<td>45.0%</td><td class="diff">-30.0 pts</td><td>\[{size["ci_low"] * 100:+.1f} pts, '
                     rf'{size["ci_high"] * 100:+.1f} pts\]</td>', table)
    warning = re.search(r'<div class="warning">(.*?)</div>', page).group(1)
    assert "<b>clip</b>" in warning and "<b>combined</b>" in warning and "<b>aesthetic</b>" not in warning
    assert "<b>contrast</b>" in warning and "<b>oracle_size</b>" in warning and "reward hacking" in warning

    # Held-out reward up and ground truth the only fall: still a warning; nothing falls: none.
    page = verdict_section(verdict_result([b + 0.3 for b in base]))
    assert "<b>oracle_size</b>" in re.search(r'<div class="warning">(.*?)</div>', page).group(1)
    calm = verdict_result([b + 0.3 for b in base])
    calm["comparisons"]["candidate0"]["oracle_size"] = _paired([1.0] * 30 + [0.0] * 10, [1.0] * 30 + [0.0] * 10)
    assert '<div class="warning">' not in verdict_section(calm)


def test_plot_legend_sits_outside_the_data_and_flat_series_are_numbers(tmp_path):
    from rlhf.report import svg_line_plot, training_section

    svg = svg_line_plot({"a": [(0, 0), (1, 5)], "b": [(0, 1), (1, 2)], "c": [(0, 3), (1, 3)]}, "t")
    x, y, w, h = map(float, re.search(r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)" '
                                      r'class="frame"/>', svg).groups())
    legend = [float(v) for v in re.findall(r'<text x="[\d.]+" y="([\d.]+)" class="legend">', svg)]
    assert len(legend) == 3 and min(legend) - 11 > y + h + 16  # below the plot and its tick labels
    assert float(re.search(r'<svg class="plot" width="\d+" height="(\d+)"', svg).group(1)) >= max(legend) + 2

    run = tmp_path / "train"
    (run / "logs").mkdir(parents=True)
    rows = [{"step": s, "loss": 1 / s, "flops_per_step": 1.5e12, "lr": 1e-4 if s < 5 else 5e-5} for s in range(1, 7)]
    (run / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"method": "dpo"}))
    html_ = training_section({"train": run})
    assert 'aria-label="loss"' in html_ and 'aria-label="lr"' in html_
    assert 'aria-label="flops_per_step"' not in html_
    assert ('<tr><td>flops_per_step</td><td class="constant">1.5e+12</td><td class="hint">the same at all 6 '
            'logged steps</td></tr>') in html_


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


VIEWPORT = {"width": 1280, "height": 800}
VIDEOS_PLAY = """() => Array.from(document.querySelectorAll('video')).every(
    v => v.readyState >= 2 && !v.error && !v.paused && v.currentTime > 0 && v.videoWidth > 0)"""


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_report_in_headless_chromium_plays_every_video_offline(world_eval, tmp_path):
    """The world eval's report in Chromium at 1280 x 800: every video plays, every frame strip decodes, no console
    error, no request but the page's own file and data: URIs, the curves start within three screens, and a
    full-page screenshot is taken."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install -e '.[test]'")
    url = (world_eval["dir"] / "report.html").resolve().as_uri()
    requests, errors = [], []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=_chromium(), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required"])
        page = browser.new_page(viewport=VIEWPORT)
        page.on("request", lambda request: requests.append(request.url))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url, wait_until="load")
        page.wait_for_function(VIDEOS_PLAY, timeout=30_000)  # autoplay, muted: no play() from the test
        videos = page.evaluate("document.querySelectorAll('video').length")
        status = json.loads(page.locator("#report-status").text_content())
        curves = page.evaluate("document.getElementById('training').getBoundingClientRect().top + window.scrollY")
        shown = page.evaluate("Array.from(document.querySelectorAll('#videos video'), v => v.clientWidth)")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert videos == world_eval["page"].count("<video") == 2 * len(WORLD_GROUPS)  # (the pairs' store has no mp4)
    assert status["videos_failed"] == 0 and status["videos_loaded"] == videos, status
    assert status["images"] == status["images_decoded"] == world_eval["page"].count('<img class="frames"') > 0
    assert errors == []
    assert [u for u in requests if not u.startswith("data:")] == [url], requests
    assert curves <= 3 * VIEWPORT["height"], curves
    assert shown == [192] * 2 * len(WORLD_GROUPS)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.width == VIEWPORT["width"] and image.height > curves
