"""Critique reward: a vision-language model writes a critique of the image, then scores it.

The answer is parsed for scores in the common formats:

* ``Final Score: 7.5`` and ``<Score>4</Score>`` -> the ``overall`` dimension;
* ``Visual Quality Score (1-5): 4`` (also ``**Visual Quality Score (1-5):** 4``, ``Text Alignment score: 3``)
  -> the dimension of that name (case, spaces and underscores do not matter).

The last occurrence wins (the score after the critique). A requested dimension that the answer does not
contain, or a value outside its stated range, is flagged (``_valid`` False, the value NaN): never
scored 0. Scores stay on the model's scale unless ``normalize`` maps a stated range (lo-hi) to [0, 1].

Back ends (any callable ``messages -> text``):

* :class:`OpenAIChatBackend` -- any OpenAI-compatible chat server (vLLM, SGLang, TGI, llama.cpp, a
  hosted API), images sent as base64 PNG data URLs; standard library HTTP only.
* :class:`TransformersVLMBackend` -- a local transformers VLM (``AutoModelForImageTextToText`` and its
  processor's chat template).

Timeouts, retries (with exponential back-off) and the failure policy (``on_failure``: ``skip`` flags the
sample, ``stop`` raises) are options; :attr:`CritiqueReward.report` counts requests, retries, failures,
timeouts and unparsed answers, and :attr:`CritiqueReward.last_texts` keeps the last answers.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from align.errors import ConfigError
from rewards.base import Reward, RewardError, register_reward

NUMBER = r"([-+]?\d+(?:\.\d+)?)"
_FINAL = re.compile(r"final\s+score\s*\**\s*[:=]\s*\**\s*" + NUMBER, re.IGNORECASE)
_TAG = re.compile(r"<score>\s*" + NUMBER + r"\s*</score>", re.IGNORECASE)
#: after the dimension's name: "score", an optional stated range "(lo-hi)", then ": value"
_AFTER_NAME = (r"\s+score\s*(?:\(\s*" + NUMBER + r"\s*(?:-|–|to|~)\s*" + NUMBER + r"\s*\))?"
               r"\s*\**\s*[:=]\s*\**\s*" + NUMBER)
OVERALL_NAMES = ("overall", "final", "total")

DEFAULT_EDIT_INSTRUCTION = (
    "You are an expert judge of image edits. The first image is the source; the last image is the result "
    "of editing it with the instruction:\n\"{prompt}\"\n"
    "First write a short critique of how well the result follows the instruction and keeps everything of "
    "the source that the instruction does not ask to change, with respect to {dimension_list}. Then give "
    "each score on its own line in exactly this form:\n{score_lines}"
)
#: critique modes: a generated image against its prompt, or an edit against its source and instruction
CRITIQUE_MODES = ("generate", "edit")

DEFAULT_INSTRUCTION = (
    "You are an expert judge of generated images and videos. The generation prompt was:\n"
    "\"{prompt}\"\n"
    "First write a short critique of the image with respect to {dimension_list}. Then give each score on "
    "its own line in exactly this form:\n{score_lines}"
)


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def _dimension_pattern(name: str) -> re.Pattern:
    words = [re.escape(w) for w in _key(name).split(" ")]
    return re.compile(r"(?<![A-Za-z])" + r"[\s_\-]+".join(words) + _AFTER_NAME, re.IGNORECASE)


def parse_scores(text: str, dimensions: Sequence[str], *, normalize: bool = False) -> dict[str, float | None]:
    """Scores of ``dimensions`` found in ``text``: the last ``<Name> Score (lo-hi): x`` line of each
    (the ``overall`` / ``final`` / ``total`` dimension also reads ``Final Score: x`` and
    ``<Score>x</Score>``); None where absent or outside the stated range."""
    out: dict[str, float | None] = {}
    for dim in dimensions:
        hits = [(m.start(), float(m.group(3)), m.group(1), m.group(2)) for m in _dimension_pattern(dim).finditer(text)]
        if _key(dim) in OVERALL_NAMES:
            hits += [(m.start(), float(m.group(1)), None, None) for m in _FINAL.finditer(text)]
            hits += [(m.start(), float(m.group(1)), None, None) for m in _TAG.finditer(text)]
        if not hits:
            out[dim] = None
            continue
        _, value, lo, hi = max(hits, key=lambda h: h[0])
        lo = None if lo is None else float(lo)
        hi = None if hi is None else float(hi)
        if lo is not None and hi is not None and not lo <= value <= hi:
            out[dim] = None
        elif normalize and lo is not None and hi is not None and hi > lo:
            out[dim] = (value - lo) / (hi - lo)
        else:
            out[dim] = value
    return out


def image_to_data_url(image: Tensor) -> str:
    """(C, H, W) float in [0, 1] -> ``data:image/png;base64,...``."""
    from torchvision.transforms.functional import to_pil_image

    buffer = io.BytesIO()
    to_pil_image(image.detach().float().clamp(0, 1).cpu()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def build_messages(frames: Tensor, instruction: str) -> list[dict]:
    """One user message: the frames (images) then the instruction, in the OpenAI content format."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_to_data_url(f)}} for f in frames]
    content.append({"type": "text", "text": instruction})
    return [{"role": "user", "content": content}]


