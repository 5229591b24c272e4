"""`contentv-rlhf report`: a tiny real run (store, pairs, train, eval) rendered as one self-contained page,
checked as text (embedded media, escaping, no network references) and loaded in headless Chromium; and the
report of each other kind of run directory (a train run, an eval directory, an online run) checked against
the files those commands wrote."""

import html
import json
import re
import shutil
import subprocess

import pytest
import yaml

from rlhf.report import RUN_FILE, write_run_manifest
from tests.conftest import call_cli

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
    eval_videos = len(EVAL_PROMPTS) * SEEDS * 2  # base and one candidate
    pair_media = 2 * tiny_run["pairs_shown"]  # chosen and rejected of each shown pair; one has an mp4
    videos = re.findall(r'<video [^>]*src="data:video/mp4;base64,[A-Za-z0-9+/=]+"', page)
    assert len(videos) == page.count("<video") == eval_videos + 1
    strips = re.findall(r'<img class="frames" src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)
    assert len(strips) == pair_media - 1
    for metric in ("loss", "implicit_accuracy", "reward_margin", "lr"):
        assert re.search(f'<svg class="plot"[^>]* aria-label="{metric}">', page), metric
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
    assert page.count("<video") == len(EVAL_PROMPTS) * SEEDS * 2
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


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_report_loads_in_headless_chromium(tiny_run, report_page, tmp_path):
    """The page's status script counts what the browser actually loaded: every video's metadata (H.264
    decodable from its data: URI), every PNG strip decoded, every plot in the DOM."""
    page = tiny_run["dir"] / "report.html"
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r'<pre id="report-status"[^>]*>(.*?)</pre>', result.stdout, re.S)
    assert match, result.stdout[-2000:]
    status = json.loads(html.unescape(match.group(1)))
    assert status["videos"] == report_page.count("<video") > 0
    assert status["videos_failed"] == 0 and status["videos_loaded"] == status["videos"], status
    assert status["images"] == status["images_decoded"] == report_page.count('<img class="frames"') > 0
    assert status["plots"] == report_page.count('<svg class="plot"') >= 4


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
    assert page.count("<video") == len(EVAL_PROMPTS) * SEEDS * 2
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
