"""DINOv2 rewards: similarity to reference images, and the adversarial head of Adv-GRPO.

Backbone: a timm DINOv2 ViT (default ``vit_base_patch14_dinov2``, 518 px = 37 x 14, ImageNet mean /
std, bicubic resize and centre crop done in torch), frozen. Weights from a local file (the timm
checkpoint or the original DINOv2 release, converted by timm's own filter and checked key by key),
or from the hub when online (``checkpoint="hub"``).

* ``dino_similarity`` -- cos(CLS feature of the image, CLS features of the references), the mean or
  the max over references.
* ``adv_dino`` -- a trainable discriminator head on DINO features: a CLS part and a patch part (each
  a small MLP giving one logit; the patch part averages over patches), reward =
  ``0.7 * h_cls + 0.3 * h_patch`` (the default dimension weights). :meth:`AdversarialDino.update_head`
  trains it with the hinge loss ``relu(1 - h(ref)) + relu(1 + h(gen))`` against reference images
  (random patches in training), and :meth:`AdversarialDino.after_generator_step` runs
  ``updates_per_step`` head updates every ``update_every`` generator updates -- the schedule of
  head updates per generator update. Reference images come from a folder (``reference_dir``) or a
  tensor (:meth:`AdversarialDino.set_references`).
"""

from __future__ import annotations

from pathlib import Path
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.errors import ConfigError
from rewards.base import Reward, RewardError, register_reward
from rewards.clip import IMAGENET_MEAN, IMAGENET_STD, clip_preprocess
from rewards.loading import CheckpointError, check_state_dict, freeze, load_into, parse_dtype, read_state_dict

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DinoBackbone(nn.Module):
    """A frozen timm ViT with torch preprocessing; :meth:`tokens` gives (CLS (B, D), patches (B, N, D))."""

    def __init__(self, model: nn.Module, *, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 dtype: str | torch.dtype = "float32", name: str = "dino") -> None:
        super().__init__()
        self.dtype = parse_dtype(dtype)
        self.model = freeze(model).to(self.dtype)
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    def preprocess(self, images: Tensor) -> Tensor:
        return clip_preprocess(images, self.image_size, self.mean, self.std, interpolation="bicubic",
                               resize_mode="shortest")

    def tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = self.preprocess(images).to(self.device, self.dtype)
        feats = self.model.forward_features(x).float()
        prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        return feats[:, 0], feats[:, prefix:]


def load_dino(model: str = "vit_base_patch14_dinov2", checkpoint: str | Path | None = None, *, image_size: int = 518,
              dtype: str = "float32", device: str = "cpu", what: str = "DINOv2 backbone",
              **model_kwargs) -> DinoBackbone:
    """A timm DINOv2 ViT. ``checkpoint``: a local checkpoint file (timm or original DINOv2 keys), ``"hub"``
    (timm's pretrained weights, needs the network) or None (random: tests). ``image_size`` must be a
    multiple of the patch size (14). ``model_kwargs`` go to ``timm.create_model`` (tiny test models
    set ``embed_dim``, ``depth``, ``num_heads``)."""
    import timm

    if model not in timm.list_models() and model.split(".")[0] not in timm.list_models():
        from align.errors import unknown_name_error

        raise unknown_name_error("timm model", model, timm.list_models("*dinov2*"))
    kwargs = dict(num_classes=0, img_size=int(image_size), **model_kwargs)
    if checkpoint == "hub":
        try:
            net = timm.create_model(model, pretrained=True, **kwargs)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"{what}: could not fetch timm {model!r} weights (offline? give a local "
                                  f"checkpoint file instead): {first}") from None
    else:
        try:
            net = timm.create_model(model, pretrained=False, **kwargs)
        except (AssertionError, ValueError, TypeError) as err:
            raise ConfigError(f"{what}: cannot build timm {model!r} at {image_size} px: {err}") from None
        if checkpoint is not None:
            state = read_state_dict(checkpoint, what)
            from timm.models.vision_transformer import checkpoint_filter_fn

            try:  # original DINOv2 keys -> timm keys, position embeddings resized to image_size
                state = checkpoint_filter_fn(state, net)
            except Exception as err:
                raise CheckpointError(f"{what}: checkpoint {checkpoint} is not a ViT state dict: {err}") from None
            state.pop("head.weight", None), state.pop("head.bias", None)
            check_state_dict(state, net.state_dict(), checkpoint, f"{what} (timm {model}, {image_size} px)")
            net.load_state_dict(state)
    patch = net.patch_embed.patch_size[0]
    if image_size % patch:
        raise ConfigError(f"{what}: image_size {image_size} is not a multiple of the patch size {patch}")
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    backbone = DinoBackbone(net, image_size=image_size, mean=cfg.get("mean", IMAGENET_MEAN),
                            std=cfg.get("std", IMAGENET_STD), dtype=dtype, name=model)
    return backbone.to(device)


