from __future__ import annotations

import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from multi_dist.data.text import load_tokenizer
from multi_dist.dist import free_port
from multi_dist.model import MuLTI, model_config
from multi_dist.objectives import LossConfig, PretrainLoss, caption_ids, sample_hard_negatives, vtc_loss

from .conftest import TOKENIZER
from .test_model import make_batch


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_vtc_is_symmetric_and_every_negative_gets_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    t = unit(torch.randn(6, 16, generator=g)).requires_grad_()
    v = unit(torch.randn(6, 16, generator=g)).requires_grad_()
    scale = torch.tensor(2.0)
    fp = torch.arange(6)
    loss_tv, _, _ = vtc_loss(t, v, scale, fp)
    loss_vt, _, _ = vtc_loss(v, t, scale, fp)
    torch.testing.assert_close(loss_tv, loss_vt)
    loss_tv.backward()
    assert (v.grad.abs().sum(1) > 0).all() and (t.grad.abs().sum(1) > 0).all()
    # hand-computed: symmetric cross-entropy over the similarity matrix with targets on the diagonal
    logits = scale.exp() * t.detach() @ v.detach().t()
    expected = (
        torch.nn.functional.cross_entropy(logits, torch.arange(6))
        + torch.nn.functional.cross_entropy(logits.t(), torch.arange(6))
    ) / 2
    torch.testing.assert_close(loss_tv.detach(), expected)


def test_identical_captions_share_the_target() -> None:
    # clip 0 looks more like caption 1 and vice versa: wrong if the captions differ, fine if equal
    t = unit(torch.tensor([[1.0, 0.0], [0.8, 0.6], [-1.0, 1.0]]))
    v = unit(torch.tensor([[0.8, 0.6], [1.0, 0.0], [-1.0, 1.0]]))
    scale = torch.tensor(4.0)
    same_captions, _, acc = vtc_loss(t, v, scale, torch.tensor([7, 7, 9]))
    distinct, _, _ = vtc_loss(t, v, scale, torch.tensor([7, 8, 9]))
    assert same_captions < distinct - 0.1
    assert acc == 1.0  # the crossed pairs count as right when the captions are equal


