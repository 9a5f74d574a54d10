"""A reward served over HTTP (``align serve-reward``) and scored through the ``remote`` reward: the
same scores as the local reward, concurrent requests batched, a server killed mid-run costs only
the samples the invalid-sample policy drops, timeouts are counted, no server is one line."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from align.errors import ConfigError  # noqa: E402
from rewards import build_reward  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red digit 3", "a blue digit 8", "a green digit 5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, *args: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "align", "serve-reward", "digit", "--port", str(port), *args],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("the reward server did not start")


@pytest.fixture(scope="module")
def server():
    port = free_port()
    process = start_server(port, "--max-batch", "8", "--max-wait-ms", "50")
    yield port, process
    process.kill()
    process.wait()


def images(n=3, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_the_remote_reward_scores_what_the_local_reward_scores(server):
    port, _ = server
    remote = build_reward({"name": "remote", "urls": [f"http://127.0.0.1:{port}"]})
    assert remote.dimensions == ("score",) and remote.server["name"] == "digit"
    samples = images()
    local = build_reward("digit")(samples, PROMPTS)
    out = remote(samples, PROMPTS)
    assert torch.allclose(out.total, local.total, atol=1e-6) and bool(out.valid_mask().all())
    png = build_reward({"name": "remote", "urls": [f"http://127.0.0.1:{port}"], "encoding": "png"})(samples, PROMPTS)
    assert torch.allclose(png.total, local.total, atol=0.05)  # 8-bit images: close, not equal


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(server):
    port, _ = server
    remote = build_reward({"name": "remote", "urls": [f"http://127.0.0.1:{port}"]})
    batches = [images(2, seed) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda b: remote(b, PROMPTS[:2]), batches))
    local = build_reward("digit")
    for batch, out in zip(batches, outs):
        assert torch.allclose(out.total, local(batch, PROMPTS[:2]).total, atol=1e-5)


def test_a_server_killed_mid_run_loses_only_the_batches_sent_while_it_was_down(tmp_path):
    port = free_port()
    process = start_server(port)
    remote = build_reward({"name": "remote", "urls": [f"http://127.0.0.1:{port}"], "timeout": 2, "max_retries": 1,
                           "retry_backoff": 0.1})
    assert bool(remote(images(), PROMPTS).valid_mask().all())
    process.kill()
    process.wait()
    down = remote(images(), PROMPTS)
    assert not bool(down.valid_mask().any()) and remote.report["failures"] == 1 and remote.report["retries"] == 1
    process = start_server(port)
    try:
        assert bool(remote(images(), PROMPTS).valid_mask().all())  # back: nothing else lost
    finally:
        process.kill()
        process.wait()


def test_a_server_that_does_not_answer_in_time_is_counted_as_a_timeout():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    # a metadata answer, then silence: scoring requests time out
    body = b'{"name": "slow", "dimensions": ["score"]}'
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    def serve():
        first, _ = listener.accept()
        first.recv(65536)
        first.sendall(reply)
        first.close()
        held = []
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    remote = build_reward({"name": "remote", "urls": [f"http://127.0.0.1:{port}"], "timeout": 0.5, "max_retries": 0})
    out = remote(images(), PROMPTS)
    listener.close()
    assert not bool(out.valid_mask().any())
    assert remote.report["timeouts"] == 1 and "timed out after 0.5s" in remote.report["last_error"]


def test_no_server_at_the_address_is_one_line():
    with pytest.raises(ConfigError, match="no reward server answers at http://127.0.0.1:") as err:
        build_reward({"name": "remote", "urls": [f"http://127.0.0.1:{free_port()}"], "timeout": 1})
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_the_ray_serve_deployment_scores_what_the_local_reward_scores():
    """``align serve-reward digit --ray``: the same app on a local Ray instance, one Ray Serve replica
    that builds the reward itself; the remote reward's scores equal the local ones."""
    pytest.importorskip("ray.serve")
    port = free_port()
    process = start_server(port, "--ray", "--replicas", "1")
    try:
        remote = build_reward({"name": "remote", "urls": [f"http://127.0.0.1:{port}"]})
        assert remote.server["name"] == "digit"
        samples = images()
        out = remote(samples, PROMPTS)
        assert torch.allclose(out.total, build_reward("digit")(samples, PROMPTS).total, atol=1e-6)
        assert bool(out.valid_mask().all())
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
