"""Online learning while the stream flows: losses, per-stage optimisers, and the three modes.

With S stages, stage k owes, after its forward of frame t, the gradient of frame
t - d_k with d_k = 2(S-1-k): the one a lock-step pipeline delivers (the last stage owes frame
t itself: it computes the loss). What each mode does with it:

``sequential``  one stage (the whole model on the first device): exact online SGD, frame after
                frame. The reference.
``partime``     PARTIME's rule: back-propagate the gradient of frame t - d_k through the graph
                of frame t (the newest one), step. O(1) activation memory; the error signal is
                d_k frames older than the activations it meets.
``stashed``     back-propagate it through the graph *of frame t - d_k*, kept since its forward,
                at the weights that forward used (weight stashing, PipeDream-style): exact
                per-frame gradients, delayed weights. ``recompute=True`` keeps only the input
                and recomputes the graph at the current weights (less memory); the recompute
                leaves buffers (BatchNorm's running statistics) as that one forward left them
                and draws fresh random numbers (another dropout mask).

The schedule fixes the delays, so learning is deterministic: the same stream and seeds give
the same weights on CPU whatever the stage speeds — for models without random layers (dropout
draws from PyTorch's process-wide generator, in whatever order the stages' threads reach it).
Warm-up: a gradient owed for a frame that does not exist (t - d_k < 0) or that had no
target is skipped. End of stream: ``stashed`` applies every owed gradient; ``partime`` has no
newer graph to carry its last owed gradients, drops them and counts them in
:attr:`StageLearner.dropped_gradients`. ``partime`` needs frame t's output to have frame
t - d_k's shapes (the gradient of one meets the graph of the other); a stage whose shapes
change within d_k frames raises a ValueError that says so.

Updates that are skipped: a non-finite loss or gradient never reaches the weights. The stage
that finds one (the loss, or any gradient it computes, holds NaN or Inf) skips its optimiser
step for that frame and sends :data:`~partime_async.core.job.NO_GRADIENT` back instead of a
gradient, so every stage before it skips that frame's update too, as AMP's ``GradScaler``
skips steps with infs; it warns once, and every stage counts what it skipped in
:attr:`StageLearner.skipped_updates`. A frame skipped by a stage (``on_error="skip"``: its
forward raised, or its target does not fit) owes no gradient either: the stages before it
receive ``NO_GRADIENT`` for it (in ``partime``, that frame's graph was also to carry an older
frame's gradient at the stage that skipped it: that update is skipped too), and it travels on
to the stages after it as a marker (:attr:`~partime_async.core.job.Job.skipped`), which they
count in their schedules without computing on it (:meth:`StageLearner.pass_skipped`; in
``partime`` the update its position carries is skipped there too). The schedule, and so
determinism, is untouched: every stage counts the same frames, and an owed gradient is only
marked absent.

Targets (``target_spec="output"``, the default): the last stage checks each target against
the output it is compared with, before the loss: the same structure, shapes and dtypes. A
target that differs (a wrong shape, one the loss would broadcast, an integer target for a
float output) is a :class:`~partime_async.core.errors.FrameError` naming the target, what was
expected and what came. Losses whose targets differ from their outputs by design (a class
index per sample) give ``target_spec``, an :class:`~partime_async.core.validation.InputSpec`
that the pipeline checks every target against at its door instead, or ``None`` (no check).

Everything in :class:`StageLearner` runs on the stage's device thread (its worker thread on
CPU): :meth:`~StageLearner.forward` and :meth:`~StageLearner.backward` calls for one stage
are strictly ordered, forward(t), backward(owed at t), forward(t+1), …
"""
from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from ..core.frame import Payload
from ..core.job import NO_GRADIENT
from ..core.validation import InputSpec

Mode = Literal["sequential", "partime", "stashed"]
MODES: tuple[str, ...] = ("sequential", "partime", "stashed")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


