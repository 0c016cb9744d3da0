"""CUDA graphs for the denoising step.

An SD UNet forward is a few thousand small kernels; at batch 1-2 a GPU finishes them faster
than Python can launch them, so the eager step is bound by the CPU's issue rate (an SD1.5
step at 512x512: 47 ms eager, 12 ms replayed from a graph, on an H200). ``GraphedStep`` wraps
a step function: on CUDA it captures the function once per input signature (the shapes,
dtypes and devices of its tensor inputs and the values of its other inputs) into a graph with
static input buffers, and each later call copies its inputs into those buffers and replays
the graph. Everywhere else (the CPU, model offload, a capture that failed, ``GENFILL_CUDA_GRAPHS=0``)
the same function runs eagerly, so both paths compute the same thing with the same kernels.

Rules for a function to be captured: it takes tensors (in tuples, lists and dicts, nested as
pytrees) and plain constants; it makes no host synchronisation (``.item()``, ``bool(t)``)
and no data-dependent control flow; it returns tensors. Outputs are cloned after each replay,
so a caller may keep them across calls.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

logger = logging.getLogger("genfill.engines.graphs")

__all__ = ["GraphedStep", "graphs_enabled", "signature"]

_WARMUP_CALLS = 2


def graphs_enabled(device: str) -> bool:
    """Whether CUDA graphs are used on ``device``: CUDA, and not turned off by
    ``GENFILL_CUDA_GRAPHS=0``."""
    if os.environ.get("GENFILL_CUDA_GRAPHS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return str(device).startswith("cuda") and torch.cuda.is_available()


def signature(args: Any) -> tuple:
    """The capture key of a call's arguments: their pytree structure, and per leaf its shape,
    dtype and device (tensors) or its value (anything else)."""
    leaves, spec = pytree.tree_flatten(args)
    described = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            described.append(("tensor", tuple(leaf.shape), leaf.dtype, str(leaf.device)))
        else:
            described.append(("value", type(leaf).__name__, repr(leaf)))
    return (str(spec), tuple(described))


@dataclass
class _Captured:
    graph: Any
    inputs: list[torch.Tensor | None]  # a static buffer per tensor leaf, None for constants
    outputs: Any  # the static outputs, as the function returned them
    seconds: float


class GraphedStep:
    """Runs ``function(*args)`` eagerly or replayed from a CUDA graph captured per signature.

    Args:
        function: the step; see the module's rules.
        enabled: capture graphs (``graphs_enabled(device)``); ``False`` always runs eagerly.
        max_graphs: graphs kept, least recently used dropped first. They share one memory
            pool, so memory grows with the largest, not with their number.
    """

    def __init__(self, function: Callable[..., Any], *, enabled: bool, max_graphs: int = 12) -> None:
        self.function = function
        self.enabled = enabled
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._pool = None
        self._lock = threading.Lock()
        self.captures = 0
        self.replays = 0
        self.eager_calls = 0

    def __call__(self, *args: Any) -> Any:
        if not self.enabled:
            self.eager_calls += 1
            return self.function(*args)
        key = signature(args)
        with self._lock:
            captured = self._graphs.get(key)
            if captured is None:
                try:
                    captured = self._capture(args)
                except Exception:  # noqa: BLE001 - an uncapturable step still runs, eagerly
                    logger.warning("CUDA graph capture failed; this engine runs its steps eagerly", exc_info=True)
                    self.enabled = False
                    self.clear()
                    self.eager_calls += 1
                    return self.function(*args)
                self._graphs[key] = captured
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            leaves = pytree.tree_leaves(args)
            for buffer, leaf in zip(captured.inputs, leaves):
                if buffer is not None:
                    buffer.copy_(leaf, non_blocking=True)
            captured.graph.replay()
            self.replays += 1
            return pytree.tree_map(_clone_tensor, captured.outputs)

    def clear(self) -> None:
        """Drops every graph and its memory."""
        self._graphs.clear()
        self._pool = None

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def _capture(self, args: Any) -> _Captured:
        started = time.perf_counter()
        leaves, spec = pytree.tree_flatten(args)
        inputs = [leaf.clone() if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
        static_args = pytree.tree_unflatten(
            [buffer if buffer is not None else leaf for buffer, leaf in zip(inputs, leaves)], spec
        )
        # Warm-up calls on a side stream, as capture requires: lazy initialisations
        # (cuBLAS workspaces, autotuning) must not happen inside the graph.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(_WARMUP_CALLS):
                self.function(*static_args)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = self.function(*static_args)
        torch.cuda.synchronize()
        self.captures += 1
        seconds = time.perf_counter() - started
        logger.info("captured a CUDA graph for %s in %.3f s", _describe(leaves), seconds)
        return _Captured(graph, inputs, outputs, seconds)


def _clone_tensor(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _describe(leaves: list[Any]) -> str:
    first = next((leaf for leaf in leaves if isinstance(leaf, torch.Tensor)), None)
    return "inputs" if first is None else f"input {tuple(first.shape)} {first.dtype}"
