"""VideoReward-style multi-dimension video reward: a VLM with a linear head read at special tokens.

A Qwen2-VL (transformers ``Qwen2VLForConditionalGeneration``, or any image-text-to-text model whose
processor takes ``videos=``) reads the video and the prompt, followed by three special tokens
``<|VQ_reward|> <|MQ_reward|> <|TA_reward|>``. A linear head (hidden -> 1) applied to the last hidden
state at each of them gives the dimensions ``VQ`` (visual quality), ``MQ`` (motion quality) and ``TA``
(text alignment); the total is their sum (the default weights).

Training (:meth:`VideoRewardModel.train_step`) uses pairwise preferences per dimension with the
Bradley-Terry model with ties (Rao-Kupper, tie parameter theta > 1): with d = s_A - s_B,

    P(A > B) = sigmoid(d - log theta),  P(B > A) = sigmoid(-d - log theta),
    P(tie) = (theta^2 - 1) e^{s_A} e^{s_B} / ((e^{s_A} + theta e^{s_B}) (theta e^{s_A} + e^{s_B})),

and the loss is the mean negative log-likelihood of the labels (1: A better, -1: B better, 0: tie,
NaN: not labelled). A trained model is a directory: the VLM and processor (``save_pretrained``) plus
``reward_head.safetensors``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.errors import ConfigError
from rewards.base import Reward, RewardError, register_reward
from rewards.loading import CheckpointError, load_into, parse_dtype

REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("VQ", "MQ", "TA")
HEAD_FILE = "reward_head.safetensors"
DEFAULT_QUESTION = ("Please evaluate the visual quality, motion quality and text alignment of this video. "
                    "It was generated from the prompt: \"{prompt}\"")


def btt_log_likelihood(score_a: Tensor, score_b: Tensor, labels: Tensor, theta: float = 5.0) -> Tensor:
    """log P(label) under Bradley-Terry with ties (Rao-Kupper); labels 1 (A), -1 (B), 0 (tie), elementwise."""
    if theta <= 1:
        raise ValueError(f"the tie parameter theta must be > 1, got {theta}")
    log_theta = math.log(theta)
    d = score_a - score_b
    log_a = F.logsigmoid(d - log_theta)
    log_b = F.logsigmoid(-d - log_theta)
    log_tie = (math.log(theta ** 2 - 1) + score_a + score_b - torch.logaddexp(score_a, score_b + log_theta)
               - torch.logaddexp(score_a + log_theta, score_b))
    return torch.where(labels > 0, log_a, torch.where(labels < 0, log_b, log_tie))


def btt_loss(score_a: Tensor, score_b: Tensor, labels: Tensor, theta: float = 5.0) -> Tensor:
    """Mean negative log-likelihood over the labelled entries (NaN labels are skipped)."""
    mask = ~torch.isnan(labels)
    if not mask.any():
        return score_a.sum() * 0.0
    ll = btt_log_likelihood(score_a, score_b, torch.nan_to_num(labels), theta)
    return -ll[mask].mean()


class VideoRewardModel(nn.Module):
    """The VLM, its processor, the three reward tokens and the linear head."""

    def __init__(self, vlm: nn.Module, processor, head: nn.Linear | None = None,
                 question: str = DEFAULT_QUESTION, max_frames: int = 8) -> None:
        super().__init__()
        tokenizer = processor.tokenizer
        missing = [t for t in REWARD_TOKENS if t not in tokenizer.get_vocab()]
        if missing:  # a fresh VLM: add the tokens (their embeddings are learnt with the head)
            tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
            vlm.resize_token_embeddings(len(tokenizer))
        self.vlm = vlm
        self.processor = processor
        self.token_ids = [tokenizer.convert_tokens_to_ids(t) for t in REWARD_TOKENS]
        hidden = _hidden_size(vlm)
        self.head = head if head is not None else nn.Linear(hidden, 1)
        if self.head.in_features != hidden:
            raise ConfigError(f"video reward head has {self.head.in_features} inputs, "
                              f"the VLM's hidden size is {hidden}")
        self.question = question
        self.max_frames = int(max_frames)

    @property
    def device(self) -> torch.device:
        return next(self.vlm.parameters()).device

    def _frames(self, sample: Tensor) -> Tensor:
        """(F, C, H, W) or (C, H, W) in [0, 1] -> (K, C, H, W) uint8, K <= max_frames (uniform), K even."""
        video = sample[None] if sample.ndim == 3 else sample
        f = video.shape[0]
        k = min(self.max_frames, f)
        video = video[torch.linspace(0, f - 1, k).round().long()]
        if video.shape[0] % 2:  # the vision tower groups frames in pairs
            video = torch.cat([video, video[-1:]])
        video = video.expand(-1, 3, -1, -1) if video.shape[1] == 1 else video
        return (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    def encode(self, samples: Tensor, prompts: Sequence[str]) -> dict:
        texts, videos = [], []
        for sample, prompt in zip(samples, prompts):
            messages = [{"role": "user", "content": [{"type": "video"},
                                                     {"type": "text", "text": self.question.format(prompt=prompt)}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
            texts.append(text + "".join(REWARD_TOKENS))
            videos.append(self._frames(sample))
        enc = self.processor(text=texts, videos=videos, return_tensors="pt", padding=True)
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in enc.items()}

    def forward(self, samples: Tensor, prompts: Sequence[str]) -> Tensor:
        """(B, 3) scores (VQ, MQ, TA) of videos (B, F, C, H, W) or images (B, C, H, W) in [0, 1]."""
        enc = self.encode(samples, prompts)
        out = self.vlm(**enc, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1]  # (B, L, H)
        ids = enc["input_ids"]
        cols = []
        for token in self.token_ids:
            hits = ids == token
            if not bool((hits.sum(1) == 1).all()):
                raise RewardError("video reward: each sequence must hold each reward token exactly once "
                                  "(was the prompt truncated?)")
            cols.append(hits.float().argmax(1))
        positions = torch.stack(cols, 1)  # (B, 3)
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.head(picked.to(self.head.weight.dtype)).squeeze(-1).float()

    def train_step(self, optimizer: torch.optim.Optimizer, videos_a: Tensor, videos_b: Tensor,
                   prompts: Sequence[str], labels: Tensor, theta: float = 5.0) -> float:
        """One Bradley-Terry-with-ties update on pairs (A, B) of the same prompt; ``labels`` (B, 3)."""
        self.train()
        both = self(torch.cat([videos_a, videos_b]), list(prompts) * 2)
        a, b = both.chunk(2)
        loss = btt_loss(a, b, labels.to(a.device).float(), theta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.eval()
        return float(loss.detach())

    def save_pretrained(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        self.vlm.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(directory / HEAD_FILE))
        return directory


def _hidden_size(vlm: nn.Module) -> int:
    cfg = vlm.config
    text = getattr(cfg, "text_config", None) or cfg
    return int(text.hidden_size)


def load_video_reward_model(model_path: str | Path, *, head_path: str | Path | None = None, dtype: str = "float32",
                            device: str = "cpu", max_frames: int = 8, question: str = DEFAULT_QUESTION,
                            require_head: bool = True) -> VideoRewardModel:
    """A VLM directory (or hub name) with its processor, plus the head (``head_path``, default the
    directory's ``reward_head.safetensors``). ``require_head=False`` starts a fresh random head
    (training from a base VLM)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    text = str(model_path)
    if (text.startswith((".", "/", "~")) or Path(text).suffix) and not Path(text).expanduser().exists():
        raise CheckpointError(f"video reward: no model directory at {text} (expected a Qwen2-VL directory)")
    try:
        processor = AutoProcessor.from_pretrained(text)
        vlm = AutoModelForImageTextToText.from_pretrained(text, dtype=parse_dtype(dtype))
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or ["?"])[0]
        raise CheckpointError(f"video reward: cannot load a VLM with its processor from {text}: {first}") from None
    model = VideoRewardModel(vlm, processor, question=question, max_frames=max_frames)
    head_file = Path(head_path) if head_path is not None else Path(text) / HEAD_FILE
    if head_file.is_file():
        load_into(model.head, head_file, f"video reward head (Linear {model.head.in_features} -> 1)")
    elif head_path is not None or require_head:
        raise CheckpointError(f"video reward: no head at {head_file} (expected {HEAD_FILE}: a Linear "
                              f"{model.head.in_features} -> 1 state dict); pass require_head=False to start a new one")
    return model.to(device).eval()