@dataclass
class OnlineLearning:
    """How a pipeline learns from its stream.

    Args:
        loss: ``loss(output, target) -> scalar tensor`` for frames that carry a target; with
            ``needs_target=False``, ``loss(output)`` on every frame (an unsupervised loss).
        optimizer: a factory called once per stage with that stage's parameters, e.g.
            ``lambda params: torch.optim.Adam(params, 1e-3)``.
        mode: ``"sequential"``, ``"partime"`` or ``"stashed"`` (see the module docstring).
        recompute: ``stashed`` only: keep inputs and recompute, instead of stashing weights.
            The recompute runs on copies of the module's buffers, so BatchNorm's running
            statistics count each frame once. It draws fresh random numbers: a dropout layer
            masks it differently from the forward whose output went on (replaying that
            forward's generator state, as ``torch.utils.checkpoint`` does, would rewind the
            process-wide generator under every other stage and task drawing from it).
        clip_grad_norm: clip each stage's gradient to this norm before its step (per stage).
        scheduler: a factory ``scheduler(optimizer)``; stepped after every optimiser step.
        needs_target: see ``loss``.
        target_spec: what each target must be: ``"output"`` (the default: the structure,
            shapes and dtypes of the output it is compared with, checked at the last stage
            before the loss), an :class:`~partime_async.InputSpec` (checked at the pipeline's
            door, for losses whose targets differ from their outputs, e.g. class indices), or
            ``None`` (not checked). See the module docstring.
        delay_lr: delay-aware learning rates (off by default: every stage keeps the factory's
            rates, and the modes are exactly as described above). A float ``c`` multiplies
            stage k's learning rates by ``1 / (1 + c * d_k)``, ``d_k`` its gradient delay; a
            callable ``delay_lr(d) -> factor`` gives the factor itself. The last stage
            (``d = 0``) and a one-stage pipeline keep their rates, so ``sequential`` is never
            changed. Why: a gradient applied ``d`` steps late was computed at (``stashed``) or
            for (``partime``) weights the stage has since moved away from; the step that is
            safe for exact online SGD can overshoot, and with Adam the delayed early stages
            oscillate and lose ReLU units for good (see the README's learning section and
            ``bench/learning.py``). Scaling the step by ``1/(1 + c*d)`` is the usual
            delay-tolerant rule of asynchronous SGD (step ~ 1/delay; PipeMare's per-stage
            rates). It slows those stages' learning: a trade-off to measure, not a free fix.
            The factor scales the optimiser's ``lr`` once, before ``scheduler`` is built, so
            schedulers scale the reduced rate (``OneCycleLR`` and ``CyclicLR``, which set
            the rates from their own bounds, ignore it). A loaded state (checkpoint) records the factor
            it was saved with: loading divides it out and applies this configuration's
            factor, so a resumed run may change ``delay_lr``.
    """

    loss: Callable[..., torch.Tensor]
    optimizer: OptimizerFactory = field(default=lambda params: torch.optim.SGD(params, lr=1e-2))
    mode: Mode = "partime"
    recompute: bool = False
    clip_grad_norm: float | None = None
    scheduler: SchedulerFactory | None = None
    needs_target: bool = True
    delay_lr: float | Callable[[int], float] | None = None
    target_spec: Literal["output"] | InputSpec | None = "output"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown learning mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.recompute and self.mode != "stashed":
            raise ValueError("recompute=True applies to mode='stashed' only")
        if not callable(self.loss) or not callable(self.optimizer):
            raise TypeError("loss and optimizer must be callables (a loss module and an optimiser factory)")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {self.clip_grad_norm}")
        if self.delay_lr is not None and not callable(self.delay_lr) and self.delay_lr < 0:
            raise ValueError(f"delay_lr must be >= 0, a callable or None, got {self.delay_lr}")
        if self.target_spec not in ("output", None) and not isinstance(self.target_spec, InputSpec):
            raise ValueError(f"target_spec must be 'output', an InputSpec or None, got {self.target_spec!r}")

    def lr_factor(self, delay: int) -> float:
        """What ``delay_lr`` multiplies the learning rates of a stage with gradient delay
        ``delay`` by (1 when it is off or the delay is 0)."""
        if self.delay_lr is None or delay == 0:
            return 1.0
        factor = self.delay_lr(delay) if callable(self.delay_lr) else 1.0 / (1.0 + self.delay_lr * delay)
        if not factor > 0:
            raise ValueError(f"delay_lr gave a learning-rate factor of {factor} for delay {delay}; it must be > 0")
        return float(factor)

    def delay(self, stage: int, n_stages: int) -> int:
        """Frames between stage ``stage``'s forward and the gradient it applies after it."""
        return 2 * (n_stages - 1 - stage)


