"""Critique reward: the score parser, and the OpenAI-compatible back end against a real local server
process (``python -m rewards.chat_server --scripted``) on 127.0.0.1."""

from __future__ import annotations

import math
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from align.config import ConfigError
from rewards import build_reward
from rewards.base import RewardError
from rewards.critique import OpenAIChatBackend, BackendError, parse_scores

ROOT = Path(__file__).resolve().parents[1]


def test_parser_formats():
    text = ("The colours are washed out; the visual quality score is low.\n"
            "**Visual Quality Score (1-5):** 2\n- Text_Alignment score (1-5): 4.5\nFinal Score: 3")
    got = parse_scores(text, ["visual quality", "text alignment", "overall"])
    assert got == {"visual quality": 2.0, "text alignment": 4.5, "overall": 3.0}
    assert parse_scores("ok <Score>4</Score>", ["overall"]) == {"overall": 4.0}
    assert parse_scores("Overall Score (1-10): 8", ["overall"]) == {"overall": 8.0}
    # the last occurrence wins (a draft score, then the final one)
    assert parse_scores("Final Score: 2\n...on reflection...\nFinal Score: 4", ["overall"]) == {"overall": 4.0}
    # missing and out-of-range values are flagged (None), never 0
    assert parse_scores("Visual Quality Score (1-5): 9", ["visual quality", "motion quality"]) == {
        "visual quality": None, "motion quality": None}
    assert parse_scores("no scores here", ["overall"]) == {"overall": None}
    assert parse_scores("Visual Quality Score (1-5): 4", ["visual quality"], normalize=True) == {"visual quality": 0.75}


class Scripted:
    """An in-process client for option checks (the server tests below use a real process)."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = 0

    def __call__(self, messages):
        self.calls += 1
        return self.answer(messages) if callable(self.answer) else self.answer


def test_options_and_flags():
    reward = build_reward({"name": "critique", "dims": ["visual quality", "overall"],
                           "client": Scripted("Visual Quality Score (1-5): 4\nFinal Score: 3"), "concurrency": 1})
    out = reward(torch.rand(2, 3, 8, 8), ["a cat", "a dog"])
    assert out.valid is None and out.scores["visual quality"].tolist() == [4.0, 4.0]
    torch.testing.assert_close(out.total, torch.tensor([7.0, 7.0]))
    flagged = build_reward({"name": "critique", "client": Scripted("I like it."), "concurrency": 1})
    out = flagged(torch.rand(2, 3, 8, 8), ["a", "b"])
    assert out.valid.tolist() == [False, False] and math.isnan(out.total[0])
    assert flagged.report["unparsed"] == 2 and flagged.last_errors[0] == "no score for overall"
    with pytest.raises(ConfigError, match="needs base_url"):
        build_reward({"name": "critique"})
    with pytest.raises(ConfigError, match="on_failure"):
        build_reward({"name": "critique", "client": Scripted(""), "on_failure": "retry"})
    with pytest.raises(ConfigError, match="backend must be"):
        build_reward({"name": "critique", "backend": "grpc", "base_url": "x", "model": "m"})


@pytest.fixture(scope="module")
def server():
    """A real server process on 127.0.0.1 (any free port), stopped after the module or 120 s."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "rewards.chat_server", "--scripted", "--host", "127.0.0.1",
                             "--port", "0", "--max-seconds", "120"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=60)
    except queue.Empty:
        proc.kill()
        pytest.fail("the chat server did not start within 60 s: " + proc.stderr.read()[-500:])
    assert line.startswith("READY "), line
    yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _grey(levels, size=16):
    return torch.stack([torch.full((3, size, size), v) for v in levels])


def test_server_scores_per_dimension(server):
    reward = build_reward({"name": "critique", "base_url": server, "model": "critic",
                           "dims": ["visual quality", "text alignment", "overall"], "timeout": 30})
    x = _grey([0.0, 0.5, 1.0])
    out = reward(x, ["a black square", "a grey square", "a white square"])
    assert out.valid is None
    # the scripted critic scores lo + (hi - lo) * brightness on the requested 1-5 lines (8-bit PNG rounding)
    expected = torch.tensor([1.0, 1 + 4 * 127 / 255, 5.0])
    torch.testing.assert_close(out.scores["visual quality"], expected, atol=0.01, rtol=0)
    torch.testing.assert_close(out.scores["overall"], expected, atol=0.01, rtol=0)
    assert reward.report == {"requests": 3, "retries": 0, "failures": 0, "timeouts": 0, "unparsed": 0}
    assert "Visual Quality Score (1-5):" in reward.last_texts[0]
    # videos: up to max_frames frames go in one request
    video = torch.stack([_grey([0.0, 1.0, 0.0, 1.0]), _grey([1.0, 1.0, 1.0, 1.0])])
    vout = reward(video, ["flicker", "white"])
    torch.testing.assert_close(vout.scores["overall"], torch.tensor([3.0, 5.0]), atol=0.01, rtol=0)


