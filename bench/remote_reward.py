"""Throughput of the ``remote`` reward (a reward server on localhost) against the same reward local.

Starts ``align serve-reward REWARD`` in a subprocess, then scores ``--batches`` batches of
``--batch`` images (16 x 16 toy samples by default, ``--size`` to change) locally and through the
server (float32 encoding: exact scores; ``--encoding png`` for 8-bit), with ``--clients`` threads
sending at once (the server batches concurrent requests up to ``--max-batch``). Prints images per
second of both; last line ``remote_vs_local_throughput=<remote / local>``.

    python bench/remote_reward.py [--reward digit] [--batch 8] [--clients 4]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", default="digit")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--encoding", default="float32")
    args = parser.parse_args()
    import httpx

    from rewards import build_reward

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "align", "serve-reward", args.reward, "--port", str(port),
                               "--max-batch", str(args.max_batch)], cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        g = torch.Generator().manual_seed(0)
        batches = [torch.rand(args.batch, 3, args.size, args.size, generator=g) for _ in range(args.batches)]
        prompts = [f"a red digit {i % 10}" for i in range(args.batch)]
        local = build_reward(args.reward)
        remote = build_reward({"name": "remote", "urls": [f"http://127.0.0.1:{port}"], "encoding": args.encoding})
        remote(batches[0], prompts)  # warm-up
        start = time.perf_counter()
        for batch in batches:
            local(batch, prompts)
        local_rate = args.batch * args.batches / (time.perf_counter() - start)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(lambda b: remote(b, prompts), batches))
        remote_rate = args.batch * args.batches / (time.perf_counter() - start)
    finally:
        server.kill()
        server.wait()
    print(f"{args.reward} at batch {args.batch}: local {local_rate:.0f} images/s, remote ({args.clients} clients, "
          f"{args.encoding}) {remote_rate:.0f} images/s")
    print(f"remote_vs_local_throughput={remote_rate / local_rate:.3f}")


if __name__ == "__main__":
    main()
