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

**Compiled steps.** Given a ``compiler`` (``compiler_for(device)``: TorchInductor on a CUDA
device with Triton), the calls made inside ``with step.compiling():`` compile the function for
their signature and capture a graph of the compiled version, which later calls of that
signature replay. Compiling is faster to run because Inductor fuses the normalisations and
pointwise work between the matrix kernels (an SD1.5 step 12.0 -> 7.1 ms, SDXL 42 -> 32 ms,
the SD VAE decoder 21 -> 7 ms on an H200), but slow to do: tens of seconds per shape (an
SD1.5 step at 512x512: 52 s cold, 6 s from Inductor's on-disk cache; SDXL 92 s). It runs in
the caller's thread, never beside other work: PyTorch's tracing state is process-wide, and a
compile running next to a graph capture or an eager step in another thread broke both when
tried. So the engines compile only at load, for their commonest shapes; other shapes run the
plain graph. A failed compile leaves the plain step in use; ``GENFILL_COMPILE=0`` turns
compiling off. Compiled and plain steps agree to fp16 rounding (relative difference ~2e-3).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

logger = logging.getLogger("genfill.engines.graphs")

__all__ = ["GraphedStep", "compiler_for", "graphs_enabled", "signature"]

_WARMUP_CALLS = 2


def _switched_off(variable: str) -> bool:
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def graphs_enabled(device: str) -> bool:
    """Whether CUDA graphs are used on ``device``: CUDA, and not turned off by
    ``GENFILL_CUDA_GRAPHS=0``."""
    if _switched_off("GENFILL_CUDA_GRAPHS"):
        return False
    return str(device).startswith("cuda") and torch.cuda.is_available()


def compiler_for(device: str) -> Callable[[Callable[..., Any]], Callable[..., Any]] | None:
    """The compiler a ``GraphedStep`` on ``device`` uses: TorchInductor, one specialisation per
    shape, where CUDA graphs are used and Triton is installed; ``None`` elsewhere (the CPU,
    ``GENFILL_COMPILE=0``). Inductor's cache goes to ``$GENFILL_CACHE_DIR/inductor`` (default
    ``~/.cache/genfill/inductor``) unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise, so a
    restarted server compiles the shapes it has seen in seconds."""
    if _switched_off("GENFILL_COMPILE") or not graphs_enabled(device):
        return None
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return None
    if not has_triton():
        return None
    cache_root = os.environ.get("GENFILL_CACHE_DIR") or str(Path.home() / ".cache" / "genfill")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_root) / "inductor"))
    import torch._dynamo

    # One compiled specialisation per working size and batch; the default limit (8) would
    # leave a long-running server's later shapes uncompiled.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))

    def inductor(function: Callable[..., Any]) -> Callable[..., Any]:
        return torch.compile(function, dynamic=False)

    return inductor


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
    compiled: bool = False


class GraphedStep:
    """Runs ``function(*args)`` eagerly or replayed from a CUDA graph captured per signature.

    Args:
        function: the step; see the module's rules.
        enabled: capture graphs (``graphs_enabled(device)``); ``False`` always runs eagerly.
        compiler: makes a faster equivalent of ``function`` (``compiler_for(device)``), used
            for the signatures first called inside ``compiling()``; ``None`` compiles nothing.
        max_graphs: graphs kept, least recently used dropped first. They share one memory
            pool, so memory grows with the largest, not with their number.
        name: what the log calls this step.
    """

    def __init__(
        self,
        function: Callable[..., Any],
        *,
        enabled: bool,
        compiler: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
        max_graphs: int = 12,
        name: str = "step",
    ) -> None:
        self.function = function
        self.enabled = enabled
        self.compiler = compiler
        self.max_graphs = max_graphs
        self.name = name
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._pool = None
        self._lock = threading.Lock()
        self._compiled_function: Callable[..., Any] | None = None
        self._compiled: set[tuple] = set()
        self._compile_new = False
        self.captures = 0
        self.replays = 0
        self.eager_calls = 0
        self.compiled_calls = 0  # replays or calls of the compiled function
        self.compile_failures = 0
        self.compile_seconds = 0.0

    @contextmanager
    def compiling(self):
        """Within this block, a call of a signature not yet compiled compiles it first (in
        this thread, for as long as that takes). Without a compiler it changes nothing."""
        self._compile_new = self.compiler is not None
        try:
            yield self
        finally:
            self._compile_new = False

    def __call__(self, *args: Any) -> Any:
        key = signature(args) if self.enabled or self.compiler is not None else None
        with self._lock:
            if self._compile_new and key not in self._compiled and not self.compile_failures:
                self._compile(key, args)
            compiled = key in self._compiled
            if not self.enabled:
                if compiled:
                    self.compiled_calls += 1
                    return self._compiled_function(*args)
                self.eager_calls += 1
                return self.function(*args)
            captured = self._graphs.get(key)
            if captured is None or captured.compiled != compiled:
                try:
                    captured = self._capture(args, compiled=compiled)
                except Exception:  # noqa: BLE001 - an uncapturable step still runs, eagerly
                    logger.warning("CUDA graph capture failed; this engine runs its steps eagerly", exc_info=True)
                    self.enabled = False
                    self._graphs.clear()
                    self._pool = None
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
            if captured.compiled:
                self.compiled_calls += 1
            return pytree.tree_map(_clone_tensor, captured.outputs)

    @property
    def compiled_count(self) -> int:
        """Signatures that run compiled."""
        return len(self._compiled)

    def clear(self) -> None:
        """Drops every graph and its memory, and forgets compiled signatures."""
        with self._lock:
            self._graphs.clear()
            self._pool = None
            self._compiled.clear()
            self._compiled_function = None

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def _compile(self, key: tuple, args: Any) -> None:
        """Compiles ``function`` for ``args``' signature by running the compiled version once;
        on failure, logs it and leaves the plain step in use for every signature."""
        started = time.perf_counter()
        try:
            if self._compiled_function is None:
                self._compiled_function = self.compiler(self.function)
            self._compiled_function(*args)
            if self.enabled:
                torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - the plain step keeps serving
            logger.warning("compiling the %s failed; it runs uncompiled", self.name, exc_info=True)
            self.compile_failures += 1
            return
        seconds = time.perf_counter() - started
        self.compile_seconds += seconds
        self._compiled.add(key)
        logger.info("compiled the %s for %s in %.1f s", self.name, _describe(pytree.tree_leaves(args)), seconds)

    def _capture(self, args: Any, *, compiled: bool = False) -> _Captured:
        function = self._compiled_function if compiled else self.function
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
                function(*static_args)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = function(*static_args)
        torch.cuda.synchronize()
        self.captures += 1
        seconds = time.perf_counter() - started
        logger.info("captured a CUDA graph of the %s%s for %s in %.3f s", "compiled " if compiled else "",
                    self.name, _describe(leaves), seconds)
        return _Captured(graph, inputs, outputs, seconds, compiled)


def _clone_tensor(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _describe(leaves: list[Any]) -> str:
    first = next((leaf for leaf in leaves if isinstance(leaf, torch.Tensor)), None)
    return "inputs" if first is None else f"input {tuple(first.shape)} {first.dtype}"
