"""Human preference labels for D3PO: ``align label`` samples pairs (two stochastic trajectories of
one prompt from one start noise), writes what a person judges, and keeps the trajectories so that
``align train d3po labels=FOLDER/pairs.jsonl`` trains on exactly the judged samples.

A label folder holds:

- ``pair-0000-a.png`` / ``pair-0000-b.png`` ... : the two images of each pair;
- ``pairs.jsonl``: one line per pair, ``{"pair": 0, "prompt": ..., "a": ..., "b": ..., "preferred": null}``;
  set ``preferred`` to ``"a"``, ``"b"`` or ``"tie"`` (ties and nulls are skipped in training);
- ``index.html``: the pairs side by side with a choice per pair and a button that downloads the
  filled ``pairs.jsonl`` (a plain page: open it in any browser, no server);
- ``trajectories.safetensors`` + ``trajectories.json``: every stochastic step of both trajectories
  (latents before / after, mean, std, log-prob) and the sampling settings they need (model,
  steps, size, kernel, guidance).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from align.errors import ConfigError

from align.labels import PREFERRED


def write_label_set(adapter, config, out: Path, pairs: int) -> Path:
    """Sample ``pairs`` pairs with ``config`` (a D3POConfig) and write the label folder ``out``."""
    from dataclasses import replace

    from torchvision.transforms.functional import to_pil_image

    from align.prompts import prompt_list
    from align.prompts import iteration_generator, prompts_for_iteration
    from align.training.run import TOY_PROMPTS
    from align.sampling.rollout import rollout

    out.mkdir(parents=True, exist_ok=True)
    prompts = prompt_list(config.prompts, config.prompt_file, TOY_PROMPTS)
    chosen = prompts_for_iteration(prompts, pairs, config.run.seed, 0)
    size = {"height": config.model.height, "width": config.model.width, "num_frames": config.model.num_frames}
    rollout_config = replace(config.rollout, same_noise_per_group=True)
    with torch.no_grad():
        cond = adapter.encode(chosen, config.negative_prompt, rollout_config.guidance_scale)
        result = rollout(adapter, cond, rollout_config, group_size=2, generator=iteration_generator(config.run.seed, 0),
                         **size)
        pixels = adapter.decode(result.samples.to(adapter.dtype)).float().cpu()
    tensors, steps = {}, []
    for t in result.main_transitions():
        steps.append({"step": t.step, "kernel": t.kernel, "params": t.params, "expert": t.expert})
        for name in ("latents", "next_latents", "mean", "std", "log_prob"):
            tensors[f"step{t.step}.{name}"] = getattr(t, name).detach().cpu().clone()  # steps share latents
    if not steps:
        raise ConfigError(f"rollout.kernel: {config.rollout.kernel!r} records no stochastic steps to train")
    from safetensors.torch import save_file

    save_file(tensors, str(out / "trajectories.safetensors"))
    # image-to-video: each prompt's image (a path) goes with it, so D3PO re-scores as it was sampled
    images = [str(image) if isinstance(image := getattr(p, "image", None), (str, Path)) else None for p in chosen]
    if any(getattr(p, "image", None) is not None for p in chosen) and None in images:
        raise ConfigError("align label keeps image-to-video prompts' images as paths: give them in a JSONL prompt_file")
    info = {"prompts": [str(p) for p in chosen], "images": images, "steps": steps, "model": config.model.name,
            "model_path": config.model.path,
            "dtype": config.model.dtype,
            "num_steps": config.rollout.num_steps, "guidance_scale": rollout_config.guidance_scale,
            "negative_prompt": config.negative_prompt, **size}
    (out / "trajectories.json").write_text(json.dumps(info, indent=1))
    lines = []
    for p, prompt in enumerate(chosen):
        names = {}
        for side, row in (("a", 2 * p), ("b", 2 * p + 1)):
            # a video shows its middle frame (image-to-video's first frame is the given image itself)
            frame = pixels[row] if pixels[row].ndim == 3 else pixels[row][pixels[row].shape[0] // 2]
            names[side] = f"pair-{p:04d}-{side}.png"
            to_pil_image(frame).save(out / names[side])
        lines.append({"pair": p, "prompt": prompt, "a": names["a"], "b": names["b"], "preferred": None})
    (out / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (out / "index.html").write_text(label_page(lines))
    return out


def label_page(lines: list[dict]) -> str:
    """The judging page: each pair's prompt and images, a choice a / b / tie, and a download of the
    filled pairs.jsonl (all in the page; nothing is sent anywhere)."""
    rows = []
    for line in lines:
        p = line["pair"]
        choices = "".join(f'<label><input type="radio" name="pair{p}" value="{v}"> {v}</label> '
                          for v in PREFERRED)
        rows.append(f'<section><h2>pair {p}: {html.escape(line["prompt"])}</h2>'
                    f'<figure><img src="{line["a"]}" alt="a"><figcaption>a</figcaption></figure>'
                    f'<figure><img src="{line["b"]}" alt="b"><figcaption>b</figcaption></figure>'
                    f'<p>preferred: {choices}</p></section>')
    data = json.dumps(lines).replace("</", "<\\/")  # a prompt cannot close the script
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>align label: {len(lines)} pairs</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
section {{ border-bottom: 1px solid #ccc; padding: 1em 0; }}
figure {{ display: inline-block; margin: 0 1em 0 0; text-align: center; }}
img {{ width: 256px; image-rendering: pixelated; border: 1px solid #888; }}
h2 {{ font-size: 1.1em; }}
</style></head><body>
<h1>Which image fits its prompt better?</h1>
<p>Choose a, b or tie for each pair, then download <code>pairs.jsonl</code> into this folder (replacing
the unfilled one) and train with <code>align train d3po labels=&lt;this folder&gt;/pairs.jsonl</code> (or
<code>align train dpo pairs=&lt;this folder&gt;/pairs.jsonl</code>).</p>
{''.join(rows)}
<p><button id="download">download pairs.jsonl</button> <span id="count"></span></p>
<script>
const pairs = {data};
function filled() {{
  return pairs.map(p => {{
    const picked = document.querySelector(`input[name="pair${{p.pair}}"]:checked`);
    return {{...p, preferred: picked ? picked.value : null}};
  }});
}}
document.addEventListener("change", () => {{
  const done = filled().filter(p => p.preferred !== null).length;
  document.getElementById("count").textContent = `${{done}} of ${{pairs.length}} judged`;
}});
document.getElementById("download").onclick = () => {{
  const text = filled().map(p => JSON.stringify(p)).join("\\n") + "\\n";
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], {{type: "application/jsonl"}}));
  link.download = "pairs.jsonl";
  link.click();
}};
</script></body></html>
"""


