"""Convert a public image-editing dataset's parquet shards into the edit prompt file of
docs/editing.md (``{"prompt": instruction, "image": source, "target": ..., "mask": ...}`` a line).

    python scripts/edit_dataset_to_jsonl.py train-00000-of-00051.parquet data/magicbrush [--limit N]

The columns are found by name (MagicBrush: source_img, instruction, target_img, mask_img;
InstructPix2Pix: original_image, edit_prompt, edited_image; others: input_image / source_image /
image, prompt, output_image / target_image, mask), or given with --source / --instruction /
--target / --mask. Image cells are Hugging Face ``datasets`` image structs ({"bytes", "path"}) or
raw bytes; they are written as they are to OUT_DIR/images/ and named relative to the JSONL file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: column names of the public layouts, in the order they are tried
COLUMNS = {
    "source": ("source_img", "original_image", "input_image", "source_image", "image"),
    "instruction": ("instruction", "edit_prompt", "prompt", "edit_instruction"),
    "target": ("target_img", "edited_image", "output_image", "target_image"),
    "mask": ("mask_img", "mask", "mask_image"),
}
REQUIRED = ("source", "instruction")


def find_columns(names: list[str], given: dict[str, str | None]) -> dict[str, str]:
    """The column of each role: the one given, else the first known name present; a required role
    without a column is a one-line error naming the columns there are."""
    found = {}
    for role, candidates in COLUMNS.items():
        column = given.get(role) or next((c for c in candidates if c in names), None)
        if column is not None and column not in names:
            raise SystemExit(f"--{role} {column!r} is not a column (columns: {', '.join(names)})")
        if column is None and role in REQUIRED:
            raise SystemExit(f"no {role} column found (tried {', '.join(candidates)}; columns: {', '.join(names)}): "
                             f"name it with --{role}")
        if column is not None:
            found[role] = column
    return found


def image_bytes(cell) -> bytes:
    """The encoded image of a cell: a datasets image struct's bytes, or raw bytes."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if not isinstance(cell, (bytes, bytearray)):
        raise SystemExit(f"an image cell holds {type(cell).__name__}, not encoded image bytes")
    return bytes(cell)


def suffix(data: bytes) -> str:
    return ".png" if data.startswith(b"\x89PNG") else ".jpg" if data.startswith(b"\xff\xd8") else ".webp" \
        if data[8:12] == b"WEBP" else ".img"


def convert(shard: Path, out: Path, given: dict[str, str | None] | None = None, limit: int | None = None) -> int:
    """Append the rows of ``shard`` to ``out``/edits.jsonl (images under ``out``/images); returns the rows written."""
    import pyarrow.parquet as pq

    names = pq.read_schema(shard).names
    columns = find_columns(names, given or {})
    table = pq.read_table(shard, columns=sorted(set(columns.values())))
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = 0
    with open(out / "edits.jsonl", "a", encoding="utf-8") as index:
        for i, row in enumerate(table.to_pylist()):
            if limit is not None and rows >= limit:
                break
            entry = {"prompt": str(row[columns["instruction"]]).strip()}
            for role in ("source", "target", "mask"):
                if role in columns and row[columns[role]] is not None:
                    data = image_bytes(row[columns[role]])
                    name = f"images/{shard.stem}-{i:06d}-{role}{suffix(data)}"
                    (out / name).write_bytes(data)
                    entry["image" if role == "source" else role] = name
            index.write(json.dumps(entry) + "\n")
            rows += 1
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, help="rows per shard")
    for role in COLUMNS:
        parser.add_argument(f"--{role}", help=f"the {role} column (default: found by name)")
    args = parser.parse_args()
    given = {role: getattr(args, role) for role in COLUMNS}
    total = sum(convert(shard, args.out, given, args.limit) for shard in args.shards)
    print(f"wrote {total} edits to {args.out / 'edits.jsonl'}")


if __name__ == "__main__":
    main()
