"""Per-stage CUDA graphs: one launch per frame (and one per backward), however many layers.

A stage of many small layers on a GPU is bound by the host: every layer launches its
kernels one by one, microseconds of CPU each, so the per-frame cost grows with the number of
layers however little the GPU does. :class:`GraphedStage` records the stage's kernels once
into a CUDA graph (``torch.cuda.graph``) and then replays the whole graph with one launch
per frame.

Contract of ``stage = GraphedStage(run, name=...)``, called as ``stage(x)``:

* ``run(x)`` is the stage's eager *inference* computation (it records no autograd graph).
  ``stage`` is called on one thread, with the stage's compute stream current on the device
  that holds ``x``; it returns what ``run(x)`` returns.
* **Signatures.** A graph serves one input signature: the pytree structure of ``x``, and
  the shape, dtype, device and ``requires_grad`` of each tensor leaf; a non-tensor leaf is
  part of the signature by value (it must be hashable). The first frame of a signature is
  captured: ``run`` is warmed up ``warmup`` times on a side stream (cuDNN autotuning, library
  handles and allocations happen there, not in the graph), then captured on that same stream
  reading static input buffers. Every frame of a captured signature is copied into those
  buffers and the graph is replayed, all on the caller's current stream. Up to
  ``max_graphs`` signatures get a graph each (a stream whose shapes alternate between a few
  values stays graphed); a frame with yet another signature runs eagerly, with one warning
  for the stage, while the captured signatures keep replaying.
* **Outputs.** Each call returns fresh tensors (clones of the graph's static outputs, made
  on the current stream): the caller hands them to another stream or stage asynchronously,
  and the next replay overwrites the static outputs. A replay runs the kernels that the
  capture recorded, so outputs equal eager ``run`` bit for bit when those kernels are
  deterministic and eager selects the same ones (for cuDNN:
  ``torch.backends.cudnn.deterministic = True``, ``benchmark = False``); otherwise they
  agree only as closely as two eager runs do.
* **Fallback** (eager for good, one ``RuntimeWarning`` that names the stage, says why, and
  says what to do): a tensor leaf of the input is not on the current CUDA device (a CPU
  tensor, for one), or no leaf is a CUDA tensor; the capture raised (an op that synchronises
  with the host such as ``.item()`` or ``.cpu()``, a data-dependent shape, a library call
  that cannot be captured); or an output is not on the device, or requires grad (autograd
  recorded: not inference). The frame that triggered the fallback is computed eagerly,
  so no frame is lost; the graphs already captured are released. With PyTorch < 2.12 a
  capture that raised leaves the caching allocator in capture mode for the rest of the
  process (pytorch#180395: later captures fail, memory used across streams is freed late):
  the warning says so, and every later stage of the process falls back without trying.
* **Learning** has its own wrapper, :class:`GraphedLearningStage` (below): a ``run`` that
  records autograd falls back here, as above.

Streams. Warm-up and capture use one side stream of the stage (the torch notes' recipe:
warm up on a side stream before capture), the same stream for both so that library handles
created lazily per stream (cuBLAS, hipBLASLt) exist before the capture begins.
The side stream waits for the caller's stream before warm-up and the caller's stream waits
for it afterwards, whatever happens. The capture runs with ``capture_error_mode=
"thread_local"``: only CUDA calls of the capturing thread are checked against it. In the
default ``"global"`` mode a call that the driver deems unsafe during capture fails in any
thread, e.g. in the worker of a CPU stage reading a GPU result at that moment.

Cost. The first frame of each signature synchronises the device (``torch.cuda.graph`` does,
to free memory for the graph), runs ``run`` ``warmup`` + 1 times, and stalls the calling
thread (the event loop) meanwhile. Memory per graph: the static inputs, the static outputs,
and the graph's private memory pool, which keeps every block the capture allocated (about
the stage's peak eager working set: activations and workspaces) until the stage is
released. Graphs do not share pools: graphs of different stages replay concurrently on
different streams, and the graphs of one stage in any order, which pool sharing forbids
("Graph memory management" in the torch CUDA notes).

Learning: ``stage = GraphedLearningStage(module, name=...)``, called as ``stage(x)`` with grad
mode on, is ``module(x)`` with autograd as two graphs per signature, the forward and the
backward (the torch notes' "partial-network capture", as ``torch.cuda.make_graphed_callables``
builds it, but captured lazily in ``"thread_local"`` mode on the stage's side stream like
:class:`GraphedStage`: the pipeline keeps streaming on other threads meanwhile). Contract, in
addition to the one above (signatures, fallback, streams, cost):

* It returns fresh output tensors attached to one autograd node. A backward through them
  (on the stream of the forward, as autograd does) replays the backward graph and yields
  gradients for the input's leaves that require grad (fresh tensors) and for the module's
  trainable parameters. ``torch.autograd.grad`` returns the latter as the graph's static
  buffers, which the next *forward* replay of the signature may overwrite (the two graphs
  share one memory pool): consume them (an optimiser step) in stream order before the
  stage's next frame, as :class:`~partime_async.programs.online.StageLearner` does.
  (``.backward()`` accumulates copies into ``.grad``.)
* **One backward per forward, right after it**: the backward graph reads the activations
  that the latest forward replay of that signature left in the graph's memory, so between
  a forward and its backward no other forward of the stage may run. PARTIME's rule (the
  gradient goes through the newest frame's graph) and every stage without a delay do exactly
  that; ``stashed`` stages with a delay keep several frames' graphs at stashed weights and
  are not graphed (the learning program warns).
* Parameters are read in place by every replay (an optimiser's in-place step is what the
  next frame sees); parameters replaced by new tensors are not, and parameter or module
  hooks do not run in replays. The module's train/eval mode is part of the signature. Warm-up runs the forward and
  the backward ``warmup`` times on static copies and then restores the module's buffers
  (BatchNorm's running statistics) and the device's random-number state, so that it changes
  nothing a frame sees; the graphs themselves update buffers as eager steps do.
* Also not capturable (eager, with the warning): an output that is not a tensor, or no
  output that requires grad.
"""
from __future__ import annotations