def test_caption_fingerprints_match_exactly_equal_captions() -> None:
    ids = torch.tensor([[101, 5, 6, 102, 0], [101, 5, 6, 102, 0], [101, 6, 5, 102, 0], [101, 5, 6, 102, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    fp = caption_ids(ids, mask)
    assert fp[0] == fp[1] and len({int(x) for x in fp[1:]}) == 3


def test_hard_negatives_are_never_positives_and_follow_similarity() -> None:
    torch.manual_seed(0)
    sim = torch.tensor([[5.0, 4.0, 0.0, 0.0], [4.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 4.9], [1.0, 1.0, 1.0, 1.0]])
    same = torch.eye(4, dtype=torch.bool)
    same[2, 3] = same[3, 2] = True  # rows 2 and 3 share a caption: 3 is not a negative of 2
    draws = torch.stack([sample_hard_negatives(sim, same) for _ in range(500)])
    for row in range(4):
        assert not same[row, draws[:, row]].any()
    assert (draws[:, 0] == 1).float().mean() > 0.9  # the hardest negative dominates
    only_pos = torch.ones(2, 2, dtype=torch.bool)
    assert (sample_hard_negatives(torch.zeros(2, 2), only_pos) == -1).all()  # nothing to draw
    # a confident model at scale 100: each positive ahead of its negatives by more than exp's range
    far = 100 * torch.tensor(
        [[0.8, -0.3, -0.25, -0.28], [-0.3, 0.8, -0.2, -0.3], [-0.3, -0.3, 0.8, -0.2], [-0.3] * 3 + [0.8]]
    )
    draws = torch.stack([sample_hard_negatives(far, torch.eye(4, dtype=torch.bool)) for _ in range(200)])
    assert (draws >= 0).all() and (draws != torch.arange(4)).all()
    assert (draws[:, 0] == 2).float().mean() > 0.8  # still the hardest: -0.25 against -0.28 and -0.3


def test_mlm_ignores_unmasked_positions() -> None:
    torch.manual_seed(0)
    model = MuLTI(model_config("tiny"))
    batch = make_batch()
    states = {}

    def keep(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        states["out"] = out

    handle = model.fusion_norm.register_forward_hook(keep)
    out = PretrainLoss(LossConfig(vtc=0, vtm=0, mlm=1, mcm=0))(model, batch)
    handle.remove()
    out["loss_mlm"].backward()
    grad = states["out"].grad[:, : batch["mlm_labels"].shape[1]].abs().sum(-1)
    masked = batch["mlm_labels"].ne(-100)
    assert (grad[masked] > 0).all()
    assert (grad[~masked] == 0).all()


def _vtc_rank(rank: int, world: int, port: int, text: torch.Tensor, video: torch.Tensor, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = text.shape[0] // world
        t = text.clone().requires_grad_()
        v = video.clone().requires_grad_()
        scale = torch.nn.Parameter(torch.tensor(2.0))
        local = slice(rank * b, (rank + 1) * b)
        loss, _, _ = vtc_loss(t[local], v[local], scale, torch.arange(text.shape[0])[local])
        (loss * world).backward()  # what PretrainLoss does; the engine then averages gradients
        grads = torch.cat([t.grad.flatten(), v.grad.flatten(), scale.grad.view(1)])
        dist.all_reduce(grads)
        queue.put((rank, float(loss), (grads / world).numpy()))
    finally:
        dist.destroy_process_group()


def _window_rank(rank: int, port: int, queue: mp.Queue) -> None:
    from multi_dist.train import window_metrics

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        means = {"train/loss": 1.0 + rank}
        # rank 1: twice the time, three times the waiting, 2 samples skipped (rank 0: 1), the larger peak
        out = window_metrics(
            means, 10.0 * (1 + rank), 5, 100, 1.0 + 5.0 * rank, 1 + rank, 1.0 + 1.5 * rank, 2, torch.device("cpu")
        )
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_the_logged_window_is_every_ranks_not_rank_0s() -> None:
    """Two gloo ranks with different windows: the logged losses and waiting share are their
    means, frames per second and skipped samples their sums, the step time the slower rank's and
    the memory the larger peak. (Step time, waiting share, skipped samples and memory were rank
    0's alone: a corrupt shard read by rank 1 counted 0 skipped.)"""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_window_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    m = results[0]
    assert results[1] == m
    assert m["train/loss"] == 1.5 and m["data/skipped"] == 3
    assert m["data/wait_frac"] == pytest.approx((1 / 10 + 6 / 20) / 2)
    assert m["perf/frames_per_s"] == pytest.approx(100 / 10 + 100 / 20)
    assert m["perf/step_s"] == 20.0 / 5 and m["perf/mem_gib"] == 2.5


def test_vtc_across_two_gloo_ranks_equals_the_single_process_loss() -> None:
    """Two real processes with a gloo group, each holding half the batch: the loss each reports
    and the averaged gradient equal the single-process values on the whole batch (fp32
    reductions in another order: 1e-6), the learned logit scale's included (each rank computes
    the whole matrix, so it had twice its gradient)."""
    g = torch.Generator().manual_seed(0)
    text, video = unit(torch.randn(8, 16, generator=g)), unit(torch.randn(8, 16, generator=g))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_vtc_rank, args=(r, 2, port, text, video, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    t, v = text.clone().requires_grad_(), video.clone().requires_grad_()
    scale = torch.nn.Parameter(torch.tensor(2.0))
    loss, _, _ = vtc_loss(t, v, scale, torch.arange(8))
    loss.backward()
    expected = torch.cat([t.grad.flatten(), v.grad.flatten(), scale.grad.view(1)])
    assert scale.grad.abs() > 1e-3  # (a gradient to compare)
    for _, rank_loss, grads in results:
        assert rank_loss == pytest.approx(float(loss.detach()), abs=1e-6)
        torch.testing.assert_close(torch.from_numpy(grads), expected, rtol=1e-5, atol=1e-6)


COLORS = ["red", "green", "blue", "yellow"]
RGB = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])


def toy_batch(tok: object, b: int, rng: random.Random) -> dict[str, torch.Tensor]:
    """Clips of a coloured square moving left or right; captions name colour and direction;
    MCM asks for the colour among 4."""
    video = torch.zeros(b, 4, 3, 32, 32)
    captions, options, answers = [], [], []
    for i in range(b):
        c, d = rng.randrange(4), rng.randrange(2)
        for f in range(4):
            x = 4 + 6 * f if d else 22 - 6 * f
            video[i, f, :, 12:20, x : x + 8] = RGB[c].view(3, 1, 1)
        words = f"a {COLORS[c]} square moves {'right' if d else 'left'}"
        captions.append(words)
        order = rng.sample(range(4), 4)
        options.append([words.replace(COLORS[c], COLORS[o]) for o in order])
        answers.append(order.index(c))
    enc = tok(captions, padding="max_length", max_length=10, return_tensors="pt")
    opt = tok([o for row in options for o in row], padding="max_length", max_length=10, return_tensors="pt")
    return {
        "video": video + 0.1 * torch.randn_like(video),
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "mcm_input_ids": opt["input_ids"].view(b, 4, 10),
        "mcm_attention_mask": opt["attention_mask"].view(b, 4, 10),
        "mcm_answer": torch.tensor(answers),
    }


def test_a_few_hundred_cpu_steps_learn_the_toy_task() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and immune to a busy second core
    try:
        _learn_the_toy_task()
    finally:
        torch.set_num_threads(threads)


def _learn_the_toy_task() -> None:
    torch.manual_seed(0)
    tok = load_tokenizer(TOKENIZER)
    model = MuLTI(model_config("tiny")).train()
    loss_fn = PretrainLoss(LossConfig(vtc=1.0, vtm=0.5, mlm=0.0, mcm=1.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.01)
    rng = random.Random(0)
    history = []
    for _ in range(300):
        out = loss_fn(model, toy_batch(tok, 16, rng))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in out.items()})

    def avg(key: str, part: slice) -> float:
        values = [h[key] for h in history[part]]
        return sum(values) / len(values)

    first, last = slice(0, 20), slice(-40, None)
    assert avg("loss_vtc", last) < 0.6 * avg("loss_vtc", first)
    assert avg("loss_mcm", last) < 0.5 * avg("loss_mcm", first)
    assert avg("acc_mcm", last) > 0.7  # chance is 0.25
    model.eval()
    with torch.no_grad():
        held_out = toy_batch(tok, 64, random.Random(1))
        video = model.encode_video(held_out["video"])
        logits = model.mcm_logits(video, held_out["mcm_input_ids"], held_out["mcm_attention_mask"])
    assert (logits.argmax(1) == held_out["mcm_answer"]).float().mean() > 0.7


def test_the_pretraining_step_never_waits_for_the_device() -> None:
    """A host sync (``nonzero``, ``.item()``, a boolean mask's selection) stops the GPU's queue
    until the step so far has run. With the indices ``to_device`` finds on the host, forward and
    backward run on fake tensors, which refuse every op whose shape or value depends on the data;
    and those indices change no loss (padding frames and masked positions included)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from multi_dist.evaluate import to_device

    batch = make_batch(t=4)
    batch["frame_mask"] = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    moved = to_device(batch, torch.device("cpu"), bf16=False)
    assert moved["frame_index"].tolist() == [0, 1, 2, 3, 4, 5, 8, 12, 13, 14]
    assert moved["mlm_index"].tolist() == [2, 14, 26, 38]  # position 2 of each 12-token caption

    losses = []
    for b in (batch, moved):
        torch.manual_seed(0)
        model = MuLTI(model_config("tiny", checkpointing=True, checkpoint_frames=3)).train()
        torch.manual_seed(1)
        losses.append(PretrainLoss(LossConfig())(model, b))
    for key in losses[0]:
        torch.testing.assert_close(losses[0][key], losses[1][key], rtol=0, atol=1e-6, msg=key)

    mode = FakeTensorMode()
    fake = {k: mode.from_tensor(v) for k, v in moved.items()}
    with mode:
        model = MuLTI(model_config("tiny", checkpointing=True, checkpoint_frames=3)).train()
        out = PretrainLoss(LossConfig())(model, fake)
        out["objective"].backward()
    assert {"loss_vtc", "loss_vtm", "loss_mlm", "loss_mcm"} <= set(out)
    assert all(p.grad is not None for p in model.fusion.parameters())


def test_the_pretraining_step_reads_no_value_back_and_makes_no_tensor_on_the_host() -> None:
    """Two syncs that fake tensors cannot see. A kernel that reads a value back inside itself
    (``torch.multinomial`` checks its weights with two ``.item()`` calls): the profiler of a real
    step records every nested ``aten::_local_scalar_dense``, and there must be none. A tensor
    made on the host and copied to the device (a blocking copy, which waits for the queue): with
    the model and batch on the ``meta`` device, no op of forward or backward may touch a CPU
    tensor."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from multi_dist.evaluate import to_device

    batch = make_batch(t=4)
    batch["frame_mask"] = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    moved = to_device(batch, torch.device("cpu"), bf16=False)
    torch.manual_seed(0)
    model = MuLTI(model_config("tiny", checkpointing=True, checkpoint_frames=3)).train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        PretrainLoss(LossConfig())(model, moved)["objective"].backward()
    names = [e.name for e in prof.events()]
    assert names.count("aten::mm") > 50  # the profile holds the nested ops of forward and backward
    assert names.count("aten::_local_scalar_dense") == 0

    class HostOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            if any(t.device.type == "cpu" for t in tensors):
                self.seen.append(str(func))
            return out

    meta = {k: v.to("meta") for k, v in moved.items()}
    model.to("meta")
    with HostOps() as host:
        out = PretrainLoss(LossConfig())(model, meta)
        out["objective"].backward()
    assert out["objective"].device.type == "meta" and host.seen == []


@pytest.mark.parametrize(("sampler", "option_length"), [("multiway", 9), ("multiway", 14), ("none", 9)])
def test_one_pass_step_equals_the_objectives_computed_apart(sampler: str, option_length: int) -> None:
    """The step encodes every text in one pass and fuses every text with its own clip in one
    pass (G = 2 VTM + 1 MLM + 4 MCM texts per clip). Each loss and its gradient equal the same
    objective computed the plain way, with the model's own calls one at a time (eval mode: no
    dropout; the same hard negatives from the same seed). Tolerance 1e-5: fp32 matmuls over
    batches of other sizes sum in other orders."""
    torch.manual_seed(0)
    model = MuLTI(model_config("tiny", fusion={"sampler": sampler})).eval()  # dense: a pass per objective
    batch = make_batch(b=4, length=12)
    # options of another length than the 12-token captions: the shorter ones are padded
    batch["mcm_input_ids"] = torch.randint(1000, 2000, (4, 4, option_length))
    batch["mcm_attention_mask"] = torch.ones(4, 4, option_length, dtype=torch.long)
    torch.manual_seed(1)
    out = PretrainLoss(LossConfig())(model, batch)

    torch.manual_seed(1)
    video = model.encode_video(batch["video"])
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    fp = caption_ids(batch["input_ids"], batch["attention_mask"])
    vtc, t2v, _ = vtc_loss(text.embed, video.embed, model.logit_scale, fp)
    same = fp[:, None] == fp[None, :]
    neg_text = sample_hard_negatives(t2v.detach().t(), same.t())
    neg_video = sample_hard_negatives(t2v.detach(), same)
    assert (neg_text >= 0).all() and (neg_video >= 0).all()
    pos_neg = model.fuse(text.select(torch.stack([torch.arange(4), neg_text], 1).flatten()), video, groups=2).cls
    neg = model.fuse(text, video.select(neg_video)).cls
    vtm_logits = model.vtm_head(torch.cat([pos_neg.view(4, 2, -1)[:, 0], pos_neg.view(4, 2, -1)[:, 1], neg]))
    vtm = torch.nn.functional.cross_entropy(vtm_logits, torch.tensor([1] * 4 + [0] * 8))
    masked = model.fuse(model.encode_text(batch["mlm_input_ids"], batch["attention_mask"]), video)
    chosen = batch["mlm_labels"].ne(-100)
    mlm = torch.nn.functional.cross_entropy(model.mlm_head(masked.text_states[chosen]), batch["mlm_labels"][chosen])
    mcm_logits = model.mcm_logits(video, batch["mcm_input_ids"], batch["mcm_attention_mask"])
    mcm = torch.nn.functional.cross_entropy(mcm_logits, batch["mcm_answer"])

    for name, expected in (("vtc", vtc), ("vtm", vtm), ("mlm", mlm), ("mcm", mcm)):
        got = out[f"loss_{name}"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)
        model.zero_grad()
        got.backward(retain_graph=True)
        g1 = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        model.zero_grad()
        expected.backward(retain_graph=True)
        g2 = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def pad_text(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """The batch with its captions, masked captions and MCM options padded to ``length`` tokens."""
    fill = {"mlm_labels": -100}
    keys = ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels", "mcm_input_ids", "mcm_attention_mask")
    return {
        k: torch.nn.functional.pad(v, (0, length - v.shape[-1]), value=fill.get(k, 0)) if k in keys else v
        for k, v in batch.items()
    }


@pytest.mark.parametrize("real", [12, 30])  # tiny's K_t is 16: passed whole, condensed
def test_padding_past_the_text_tokens_changes_no_loss(real: int) -> None:
    """``data.max_text_len`` above ``fusion.text_tokens`` pads every caption past K_t; each row is
    still condensed or passed whole by its own length, its blocks cut from its own tokens, so every
    loss equals the unpadded batch's, and MLM still runs on the captions passed whole. Tolerance
    1e-5: the same sums over other shapes."""
    torch.manual_seed(0)
    model = MuLTI(model_config("tiny")).eval()
    batch = make_batch(b=4, length=real)
    outs = []
    for length in (real, 20, 48):
        if length >= real:
            torch.manual_seed(1)
            outs.append(PretrainLoss(LossConfig())(model, pad_text(batch, length)))
    assert len(outs) >= 2 and set(outs[0]) >= {"loss_vtc", "loss_vtm", "loss_mlm", "loss_mcm"}
    for out in outs[1:]:
        assert out.keys() == outs[0].keys()
        for key in out:
            torch.testing.assert_close(out[key], outs[0][key], rtol=1e-5, atol=1e-5, msg=key)
    # a condensed caption has no token positions to predict: MLM weighs it 0
    assert (outs[0]["loss_mlm"] > 0) == (real <= 16)