class BackendError(RuntimeError):
    """A back end could not answer (HTTP error, timeout, malformed reply)."""

    def __init__(self, message: str, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class OpenAIChatBackend:
    """``POST {base_url}/chat/completions`` of an OpenAI-compatible server. ``api_key_env`` names the
    environment variable holding the key (keys never go into configs)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, timeout: float = 60.0,
                 max_tokens: int = 512, temperature: float = 0.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout = model, float(timeout)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self.api_key:
            raise ConfigError(f"critique: environment variable {api_key_env} (api_key_env) is not set")
        import httpx

        self.client = httpx.Client(timeout=self.timeout)  # one pooled connection per server

    def __call__(self, messages: list[dict]) -> str:
        import httpx

        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            response = self.client.post(self.url, json=body, headers=headers)
        except httpx.TimeoutException:
            raise BackendError(f"no answer from {self.url} within {self.timeout:g} s", timeout=True) from None
        except httpx.HTTPError as err:
            raise BackendError(f"cannot reach {self.url}: {err}") from None
        if response.status_code >= 400:
            detail = response.text[:200].replace("\n", " ")
            raise BackendError(f"HTTP {response.status_code} from {self.url}: {detail}")
        try:
            payload = response.json()
        except ValueError:
            raise BackendError(f"{self.url} answered with something that is not JSON") from None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"{self.url} answered without choices[0].message.content") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)


class TransformersVLMBackend:
    """A local transformers VLM (directory or hub name) answering the same messages; greedy decoding."""

    def __init__(self, model_path: str, *, max_new_tokens: int = 256, device: str = "cpu",
                 dtype: str = "float32", model=None, processor=None) -> None:
        from rewards.loading import parse_dtype

        if model is None or processor is None:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            try:
                processor = processor or AutoProcessor.from_pretrained(model_path)
                model = model or AutoModelForImageTextToText.from_pretrained(model_path, dtype=parse_dtype(dtype))
            except OSError as err:
                first = (str(err).strip().splitlines() or ["?"])[0]
                raise ConfigError(f"critique: cannot load a transformers VLM from {model_path}: {first}") from None
        self.model = model.to(device).eval()
        self.processor = processor
        self.max_new_tokens = int(max_new_tokens)

    @staticmethod
    def _convert(messages: list[dict]) -> list[dict]:
        """OpenAI content parts -> transformers chat-template parts (images as PIL)."""
        from PIL import Image

        out = []
        for message in messages:
            parts = []
            for part in message["content"] if isinstance(message["content"], list) else [
                    {"type": "text", "text": message["content"]}]:
                if part["type"] == "image_url":
                    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                    parts.append({"type": "image", "image": Image.open(io.BytesIO(data)).convert("RGB")})
                else:
                    parts.append({"type": "text", "text": part["text"]})
            out.append({"role": message["role"], "content": parts})
        return out

    @torch.no_grad()
    def __call__(self, messages: list[dict]) -> str:
        inputs = self.processor.apply_chat_template(self._convert(messages), add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.processor.decode(new, skip_special_tokens=True)


@register_reward("critique")
class CritiqueReward(Reward):
    """VLM critique then scores per dimension (see the module docstring).

    Options: ``dims`` (default ``["overall"]``; e.g. ``["visual quality", "text alignment", "overall"]``),
    ``backend`` ("openai" or "transformers"), ``base_url`` / ``model`` / ``api_key_env`` (OpenAI-compatible
    server), ``model_path`` (transformers), ``instruction`` (template with {prompt}, {dimension_list},
    {score_lines}), ``score_range`` (stated in the requested lines, default [1, 5]), ``normalize``,
    ``timeout`` (s per request), ``max_retries``, ``retry_backoff`` (s, doubled per retry), ``on_failure``
    ("skip" or "stop"), ``concurrency`` (parallel requests), ``max_frames`` (frames sent per video),
    ``max_tokens``; ``client`` takes any callable ``messages -> text``. ``mode: edit`` judges edits: each
    request shows the prompt's source image(s) before the edited sample, and the default instruction
    asks how well the edit follows its instruction and keeps the rest of the source."""

    differentiable = False
    handles_video = True
    dimensions = ("overall",)

    def __init__(self, dims: Sequence[str] = ("overall",), backend: str = "openai", base_url: str | None = None,
                 model: str | None = None, api_key_env: str | None = None, model_path: str | None = None,
                 instruction: str | None = None, mode: str = "generate", score_range: Sequence[float] = (1, 5),
                 normalize: bool = False, timeout: float = 60.0, max_retries: int = 2, retry_backoff: float = 1.0,
                 on_failure: str = "skip", concurrency: int = 4, max_frames: int = 4, max_tokens: int = 512,
                 device: str = "cpu", client: Callable[[list[dict]], str] | None = None, weights=None) -> None:
        dims = tuple(dims)
        if not dims:
            raise ConfigError("critique: dims is empty")
        self.dimensions = dims
        super().__init__(weights)
        if on_failure not in ("skip", "stop"):
            raise ConfigError(f"critique on_failure must be 'skip' or 'stop', got {on_failure!r}")
        if max_retries < 0 or timeout <= 0 or concurrency < 1 or max_frames < 1:
            raise ConfigError("critique: max_retries >= 0, timeout > 0, concurrency >= 1, max_frames >= 1 required")
        if client is None:
            if backend == "openai":
                if not base_url or not model:
                    raise ConfigError("critique backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1) "
                                      "and model")
                client = OpenAIChatBackend(base_url, model, api_key_env=api_key_env, timeout=timeout,
                                           max_tokens=max_tokens)
            elif backend == "transformers":
                if not model_path:
                    raise ConfigError("critique backend 'transformers' needs model_path")
                client = TransformersVLMBackend(model_path, max_new_tokens=max_tokens, device=device)
            else:
                raise ConfigError(f"critique backend must be 'openai' or 'transformers', got {backend!r}")
        self.client = client
        from align.errors import check_choice

        check_choice("critique mode", mode, CRITIQUE_MODES, "critique mode")
        self.mode = mode
        self.instruction = instruction or (DEFAULT_EDIT_INSTRUCTION if mode == "edit" else DEFAULT_INSTRUCTION)
        self.score_range = tuple(float(v) for v in score_range)
        self.normalize = bool(normalize)
        self.max_retries, self.retry_backoff = int(max_retries), float(retry_backoff)
        self.on_failure, self.concurrency, self.max_frames = on_failure, int(concurrency), int(max_frames)
        self.report = {"requests": 0, "retries": 0, "failures": 0, "timeouts": 0, "unparsed": 0}
        self.last_texts: list[str | None] = []
        self.last_errors: list[str | None] = []

    def render_instruction(self, prompt: str) -> str:
        lo, hi = (f"{v:g}" for v in self.score_range)
        lines = []
        for dim in self.dimensions:
            label = "Final Score" if _key(dim) in OVERALL_NAMES else f"{dim.title()} Score ({lo}-{hi})"
            lines.append(f"{label}: <number from {lo} to {hi}>")
        return self.instruction.format(prompt=prompt, dimension_list=", ".join(self.dimensions),
                                       score_lines="\n".join(lines))

    def _frames(self, sample: Tensor) -> Tensor:
        if sample.ndim == 3:
            return sample[None]
        f = sample.shape[0]
        k = min(self.max_frames, f)
        index = torch.linspace(0, f - 1, k).round().long()
        return sample[index]

    def _ask(self, messages: list[dict]) -> tuple[str | None, str | None, int, bool]:
        """(text, error, retries used, timed out)."""
        error, timed_out = None, False
        for attempt in range(self.max_retries + 1):
            try:
                return self.client(messages), None, attempt, False
            except BackendError as err:
                error, timed_out = str(err), timed_out or err.timeout
            except Exception as err:  # a local model failing
                error = f"{type(err).__name__}: {err}"
            if attempt < self.max_retries:
                time.sleep(self.retry_backoff * (2 ** attempt))
        return None, error, self.max_retries, timed_out

    def _shown(self, sample: Tensor, prompt: str, index: int) -> Tensor:
        """The images of one request: the sample's frames, after the prompt's sources in edit mode."""
        frames = self._frames(sample)
        if self.mode != "edit":
            return frames
        from rewards.edit import _as_image

        image = getattr(prompt, "image", None)
        if image is None:
            raise RewardError(f"reward 'critique' (mode: edit): prompt {index} ({str(prompt)!r}) has no source image")
        sources = [_as_image(s, *frames.shape[-2:]) for s in (image if isinstance(image, (list, tuple)) else [image])]
        return torch.cat([torch.stack(sources).to(frames), frames])

    def score(self, samples: Tensor, prompts: Sequence[str], **context):
        requests = [build_messages(self._shown(s, p, i), self.render_instruction(p))
                    for i, (s, p) in enumerate(zip(samples, prompts))]
        if self.concurrency > 1 and len(requests) > 1:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
                answers = list(pool.map(self._ask, requests))
        else:
            answers = [self._ask(r) for r in requests]
        values = {d: [] for d in self.dimensions}
        valid, texts, errors = [], [], []
        for i, (text, error, retries, timed_out) in enumerate(answers):
            self.report["requests"] += 1
            self.report["retries"] += retries
            texts.append(text)
            if text is None:
                self.report["failures"] += 1
                self.report["timeouts"] += int(timed_out)
                errors.append(error)
                if self.on_failure == "stop":
                    self.last_texts, self.last_errors = texts, errors
                    raise RewardError(f"critique: sample {i} failed after {retries + 1} attempt(s): {error}")
                parsed = {d: None for d in self.dimensions}
            else:
                parsed = parse_scores(text, self.dimensions, normalize=self.normalize)
                missing = [d for d, v in parsed.items() if v is None]
                errors.append(f"no score for {', '.join(missing)}" if missing else None)
                self.report["unparsed"] += int(bool(missing))
            for d in self.dimensions:
                values[d].append(math.nan if parsed[d] is None else parsed[d])
            valid.append(all(parsed[d] is not None for d in self.dimensions))
        self.last_texts, self.last_errors = texts, errors
        out = {d: torch.tensor(v, dtype=torch.float32, device=samples.device) for d, v in values.items()}
        if not all(valid):
            out["_valid"] = torch.tensor(valid, dtype=torch.bool, device=samples.device)
        return out