import contextlib
import gc
import threading
import warnings
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call
from torch.utils import _pytree as pytree

from ..core.frame import Payload

ADVICE = ("pass graphs=False to silence this, or make the stage capturable: static shapes, no host "
          "synchronisation, no CPU tensors")

# Before 2.12, a capture that fails leaves PyTorch's caching allocator believing a capture is
# still under way (pytorch#180395): every later capture in the process fails inside
# empty_cache, and frees of blocks used on other streams are put off. After one failure such
# a torch is not asked to capture again: later stages fall back at once, saying why.
# (TorchVersion compares with a string as a version, not as text.)
_CAPTURE_LEAVES_ALLOCATOR_BROKEN = torch.torch_version.TorchVersion(torch.__version__) < "2.12"
_failed_capture: str | None = None  # what failed first, on such a torch


class _NotCapturable(Exception):
    """Why a signature cannot be graphed (the stage falls back to eager)."""


class _Graph:
    """One captured signature: the graph, its static input buffers (None for a non-tensor
    leaf) and its static outputs, flat, with the output's structure."""

    __slots__ = ("graph", "inputs", "outputs", "out_spec")

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor | None], outputs: list[Any],
                 out_spec: pytree.TreeSpec) -> None:
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs
        self.out_spec = out_spec

    def replay(self, leaves: list[Any]) -> Payload:
        with torch.no_grad():  # a copy from an input that requires grad must not record autograd
            for buf, t in zip(self.inputs, leaves, strict=True):
                if buf is not None:
                    buf.copy_(t)
        self.graph.replay()  # on the current stream, after the copies
        return pytree.tree_unflatten([o.clone() if isinstance(o, torch.Tensor) else o for o in self.outputs],
                                     self.out_spec)


