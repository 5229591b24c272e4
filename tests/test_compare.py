"""`contentv-rlhf compare`: bad input, the same noise and videos as `generate`, and the page in headless Chromium.

The browser test starts the real entry point on a free localhost port with the shapes-world model and two
random LoRA adapters, types a prompt and a seed in headless Chromium (Playwright driving the system's
Chromium), presses generate, and checks that three videos appear and play and that the reward scores are
shown; every request the page makes must stay on the local server, and an audit hook in the server process
records any connection or name lookup beyond localhost.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, call_cli, random_adapter

PROMPT = "a large yellow circle moving up"
STEPS = ["--steps", "4"]  # the world model's config samples 20 steps; 4 keep these tests quick
WORLD = ["--config", "configs/world/compare.yaml", "--device", "cpu", *STEPS]
# The same sampling as configs/world/compare.yaml, as `generate` flags.
GENERATE = ["--frames", "9", "--height", "64", "--width", "64", "--guidance", "4", "--negative-prompt", "",
            "--fps", "8", "--dtype", "fp32", "--device", "cpu", *STEPS]


def mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 videos of the same shape, in grey levels."""
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def world_adapters(tmp_path_factory) -> list[Path]:
    """Two rank-4 adapters on the world transformer with random non-zero lora_B, recording their base."""
    import torch

    from rlhf.base_model import identity, write_record
    from rlhf.world import MODEL_DIR

    root = tmp_path_factory.mktemp("compare-adapters")
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        adapter = random_adapter(MODEL_DIR, root / f"adapter{seed}", std=0.2)
        write_record(adapter, identity(MODEL_DIR))
        adapters.append(adapter)
    return adapters


@pytest.fixture
def in_repo(monkeypatch) -> Path:
    monkeypatch.chdir(REPO)  # the world config's paths are relative to the repository root
    return REPO


