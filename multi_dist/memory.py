"""Peak tensor memory of a piece of work, on any device: CPU, CUDA, meta or fake tensors.

:class:`LiveBytes` counts the bytes of every tensor storage created while it is active and not
yet freed, and keeps the peak: the analogue of ``torch.cuda.max_memory_allocated`` (minus the
allocator's rounding and workspaces) where there is no CUDA allocator to ask. Under
``torch._subclasses.fake_tensor.FakeTensorMode`` nothing is computed, so a CUDA training step's
activation memory can be estimated for full-size shapes on a machine without a GPU
(``launch/bench_memory.py --estimate``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes(exclude=[...]) as m: step()``; then ``m.peak`` (bytes) and ``m.live``.

    Counts storages that ops create while the mode is active (autograd's backward included: the
    mode travels with it). Storages of the tensors in ``exclude`` (weights, optimizer state, the
    batch: what exists before) are never counted, even when an in-place op returns them.
    ``reset_peak()`` starts a new peak from what is live now.

    ``ops`` counts the ops dispatched meanwhile, views and metadata queries left out: about the
    kernels the same work launches on a GPU (eager mode), the bound of a launch-bound step."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.ops = 0
        self._known: weakref.WeakSet[Any] = weakref.WeakSet()
        for t in exclude:
            self._known.add(t.untyped_storage())

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.namespace != "prim" and not func.is_view:
            self.ops += 1
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self._known:
                continue
            self._known.add(storage)
            if func.is_view:  # a view allocates nothing: its storage existed before (not in exclude)
                continue
            nbytes = storage.nbytes()
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, nbytes)
        return out