@register_reward("video_reward")
class VideoReward(Reward):
    """VideoReward-style VQ / MQ / TA scores (total = their sum). Options: ``model_path`` (a directory
    saved by :meth:`VideoRewardModel.save_pretrained`), ``head_path``, ``max_frames`` (8), ``dtype``,
    ``device``, ``question`` (template with {prompt}); ``tiny`` builds a tiny random Qwen2-VL in a
    temporary folder (tests, smoke runs); ``model`` takes a built :class:`VideoRewardModel`."""

    differentiable = False
    handles_video = True
    dimensions = DIMENSIONS

    def __init__(self, model_path: str | Path | None = None, head_path: str | Path | None = None, max_frames: int = 8,
                 dtype: str = "float32", device: str = "cpu", question: str = DEFAULT_QUESTION, tiny: bool = False,
                 model: VideoRewardModel | None = None, weights=None) -> None:
        super().__init__(weights)
        if model is None:
            if tiny:
                import tempfile

                from rewards.tiny import tiny_qwen2_vl

                self._tmp = tempfile.TemporaryDirectory()
                model_path = tiny_qwen2_vl(Path(self._tmp.name) / "vlm")
                model = load_video_reward_model(model_path, max_frames=max_frames, question=question, device=device,
                                                require_head=False)
            elif model_path is None:
                raise ConfigError("reward 'video_reward' needs model_path (a VideoReward directory: Qwen2-VL, "
                                  f"processor and {HEAD_FILE})")
            else:
                model = load_video_reward_model(model_path, head_path=head_path, dtype=dtype, device=device,
                                                max_frames=max_frames, question=question)
        self.model = model.eval().requires_grad_(False)
        self.device = self.model.device

    def score(self, samples, prompts, **context):
        with torch.no_grad():
            scores = self.model(samples, list(prompts))
        return {d: scores[:, i] for i, d in enumerate(DIMENSIONS)}