BAD_INPUT = [  # (arguments after `compare`, text of the one error line)
    (["--model", "{tmp}/no-model", "--adapter", "{adapter}"], "no-model: model directory not found"),
    (["--adapter", "{tmp}/no-adapter"], "no-adapter: adapter directory not found"),
    (["--adapter", "{tmp}"], "no LoRA adapter found"),
    ([], "field 'adapters' needs at least one LoRA adapter directory"),
    (["--adapter", "{adapter}", "--port", "0"], "field 'port' must be >= 1"),
    (["--adapter", "{adapter}", "--port", "65536"], "field 'port' must be <= 65535"),
    (["--adapter", "{adapter}", "--port", "http"], "field 'port' expects an integer"),
    (["--adapter", "{adapter}", "--port", "{busy}"], "cannot be served on 127.0.0.1:"),
    (["--adapter", "{adapter}", "--adapters", "{adapter}"], "with --adapter (repeated) or with --adapters, not both"),
    (["--adapter", "{adapter}", "--rewards", "{tmp}/no-rewards.yaml"], "rewards config not found"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[m for _, m in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_before_any_work(args, message, world_adapters, in_repo, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values = {"tmp": tmp_path, "adapter": world_adapters[0], "busy": busy.getsockname()[1]}
        start = time.perf_counter()
        code, out, err = call_cli(capsys, "compare", *WORLD, *[a.format(**values) for a in args])
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert time.perf_counter() - start < 5  # no model was loaded


def test_missing_gradio_is_one_line_exit_2(world_adapters, in_repo, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # importlib.util.find_spec("gradio") -> None
    code, out, err = call_cli(capsys, "compare", *WORLD, "--adapter", world_adapters[0], "--port", free_port())
    assert code == 2 and out == ""
    assert err.strip() == ("contentv-rlhf compare: error: the compare page needs Gradio, an optional extra: "
                           "pip install -e '.[app]'")


def test_columns_sample_the_same_noise_as_generate(world_adapters, in_repo, tmp_path, capsys):
    """Each column's video is exactly what `generate` (with that adapter) writes for the prompt and seed."""
    from rewards.config import load_rewards_config
    from rlhf.commands.compare import CompareConfig
    from rlhf.compare import BASE, COMBINED, Comparer, format_scores
    from rlhf.config import config_from_dict, load_yaml
    from rlhf.video import read_video
    from rlhf.world import MODEL_DIR

    data = {**load_yaml("configs/world/compare.yaml"), "adapters": [str(a) for a in world_adapters],
            "device": "cpu", "steps": 4}
    config = config_from_dict(CompareConfig, data)
    rewards = load_rewards_config(config.rewards)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comparer = Comparer(config, rewards, tmp_path / "videos")  # two adapters on one transformer, on purpose
    assert not [w for w in caught if "peft_config" in str(w.message)], [str(w.message) for w in caught]
    results = comparer.compare(PROMPT, 7)
    assert [r.label for r in results] == [BASE, *map(str, world_adapters)]

    for index, adapter in enumerate([None, *world_adapters]):
        out = tmp_path / f"generate-{index}.mp4"
        code, _, err = call_cli(capsys, "generate", "--model", MODEL_DIR, "--prompt", PROMPT, "--seed", 7,
                                "--out", out, *GENERATE, *(["--adapter", adapter] if adapter else []))
        assert code == 0, err
        # The same noise and code path as `generate`. CPU float sums may differ in their last bits between
        # processes and process states (the kernels chosen, buffer alignment), which 4 sampling steps and H.264
        # grow to about half a grey level on average; another adapter or seed changes far more (below).
        assert mean_abs_difference(read_video(out), read_video(results[index].video_path)) < 1.5, index
    frames = [r.frames for r in results]
    assert frames[0].shape == (9, 64, 64, 3)
    assert mean_abs_difference(frames[0], frames[1]) > 4 and mean_abs_difference(frames[1], frames[2]) > 4

    weights = {name: weighted.weight for name, weighted in comparer.scorers.items()}
    for result in results:
        assert list(result.scores) == ["clip", "aesthetic", "motion", COMBINED]
        assert result.scores[COMBINED] == pytest.approx(sum(w * result.scores[n] for n, w in weights.items()))
    table = format_scores(results[1], results[0])
    diff = results[1].scores["clip"] - results[0].scores["clip"]
    assert f"| clip | {results[1].scores['clip']:.4f} | {'+' if diff >= 0 else ''}{diff:.4f} |" in table

    again = comparer.compare(PROMPT, 7)  # switching adapters back and forth leaves the base untouched
    assert all(mean_abs_difference(a.frames, b.frames) < 1.5 for a, b in zip(results, again, strict=True))
    assert mean_abs_difference(comparer.compare(PROMPT, 8)[0].frames, frames[0]) > 4  # another seed, other noise


def test_user_mistakes_on_the_page_are_one_message_and_one_log_line(world_adapters, in_repo, tmp_path, caplog):
    """An empty prompt or a seed that is no integer answers one status message (the page keeps its columns),
    logs one line on the server and samples nothing; a good request after it still works."""
    from rlhf.commands.compare import CompareConfig
    from rlhf.compare import Comparer, respond
    from rlhf.config import config_from_dict, load_yaml

    data = {**load_yaml("configs/world/compare.yaml"), "adapters": [str(world_adapters[0])], "device": "cpu",
            "steps": 2, "rewards": None}
    comparer = Comparer(config_from_dict(CompareConfig, data), None, tmp_path / "videos")
    for prompt, seed, message in (("", 0, "the prompt is empty"), ("  ", 3, "the prompt is empty"),
                                  (None, 3, "the prompt is empty"), (PROMPT, 1.5, "the seed must be an integer"),
                                  (PROMPT, None, "the seed must be an integer"),
                                  (PROMPT, -1, "the seed must be an integer")):
        caplog.clear()
        results, status = respond(comparer, prompt, seed)
        assert results is None and status.startswith("**Not generated:**") and message in status, status
        assert len(status.splitlines()) == 1
        lines = [r for r in caplog.records if r.name == "contentv-rlhf"]
        assert len(lines) == 1 and message in lines[0].getMessage() and lines[0].exc_info is None
    assert comparer.calls == 0 and not (tmp_path / "videos").exists()  # nothing sampled or written
    results, status = respond(comparer, PROMPT, 3)
    assert results is not None and len(results) == 2 and status.startswith("Seed 3: 2 videos")


# Runs the real entry point; records every connection or name lookup that is not to this machine.
AUDITED_CLI = r"""
import sys
LOCAL = {None, "", "127.0.0.1", "localhost", "::1", "0.0.0.0"}
def remote(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    elif event == "socket.getaddrinfo":
        host = args[0]
    else:
        return
    host = host.decode() if isinstance(host, bytes) else host
    if host not in LOCAL:
        print(f"REMOTE-CONNECTION {event} {host}", file=sys.stderr, flush=True)
sys.addaudithook(remote)
from rlhf.cli import main
sys.exit(main(sys.argv[1:]))
"""
SERVED = "compare: serving http://127.0.0.1:{port}/"
VIDEOS_PLAY = """n => Array.from({length: n}, (_, i) => document.querySelector(`#video-${i} video`)).every(
    v => v && v.readyState >= 2 && !v.paused && v.currentTime > 0 && v.videoWidth === 64)"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_page_in_headless_chromium_generates_plays_and_scores(world_adapters, tmp_path):
    pytest.importorskip("gradio", reason="gradio not installed: pip install -e '.[test]'")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install -e '.[test]'")
    from rlhf.compare import PROMPT_HINT

    port = free_port()
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        server = subprocess.Popen(
            [sys.executable, "-c", AUDITED_CLI, "compare", *WORLD, "--port", str(port),
             *[a for adapter in world_adapters for a in ("--adapter", str(adapter))]],
            cwd=REPO, stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 180  # about 15 s on 2 idle cores; far more on a busy machine
        while SERVED.format(port=port) not in stdout.read_text():
            assert server.poll() is None, f"compare exited with {server.returncode}: {stderr.read_text()}"
            assert time.monotonic() < deadline, f"the page was not served in 180 s: {stderr.read_text()}"
            time.sleep(0.2)

        local = f"http://127.0.0.1:{port}/"
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=_chromium(), headless=True,
                args=["--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required"])
            page = browser.new_page()
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.on("websocket", lambda socket: requests.append(socket.url))
            page.goto(local)
            box = page.locator("#prompt textarea, #prompt input").first
            # configs/world/compare.yaml gives no example prompt: an empty box whose hint is an instruction.
            initial, hint = box.input_value(), box.get_attribute("placeholder")
            box.fill(PROMPT)
            page.locator("#seed input[type=number]").fill("7")
            page.locator("#generate").click()
            page.wait_for_function("document.querySelectorAll('video').length >= 3", timeout=180_000)
            for index in range(3):  # autoplay is on; play() again in case the browser held it back
                page.locator(f"#video-{index} video").evaluate("v => v.play()")
            page.wait_for_function(VIDEOS_PLAY, arg=3, timeout=20_000)
            sources = [page.locator(f"#video-{i} video").get_attribute("src") for i in range(3)]
            scores = [page.locator(f"#scores-{i}").inner_text() for i in range(3)]
            status = page.locator("#status").inner_text()
            # A column's first line is its label; the player's clock below it moves while the video plays.
            labels = [page.locator(f"#video-{i}").inner_text().splitlines()[0] for i in range(3)]

            # A user mistake: one message in the status line; the columns keep their labels and videos.
            box.fill("")
            page.locator("#generate").click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('Not generated')",
                                   timeout=60_000)
            mistake = page.locator("#status").inner_text()
            labels_after = [page.locator(f"#video-{i}").inner_text().splitlines()[0] for i in range(3)]
            sources_after = [page.locator(f"#video-{i} video").get_attribute("src") for i in range(3)]
            errors_shown = page.get_by_text("Error", exact=True).count()
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert code == 0, stderr.read_text()  # SIGTERM closes the server like Ctrl-C

    assert len(set(sources)) == 3 and all(s.startswith(local) for s in sources), sources
    for index, text in enumerate(scores):
        for name in ("clip", "aesthetic", "motion", "combined"):
            assert name in text, (index, text)
        assert ("vs base" in text) == (index > 0), text
    assert "Seed 7: 3 videos" in status
    assert initial == "" and hint == PROMPT_HINT
    assert "the prompt is empty" in mistake and len(mistake.strip().splitlines()) == 1, mistake
    assert labels_after == labels and labels[0].startswith("base") and sources_after == sources, labels_after
    assert errors_shown == 0
    server_log = stderr.read_text()
    assert "Traceback" not in server_log and server_log.count("not generated: the prompt is empty") == 1, server_log
    elsewhere = [url for url in requests if not url.startswith((local, f"ws://127.0.0.1:{port}/", "data:", "blob:"))]
    assert elsewhere == [], elsewhere
    assert "REMOTE-CONNECTION" not in stderr.read_text(), stderr.read_text()


def test_requests_from_other_names_or_sites_are_refused(tmp_path):
    """DNS rebinding (a foreign Host) and cross-site requests (a foreign Origin) get 403 before reaching the app;
    the page's own requests pass. A one-button page behind the same `launch` as the compare page."""
    import http.client

    gr = pytest.importorskip("gradio", reason="gradio not installed: pip install -e '.[test]'")
    from rlhf.compare import disable_telemetry, launch

    disable_telemetry()
    with gr.Blocks() as app:
        text = gr.Textbox(elem_id="text")
        gr.Button("go").click(lambda value: value, text, text, api_name="go")
    port = free_port()
    launch(app, port, [str(tmp_path)])

    def status(method: str, path: str, headers: dict[str, str], body: str | None = None) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.putrequest(method, path, skip_host=True)
        sent = {"Content-Type": "application/json", "Content-Length": str(len(body))} if body else {}
        for name, value in {**headers, **sent}.items():
            connection.putheader(name, value)
        connection.endheaders(body.encode() if body else None)
        code = connection.getresponse().status
        connection.close()
        return code

    own = f"127.0.0.1:{port}"
    call = ("POST", "/gradio_api/call/go", '{"data": ["x"]}')
    try:
        assert status("GET", "/", {"Host": own}) == 200
        assert status("GET", "/", {"Host": f"localhost:{port}"}) == 200
        assert status(*call[:2], {"Host": own, "Origin": f"http://{own}"}, call[2]) == 200
        for headers in ({"Host": f"attacker.example:{port}"},  # a name re-pointed at 127.0.0.1
                        {"Host": f"attacker.example:{port}", "Origin": f"http://attacker.example:{port}"},
                        {"Host": own, "Origin": "http://attacker.example"},  # a cross-site form or fetch
                        {"Host": own, "Origin": "null"}):
            assert status("GET", "/", headers) == 403, headers
            assert status(*call[:2], headers, call[2]) == 403, headers
    finally:
        app.close()