class _PerSignature:
    """What both wrappers share: a graph per input signature, captured on first use, and the
    eager fallback (see the module docstring). Subclasses give ``_capture`` and ``_replay``."""

    def __init__(self, eager: Callable[[Payload], Payload], *, name: str, warmup: int, max_graphs: int) -> None:
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (capture needs warmed-up libraries), got {warmup!r}")
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.eager = eager
        self.name = name
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.replays = 0
        self.fallback_reason: str | None = None
        self._graphs: dict[Hashable, Any] = {}
        self._stream: torch.cuda.Stream | None = None  # warm-up and capture, created at the first capture
        self._overflowed = False

    @property
    def captured(self) -> bool:
        """A graph is in use."""
        return bool(self._graphs)

    @property
    def graphs(self) -> int:
        """Signatures captured so far."""
        return len(self._graphs)

    def __repr__(self) -> str:
        state = f"eager: {self.fallback_reason}" if self.fallback_reason else f"{self.graphs} graph(s)"
        return f"{type(self).__name__}({self.name!r}, {state}, {self.replays} replays)"

    def __call__(self, x: Payload) -> Payload:
        if self.fallback_reason is not None:
            return self.eager(x)
        leaves, spec = pytree.tree_flatten(x)
        key = (spec, self._mode(), tuple((t.shape, t.dtype, t.device, t.requires_grad) if isinstance(t, torch.Tensor)
                                         else (type(t), t) for t in leaves))
        try:
            graph = self._graphs.get(key)
        except TypeError as exc:  # hashing the key: a non-tensor leaf is unhashable
            return self._give_up(f"a non-tensor leaf of the input cannot be part of a signature ({exc})", x)
        if graph is None:
            problem = _input_problem(leaves)
            if problem is None and _failed_capture is not None:
                problem = (f"an earlier capture failed in this process ({_failed_capture}), and PyTorch "
                           f"{torch.__version__} cannot capture again after that (fixed in 2.12, pytorch#180395)")
            if problem is not None:
                return self._give_up(problem, x)
            if len(self._graphs) >= self.max_graphs:
                return self._overflow(leaves, x)
            try:
                graph = self._capture_on_side_stream(leaves, spec)
            except _NotCapturable as exc:
                return self._give_up(str(exc), x)
            self._graphs[key] = graph
        out = self._replay(graph, leaves)
        self.replays += 1
        return out

    def _capture_on_side_stream(self, leaves: list[Any], spec: pytree.TreeSpec) -> Any:
        """``_capture`` on the stage's side stream, which waits for the caller's stream first
        (the static inputs are written there) and which the caller's stream waits for after,
        however the capture ends. Static copies of ``leaves`` keep ``requires_grad``."""
        caller = torch.cuda.current_stream()
        if self._stream is None:
            self._stream = torch.cuda.Stream(caller.device)
        side = self._stream
        inputs = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else None
                  for t in leaves]
        static_x = pytree.tree_unflatten([t if buf is None else buf for t, buf in zip(leaves, inputs, strict=True)],
                                         spec)
        side.wait_stream(caller)
        try:
            # The outer context restores the caller's stream however the capture ends:
            # torch.cuda.graph's own __exit__ skips that when capture_end raises.
            with _no_collection(), torch.cuda.stream(side):
                return self._capture(inputs, static_x, side)
        finally:
            caller.wait_stream(side)

    def _mode(self) -> Hashable:
        """What else a signature depends on (none here)."""
        return None

    def _capture(self, inputs: list[torch.Tensor | None], static_x: Payload, side: torch.cuda.Stream) -> Any:
        raise NotImplementedError

    def _replay(self, graph: Any, leaves: list[Any]) -> Payload:
        raise NotImplementedError

    def _give_up(self, reason: str, x: Payload) -> Payload:
        """Eager from now on, with one warning; this frame too, so that it is not lost."""
        self.fallback_reason = reason
        self._graphs.clear()  # their pools and static buffers go back to the allocator
        warnings.warn(f"{self.name} runs eagerly, not as a CUDA graph: {reason}; {ADVICE}",
                      RuntimeWarning, stacklevel=3)
        return self.eager(x)

    def _overflow(self, leaves: list[Any], x: Payload) -> Payload:
        if not self._overflowed:
            self._overflowed = True
            shapes = [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor)]
            warnings.warn(f"{self.name}: input shapes {shapes} make a new signature after "
                          f"{self.max_graphs} captured ones (max_graphs); frames with a signature not captured "
                          f"run eagerly from now on, captured ones keep replaying; {ADVICE}",
                          RuntimeWarning, stacklevel=3)
        return self.eager(x)


