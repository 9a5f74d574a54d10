"""Any registered reward served over HTTP (``align serve-reward NAME``): a FastAPI (ASGI) app.

Endpoints:

- ``GET /health`` -> ``{"status": "ok"}``
- ``GET /metadata`` -> ``{"name", "dimensions", "differentiable", "version"}``
- ``POST /score`` with a JSON body (:data:`SCHEMA`)::

      {"prompts": ["a red digit 3", ...],
       "samples": {"encoding": "float32", "shape": [B, C, H, W], "data": "<base64 of the raw little-endian float32 values>"}}
    or "samples": {"encoding": "png", "images": ["<base64 PNG>", ...]}            (images only, 8-bit)

  -> ``{"scores": {dimension: [B floats]}, "total": [B floats], "valid": [B booleans]}``. Samples are
  images (B, C, H, W) or videos (B, F, C, H, W) in [0, 1]; a non-finite score is sent as null.

Concurrent requests are batched: they wait up to ``max_wait_ms`` for one another and are scored in
one reward call of at most ``max_batch`` samples. The app is a plain ASGI application, so it runs
under uvicorn on one machine (``align serve-reward``) or in a Ray Serve deployment
(:func:`ray_deployment`, ``align serve-reward NAME --ray``): replicas on several GPUs or nodes, each
building the reward itself and batching its own requests; docs/reward_servers.md has both launches.
"""

from __future__ import annotations

import asyncio
import base64
import io
from importlib import metadata as importlib_metadata

import numpy as np
import torch

#: the request schema, also served at /metadata
SCHEMA = {
    "prompts": "list of B strings",
    "samples": {"float32": {"encoding": "float32", "shape": "[B, C, H, W] or [B, F, C, H, W]",
                            "data": "base64 of the little-endian float32 values in [0, 1]"},
                "png": {"encoding": "png", "images": "list of B base64 PNG images"}},
    "response": {"scores": "{dimension: [B floats or null]}", "total": "[B floats or null]", "valid": "[B booleans]"},
}


def encode_samples(samples: torch.Tensor, encoding: str = "float32") -> dict:
    """The ``samples`` field of a request for images / videos in [0, 1]."""
    if encoding == "float32":
        array = samples.detach().float().cpu().contiguous().numpy().astype("<f4")
        return {"encoding": "float32", "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}
    if encoding == "png":
        from PIL import Image

        if samples.ndim != 4:
            raise ValueError("png encoding sends images (B, C, H, W); use float32 for videos")
        images = []
        for sample in samples.detach().float().clamp(0, 1).cpu():
            buffer = io.BytesIO()
            Image.fromarray((sample.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).squeeze()).save(
                buffer, format="PNG")
            images.append(base64.b64encode(buffer.getvalue()).decode())
        return {"encoding": "png", "images": images}
    raise ValueError(f"encoding must be 'float32' or 'png', got {encoding!r}")


def decode_samples(field: dict) -> torch.Tensor:
    if field.get("encoding") == "float32":
        shape = [int(s) for s in field["shape"]]
        array = np.frombuffer(base64.b64decode(field["data"]), dtype="<f4")
        if array.size != int(np.prod(shape)):
            raise ValueError(f"samples: {array.size} values for shape {shape}")
        return torch.from_numpy(array.copy()).reshape(shape)
    if field.get("encoding") == "png":
        from PIL import Image

        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in field["images"]]
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    raise ValueError(f"samples.encoding must be 'float32' or 'png', got {field.get('encoding')!r}")


def finite_list(values: torch.Tensor) -> list:
    return [float(v) if np.isfinite(v) else None for v in values.float().tolist()]


