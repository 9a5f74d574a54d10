"""Convert Pick-a-Pic parquet shards into the preference-pair JSONL of docs/preference_pairs.md.

    python scripts/pickapic_to_pairs.py train-00000-of-00645.parquet data/pickapic [--limit N]

Writes OUT_DIR/images/<row>_{0,1}.jpg and OUT_DIR/pairs.jsonl (ties included with label 0.5: the
trainer drops them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def convert(shard: Path, out: Path, limit: int | None = None) -> int:
    import pyarrow.parquet as pq

    table = pq.read_table(shard, columns=["caption", "jpg_0", "jpg_1", "label_0"])
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = 0
    with open(out / "pairs.jsonl", "a", encoding="utf-8") as index:
        for i, row in enumerate(table.to_pylist()):
            if limit is not None and rows >= limit:
                break
            name = f"{shard.stem}-{i:06d}"
            (images / f"{name}_0.jpg").write_bytes(row["jpg_0"])
            (images / f"{name}_1.jpg").write_bytes(row["jpg_1"])
            index.write(json.dumps({"prompt": row["caption"], "chosen": f"images/{name}_0.jpg",
                                    "rejected": f"images/{name}_1.jpg", "label": float(row["label_0"])}) + "\n")
            rows += 1
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, help="rows per shard")
    args = parser.parse_args()
    total = sum(convert(shard, args.out, args.limit) for shard in args.shards)
    print(f"wrote {total} pairs to {args.out / 'pairs.jsonl'}")


if __name__ == "__main__":
    main()
