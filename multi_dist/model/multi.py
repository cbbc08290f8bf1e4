"""MuLTI: video and text encoders, the Text-Guided MultiWay-Sampler, MultiWay fusion, and heads.

A plain ``nn.Module`` with no distributed calls: losses that need the global batch (VTC) gather
in :mod:`multi_dist.objectives`. The model exposes the steps the objectives and tasks combine:

    v = model.encode_video(video, frame_mask)      # once per clip
    t = model.encode_text(input_ids, attention_mask)
    f = model.fuse(t, v, groups=G)                 # text rows b*G+g paired with video b
    f.cls -> vtm_head / mcm_head / qa_head / label_head;  f.text_states -> mlm_head
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import from_dict, merge, to_dict
from ..data.transforms import CLIP_MEAN, CLIP_STD
from .encoders import EncoderConfig, TextEncoder, VideoEncoder
from .fusion import AdaptPooling, Attention, FusionConfig, MultiWayLayer, SamplerLayer, mlp
from .presets import PRESETS


@dataclass
class HeadsConfig:
    """Downstream heads, created when their size is set (finetuning)."""

    qa_answers: int = 0
    """Open-ended QA: size of the answer vocabulary (top-K answers of the training split)."""
    num_labels: int = 0
    """Multi-label classification: number of classes."""
    label_source: str = "fusion"
    """``fusion``: the multimodal CLS; ``video``: the video global feature (no text needed)."""

    def validate(self) -> None:
        if self.label_source not in ("fusion", "video"):
            raise ValueError(f"label_source must be 'fusion' or 'video', got {self.label_source!r}")


@dataclass
class ModelConfig:
    preset: str = "custom"
    """``tiny`` | ``demo`` | ``base`` | ``large``: fills every field not given explicitly."""
    vision: EncoderConfig = field(default_factory=lambda: EncoderConfig(kind="clip"))
    text: EncoderConfig = field(default_factory=lambda: EncoderConfig(kind="bert"))
    fusion: FusionConfig = field(default_factory=FusionConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    max_frames: int = 128
    embed_dim: int = 256
    """VTC projection width."""
    temperature: float = 0.07
    """Initial VTC temperature (learned)."""
    pixel_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    pixel_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    """The vision backbone's normalisation, applied by the model to uint8 frames (what the data
    pipeline delivers): ``(pixel / 255 - mean) / std`` per RGB channel. CLIP's by default; a ViT
    pretrained with other statistics needs its own. Float frames are taken as normalised already."""
    checkpointing: bool = False
    """Non-reentrant activation checkpointing of every trainable encoder, sampler and fusion layer."""
    checkpoint_frames: int = 0
    """With ``checkpointing``: run the vision tower in chunks of this many frames (of the whole
    batch), each chunk checkpointed whole instead of layer by layer. Same recomputation (one
    forward), far less memory on long clips: only each frame's tower input and output are kept,
    and the backward holds one chunk's activations at a time. 0: per-layer checkpointing."""

    @staticmethod
    def expand_preset(data: dict[str, Any]) -> dict[str, Any]:
        """The preset's fields under the ones given (called by the config loader)."""
        name = data.get("preset", "custom")
        if not isinstance(name, str):
            raise ValueError(f"preset: expected a preset's name, got {name!r}")
        if name == "custom":
            return data
        if name not in PRESETS:
            raise ValueError(f"preset: unknown model preset {name!r} (known: {', '.join(PRESETS)}, custom)")
        return merge(PRESETS[name], data)

    def validate(self) -> None:
        if self.vision.kind == "bert":
            raise ValueError("vision.kind must be 'clip' or 'vit'")
        if self.text.kind != "bert":
            raise ValueError("text.kind must be 'bert' (any BERT-like encoder)")
        if self.checkpoint_frames < 0:
            raise ValueError(f"checkpoint_frames must be >= 0, got {self.checkpoint_frames}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            got = f"{self.pixel_mean}, {self.pixel_std}"
            raise ValueError(f"pixel_mean and pixel_std: 3 values each (RGB), std > 0; got {got}")


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """``model_config("tiny", checkpointing=True)``: a preset with nested-dict overrides."""
    return from_dict(ModelConfig, {"preset": preset, **overrides})


@dataclass
class VideoOutput:
    tokens: torch.Tensor  # (B, N, D) projected video tokens, N = T * (1 + P)
    mask: torch.Tensor  # (B, N) real tokens (False on padding frames)
    embed: torch.Tensor  # (B, E) L2-normalised VTC embedding
    glob: torch.Tensor  # (B, Dv) the video global feature (mean of the real frames' CLS)

    def select(self, index: torch.Tensor) -> VideoOutput:
        return VideoOutput(self.tokens[index], self.mask[index], self.embed[index], self.glob[index])


@dataclass
class TextOutput:
    tokens: torch.Tensor  # (B, L, D) projected text tokens
    mask: torch.Tensor  # (B, L) attention mask
    embed: torch.Tensor  # (B, E) L2-normalised VTC embedding
    guide: torch.Tensor  # (B, D) the text's global feature, guiding the video sampler

    def select(self, index: torch.Tensor) -> TextOutput:
        return TextOutput(self.tokens[index], self.mask[index], self.embed[index], self.guide[index])


@dataclass
class FusionOutput:
    states: torch.Tensor  # (B*G, L' + K, D)
    n_text: int  # text positions come first
    video_weights: torch.Tensor | None  # (B, G, N) the sampler's pooling weights (None when dense)

    @property
    def cls(self) -> torch.Tensor:
        return self.states[:, 0]

    @property
    def text_states(self) -> torch.Tensor:
        return self.states[:, : self.n_text]


class MLMHead(nn.Module):
    """BERT's MLM head on fused text positions, its decoder tied to the text word embeddings."""

    def __init__(self, width: int, text_width: int, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, text_width), nn.GELU(), nn.LayerNorm(text_width))
        self.decoder = nn.Linear(text_width, word_embeddings.num_embeddings)
        self.decoder.weight = word_embeddings.weight
        nn.init.zeros_(self.decoder.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(h))


