"""``python -m bench --quick``: every benchmark of bench/ runs at a tiny size and names its figure on its
last line, so none can rot unnoticed (the figures of a quick run are not measurements)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.__main__ import HELPERS, SUITE  # noqa: E402


def test_the_suite_holds_every_benchmark_script():
    scripts = {bench.command.split()[0] for bench in SUITE.values()}
    assert scripts == {p.name for p in (ROOT / "bench").glob("*.py") if p.name not in ("__main__.py", *HELPERS)}


def test_every_benchmark_runs_tiny_and_names_its_figure_last():
    done = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if line.split(":")[0] in SUITE)
    assert set(lines) == set(SUITE), done.stderr[-2000:]
    for name, last in lines.items():
        # the last line is <figure>=<number>, e.g. rollout_vs_diffusers=0.848
        assert re.match(rf"{re.escape(SUITE[name].figure)}=-?\d", last), f"{name}: {last}"
    assert done.returncode == 0
