"""Reward commands of the ``align`` CLI: ``align rewards list`` and ``align score``.

    align rewards list
    align score --reward aesthetic -o head_path=sac+logos+ava1-l14-linearMSE.pth --images samples/
    align score --reward digit --reward colour -o colour.weight=0.5 --images samples/ --prompts prompts.txt
    align score --config rewards.yaml --images samples/ --json

``--images DIR`` holds images (png, jpg, webp, bmp) or videos (mp4, gif). Prompts come from
``--prompts FILE``: either ``file<TAB>prompt`` lines (the ``prompts.txt`` that ``align sample``
writes; used by default when the folder has one) or one prompt per line for the files in sorted
order; ``--prompt TEXT`` gives one prompt for every file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rewards.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, load_sample


def cmd_rewards_list(args: argparse.Namespace) -> int:
    from rewards.registry import available_rewards, reward_class

    for name in available_rewards():
        cls = reward_class(name)
        kind = "differentiable" if cls.differentiable else "black-box"
        print(f"{name:28s} {kind:15s} dims={','.join(cls.dimensions)}")
    return 0


# --- align score ----------------------------------------------------------------------------------
def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def reward_specs(names: list[str] | None, options: list[str] | None, config: str | None) -> list[dict]:
    """Reward specs from ``--config`` (YAML / JSON: a list of specs, or ``{rewards: [...]}``), then
    ``--reward`` names, with ``-o [NAME.]KEY=VALUE`` options applied (``NAME.`` picks one reward when
    there are several)."""
    from align.errors import ConfigError

    specs: list[dict] = []
    if config:
        import yaml

        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"reward config file not found: {path}")
        data = yaml.safe_load(path.read_text())
        data = data.get("rewards", data.get("reward", data)) if isinstance(data, dict) else data
        data = [data] if isinstance(data, (dict, str)) else data
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a list of reward specs or a mapping with 'rewards'")
        specs += [{"name": s} if isinstance(s, str) else dict(s) for s in data]
    specs += [{"name": n} for n in names or []]
    if not specs:
        raise ConfigError("no reward given: use --reward NAME (see `align rewards list`) or --config FILE")
    keys = [s.get("key", s.get("name")) for s in specs]
    for option in options or []:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ConfigError(f"option {option!r} is not of the form [reward.]key=value")
        target, dot, field = key.partition(".")
        if dot and target in keys:
            specs[keys.index(target)][field] = _parse_value(value)
        elif len(specs) == 1:
            specs[0][key] = _parse_value(value)
        else:
            raise ConfigError(f"option {option!r}: with several rewards, prefix the key with one of "
                              f"{', '.join(keys)} (e.g. {keys[0]}.{key}={value})")
    return specs


def read_prompts(images_dir: Path, prompts_file: str | None, prompt: str | None) -> tuple[list[Path], list[str]]:
    """(files, prompts) for ``align score``."""
    from align.errors import ConfigError

    if not images_dir.is_dir():
        raise FileNotFoundError(f"no images folder at {images_dir}")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    index = images_dir / "prompts.txt"
    if index.is_file():  # a folder written by `align sample`: its grid is not a sample
        files = [f for f in files if f.name != "grid.png"]
        if prompts_file is None and prompt is None:
            prompts_file = str(index)
    if prompt is not None:
        if not files:
            raise ConfigError(f"no images or videos in {images_dir}")
        return files, [prompt] * len(files)
    if prompts_file is None:
        raise ConfigError("no prompts: give --prompts FILE or --prompt TEXT")
    path = Path(prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}")
    lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and all("\t" in line for line in lines):
        pairs = [line.split("\t", 1) for line in lines]
        listed = [images_dir / name for name, _ in pairs]
        missing = [p for p in listed if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{path} lists {missing[0].name}, which is not in {images_dir}")
        return listed, [p for _, p in pairs]
    if not files:
        raise ConfigError(f"no images or videos in {images_dir}")
    if len(lines) != len(files):
        raise ConfigError(f"{path} has {len(lines)} prompts but {images_dir} has {len(files)} images/videos "
                          "(give one prompt per file in sorted order, or file<TAB>prompt lines)")
    return files, lines


def score_files(reward, samples: list, prompts: list[str], batch_size: int = 8, device: str = "cpu"):
    """Scores per sample (:func:`load_sample` of each file): a list of {dimension: float} and a list
    of valid flags, in file order. Samples of the same shape are scored together in batches of
    ``batch_size``."""
    import torch

    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(s.shape), []).append(i)
    rows: list[dict[str, float] | None] = [None] * len(samples)
    valid = [True] * len(samples)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch = torch.stack([samples[i] for i in chunk]).to(device)
            with torch.no_grad():
                out = reward(batch, [prompts[i] for i in chunk])
            for j, i in enumerate(chunk):
                row = {k: float(v[j]) for k, v in out.scores.items()}
                row["total"] = float(out.total[j])
                rows[i] = row
                valid[i] = True if out.valid is None else bool(out.valid[j])
    return rows, valid


def format_table(files: list[Path], prompts: list[str], rows: list[dict], valid: list[bool],
                 width: int = 40) -> str:
    columns = list(rows[0]) if rows else ["total"]
    if "total" in columns:
        columns = [c for c in columns if c != "total"] + ["total"]
    if columns == ["score", "total"]:
        columns = ["total"]
    header = ["file", "prompt"] + columns
    body = []
    for f, p, row, ok in zip(files, prompts, rows, valid):
        short = p if len(p) <= width else p[: width - 3] + "..."
        cells = [f"{row[c]:.4f}" if ok else "invalid" for c in columns]
        body.append([f.name, short] + cells)
    kept = [r for r, ok in zip(rows, valid) if ok]
    mean = [f"{sum(r[c] for r in kept) / len(kept):.4f}" if kept else "-" for c in columns]
    body.append(["mean", f"({len(kept)} of {len(rows)} scored)"] + mean)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) if k < 2 else str(x).rjust(w) for k, (x, w) in enumerate(zip(r, widths)))
             for r in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_score(args: argparse.Namespace) -> int:
    from align.errors import ConfigError
    from rewards.base import RewardError
    from rewards.registry import build_rewards, check_reward_specs

    specs = reward_specs(args.reward, args.option, args.config)
    check_reward_specs(specs, "--reward")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    files, prompts = read_prompts(Path(args.images), args.prompts, args.prompt)
    if args.device:
        from align.models import check_device

        check_device(args.device, field="--device")
    samples = [load_sample(f) for f in files]  # every file decodes before a reward model loads
    try:
        reward = build_rewards(specs)
        if args.device:
            reward.to(args.device)
        rows, valid = score_files(reward, samples, prompts, batch_size=args.batch_size,
                                  device=args.device or "cpu")
    except RewardError as err:
        print(f"align: reward error: {err}", file=sys.stderr)
        return 2
    if args.json:
        def clean(row):  # NaN (invalid samples) is not JSON
            return {k: (None if v != v else v) for k, v in row.items()}

        print(json.dumps([{"file": f.name, "prompt": p, "valid": ok, "scores": clean(r)}
                          for f, p, r, ok in zip(files, prompts, rows, valid)], indent=1))
    else:
        print(format_table(files, prompts, rows, valid))
    return 0


def check_port(port: int, field: str = "--port") -> None:
    """A one-line ConfigError unless ``port`` is a TCP port a server can listen on (1-65535)."""
    from align.errors import ConfigError

    if not 1 <= port <= 65535:
        raise ConfigError(f"{field} must be in 1..65535, got {port}")


def cmd_serve_reward(args: argparse.Namespace) -> int:
    from align.errors import ConfigError
    from rewards.server import serve

    check_port(args.port)
    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--max-wait-ms", args.max_wait_ms, 0),
                               ("--replicas", args.replicas, 1), ("--gpus-per-replica", args.gpus_per_replica, 0)):
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    if args.device:
        from align.models import check_device

        check_device(args.device, field="--device")
    specs = reward_specs([args.name], args.option, None)
    options = {k: v for k, v in specs[0].items() if k != "name"}
    from rewards import build_reward  # the name and options are checked before the server starts

    build_reward({"name": args.name, **options})
    where = f"Ray Serve, {args.replicas} replica(s)" if args.ray else "uvicorn"
    print(f"serving reward {args.name!r} on http://{args.host}:{args.port} (GET /health, GET /metadata, POST /score; "
          f"{where})", flush=True)
    if args.ray:
        from rewards.server import serve_on_ray

        serve_on_ray(args.name, options, host=args.host, port=args.port, num_replicas=args.replicas,
                     gpus_per_replica=args.gpus_per_replica, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                     device=args.device)
        return 0
    serve(args.name, options, host=args.host, port=args.port, max_batch=args.max_batch,
          max_wait_ms=args.max_wait_ms, device=args.device)
    return 0


def register_commands(sub) -> None:
    rewards = sub.add_parser("rewards", help="reward registry")
    rewards_sub = rewards.add_subparsers(dest="rewards_command", required=True)
    listing = rewards_sub.add_parser("list", help="list registered rewards")
    listing.set_defaults(func=cmd_rewards_list)

    score = sub.add_parser("score", help="score a folder of images / videos with one or more rewards",
                           description="Score a folder of images or videos and print a table (or JSON).")
    score.add_argument("--reward", action="append", metavar="NAME", help="reward name (repeat to combine)")
    score.add_argument("-o", "--option", action="append", metavar="[NAME.]KEY=VALUE",
                       help="reward option, e.g. head_path=..., weight=0.5, normalize=batch (repeatable)")
    score.add_argument("--config", help="YAML / JSON file: a list of reward specs {name, weight, normalize, ...}")
    score.add_argument("--images", required=True, help="folder of images / videos")
    score.add_argument("--prompts", help="prompts file: file<TAB>prompt lines, or one prompt per file")
    score.add_argument("--prompt", help="one prompt for every file")
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.set_defaults(func=cmd_score)

    server = sub.add_parser("serve-reward", help="serve a reward over HTTP (FastAPI + uvicorn) for the remote reward")
    server.add_argument("name", help="a registered reward (align rewards list)")
    server.add_argument("-o", "--option", action="append", metavar="KEY=VALUE", help="reward option (repeatable)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--max-batch", type=int, default=8, help="samples scored together from concurrent requests")
    server.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request waits for others")
    server.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    server.add_argument("--ray", action="store_true",
                        help="deploy on Ray Serve (a local Ray instance, or the cluster of RAY_ADDRESS)")
    server.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas")
    server.add_argument("--gpus-per-replica", type=float, default=0, help="Ray Serve: GPUs of each replica")
    server.set_defaults(func=cmd_serve_reward)