class GraphedStage(_PerSignature):
    """``run`` replayed as a CUDA graph per input signature; see the module docstring.

    Args:
        run: the stage's eager inference computation.
        name: how warnings name the stage.
        warmup: eager runs on the side stream before each capture (at least 1).
        max_graphs: signatures graphed at most; frames with further ones run eagerly.

    Attributes:
        replays: frames computed by replaying a graph.
        fallback_reason: why the stage runs eagerly for good; None while graphed or not yet
            tried.
    """

    def __init__(self, run: Callable[[Payload], Payload], *, name: str, warmup: int = 3,
                 max_graphs: int = 4) -> None:
        super().__init__(run, name=name, warmup=warmup, max_graphs=max_graphs)

    def _capture(self, inputs: list[torch.Tensor | None], static_x: Payload, side: torch.cuda.Stream) -> _Graph:
        """Warm up and capture ``run`` (``self.eager``) on the static input. Raises _NotCapturable (state sane:
        no stream left capturing); an error of the warm-up (``run`` fails eagerly too: the
        frame's own error) propagates as it is."""
        for _ in range(self.warmup):
            self.eager(static_x)
        graph = torch.cuda.CUDAGraph()
        with _capturing(graph, side, self.name):
            out = self.eager(static_x)
        outputs, out_spec = pytree.tree_flatten(out)
        _check_outputs(outputs, side.device)
        for o in outputs:
            if isinstance(o, torch.Tensor) and o.requires_grad:
                raise _NotCapturable("an output requires grad (autograd recorded the stage): GraphedStage "
                                     "graphs inference; learning stages use GraphedLearningStage")
        return _Graph(graph, inputs, outputs, out_spec)

    def _replay(self, graph: _Graph, leaves: list[Any]) -> Payload:
        return graph.replay(leaves)


class _LearningGraph:
    """One captured signature of a learning stage: the forward and backward graphs and their
    static buffers (flat; None where a leaf is not a tensor or gets no gradient)."""

    __slots__ = ("forward", "backward", "inputs", "outputs", "differentiable", "out_spec", "grad_outputs",
                 "input_grads", "param_grads")

    def __init__(self, forward: torch.cuda.CUDAGraph, backward: torch.cuda.CUDAGraph,
                 inputs: list[torch.Tensor | None], outputs: list[torch.Tensor], out_spec: pytree.TreeSpec,
                 grad_outputs: list[torch.Tensor], input_grads: list[torch.Tensor | None],
                 param_grads: list[torch.Tensor | None]) -> None:
        self.forward = forward
        self.backward = backward
        self.inputs = inputs
        self.outputs = [o.detach() for o in outputs]  # keeps the static outputs' memory, not their graph
        self.differentiable = [o.requires_grad for o in outputs]
        self.out_spec = out_spec
        self.grad_outputs = grad_outputs
        self.input_grads = input_grads
        self.param_grads = param_grads


class _Replay(torch.autograd.Function):
    """The autograd node of one graphed learning forward: ``apply(graph, n, *leaves,
    *params)``; its backward replays the backward graph."""

    @staticmethod
    def forward(ctx: Any, graph: _LearningGraph, n_leaves: int, *args: Any) -> tuple[torch.Tensor, ...]:
        for buf, t in zip(graph.inputs, args[:n_leaves], strict=True):  # (autograd is off in a Function's forward)
            if buf is not None:
                buf.copy_(t)
        graph.forward.replay()
        ctx.graph = graph
        outs = tuple(o.clone() for o in graph.outputs)  # the next replay overwrites the static ones
        ctx.mark_non_differentiable(*[o for o, d in zip(outs, graph.differentiable, strict=True) if not d])
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        graph: _LearningGraph = ctx.graph
        # Undefined gradients arrive as zeros (materialised by autograd).
        given = [g for g, d in zip(grads, graph.differentiable, strict=True) if d]
        for buf, g in zip(graph.grad_outputs, given, strict=True):
            buf.copy_(g)
        graph.backward.replay()
        input_grads = [g.clone() if g is not None else None for g in graph.input_grads]
        return (None, None, *input_grads, *graph.param_grads)


