"""The edit dataset converter (scripts/edit_dataset_to_jsonl.py) on a small parquet file of a public
layout it writes itself: the JSONL it makes reads back as edit prompts whose source, target and mask
load as the images that went in."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import torch

from align.prompts import prompt_list
from pipelines.base import Prompt, load_image

ROOT = Path(__file__).resolve().parents[1]


def _png(colour, size=(8, 8)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _magicbrush_shard(path: Path) -> Path:
    """Three rows of MagicBrush's layout (datasets image structs), one without a mask."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = lambda colour: {"bytes": _png(colour), "path": None}  # noqa: E731
    pq.write_table(pa.table({
        "img_id": ["1", "2", "3"], "turn_index": [1, 1, 2],
        "source_img": [image((255, 0, 0)), image((0, 255, 0)), image((0, 0, 255))],
        "mask_img": [image((255, 255, 255)), None, image((0, 0, 0))],
        "instruction": ["make it blue", " add a hat ", "remove the dog"],
        "target_img": [image((0, 0, 255)), image((0, 128, 0)), image((0, 0, 128))],
    }), path)
    return path


def _run(*args):
    return subprocess.run([sys.executable, "scripts/edit_dataset_to_jsonl.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_converted_rows_read_back_as_edit_prompts(tmp_path):
    shard = _magicbrush_shard(tmp_path / "train-00000.parquet")
    done = _run(shard, tmp_path / "out", "--limit", 2)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote 2 edits to {tmp_path / 'out' / 'edits.jsonl'}"
    prompts = prompt_list(None, str(tmp_path / "out" / "edits.jsonl"), [])
    assert prompts == ["make it blue", "add a hat"] and all(isinstance(p, Prompt) for p in prompts)
    first, second = prompts
    red = load_image(first.image, 8, 8)
    assert red[0].eq(1).all() and red[1:].eq(0).all()
    assert load_image(first.target, 8, 8)[2].eq(1).all() and load_image(first.mask, 8, 8).eq(1).all()
    assert second.mask is None and load_image(second.target, 8, 8)[1].mean() == torch.tensor(128 / 255)


def test_an_unknown_layout_is_one_line_naming_the_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"before": [b"x"], "text": ["a"]}), tmp_path / "odd.parquet")
    done = _run(tmp_path / "odd.parquet", tmp_path / "out")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == ("no source column found (tried source_img, original_image, "
                                                    "input_image, source_image, image; columns: before, text): name "
                                                    "it with --source")
    named = _run(tmp_path / "odd.parquet", tmp_path / "out", "--source", "before", "--instruction", "text")
    assert named.returncode == 0 and (tmp_path / "out" / "edits.jsonl").read_text().count("\n") == 1