def test_server_formats_and_failures(server):
    common = {"name": "critique", "base_url": server, "model": "critic", "retry_backoff": 0.01, "timeout": 30}
    reward = build_reward({**common, "max_retries": 1})
    prompts = ["tag [format=tag]", "final [format=final]", "garbage [fail=garbage]", "flaky [fail=first:1]",
               "broken [fail=500]"]
    out = reward(_grey([1.0] * 5), prompts)
    assert out.scores["overall"][:2].tolist() == [5.0, 10.0]  # <Score> on 1-5, Final Score on 1-10
    assert out.valid.tolist() == [True, True, False, True, False]
    assert math.isnan(out.scores["overall"][2]) and math.isnan(out.scores["overall"][4])
    assert reward.report["unparsed"] == 1 and reward.report["failures"] == 1
    assert reward.report["retries"] == 1 + 1  # the flaky one once, the broken one once (then gave up)
    assert "HTTP 500" in reward.last_errors[4]
    # failure policy "stop": one line naming the sample
    stop = build_reward({**common, "max_retries": 0, "on_failure": "stop"})
    with pytest.raises(RewardError, match=r"critique: sample 1 failed after 1 attempt\(s\): HTTP 500"):
        stop(_grey([1.0, 1.0]), ["fine", "broken [fail=500]"])
    # timeouts are counted and reported
    slow = build_reward({**common, "max_retries": 0, "timeout": 0.5, "concurrency": 1})
    start = time.time()
    out = slow(_grey([1.0]), ["slow [fail=slow:3]"])
    assert time.time() - start < 3 and out.valid.tolist() == [False]
    assert slow.report["timeouts"] == 1 and "within 0.5 s" in slow.last_errors[0]


def test_backend_errors_are_one_line(server):
    with pytest.raises(BackendError, match="HTTP 404"):
        OpenAIChatBackend(server.replace("/v1", "/nope"), "critic", timeout=5)([{"role": "user", "content": "hi"}])
    with pytest.raises(BackendError, match="cannot reach"):
        OpenAIChatBackend("http://127.0.0.1:9/v1", "critic", timeout=5)([{"role": "user", "content": "hi"}])
    with pytest.raises(ConfigError, match="ALIGN_TEST_NO_SUCH_KEY"):
        OpenAIChatBackend(server, "critic", api_key_env="ALIGN_TEST_NO_SUCH_KEY")


def test_edit_mode_shows_the_source_before_the_edit(server, tmp_path):
    """mode: edit sends each prompt's source image(s) and then the edited sample, with the edit
    instruction: the scripted critic's brightness score averages all the images it was shown."""
    from PIL import Image

    from pipelines.base import Prompt

    Image.new("RGB", (16, 16), (0, 0, 0)).save(tmp_path / "black.png")
    edit = build_reward({"name": "critique", "base_url": server, "model": "critic", "mode": "edit",
                         "dims": ["instruction following"], "timeout": 30})
    plain = build_reward({"name": "critique", "base_url": server, "model": "critic",
                          "dims": ["instruction following"], "timeout": 30})
    white = _grey([1.0, 1.0])
    prompts = [Prompt("make it white", str(tmp_path / "black.png")),
               Prompt("make it white", [str(tmp_path / "black.png")] * 2)]
    # one black source beside the white edit: brightness 1/2; two black sources: 1/3; no source: 1
    torch.testing.assert_close(edit(white, prompts).total, torch.tensor([1 + 4 / 2, 1 + 4 / 3]), atol=0.01, rtol=0)
    torch.testing.assert_close(plain(white, prompts).total, torch.tensor([5.0, 5.0]), atol=0.01, rtol=0)
    assert "The first image is the source" in edit.render_instruction("make it white")
    with pytest.raises(RewardError, match="prompt 0 .* has no source image"):
        edit(white[:1], ["make it white"])
    with pytest.raises(ConfigError, match="critique mode"):
        build_reward({"name": "critique", "base_url": server, "model": "critic", "mode": "judge"})