class GraphedLearningStage(_PerSignature):
    """``module(x)`` with autograd as forward and backward CUDA graphs per input signature; see
    the module docstring ("Learning").

    Args:
        module: the stage's layers; its trainable parameters get gradients.
        name: how warnings name the stage.
        warmup: eager forward + backward runs on the side stream before each capture.
        max_graphs: signatures graphed at most; frames with further ones run eagerly.
    """

    def __init__(self, module: nn.Module, *, name: str, warmup: int = 3, max_graphs: int = 4) -> None:
        super().__init__(module, name=name, warmup=warmup, max_graphs=max_graphs)
        self.module = module
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]

    def _mode(self) -> Hashable:
        """Train and eval mode record different graphs (BatchNorm, dropout)."""
        return self.module.training

    def _capture(self, inputs: list[torch.Tensor | None], static_x: Payload,
                 side: torch.cuda.Stream) -> _LearningGraph:
        # Warm-up and capture go through fresh aliases of the parameters (same storage, so
        # the graphs read whatever an in-place optimiser step wrote): the parameters' own
        # autograd nodes keep the stream of their first use, which a capture must not wait on
        # (pytorch#137483), and their hooks stay out of the graphs.
        aliases = [p.detach().requires_grad_() for p in self.params]
        weights = dict(zip(self.names, aliases, strict=True))

        def run() -> Payload:
            return functional_call(self.module, weights, (static_x,))

        wrt = [buf for buf in inputs if buf is not None and buf.requires_grad] + aliases
        if not wrt:
            raise _NotCapturable("neither the input nor a parameter requires grad (nothing to learn)")
        buffers = list(self.module.buffers())
        kept = [b.detach().clone() for b in buffers]
        # The device's generator only (warm-up draws no CPU random numbers, and restoring the
        # CPU generator would rewind what other threads drew meanwhile); this thread launches
        # all of the device's work, so nothing else draws from it before the restore.
        rng = torch.cuda.get_rng_state(side.device)
        try:
            for _ in range(self.warmup):
                diff = _differentiable(run())
                torch.autograd.grad(diff, wrt, [torch.zeros_like(o) for o in diff], allow_unused=True)
        finally:
            torch.cuda.set_rng_state(rng, side.device)
        with torch.no_grad():
            for b, k in zip(buffers, kept, strict=True):
                b.copy_(k)
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with _capturing(forward, side, self.name):
            out = run()
        outputs, out_spec = pytree.tree_flatten(out)
        _check_outputs(outputs, side.device)
        diff = _differentiable(out)
        grad_outputs = [torch.empty_like(o) for o in diff]
        with _capturing(backward, side, self.name, pool=forward.pool()):
            grads = torch.autograd.grad(diff, wrt, grad_outputs, allow_unused=True)
        it = iter(grads)
        input_grads = [next(it) if buf is not None and buf.requires_grad else None for buf in inputs]
        param_grads: list[torch.Tensor | None] = list(it)  # None: a parameter unused (allow_unused)
        return _LearningGraph(forward, backward, inputs, outputs, out_spec, grad_outputs, input_grads, param_grads)

    def _replay(self, graph: _LearningGraph, leaves: list[Any]) -> Payload:
        outs = _Replay.apply(graph, len(leaves), *leaves, *self.params)
        return pytree.tree_unflatten(list(outs), graph.out_spec)