@dataclass
class _Saved:
    """What a stage keeps of one frame's forward until its gradient comes back."""

    key: int                           # the frame's job key (unique in a run, in admission order)
    learns: bool                       # had a target (or the loss needs none)
    failed: bool = False               # its forward raised: its update is skipped
    x: Payload = None                  # stage input (requires grad where upstream wants it)
    out: Payload = None                # stage output, with its graph
    weights: dict[str, torch.Tensor] | None = None  # stashed weight version
    loss: torch.Tensor | None = None   # last stage: this frame's loss


class StageLearner:
    """The learning state of one stage: optimiser, scheduler, the frames it still owes."""

    def __init__(self, config: OnlineLearning, module: nn.Module, stage: int, n_stages: int) -> None:
        self.config = config
        self.module = module
        self.stage = stage
        self.last = stage == n_stages - 1
        self.delay = config.delay(stage, n_stages)
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = config.optimizer(self.params) if self.params else None
        self.lr_factor = config.lr_factor(self.delay)
        if self.optimizer is not None and self.lr_factor != 1.0:
            _scale_lrs(self.optimizer, self.lr_factor)
        self.scheduler = config.scheduler(self.optimizer) if config.scheduler and self.optimizer else None
        self.pending: deque[_Saved] = deque()  # device thread: kept forwards, oldest first
        self.forward_failed = False  # device thread: the latest forward raised
        self._order: deque[tuple[int, int, bool]] = deque()  # loop thread: (key, seq, learns) in forward order
        self.steps = 0
        self.dropped_gradients = 0
        self.skipped_updates = 0  # no gradient came (a frame skipped further down) or it was not finite
        self._warned_nonfinite = False
        self._stash = config.mode == "stashed" and not config.recompute and self.delay > 0
        # The learning forward as CUDA graphs (set by the learning program of a stage on a
        # device with graphs=True); None: eager.
        self.graphed: Callable[[Payload], Payload] | None = None

    @property
    def graphable(self) -> bool:
        """Whether every backward of this stage follows its forward before the next forward
        (what a graphed forward + backward needs, see :mod:`partime_async.devices.cuda_graphs`):
        true for ``partime`` and for stages without a delay; a delayed ``stashed`` stage keeps
        several frames' graphs."""
        return self.config.mode != "stashed" or self.delay == 0

    # -- the schedule (loop thread) ------------------------------------------------------------
    def new_run(self) -> None:
        """Start a run's schedule afresh (weights and optimiser state are kept): what a run
        that was cancelled or failed left owed or kept belongs to that run's frames."""
        self._order.clear()
        self.pending.clear()
        self.forward_failed = False

    def owes(self, key: int, seq: int, learns: bool) -> tuple[int, int] | None:
        """Record that the frame of job ``key`` (seq ``seq``) was forwarded (``learns``: it
        will contribute a gradient, see :meth:`learns`; a frame skipped before this stage does
        not); the job key and frame seq whose gradient is now owed, if any.

        Runs on the loop thread in the same order as the forwards; it only decides, from
        positions and targets, never from timing. Gradients are matched by job key: seqs
        need not be unique (two streams, or a stream and ``submit()``, each count from 0).
        """
        self._order.append((key, seq, learns))
        if len(self._order) <= self.delay:
            return None
        owed_key, owed_seq, owed_learns = self._order.popleft()
        return (owed_key, owed_seq) if owed_learns else None

    def remaining(self) -> list[tuple[int, int]]:
        """At end of stream: the job keys and seqs still owed a gradient, oldest first."""
        owed = [(key, seq) for key, seq, learns in self._order if learns]
        self._order.clear()
        return owed

    # -- the work (device thread) -------------------------------------------------------------
    def learns(self, has_target: bool) -> bool:
        """Whether a frame contributes a gradient."""
        return has_target or not self.config.needs_target

    def forward(self, payload: tuple[int, Payload, bool, Payload | None], seq: int) -> tuple[Payload, Any]:
        """Forward one frame ``(key, x, learns, target)`` (frame ``seq``) with autograd on
        where it will be needed; returns the detached output and, on the last stage, the
        frame's loss. Only the last stage is given the target."""
        self.forward_failed = False
        try:
            return self._forward(payload, seq)
        except BaseException:
            key, _, learns, _ = payload
            self._no_graph(key, learns, kept=False)
            raise

    def reject(self, payload: tuple[int, Payload, bool, Payload | None]) -> None:
        """The frame just forwarded (``payload``, as given to :meth:`forward`) is skipped
        after all (its output failed a check): its graph is dropped as if its forward had
        raised."""
        key, _, learns, _ = payload
        self._no_graph(key, learns, kept=True)

    def pass_skipped(self) -> None:
        """A frame skipped before this stage passes (a marker, no forward): in ``partime``
        the backward owed at its position had its graph to carry, and skips its update."""
        self.forward_failed = True
        if self.config.mode == "partime":
            self.pending.clear()

    def _no_graph(self, key: int, learns: bool, *, kept: bool) -> None:
        """No graph of the latest frame: the backward owed for it (or, in partime, carried by
        it) skips its update; in partime nothing may run on an older frame's graph instead.
        ``kept``: its forward succeeded and kept what it saved, which goes."""
        self.forward_failed = True
        if self.config.mode == "partime":
            self.pending.clear()
        elif learns:
            if kept:
                self.pending.pop()
            self.pending.append(_Saved(key, learns, failed=True))

    def _forward(self, payload: tuple[int, Payload, bool, Payload | None], seq: int) -> tuple[Payload, Any]:
        key, x, learns, target = payload
        mode = self.config.mode
        # partime carries an older frame's gradient through this frame's graph, so it keeps
        # every graph (once past warm-up); the other modes keep only frames that will learn.
        if not (learns or (mode == "partime" and self.delay > 0)):
            with torch.no_grad():
                return self.module(x), None
        with torch.enable_grad():
            if self.stage > 0:
                x = pytree.tree_map(_leaf_requiring_grad, x)
            saved = _Saved(key, learns, x=x)
            if mode == "stashed" and self.config.recompute and self.delay > 0:
                with torch.no_grad():
                    out = self.module(x)
            elif self._stash:
                saved.weights = {n: p.detach().clone().requires_grad_()
                                 for n, p in zip(self.names, self.params, strict=True)}
                out = functional_call(self.module, saved.weights, (x,))
            else:
                out = (self.graphed or self.module)(x)
            loss = None
            if self.last and learns:
                if self.config.needs_target:
                    if self.config.target_spec == "output":
                        _check_target(target, out, seq)
                    loss = self.config.loss(out, target)
                else:
                    loss = self.config.loss(out)
                saved.loss = loss
            saved.out = out
        result = pytree.tree_map(_detach, out), (loss.detach() if loss is not None else None)
        if mode == "partime":
            # Only the newest graph is ever used: frame t's graph carries the owed gradient.
            self.pending.clear()
        self.pending.append(saved)
        return result

    def backward(self, payload: tuple[int, Any], seq: int) -> tuple[int, Any]:
        """Apply the gradient owed for the frame of job ``key`` (frame ``seq``; ``grad`` w.r.t.
        this stage's output, None on the last stage, whose gradient comes from the loss),
        step, and return the gradient w.r.t. this stage's input, labelled with ``key``, for
        the stage before. Where there is no gradient to apply (``NO_GRADIENT`` came, the
        forward it needs failed, or a loss or gradient is not finite) the update is skipped
        and counted, and ``NO_GRADIENT`` goes back instead."""
        key, grad = payload
        mode = self.config.mode
        if mode == "partime":
            saved = None if self.forward_failed else self.pending[-1]  # the graph of the newest frame
        else:
            saved = self.pending.popleft()     # the graph of that frame itself
            if saved.key != key:
                raise RuntimeError(f"stage {self.stage}: gradient for job {key} but the oldest kept frame is job "
                                   f"{saved.key}'s; the learning schedule is out of step")
        if grad is NO_GRADIENT or saved is None or saved.failed:
            return self._skip(key, saved)
        with torch.enable_grad():
            if mode == "stashed" and self.config.recompute and self.delay > 0:
                saved.out = self._recompute(saved)
            elif mode == "partime" and not self.last:
                _check_carried(grad, saved.out, self.delay)
            if self.last:
                assert saved.loss is not None  # the last stage keeps only frames that learn, with their loss
                outputs, grads = [saved.loss], [None]
            else:
                pairs = list(zip(pytree.tree_leaves(saved.out), pytree.tree_leaves(grad), strict=True))
                pairs = [(o, g) for o, g in pairs if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
                outputs, grads = [o for o, _ in pairs], [g for _, g in pairs]
            weights = list(saved.weights.values()) if saved.weights is not None else self.params
            inputs = [t for t in pytree.tree_leaves(saved.x) if isinstance(t, torch.Tensor) and t.requires_grad]
            wrt = weights + inputs
            found = (torch.autograd.grad(outputs, wrt, grads, allow_unused=True) if wrt and outputs
                     else [None] * len(wrt))
        if not _finite(found) or (saved.loss is not None and not bool(torch.isfinite(saved.loss))):
            self._warn_nonfinite(seq)
            return self._skip(key, saved)
        param_grads, input_grads = found[:len(weights)], found[len(weights):]
        self._step(param_grads)
        if mode == "partime":
            saved.out = saved.loss = None      # the graph is spent; frees its activations
        if self.stage == 0:
            return key, None
        it = iter(input_grads)
        grad_in = pytree.tree_map(
            lambda t: _zeros_if_none(next(it), t) if isinstance(t, torch.Tensor) and t.requires_grad else None, saved.x)
        return key, grad_in

    def _skip(self, key: int, saved: _Saved | None) -> tuple[int, Any]:
        """No update from the frame of job ``key``: counted, and no gradient for the stage before."""
        self.skipped_updates += 1
        if saved is not None and self.config.mode == "partime":
            saved.out = saved.loss = None
        return key, (None if self.stage == 0 else NO_GRADIENT)

    def _warn_nonfinite(self, seq: int) -> None:
        if self._warned_nonfinite:
            return
        self._warned_nonfinite = True
        carried = (f" (carried through the graph of the frame forwarded {self.delay} frames later, whose input may "
                   "be the non-finite one)" if self.config.mode == "partime" and self.delay else "")
        warnings.warn(f"stage {self.stage}: the loss or a gradient of frame {seq}{carried} is not finite (NaN or "
                      "Inf): that update is skipped at this stage and every stage before it, and counted in "
                      "pipe.learners[k].skipped_updates (warned once per stage); check_finite=True rejects "
                      "non-finite inputs and targets at the pipeline's door", RuntimeWarning, stacklevel=2)

    def _recompute(self, saved: _Saved) -> Payload:
        """The forward of ``saved``'s frame again, with autograd, at the current weights. It
        updates copies of the buffers, so a BatchNorm counts the frame once."""
        buffers = {name: b.clone() for name, b in self.module.named_buffers()}
        return functional_call(self.module, buffers, (saved.x,))

    def _step(self, grads: Iterable[torch.Tensor | None]) -> None:
        if self.optimizer is None:
            return
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        if self.config.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.params, self.config.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Optimiser and scheduler state, step count, and the ``delay_lr`` factor their
        learning rates carry."""
        return {
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "steps": self.steps,
            "lr_factor": self.lr_factor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. The learning rates loaded (the optimiser's,
        and the scheduler's base rates) are divided by the saved ``lr_factor`` and multiplied
        by this stage's, so ``delay_lr`` is the loading configuration's. A state saved before
        the factor was recorded is taken to carry this stage's factor (the likely case: the
        same configuration resumed), so it loads unchanged."""
        ratio = self.lr_factor / state.get("lr_factor", self.lr_factor)
        if _sets_its_own_rates(self.scheduler):
            ratio = 1.0  # its rates are its own, delay_lr or not (so they were when it was made)
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            if ratio != 1.0:
                _scale_lrs(self.optimizer, ratio)
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
            if ratio != 1.0:
                _scale_scheduler(self.scheduler, ratio)
        self.steps = state.get("steps", 0)


def _scale_lrs(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Multiply an optimiser's learning rates by ``factor``: ``lr``, and ``initial_lr``, from
    which a scheduler takes its base rates."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor


def _sets_its_own_rates(scheduler: Any) -> bool:
    """Whether ``scheduler`` (or one it runs) sets the rates from its own bounds, whatever the
    optimiser's were: ``OneCycleLR``, ``CyclicLR``."""
    return isinstance(scheduler, (torch.optim.lr_scheduler.CyclicLR, torch.optim.lr_scheduler.OneCycleLR)) or any(
        _sets_its_own_rates(child) for child in getattr(scheduler, "_schedulers", ()))


def _scale_scheduler(scheduler: Any, factor: float) -> None:
    """Multiply a loaded scheduler's base rates by ``factor`` (its optimiser's were, by
    :func:`_scale_lrs`): an ``LRScheduler``'s, and those of the schedulers a ``SequentialLR``
    or ``ChainedScheduler`` runs."""
    for child in getattr(scheduler, "_schedulers", ()):
        _scale_scheduler(child, factor)
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    if hasattr(scheduler, "_last_lr"):  # get_last_lr(): the rates in force now
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _check_carried(grad: Payload, out: Payload, delay: int) -> None:
    """``partime``: the gradient of frame t - ``delay`` (``grad``, shaped like that frame's
    output) must fit frame t's output ``out``, whose graph carries it; a ValueError that says
    why, instead of autograd's shape mismatch."""
    grads, outs = pytree.tree_leaves(grad), pytree.tree_leaves(out)
    if len(grads) == len(outs) and all(
            not (isinstance(g, torch.Tensor) and isinstance(o, torch.Tensor)) or g.shape == o.shape
            for g, o in zip(grads, outs, strict=True)):
        return
    raise ValueError(
        f"mode='partime' carries the gradient of frame t-{delay} through the graph of frame t, so this stage's "
        f"output shapes must not change within {delay} frames: the gradient owed here (frame t-{delay}) has shape "
        f"{_shapes(grad)} but the output of frame t has shape {_shapes(out)}; use mode='stashed' for streams whose "
        "frame shapes change (each gradient goes through its own frame's graph)")


def _check_target(target: Payload, out: Payload, seq: int) -> None:
    """Raise a FrameError naming the target if it does not have ``out``'s structure, shapes
    and dtypes (what the loss compares it with: a broadcast or an integer target would train
    on something else)."""
    InputSpec.like(out).check(target, seq, component="target", hint=(
        " (a target must have the structure, shapes and dtypes of the output it is compared with; for a loss "
        "whose targets differ by design, e.g. class indices, give OnlineLearning(target_spec=InputSpec(...)), "
        "or target_spec=None)"))


def _finite(grads: Iterable[torch.Tensor | None]) -> bool:
    """Whether every gradient is finite (one reduction per tensor, one host read in all)."""
    flags = [torch.isfinite(g).all() for g in grads if g is not None]
    if not flags:
        return True
    return bool(torch.stack(flags).all())


def _shapes(tree: Payload) -> Any:
    return pytree.tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t, tree)


def _leaf_requiring_grad(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.detach().requires_grad_()
    return t


def _detach(t: Any) -> Any:
    return t.detach() if isinstance(t, torch.Tensor) else t


def _zeros_if_none(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad
