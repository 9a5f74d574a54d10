"""Run under torchrun (2 processes, gloo) by tests/test_distributed.py: a Run of the embedded default
with ``run.gradient_accumulation_steps`` = K does 2K minibatches inside ``run.accumulate()``; a DDP
communication hook counts the gradient all-reduces. Prints ``allreduces=<n> minibatches=<m>``."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.config import load_config  # noqa: E402
from align.training.run import Run  # noqa: E402
from align.trainers.flow_grpo import FlowGRPOConfig  # noqa: E402


def main(out: str, accumulation: int) -> None:
    config = load_config(FlowGRPOConfig, None, [f"run.output_dir={out}", "run.log_with=none",
                                                f"run.gradient_accumulation_steps={accumulation}"])
    run = Run(config, model=config.model, lora=config.lora, optim=config.optim, run=config.run)
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / dist.get_world_size())

    run.adapter.denoiser.register_comm_hook(None, counting_hook)
    adapter = run.adapter
    cond = adapter.encode(["a red digit 3"], "", 1.0)
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(dist.get_rank()))
    minibatches = 2 * accumulation
    buckets_per_sync = None
    for i in range(minibatches):
        before = len(calls)
        with run.accumulate():
            out = adapter.predict(x, torch.tensor(500.0), cond.select(torch.tensor([0, 0])))
            run.accelerator.backward(out.square().mean())
        if i == accumulation - 1:
            buckets_per_sync = len(calls) - before
        run.optimizer.step()
        run.optimizer.zero_grad()
    if dist.get_rank() == 0:
        print(f"allreduces={len(calls)} minibatches={minibatches} buckets_per_sync={buckets_per_sync}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
