"""Every trainer, one after another in the same processes (run it under torchrun: DDP over gloo).

Each trainer runs 2 iterations of its method preset (``configs/methods/<name>.yaml``) on the
embedded toy model (ddpo, for DDPM models: its defaults on a tiny random SD 1.x pipeline), shrunk
to a few steps, checkpointing every iteration. Every
process then prints ``trainer=<name> rank=<r> before=<digest> after=<digest> iterations=<n>``, and
appends it to ``OUT/report-rank<r>.txt`` (the processes' stdout lines can interleave): the
digests of its trainable weights before and after training (DDP keeps the replicas identical only
if every gradient was all-reduced, since each process trains on its own samples).

    torchrun --nproc_per_node 2 tests/ddp_every_trainer.py OUT [TRAINER ...]
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: trainer -> overrides on top of the common ones (settings that refer to the preset's 10 steps)
EXTRA = {
    "branch_grpo": ["rollout.split_steps=[0,2]"],
    # 4 steps: AWM's strata cover steps 1-2, DGPO trains steps 0-2
    "awm": ["t_per_sample=2"],
    "dgpo": ["trunc_steps=2", "steps_per_iteration=2"],
    "ddpo": ["model.name=sd", "model.height=32", "model.width=32", "rewards=[jpeg_compressibility]",
             "prompts=['a cat', 'a dog', 'a red car']", "lora.rank=4"],
}
COMMON = ["iterations=2", "rollout.num_steps=4", "prompts_per_iteration=2", "eval_prompts=['a white digit 3']",
          "eval.per_prompt=1", "eval.num_steps=2", "heldout_rewards=[]", "run.checkpoint_every=1",
          "run.log_with=none", "run.progress=false", "run.resume=null"]


def digest(module: torch.nn.Module) -> str:
    values = [p.detach().float().flatten() for _, p in sorted(module.named_parameters()) if p.requires_grad]
    return hashlib.sha1(torch.cat(values).numpy().tobytes()).hexdigest()[:16]


def main(out: Path, names: list[str]) -> None:
    from align.config import load_config
    from align.models import ModelConfig, load_model
    from align.trainers import TRAINERS, trainer_module
    from accelerate.state import PartialState

    from tests.tiny_models import build_sd

    # before any process group exists: with one, only rank 0's save_pretrained writes the weights
    sd_path = build_sd(out / f"sd-{os.environ.get('RANK', '0')}")
    # a finished run ends the process group (accelerate's end_training); the next trainer needs it
    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    for name in names or list(TRAINERS):
        module = trainer_module(name)
        preset = ROOT / "configs" / "methods" / f"{name}.yaml"
        config = load_config(module.CONFIG, str(preset) if preset.exists() else None,
                             [*COMMON, *EXTRA.get(name, []), f"run.output_dir={out / name}"])
        if name == "ddpo":
            adapter = load_model(ModelConfig(name="sd", path=str(sd_path), device="cpu"))
        else:
            adapter = load_model(ModelConfig(name="toy", device="cpu"))
        before = {}

        import align.training.run as runtime

        original = runtime.Run.optimizer_step

        def optimizer_step(run, *args, **kwargs):  # the first update sees the freshly added LoRA
            before.setdefault("digest", digest(adapter.base_denoiser))
            return original(run, *args, **kwargs)

        runtime.Run.optimizer_step = optimizer_step
        try:
            module.train(config, adapter=adapter)
        finally:
            runtime.Run.optimizer_step = original
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        iterations = max(r["iteration"] for r in rows)
        rank = int(os.environ.get("RANK", "0"))
        line = (f"trainer={name} rank={rank} before={before.get('digest')} after={digest(adapter.base_denoiser)} "
                f"iterations={iterations}")
        with open(out / f"report-rank{rank}.txt", "a") as report:  # the processes' stdout lines interleave
            report.write(line + "\n")
        print(line, flush=True)
    destroy(PartialState())



if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