def load_reference_images(folder: str | Path, size: int, limit: int | None = None) -> Tensor:
    """Every image of ``folder`` (sorted), resized (short side) and centre-cropped to ``size``, as
    (N, 3, size, size) in [0, 1]."""
    import numpy as np
    from PIL import Image

    from rewards.clip import resize_to

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no reference image folder at {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ConfigError(f"no reference images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    out = []
    for path in files:
        with Image.open(path) as image:
            x = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
        out.append(resize_to(x[None], size, mode="shortest").clamp(0, 1)[0])
    return torch.stack(out)


class _DinoReward(Reward):
    differentiable = True

    def _init_backbone(self, backbone, model, checkpoint, image_size, dtype, device, model_kwargs) -> None:
        self.backbone = backbone or load_dino(model, checkpoint, image_size=image_size, dtype=dtype, device=device,
                                              **(model_kwargs or {}))
        self.device = self.backbone.device
        self.references: Tensor | None = None

    def to(self, device) -> "_DinoReward":
        super().to(device)
        self._ref_cache = None  # reference features are recomputed on the new device
        return self

    def set_references(self, images: Tensor) -> None:
        """Reference images (N, C, H, W) in [0, 1]."""
        if images.ndim != 4 or images.shape[0] == 0:
            raise RewardError(f"reference images must be (N, C, H, W) with N > 0, got {tuple(images.shape)}")
        self.references = images.detach().float().cpu()
        self._ref_cache = None


@register_reward("dino_similarity")
class DinoSimilarity(_DinoReward):
    """cos(DINO CLS of the image, DINO CLS of the references): ``reduce`` = "mean" or "max" over them."""

    dimensions = ("score",)

    def __init__(self, reference_dir: str | Path | None = None, reduce: str = "mean",
                 model: str = "vit_base_patch14_dinov2", checkpoint: str | None = "hub", image_size: int = 518,
                 dtype: str = "float32", device: str = "cpu", model_kwargs: dict | None = None,
                 backbone: DinoBackbone | None = None, max_references: int | None = None, weights=None) -> None:
        super().__init__(weights)
        if reduce not in ("mean", "max"):
            raise ConfigError(f"dino_similarity reduce must be 'mean' or 'max', got {reduce!r}")
        self.reduce = reduce
        self._init_backbone(backbone, model, checkpoint, image_size, dtype, device, model_kwargs)
        self._ref_cache = None
        if reference_dir is not None:
            self.set_references(load_reference_images(reference_dir, self.backbone.image_size, max_references))

    def score(self, samples, prompts, **context):
        refs = context.get("reference_images")
        if refs is not None:
            self.set_references(refs)
        if self.references is None:
            raise RewardError("reward 'dino_similarity' has no reference images (reference_dir or set_references)")
        if self._ref_cache is None:
            with torch.no_grad():
                self._ref_cache = F.normalize(self.backbone.tokens(self.references.to(self.device))[0], dim=-1)
        cls = F.normalize(self.backbone.tokens(samples)[0], dim=-1)
        sim = cls @ self._ref_cache.to(cls.device).T
        return {"score": sim.mean(1) if self.reduce == "mean" else sim.amax(1)}


class DiscriminatorHead(nn.Module):
    """Two small MLPs over DINO features: one logit from the CLS token, one per patch token."""

    def __init__(self, embed_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.embed_dim, self.hidden = embed_dim, hidden
        self.cls = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.patch = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden), nn.GELU(),
                                   nn.Linear(hidden, 1))

    def forward(self, cls: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) CLS logits and (B,) mean patch logits over the given patches (B, N, D)."""
        return self.cls(cls).squeeze(-1), self.patch(patches).squeeze(-1).mean(-1)


def hinge_loss(real: Tensor, fake: Tensor) -> Tensor:
    """Discriminator hinge loss: mean relu(1 - h(real)) + mean relu(1 + h(fake))."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def random_patches(patches: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` random patch tokens per image (without replacement) from (B, N, D)."""
    b, total, d = patches.shape
    if n >= total:
        return patches
    idx = torch.rand(b, total, generator=generator).argsort(dim=1)[:, :n].to(patches.device)
    return patches.gather(1, idx[..., None].expand(-1, -1, d))


@register_reward("adv_dino")
class AdversarialDino(_DinoReward):
    """Adversarial DINO reward (Adv-GRPO): dimensions ``cls`` and ``patch`` (weights 0.7 / 0.3).

    Options: ``reference_dir`` (folder of reference images), ``head_path`` (a saved head to start from),
    ``hidden`` (head width), ``lr`` (Adam, 1e-4), ``num_patches`` (random patches per image in training,
    64), ``updates_per_step`` (head updates per generator update, 1), ``update_every`` (generator
    updates between head updates, 1), ``cls_weight`` / ``patch_weight`` (0.7 / 0.3), the backbone options
    of ``dino_similarity``, and ``seed``."""

    dimensions = ("cls", "patch")

    def __init__(self, reference_dir: str | Path | None = None, head_path: str | Path | None = None,
                 hidden: int = 256, lr: float = 1e-4, num_patches: int = 64, updates_per_step: int = 1,
                 update_every: int = 1, cls_weight: float = 0.7, patch_weight: float = 0.3,
                 model: str = "vit_base_patch14_dinov2", checkpoint: str | None = "hub", image_size: int = 518,
                 dtype: str = "float32", device: str = "cpu", model_kwargs: dict | None = None,
                 backbone: DinoBackbone | None = None, max_references: int | None = None, seed: int = 0) -> None:
        super().__init__({"cls": cls_weight, "patch": patch_weight})
        if updates_per_step < 0 or update_every < 1 or num_patches < 1:
            raise ConfigError("adv_dino: updates_per_step >= 0, update_every >= 1 and num_patches >= 1 are required")
        self._init_backbone(backbone, model, checkpoint, image_size, dtype, device, model_kwargs)
        with torch.random.fork_rng(devices=[]):  # the head's start depends on ``seed`` only
            torch.manual_seed(seed)
            self.head = DiscriminatorHead(self.backbone.embed_dim, hidden).to(self.device)
        if head_path is not None:
            load_into(self.head, head_path, f"adv_dino head ({self.backbone.embed_dim}-d, hidden {hidden})")
        self.head.requires_grad_(False).eval()
        self.lr, self.num_patches = float(lr), int(num_patches)
        self.updates_per_step, self.update_every = int(updates_per_step), int(update_every)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=self.lr, betas=(0.5, 0.999))
        self.generator = torch.Generator().manual_seed(seed)
        self.generator_steps = 0
        self.head_updates = 0
        self._ref_cache = None
        if reference_dir is not None:
            self.set_references(load_reference_images(reference_dir, self.backbone.image_size, max_references))

    # scoring
    def score(self, samples, prompts, **context):
        cls, patches = self.backbone.tokens(samples)
        h_cls, h_patch = self.head(cls, patches)
        return {"cls": h_cls, "patch": h_patch}

    # training the head
    def _reference_tokens(self, n: int) -> tuple[Tensor, Tensor]:
        if self.references is None:
            raise RewardError("reward 'adv_dino' has no reference images (reference_dir or set_references)")
        idx = torch.randint(0, self.references.shape[0], (n,), generator=self.generator)
        if self._ref_cache is None:
            with torch.no_grad():
                cache = [self.backbone.tokens(chunk.to(self.device)) for chunk in self.references.split(32)]
            self._ref_cache = (torch.cat([c for c, _ in cache]), torch.cat([p for _, p in cache]))
        cls, patches = self._ref_cache
        idx = idx.to(cls.device)
        return cls[idx], patches[idx]

    def update_head(self, generated: Tensor, references: Tensor | None = None, steps: int = 1) -> dict[str, float]:
        """``steps`` hinge-loss updates of the head: references (default: a random draw from the reference
        set) against ``generated`` images (B, C, H, W) or videos (frames flattened); returns the last
        loss and the discriminator's accuracy on that batch."""
        if references is not None:
            self.set_references(references)
        if generated.ndim == 5:
            generated = generated.flatten(0, 1)
        with torch.no_grad():
            gen_cls, gen_patches = self.backbone.tokens(generated.detach())
        w_cls, w_patch = self.weights["cls"], self.weights["patch"]
        stats: dict[str, float] = {}
        self.head.train().requires_grad_(True)
        try:
            for _ in range(steps):
                ref_cls, ref_patches = self._reference_tokens(gen_cls.shape[0])
                real_c, real_p = self.head(ref_cls, random_patches(ref_patches, self.num_patches, self.generator))
                fake_c, fake_p = self.head(gen_cls, random_patches(gen_patches, self.num_patches, self.generator))
                loss = w_cls * hinge_loss(real_c, fake_c) + w_patch * hinge_loss(real_p, fake_p)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.head_updates += 1
                real = (w_cls * real_c + w_patch * real_p).detach()
                fake = (w_cls * fake_c + w_patch * fake_p).detach()
                stats = {"head_loss": float(loss.detach()), "head_accuracy": float(((real > 0).float().mean()
                                                                           + (fake < 0).float().mean()) / 2)}
        finally:
            self.head.eval().requires_grad_(False)
        return stats

    def after_generator_step(self, generated: Tensor) -> dict[str, float]:
        """Call once per generator update: runs ``updates_per_step`` head updates every
        ``update_every`` generator updates (none otherwise)."""
        self.generator_steps += 1
        if self.updates_per_step == 0 or self.generator_steps % self.update_every:
            return {}
        return self.update_head(generated, steps=self.updates_per_step)

    def trainable_state(self) -> dict:
        """What a run checkpoints of the head's training: weights, optimiser state, the patch /
        reference sampling generator and the counters (a resume continues bit for bit)."""
        return {"head": {k: v.detach().clone() for k, v in self.head.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "generator_steps": self.generator_steps, "head_updates": self.head_updates}

    def load_trainable_state(self, state: dict) -> None:
        """The inverse of :meth:`trainable_state`."""
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.generator_steps, self.head_updates = int(state["generator_steps"]), int(state["head_updates"])

    def save_head(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, str(path))
        return path

    def set_references(self, images: Tensor) -> None:
        super().set_references(images)
        self._ref_cache = None


__all__ = ["AdversarialDino", "DinoBackbone", "DinoSimilarity", "DiscriminatorHead", "hinge_loss", "load_dino",
           "load_reference_images", "random_patches"]