class MuLTI(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        fc = cfg.fusion
        d = fc.width
        self.video = VideoEncoder(
            cfg.vision, cfg.max_frames, tuple(cfg.pixel_mean), tuple(cfg.pixel_std), field="model.vision.name"
        )
        self.text = TextEncoder(cfg.text, field="model.text.name")
        dv, dt = self.video.width, self.text.width
        self.video_proj = nn.Linear(dv, d)
        self.text_proj = nn.Linear(dt, d)
        self.vtc_video = nn.Linear(dv, cfg.embed_dim)
        self.vtc_text = nn.Linear(dt, cfg.embed_dim)
        # shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / cfg.temperature)]))
        self.video_pool = AdaptPooling(d, fc.video_tokens)
        self.text_pool = AdaptPooling(d, fc.text_tokens)
        self.text_query = nn.Parameter(torch.randn(d) * 0.02)  # the learned guide of text pooling
        self.sampler = nn.ModuleList(
            SamplerLayer(d, fc.mlp_ratio, fc.dropout, Attention(d, fc.heads, fc.dropout))
            for _ in range(fc.sampler_layers)
        )
        self.fusion = nn.ModuleList(MultiWayLayer(d, fc.heads, fc.mlp_ratio, fc.dropout) for _ in range(fc.layers))
        self.fusion_norm = nn.LayerNorm(d)
        self.vtm_head = nn.Linear(d, 2)
        self.mcm_head = nn.Linear(d, 1)
        self.mlm_head = MLMHead(d, dt, self.text.word_embeddings)
        hc = cfg.heads
        self.qa_head = mlp(d, 2.0, 0.0).append(nn.Linear(d, hc.qa_answers)) if hc.qa_answers else None
        label_in = d if hc.label_source == "fusion" else dv
        self.label_head = (
            nn.Sequential(nn.Linear(label_in, d), nn.GELU(), nn.Linear(d, hc.num_labels)) if hc.num_labels else None
        )
        self.set_checkpointing(cfg.checkpointing, cfg.checkpoint_frames)

    def forward(self, batch: dict[str, Any], objective: Callable[[MuLTI, dict[str, Any]], Any]) -> Any:
        """A training step's forward: ``objective(self, batch)``. Running objectives as this
        module's forward lets engines that hook ``forward`` (ZeRO-3 gathering this module's own
        parameters, e.g. ``logit_scale``) see every parameter the objective touches."""
        return objective(self, batch)

    # -- configuration --------------------------------------------------------------------------
    def set_checkpointing(self, enabled: bool, frames: int = 0) -> None:
        """Activation checkpointing on or off; ``frames``: see ``ModelConfig.checkpoint_frames``."""
        self.checkpointing = enabled
        self.video.checkpointing = enabled
        self.video.checkpoint_frames = frames
        self.text.checkpointing = enabled

    def compile_layers(self, **options: Any) -> None:
        """``torch.compile`` every transformer layer (vision and text towers, sampler, fusion):
        regional compilation. Layers of one kind share their compiled code, so compiling costs a
        few graphs whatever the depth, and what runs between layers (checkpointing, frame
        selection, the objectives) stays eager. Each layer's elementwise work fuses into few
        kernels: fewer launches per step, the bound of a small-batch step on a GPU."""
        for layer in (*self.video.layers, *self.text.layers, *self.sampler, *self.fusion):
            layer.compile(**options)

    def _maybe_checkpoint(self, fn: Any, *args: Any) -> Any:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # -- unimodal -------------------------------------------------------------------------------
    def encode_video(
        self, video: torch.Tensor, frame_mask: torch.Tensor | None = None, frame_index: torch.Tensor | None = None
    ) -> VideoOutput:
        """``video`` (B, T, 3, H, W): uint8 RGB frames as the data pipeline gives them (normalised
        here with ``pixel_mean``/``pixel_std``), or float frames normalised already;
        ``frame_mask`` (B, T) True for real frames; ``frame_index`` its True entries' flat indices
        if known (``to_device`` finds them on the host; without them the encoder's ``nonzero``
        waits for the GPU)."""
        h, glob = self.video(video, frame_mask, frame_index)
        b, t, n, _ = h.shape
        if frame_mask is None:
            mask = torch.ones(b, t * n, dtype=torch.bool, device=h.device)
        else:
            mask = frame_mask.bool().repeat_interleave(n, dim=1)
        embed = F.normalize(self.vtc_video(glob), dim=-1)
        return VideoOutput(self.video_proj(h.flatten(1, 2)), mask, embed, glob)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        h = self.text(input_ids, attention_mask)
        tokens = self.text_proj(h)
        return TextOutput(tokens, attention_mask.bool(), F.normalize(self.vtc_text(h[:, 0]), dim=-1), tokens[:, 0])

    # -- the sampler and the fusion -------------------------------------------------------------
    def long_text(self, mask: torch.Tensor) -> torch.Tensor:
        """(B,) True for the rows the fusion condenses: more real tokens than K_t, with a sampler.
        Decided per row from its own length, never from the padding around it."""
        if self.cfg.fusion.sampler == "none":
            return torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        return mask.sum(1) > self.cfg.fusion.text_tokens

    def condense_text(self, text: TextOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """A row longer than K_t real tokens -> [CLS ; K_t pooled tokens], blocks cut from its own
        tokens (``packed``), so that padding changes nothing; a shorter row passes whole. When the
        padded batch is longer than K_t, every row takes 1 + K_t positions (a short row: its first
        1 + K_t, all its tokens); else the batch passes as it is."""
        k = self.cfg.fusion.text_tokens
        if self.cfg.fusion.sampler == "none" or text.tokens.shape[1] <= k:
            return text.tokens, text.mask
        b = text.tokens.shape[0]
        guide = self.text_query.to(text.tokens.dtype).expand(b, 1, -1)
        pooled, pmask, _ = self.text_pool(text.tokens, text.mask, guide, packed=True)
        p = pooled[:, 0]
        for layer in self.sampler:
            p = self._maybe_checkpoint(layer, p, text.tokens, text.mask, "text")
        tokens = torch.cat([text.tokens[:, :1], p], 1)
        mask = torch.cat([text.mask[:, :1], pmask], 1)
        long = self.long_text(text.mask)
        tokens = torch.where(long[:, None, None], tokens, text.tokens[:, : 1 + k])
        return tokens, torch.where(long[:, None], mask, text.mask[:, : 1 + k])

    def condense_video(
        self, video: VideoOutput, guides: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``guides`` (B, G, D) -> condensed video ``(B*G, K_v, D)``, its mask, the pooling weights.
        The sampler reads the long sequence once for all G guides of a clip."""
        b, g = guides.shape[:2]
        if self.cfg.fusion.sampler == "none":
            tokens = video.tokens.repeat_interleave(g, 0) if g > 1 else video.tokens
            mask = video.mask.repeat_interleave(g, 0) if g > 1 else video.mask
            return tokens, mask, None
        # packed: blocks over each clip's real frames, so padding frames (images, short clips) change nothing
        pooled, pmask, weights = self.video_pool(video.tokens, video.mask, guides, packed=True)
        k = pooled.shape[2]
        p = pooled.flatten(1, 2)  # (B, G*K, D): the G guides' queries attend to S together
        for layer in self.sampler:
            p = self._maybe_checkpoint(layer, p, video.tokens, video.mask, "video")
        return p.view(b * g, k, -1), pmask.repeat_interleave(g, 0), weights

    def fuse(self, text: TextOutput, video: VideoOutput, groups: int = 1) -> FusionOutput:
        """Fuse text rows ``b*groups + g`` with video ``b``."""
        b = video.tokens.shape[0]
        if text.tokens.shape[0] != b * groups:
            raise ValueError(f"{text.tokens.shape[0]} text rows for {b} videos x {groups} groups")
        t_tokens, t_mask = self.condense_text(text)
        guides = text.guide.view(b, groups, -1)
        v_tokens, v_mask, weights = self.condense_video(video, guides)
        z = torch.cat([t_tokens, v_tokens], 1)
        mask = torch.cat([t_mask, v_mask], 1)
        n_text = t_tokens.shape[1]
        for layer in self.fusion:
            z = self._maybe_checkpoint(layer, z, mask, n_text)
        return FusionOutput(self.fusion_norm(z), n_text, weights)

    # -- heads ----------------------------------------------------------------------------------
    def vtc_logits(self, text: TextOutput, video: VideoOutput) -> torch.Tensor:
        """(B_text, B_video) scaled cosine similarities (single process; see objectives for the
        gathered version)."""
        return self.logit_scale.exp().clamp(max=100) * text.embed @ video.embed.t()

    def mcm_logits(self, video: VideoOutput, option_ids: torch.Tensor, option_mask: torch.Tensor) -> torch.Tensor:
        """Multiple choice: ``option_ids`` (B, O, L), each option the question with a candidate
        filled in; encoders run once per clip. Returns (B, O) scores."""
        b, o, seq = option_ids.shape
        text = self.encode_text(option_ids.reshape(b * o, seq), option_mask.reshape(b * o, seq))
        return self.mcm_head(self.fuse(text, video, groups=o).cls).view(b, o)

    def qa_logits(self, text: TextOutput, video: VideoOutput, groups: int = 1) -> torch.Tensor:
        """Open-ended QA over the answer vocabulary: ``groups`` questions per clip (rows
        ``b*groups + g``), the video encoded once. Returns (B*groups, answers)."""
        if self.qa_head is None:
            raise ValueError("this model has no QA head: set model.heads.qa_answers")
        return self.qa_head(self.fuse(text, video, groups=groups).cls)

    def label_logits(self, video: VideoOutput, text: TextOutput | None = None) -> torch.Tensor:
        """Multi-label logits from the multimodal CLS (text: e.g. a title or a prompt) or, with
        ``heads.label_source: video``, from the video global feature alone."""
        if self.label_head is None:
            raise ValueError("this model has no label head: set model.heads.num_labels")
        if self.cfg.heads.label_source == "video":
            return self.label_head(video.glob)
        if text is None:
            raise ValueError("label_source 'fusion' needs a text input")
        return self.label_head(self.fuse(text, video).cls)

    # -- saving and loading ---------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The config as ``config.json`` holds it: self-contained (encoder architectures inline,
        ``pretrained`` off), so the model can be rebuilt with no hub access before its weights load."""
        cfg = to_dict(self.cfg)
        cfg["preset"] = "custom"
        for name, enc in (("vision", self.video), ("text", self.text)):
            cfg[name]["pretrained"] = False
            cfg[name]["arch"] = _arch_of(enc.backbone.config)
        return {"model_type": "multi", **cfg}

    def save_pretrained(self, folder: str | Path, tokenizer: Any = None) -> Path:
        """``config.json`` (see :meth:`config_dict`) + ``model.safetensors`` (+ the tokenizer's
        files when given)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config_dict(), indent=1))
        # fresh contiguous copies: under DeepSpeed, parameters are views into flat buffers
        tensors = {k: v.detach().clone().contiguous() for k, v in self.state_dict().items() if k not in _TIED}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> MuLTI:
        """Load a folder written by :meth:`save_pretrained` (weights via safetensors, no pickle)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        model = cls(read_config(folder))
        weights = folder / "model.safetensors"
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        if set(missing) - _TIED or unexpected:
            raise ValueError(
                f"{weights} does not fit the config: missing {sorted(set(missing) - _TIED)}, "
                f"unexpected {sorted(unexpected)}"
            )
        return model


def read_config(folder: str | Path) -> ModelConfig:
    """The model config of a saved model (or of a training checkpoint, which holds the same file)."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a saved MuLTI model or checkpoint (no config.json)")
    data = json.loads(config_file.read_text())
    if data.pop("model_type", None) != "multi":
        raise ValueError(f"{config_file} is not a MuLTI config (model_type != 'multi')")
    return from_dict(ModelConfig, data)


_TIED = {"mlm_head.decoder.weight"}  # the text word embeddings, saved once under their own name
_NOT_ARCH = {"_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype", "_attn_implementation"}


def _arch_of(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCH and not k.startswith("_")}
