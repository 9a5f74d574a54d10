"""``remote``: a reward scored by a reward server (``align serve-reward``, ``rewards/server.py``).

``urls`` (one or several servers of the same reward: requests go round-robin, a failing server's
request is retried on the next) are asked for their metadata when the reward is built: its
dimensions become this reward's, and no server answering is a one-line ConfigError before any
heavy work. Each ``score`` call sends the batch (``encoding``: float32, exact; or png, 8-bit,
smaller) with ``timeout`` seconds per request and ``max_retries`` retries with ``retry_backoff``
seconds, doubled each time. When every attempt fails (servers down) the batch is returned unscored
(valid = False): trainers drop such samples from their groups and stop the run past
``run.max_unscored_fraction``. ``report`` counts requests, retries, timeouts and failures.
"""

from __future__ import annotations

import itertools
import time
from typing import Sequence

import torch

from align.errors import ConfigError
from rewards.base import Reward, register_reward


@register_reward("remote")
class RemoteReward(Reward):
    differentiable = False
    handles_video = True
    dimensions = ("score",)

    def __init__(self, urls: str | Sequence[str] = "http://127.0.0.1:8000", timeout: float = 30.0,
                 max_retries: int = 2, retry_backoff: float = 0.5, encoding: str = "float32",
                 weights=None) -> None:
        import httpx

        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ConfigError("remote reward: urls is empty: give the reward server's address")
        if encoding not in ("float32", "png"):
            raise ConfigError(f"remote reward: encoding must be 'float32' or 'png', got {encoding!r}")
        self.timeout, self.max_retries, self.retry_backoff = float(timeout), int(max_retries), float(retry_backoff)
        self.encoding = encoding
        self.client = httpx.Client(timeout=self.timeout)
        self.report = {"requests": 0, "retries": 0, "timeouts": 0, "failures": 0, "last_error": None}
        self._next = itertools.cycle(range(len(self.urls)))
        meta = None
        for url in self.urls:
            try:
                meta = self.client.get(url.rstrip("/") + "/metadata").raise_for_status().json()
                break
            except httpx.HTTPError as err:
                last = f"{type(err).__name__}: {err}"
        if meta is None:
            raise ConfigError(f"remote reward: no reward server answers at {', '.join(self.urls)} ({last})")
        self.name = f"remote:{meta.get('name', 'reward')}"
        self.dimensions = tuple(meta.get("dimensions") or ("score",))
        self.server = meta
        super().__init__(weights)

    def _post(self, body: dict) -> dict | None:
        import httpx

        for attempt in range(self.max_retries + 1):
            url = self.urls[next(self._next)].rstrip("/") + "/score"
            self.report["requests"] += 1
            try:
                return self.client.post(url, json=body).raise_for_status().json()
            except httpx.TimeoutException as err:
                self.report["timeouts"] += 1
                self.report["last_error"] = f"timed out after {self.timeout:g}s at {url}: {err}"
            except httpx.HTTPError as err:
                self.report["last_error"] = f"{type(err).__name__} at {url}: {err}"
            if attempt < self.max_retries:
                self.report["retries"] += 1
                time.sleep(self.retry_backoff * (2 ** attempt))
        self.report["failures"] += 1
        return None

    def score(self, samples, prompts, **context):
        from rewards.server import encode_samples

        answer = self._post({"prompts": list(prompts), "samples": encode_samples(samples, self.encoding)})
        rows = len(prompts)
        if answer is None:  # every server failed: unscored, by the invalid-sample policy
            nan = torch.full((rows,), float("nan"), device=samples.device)
            return {**{d: nan for d in self.dimensions}, "_valid": torch.zeros(rows, dtype=torch.bool)}

        def column(values):
            return torch.tensor([float("nan") if v is None else v for v in values], device=samples.device)

        return {**{d: column(answer["scores"][d]) for d in self.dimensions},
                "_valid": torch.tensor(answer["valid"], dtype=torch.bool)}
