"""The README quickstart: Flow-GRPO on the embedded default raises the digit reward.

Measured over training seeds 0, 1, 2 (fixed evaluation prompts and seeds; Flow-GRPO with the
reference's global advantage std): before 0.879, after 0.935 / 0.945 / 0.939, i.e. gains of +0.057 /
+0.066 / +0.061 (std 0.005). The assertion asks for
+0.02, well outside that noise.
"""

import re
from pathlib import Path

import pytest

from align.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_raises_the_digit_reward(tmp_path, capsys):
    out = tmp_path / "quickstart"
    code = main(["train", "flow_grpo", "--config", str(ROOT / "configs/quickstart.yaml"), f"run.output_dir={out}",
                 "run.progress=false", "run.log_with=none"])
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.match(r"reward before=([-\d.]+) after=([-\d.]+)", line)
    assert match, line
    before, after = map(float, match.groups())
    assert after > before + 0.02
    assert (out / "samples" / "before" / "grid.png").exists() and (out / "samples" / "after" / "grid.png").exists()
    assert (out / "lora" / "lora.safetensors").exists() and (out / "config.yaml").exists()
