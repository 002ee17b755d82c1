"""Activation offload to (pinned) host memory, prefetched back group by group ahead of the backward.

Built on ``torch.autograd.graph.saved_tensors_hooks``.  While group ``g`` runs forward, every
tensor autograd saves (parameters and tensors under ``min_bytes`` excepted) is copied to host
memory with a non-blocking copy into pinned memory; the device copy is then free to go.  In
backward, the first time a tensor of group ``g`` is needed, the copies of group ``g - 1`` are
started on a side stream, so they overlap with group ``g``'s backward.  The last group's
tensors (needed first) stay on the device by default.

On a machine without CUDA there is no slower tier to offload to: activations are already in host
memory, so the hooks keep them where they are (a no-op; no memory is saved) unless
``offload_on_cpu=True``, which really copies them (and copies them back) so the code path can be
exercised and tested on the CPU.  Pinned memory is only requested when CUDA is available.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from trainer_client.memory.blocks import BlockChain, check_groups

__all__ = ["ActivationOffload", "OffloadConfig"]

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class OffloadConfig:
    """``groups``: ``[start, stop)`` block ranges (default: one block per group)."""

    min_bytes: int = 1 << 16
    prefetch: bool = True
    keep_last_group: bool = True
    offload_on_cpu: bool = False
    groups: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {self.min_bytes}")
        check_groups(self.groups)


class _Saved:
    __slots__ = ("group", "tensor", "host", "device", "fetched", "__weakref__")

    def __init__(self, group: int) -> None:
        self.group = group
        self.tensor: Tensor | None = None  # kept in place (small, parameter, last group, CPU no-op)
        self.host: Tensor | None = None  # offloaded copy
        self.device: torch.device | None = None
        self.fetched: Tensor | None = None  # prefetched device copy


class ActivationOffload(nn.Module):
    """Run ``blocks`` group by group with their saved activations offloaded to host memory."""

    def __init__(self, blocks: Sequence[nn.Module], config: OffloadConfig = OffloadConfig()) -> None:
        super().__init__()
        self.chain = BlockChain(blocks)
        self.config = config
        n = len(blocks)
        self.groups = config.groups or tuple((i, i + 1) for i in range(n))
        if self.groups[-1][1] != n:
            raise ValueError(f"groups cover {self.groups[-1][1]} blocks but there are {n}")
        self._pin = torch.cuda.is_available()
        self._stream: Any = None
        self._handles: list[list[weakref.ref[_Saved]]] = []
        self._prefetched: set[int] = set()
        self._dedupe: dict[tuple[Any, ...], tuple[weakref.ref[Tensor], Tensor]] = {}
        self.offloaded_bytes = 0

    def _param_ids(self) -> set[int]:
        return {p.untyped_storage().data_ptr() for p in self.parameters()}

    def _pack(self, group: int, last: bool, params: set[int]) -> Any:
        cfg = self.config

        def pack(t: Tensor) -> _Saved:
            h = _Saved(group)
            self._handles[group].append(weakref.ref(h))
            small = t.numel() * t.element_size() < cfg.min_bytes
            is_param = isinstance(t, nn.Parameter) or t.untyped_storage().data_ptr() in params
            on_cpu = t.device.type == "cpu"
            if small or is_param or (last and cfg.keep_last_group) or (on_cpu and not cfg.offload_on_cpu):
                h.tensor = t
                return h
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version)
            hit = self._dedupe.get(key)
            if hit is not None and hit[0]() is not None:
                # the same live tensor saved twice (e.g. by an in-place ReLU and the next conv); the
                # liveness check guards against a freed tensor's address being reused.
                h.host, h.device = hit[1], t.device
                return h
            dense = t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
            src = t if dense else t.contiguous()
            host = torch.empty_like(src, device="cpu", pin_memory=self._pin and not on_cpu)  # keeps strides
            host.copy_(src, non_blocking=not on_cpu)
            h.host, h.device = host, t.device
            self._dedupe[key] = (weakref.ref(t), host)
            self.offloaded_bytes += host.numel() * host.element_size()
            return h

        return pack

    def _fetch(self, h: _Saved) -> Tensor:
        assert h.host is not None and h.device is not None
        if h.device.type == "cpu":
            return h.host
        return h.host.to(h.device, non_blocking=True)

    def _prefetch(self, group: int) -> None:
        if group < 0 or group in self._prefetched or not self.config.prefetch:
            return
        self._prefetched.add(group)
        live = [h for r in self._handles[group] if (h := r()) is not None and h.host is not None]
        if not live or live[0].device is None or live[0].device.type != "cuda":
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=live[0].device)
        self._stream.wait_stream(torch.cuda.current_stream(live[0].device))
        with torch.cuda.stream(self._stream):
            for h in live:
                h.fetched = self._fetch(h)

    def _unpack(self, h: _Saved) -> Tensor:
        self._prefetch(h.group - 1)
        if h.tensor is not None:
            return h.tensor
        if h.fetched is not None:
            t = h.fetched
            h.fetched = None
            cur = torch.cuda.current_stream(t.device)
            cur.wait_stream(self._stream)
            t.record_stream(cur)
            return t
        return self._fetch(h)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return self.chain(x)
        self._handles = [[] for _ in self.groups]
        self._prefetched = set()
        self.offloaded_bytes = 0
        params = self._param_ids()
        try:
            for gi, (start, stop) in enumerate(self.groups):
                pack = self._pack(gi, gi == len(self.groups) - 1, params)
                with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
                    x = self.chain.run(start, stop, x)
        finally:
            self._dedupe = {}
        _LOG.debug("offloaded %.1f MiB of activations", self.offloaded_bytes / 2**20)
        return x