def build_app(reward, name: str, *, max_batch: int = 8, max_wait_ms: float = 10.0):
    """The FastAPI app serving ``reward`` (a built reward) as ``name``."""
    from fastapi import FastAPI, HTTPException

    try:
        version = importlib_metadata.version("align-diffusion")
    except importlib_metadata.PackageNotFoundError:
        version = "unknown"
    app = FastAPI(title=f"align reward server: {name}")
    queue: list[tuple[torch.Tensor, list[str], asyncio.Future]] = []
    lock = asyncio.Lock()

    def score_batch(samples: torch.Tensor, prompts: list[str]):
        with torch.no_grad():
            return reward(samples, prompts)

    async def flush() -> None:
        """Score the queued requests of one sample kind and size together (up to max_batch samples)."""
        async with lock:
            if not queue:
                return
            first = queue[0][0]
            batch, count = [], 0
            for item in list(queue):
                if item[0].shape[1:] == first.shape[1:] and (count + len(item[0]) <= max_batch or not batch):
                    batch.append(item)
                    count += len(item[0])
            for item in batch:
                queue.remove(item)
        samples = torch.cat([b[0] for b in batch])
        prompts = [p for b in batch for p in b[1]]
        try:
            out = await asyncio.get_running_loop().run_in_executor(None, score_batch, samples, prompts)
        except Exception as err:  # every waiting request gets the error
            for item in batch:
                item[2].set_exception(err)
            return
        valid = out.valid_mask()
        start = 0
        for samples_i, _, future in batch:
            rows = slice(start, start + len(samples_i))
            start += len(samples_i)
            future.set_result({"scores": {k: finite_list(v[rows]) for k, v in out.scores.items()},
                               "total": finite_list(out.total[rows]), "valid": valid[rows].tolist()})

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/metadata")
    def meta():
        return {"name": name, "dimensions": list(getattr(reward, "dimensions", ())),
                "differentiable": bool(getattr(reward, "differentiable", False)), "version": version,
                "max_batch": max_batch, "schema": SCHEMA}

    @app.post("/score")
    async def score(body: dict):
        try:
            samples = decode_samples(body["samples"])
            prompts = [str(p) for p in body["prompts"]]
        except (KeyError, ValueError, TypeError) as err:
            raise HTTPException(status_code=422, detail=f"bad request: {err}") from None
        if len(prompts) != len(samples):
            raise HTTPException(status_code=422, detail=f"{len(samples)} samples but {len(prompts)} prompts")
        future = asyncio.get_running_loop().create_future()
        queue.append((samples, prompts, future))
        if sum(len(item[0]) for item in queue) < max_batch:
            await asyncio.sleep(max_wait_ms / 1000)  # let concurrent requests join the batch
        while not future.done():
            await flush()
            if not future.done():
                await asyncio.sleep(0)
        try:
            return future.result()
        except Exception as err:
            raise HTTPException(status_code=500, detail=f"{type(err).__name__}: {err}".splitlines()[0]) from None

    return app


def serve(name: str, options: dict, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          max_wait_ms: float = 10.0, device: str | None = None) -> None:
    """Build the reward and serve it with uvicorn (blocks)."""
    import uvicorn

    from rewards import build_reward

    reward = build_reward({"name": name, **options})
    if device:
        reward.to(device)
    uvicorn.run(build_app(reward, name, max_batch=max_batch, max_wait_ms=max_wait_ms), host=host, port=port,
                log_level="warning")


def ray_deployment(name: str, options: dict, *, num_replicas: int = 1, gpus_per_replica: float = 0,
                   max_batch: int = 8, max_wait_ms: float = 10.0, device: str | None = None):
    """The app as a Ray Serve application: ``num_replicas`` replicas of ``gpus_per_replica`` GPUs
    each, every one building the reward when it starts (serve.ingress of a builder function, so no
    model is pickled from the driver). ``serve.run(ray_deployment(...), route_prefix="/")`` starts it."""
    from ray import serve

    from align.errors import ConfigError

    if device and device.startswith("cuda"):
        if ":" in device:
            raise ConfigError(f"--device {device}: a Ray Serve replica sees only the GPUs it is given; use cuda")
        gpus_per_replica = gpus_per_replica or 1  # Ray hides the GPUs from a replica that asks for none

    def build():
        from rewards import build_reward

        reward = build_reward({"name": name, **options})
        if device:
            reward.to(device)
        return build_app(reward, name, max_batch=max_batch, max_wait_ms=max_wait_ms)

    actor = {"num_gpus": gpus_per_replica} if gpus_per_replica else {}
    deployment = serve.deployment(name=f"reward-{name}", num_replicas=num_replicas,
                                  ray_actor_options=actor)(serve.ingress(build)())
    return deployment.bind()


def serve_on_ray(name: str, options: dict, *, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """Start Ray (or join the cluster of ``RAY_ADDRESS``) and serve the reward with Ray Serve (blocks)."""
    import os
    import time
    from pathlib import Path

    import ray
    from ray import serve

    root = str(Path(__file__).resolve().parents[1])  # replicas import the rewards package from here
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    serve.start(http_options={"host": host, "port": port})
    serve.run(ray_deployment(name, options, **kwargs), route_prefix="/")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
