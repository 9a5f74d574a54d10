"""Shared fixtures: an analytic flow model whose exact velocity is known in closed form."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# without a GPU, Triton kernels run in its interpreter; it must be chosen before triton is imported
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the cores shared among pytest-xdist's workers (scripts/test.sh runs one per core)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))

from pipelines.base import Conditioning, ModelAdapter, Schedule  # noqa: E402

#: the longest files start first (scripts/test.sh hands the work out in this order): the workers then
#: finish together instead of one running a long file alone at the end
START_FIRST = ("test_bench_suite.py", "test_gpu_bench.py", "test_guided_training.py", "test_reward_server.py",
               "test_distributed.py", "test_toy_reward_rise.py", "test_async_rollout.py")


def pytest_collection_modifyitems(config, items):
    """START_FIRST's files first, the others in their order (scripts/test.sh runs pytest-xdist with
    --no-loadscope-reorder, so this is the order the workers get them)."""
    items.sort(key=lambda item: START_FIRST.index(item.path.name) if item.path.name in START_FIRST
               else len(START_FIRST))

SHARED_ASSETS = ROOT.parent / "shared" / "assets"


class GaussianDenoiser(torch.nn.Module):
    """Exact velocity of data x0 ~ N(mu, s0^2 I) under x_sigma = (1 - sigma) x0 + sigma eps:
    with var = (1 - sigma)^2 s0^2 + sigma^2 and r = x - (1 - sigma) mu,
    E[eps | x] = sigma r / var and E[x0 | x] = mu + (1 - sigma) s0^2 r / var; v = E[eps|x] - E[x0|x].
    ``gain`` (1.0) is a trainable scale so gradients have something to reach."""

    def __init__(self, s0: float = 0.5):
        super().__init__()
        self.s0 = s0
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, sigma, mu):
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        mu = mu.reshape(x.shape)
        var = (1 - sigma) ** 2 * self.s0**2 + sigma**2
        r = x - (1 - sigma) * mu
        eps_hat = sigma * r / var
        x0_hat = mu + (1 - sigma) * self.s0**2 * r / var
        return self.gain * (eps_hat - x0_hat)


class GaussianAdapter(ModelAdapter):
    """A model adapter over :class:`GaussianDenoiser`; prompt k means data centred at mu = k."""

    name = "gaussian"
    default_guidance = 1.0

    def __init__(self, shape=(2, 4, 4), s0: float = 0.5):
        super().__init__()
        self.shape = tuple(shape)
        self.denoiser = GaussianDenoiser(s0)

    def encode(self, prompts, negative_prompt="", guidance_scale=None):
        mu = torch.tensor([float(p) for p in prompts])[:, None].expand(-1, int(torch.tensor(self.shape).prod()))
        scale = self.default_guidance if guidance_scale is None else guidance_scale
        negative = {"mu": torch.zeros_like(mu)} if scale != 1.0 else None
        return Conditioning({"mu": mu.contiguous()}, negative, scale)

    def forward(self, x, t, tensors, extra):
        return self.denoiser(x, t / 1000, tensors["mu"])

    def decode(self, latents):
        return latents.clamp(0, 1)

    def schedule(self, num_steps, *, latent_shape=None):
        sigmas = torch.linspace(1, 0, num_steps + 1)
        return Schedule(sigmas[:-1] * 1000, sigmas, "flow")

    def latent_shape(self, height=None, width=None, num_frames=None):
        return self.shape


class GaussianEpsDenoiser(torch.nn.Module):
    """Exact noise prediction of data x0 ~ N(mu, s0^2 I) under x_a = sqrt(a) x0 + sqrt(1 - a) eps
    (a = alpha_bar): E[eps | x] = sqrt(1 - a) (x - sqrt(a) mu) / (a s0^2 + 1 - a), times a trainable
    ``gain``."""

    def __init__(self, s0: float = 0.5):
        super().__init__()
        self.s0 = s0
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, alpha, mu):
        a = alpha.reshape(-1, *([1] * (x.ndim - 1)))
        mu = mu.reshape(x.shape)
        # the gain multiplies last: a float64 x keeps the whole output float64 (gradient checks)
        return self.gain * (torch.sqrt(1 - a) * (x - torch.sqrt(a) * mu) / (a * self.s0**2 + 1 - a))


class GaussianDDPMAdapter(GaussianAdapter):
    """The same data as :class:`GaussianAdapter` under a DDPM-family (alpha_bar) schedule with an
    eps-predicting denoiser: the analytic stand-in for a UNet model (DDPO, DDIM kernels)."""

    name = "gaussian_ddpm"
    prediction_type = "epsilon"

    def __init__(self, shape=(3, 4, 4), s0: float = 0.5):
        super().__init__(shape, s0)
        self.denoiser = GaussianEpsDenoiser(s0)

    def forward(self, x, t, tensors, extra):
        return self.denoiser(x, 1 - t / 1000, tensors["mu"])

    def schedule(self, num_steps, *, latent_shape=None):
        alphas = torch.linspace(0.02, 0.995, num_steps + 1)
        return Schedule((1 - alphas[:-1]) * 1000, alphas, "ddpm")


class Crash(RuntimeError):
    """The kill of :func:`crash_on_call`."""


def crash_on_call(monkeypatch, owner, name: str, call: int, train) -> None:
    """Run ``train()`` with ``owner.name`` (a function of a module, or a method of a class) raising
    Crash on its ``call``-th call (from 1), as a run killed there; then put the original back."""
    original, calls = getattr(owner, name), {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise Crash("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, crashing)
    with pytest.raises(Crash):
        train()
    monkeypatch.setattr(owner, name, original)


def gaussian_trainer(name: str, out, *extra: str):
    """(trainer module, config) of a short full-fine-tuning run of trainer ``name`` on the analytic
    model (prompt "0.5", reward: mean brightness, 6 steps); ``extra`` overrides win."""
    from align.config import load_config
    from align.trainers import trainer_module
    from rewards.base import REWARDS, Reward, register_reward

    if "test_gaussian_brightness" not in REWARDS:
        @register_reward("test_gaussian_brightness")
        class Brightness(Reward):
            def score(self, samples, prompts, **context):
                return {"score": samples.mean(dim=(1, 2, 3))}

    module = trainer_module(name)
    config = load_config(module.CONFIG, None, [
        "rewards=[test_gaussian_brightness]", "prompts=['0.5']", "eval_prompts=['0.5']", "iterations=2",
        "lora.enabled=false", f"run.output_dir={out}", "optim.lr=0.05", "rollout.num_steps=6",
        "run.log_with=none", "prompts_per_iteration=1", "run.progress=false", "eval.per_prompt=2", *extra])
    return module, config


@pytest.fixture
def gaussian_adapter():
    return GaussianAdapter()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (thread hand-offs dominate on a busy 2-core machine);
    a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