_gc_lock = threading.Lock()
_gc_captures = 0            # captures under way in the process (any thread)
_gc_was_enabled = False     # the collector's state when the first of them began


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """No garbage collection while any capture of the process runs. A collection during a
    capture may destroy another, unreachable graph (a finished pipeline's, say), which CUDA
    forbids while a stream captures: the capture would fail (pytorch PR 161037). The
    collector is process-wide, hence the count: the last capture to end turns it back on."""
    global _gc_captures, _gc_was_enabled
    with _gc_lock:
        if _gc_captures == 0:
            gc.collect()  # now, while no capture is under way
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_captures += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_captures -= 1
            if _gc_captures == 0 and _gc_was_enabled:
                gc.enable()


def _differentiable(out: Payload) -> list[torch.Tensor]:
    """The outputs a backward starts from. Raises _NotCapturable if there is none (nothing
    to learn through) or an output is not a tensor."""
    leaves = pytree.tree_leaves(out)
    if not all(isinstance(o, torch.Tensor) for o in leaves):
        raise _NotCapturable("an output is not a tensor (a graph's outputs are static tensors)")
    diff = [o for o in leaves if o.requires_grad]
    if not diff:
        raise _NotCapturable("no output requires grad (nothing to back-propagate through)")
    return diff


def _check_outputs(outputs: list[Any], device: torch.device) -> None:
    for o in outputs:
        if isinstance(o, torch.Tensor) and o.device != device:
            raise _NotCapturable(f"an output tensor is on {o.device}; a graph replays only work on {device}")


@contextlib.contextmanager
def _capturing(graph: torch.cuda.CUDAGraph, side: torch.cuda.Stream, name: str, pool: Any = None) -> Iterator[None]:
    """``torch.cuda.graph`` on ``side`` in ``"thread_local"`` mode; a capture that raises ends
    as _NotCapturable with the stream out of capture mode (and, on a torch whose allocator a
    failed capture breaks, every later capture of the process refused)."""
    try:
        with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            yield
    except Exception as exc:
        _end_capture(graph, side)
        reason = f"capture failed: {_describe(exc)}"
        if _CAPTURE_LEAVES_ALLOCATOR_BROKEN:
            global _failed_capture
            _failed_capture = name
            reason += (f"; with PyTorch {torch.__version__} a failed capture also leaves the "
                       "memory allocator in capture mode for the rest of the process (GPU memory "
                       "freed late; fixed in 2.12): prefer graphs=False for this stage")
        raise _NotCapturable(reason) from exc


def _input_problem(leaves: list[Any]) -> str | None:
    """Why this input cannot be captured, or None."""
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    if not any(t.is_cuda for t in tensors):  # checked first: no CUDA call on a machine without CUDA
        return "the input has no CUDA tensor (a graph replays GPU work only)"
    here = torch.device("cuda", torch.cuda.current_device())
    for t in tensors:
        if t.device != here:
            return f"the input has a tensor on {t.device}, while the stage runs on {here}"
    return None


def _end_capture(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream) -> None:
    """Leave ``stream`` out of capture mode after a failed capture. torch.cuda.graph ends the
    capture itself (cudaStreamEndCapture ends even an invalidated capture); only a
    capture_end that failed its own checks before that leaves the stream capturing."""
    with torch.cuda.stream(stream):
        if torch.cuda.is_current_stream_capturing():
            try:
                graph.capture_end()
            except RuntimeError:
                pass  # an invalidated capture ends with an error, but it ends


def _describe(exc: BaseException) -> str:
    """The first line of the error that broke a capture and, when capture_end then failed on
    its own (torch.cuda.graph's __exit__ chains it to the cause), of that one too."""
    root, seen = exc, {id(exc)}
    while (cause := root.__cause__ or root.__context__) is not None and id(cause) not in seen:
        root = cause
        seen.add(id(root))
    text = f"{type(root).__name__}: {_first_line(root)}"
    if root is not exc:
        text += f" (the capture then ended with {type(exc).__name__}: {_first_line(exc)})"
    return text


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else "(no message)"
