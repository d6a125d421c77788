"""Parallel in depth: a stack of layers solved as one system of equations (DeepPCR, Jacobi).

L layers ``z_l = f_l(z_{l-1})`` (``z_0 = x``) are the solution of ``F(z) = 0`` with
``F_l(z) = z_l - f_l(z_{l-1})``. Instead of running the layers one after another, a solver
evaluates *all* of them at once on a guess of their inputs and improves the guess:

* :class:`DeepPCR` (Danieli et al., NeurIPS 2023) takes Newton steps. A step's linear system
  is block lower-bidiagonal (the identity on the diagonal, ``-J_l = -df_l/dz`` below it), so
  its solution ``d_l = r_l + J_l d_{l-1}`` is a linear recurrence, solved by parallel cyclic
  reduction in ``ceil(log2 L)`` rounds of batched matmuls (round ``s``, for ``l >= s``:
  ``r_l += J'_l r_{l-s}``; ``J'_l <- J'_l J'_{l-s}``).
* :class:`Jacobi` (Song et al., ICML 2021) replaces every state by its layer's output on the
  previous guess (one *sweep*); no Jacobians.

Both are exact after L steps (step k makes the first k states exact), so ``max_iters``
defaults to L. Stopping: the largest residual ``|z_l - f_l(z_{l-1})|`` is at most ``tol``,
read off the layer evaluation that the next step needs anyway (convergence costs no extra
evaluation). A solve that does not converge within ``max_iters`` steps, meets a non-finite
value, or reaches the states' round-off while still above ``tol`` (an expanding stack's
states can be too large for an absolute ``tol``) runs the layers in sequence instead
(``Solution.fallback``): the result is then exactly that of the layers. The win is on GPUs,
where the L layer evaluations and the reduction's many small matmuls run in parallel; on a
CPU a solve is slower than the plain sequential layers (``bench/depth.py``).

Jacobians: closed form for an ``nn.Linear`` mapping a width to itself, alone or followed by
an elementwise activation (a layer ``nn.Sequential(nn.Linear(d, d), nn.Tanh())``, or an
``nn.Linear``): ``diag(act'(W z + b)) W``. Consecutive such layers with the same activation
are evaluated as one batched matmul over their stacked weights. Any other layer goes through
``torch.func``: ``vmap`` over the batch of ``jacrev``, and consecutive layers of the same
structure (type, attributes, parameter shapes) are evaluated together by ``vmap`` over their
stacked parameters.

Gradients: :attr:`Solution.output` and :attr:`Solution.states` are differentiable w.r.t. the
input and every layer's parameters through a custom autograd function, not through the
iterations. Its backward solves the adjoint (transposed) system
``lambda_l = g_l + J_{l+1}^T lambda_{l+1}`` (DeepPCR: one more reduction; Jacobi: sweeps of
batched vector-Jacobian products, stopping when the largest change is at most ``tol`` times
the largest adjoint), then takes the parameters' and the input's gradients as one batched
vector-Jacobian product over all layers. The backward uses the weights of the forward.

What the layers must be: each maps a tensor to one of the same shape and dtype, and is a
deterministic, pure function of its input (no random numbers, no updates of buffers:
``BatchNorm`` in eval mode, no dropout in training mode) that treats the samples of a batch
(the first dimension, for an input of two or more dimensions) independently. Memory: DeepPCR
holds L x batch Jacobians of n x n (n the features of one sample), so it suits deep, narrow
stacks; Jacobi holds a few copies of the states.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, jacrev, vjp, vmap

__all__ = ["DeepPCR", "Jacobi", "Solution", "Solver", "fuse"]

# Activations without parameters that act on each element on its own (so their Jacobian is
# a diagonal); exact types only: a subclass may override forward.
_CLOSED_FORM_ACTIVATIONS: frozenset[type[nn.Module]] = frozenset({
    nn.Identity, nn.Tanh, nn.Sigmoid, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.LogSigmoid,
    nn.Tanhshrink})


@dataclass(frozen=True)
class Solution:
    """What :meth:`Solver.solve` returns.

    Attributes:
        output: the last layer's output (``states[-1]``); differentiable w.r.t. the input and
            every layer's parameters.
        states: every layer's output, a tensor ``(L, *x.shape)``; differentiable too.
        iterations: Newton steps (DeepPCR) or sweeps (Jacobi) taken, including those before
            a fallback.
        fallback: True when the solve did not converge within ``max_iters`` steps (or met a
            non-finite value, or its residuals reached the states' round-off above ``tol``)
            and ran the layers in sequence instead.
    """

    output: Tensor
    states: Tensor
    iterations: int
    fallback: bool


class Solver:
    """Solves a stack of layers for an input (see the module docstring).

    Args:
        layers: a sequence of modules (an ``nn.Sequential`` too), each mapping a tensor to one
            of the same shape and dtype.
        tol: the largest residual ``|z_l - f_l(z_{l-1})|`` (absolute) at which a solve stops.
            It must be above the states' round-off, about ``sqrt(n) * eps`` times their
            largest magnitude (n features per sample, eps the dtype's): a solve whose
            residuals reach that round-off while still above ``tol`` falls back (the
            iteration cannot certify a finer ``tol``, and only the sequential run is within
            it of itself). The default suits float64 states of moderate size; in float32
            pass ``tol=1e-5`` or so.
        max_iters: the most steps before falling back to the layers in sequence (default L:
            the solve is exact by then).

    ``observer``, None by default, may be set to a callable ``observer(kind, t0, t1)``: it is
    called after every step (``kind="iterate"``) and after a sequential fallback
    (``"fallback"``), with :func:`time.perf_counter` times (the pipeline's depth program
    records them as spans).
    """

    def __init__(self, layers: Sequence[nn.Module], tol: float = 1e-10, max_iters: int | None = None) -> None:
        layers = tuple(layers)
        if not layers:
            raise ValueError(f"{type(self).__name__} needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Module):
                raise TypeError(f"{type(self).__name__}: layer {i} is a {type(layer).__name__}, not an nn.Module")
            parts = _affine_parts(layer)
            if parts is not None and parts[0].in_features != parts[0].out_features:
                raise ValueError(
                    f"{type(self).__name__}: layer {i} ({_short(layer)}) maps {parts[0].in_features} features to "
                    f"{parts[0].out_features}; a depth solver needs every layer to map a tensor to one of the "
                    "same shape")
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        if max_iters is not None and (not isinstance(max_iters, int) or max_iters < 0):
            raise ValueError(f"max_iters must be an int >= 0 or None, got {max_iters!r}")
        self.layers = layers
        self.tol = float(tol)
        self.max_iters = len(layers) if max_iters is None else max_iters
        self.observer: Callable[[str, float, float], None] | None = None
        self._plans: dict[bool, list[_Segment]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.layers)} layers, tol={self.tol:g}, max_iters={self.max_iters})"

    def solve(self, x: Tensor, init: Tensor | None = None) -> Solution:
        """Every layer's output for input ``x``, starting from ``init`` (an earlier solution's
        ``states``, shape ``(L, *x.shape)``: a warm start) or, by default, from zeros."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}.solve takes a tensor, got {type(x).__name__}")
        n_layers = len(self.layers)
        batched = x.dim() >= 2
        X = x if batched else x.unsqueeze(0)  # (B, *sample): the unbatched input is one sample
        if init is not None:
            if not isinstance(init, Tensor) or tuple(init.shape) != (n_layers, *x.shape):
                shape = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
                raise ValueError(f"init must be a tensor of shape (L, *x.shape) = {(n_layers, *x.shape)} (an earlier "
                                 f"solution's states), got {shape}")
            init = init.detach().to(device=X.device, dtype=X.dtype).reshape(n_layers, *X.shape)
        plan = self._plan(X)
        params = [segment.params() for segment in plan]
        buffers = [segment.buffers() for segment in plan]
        info: dict[str, Any] = {}
        flat = [t for ts in params for t in ts]
        states = _Solve.apply(self, _Context(plan, [len(ts) for ts in params], buffers, batched), info, X, init,
                              *flat)
        if not batched:
            states = states.reshape(n_layers, *x.shape)
        return Solution(states[-1], states, info["iterations"], info["fallback"])

    # -- the method (subclasses) ---------------------------------------------------------------
    def _step(self, ctx: _Context, p: list[list[Tensor]], Zin: Tensor, aux: list[Any], r: Tensor,
              Z: Tensor, F: Tensor) -> Tensor:
        """The next guess of the states from the residual ``r = F - Z`` at guess ``Z``."""
        raise NotImplementedError

    def _adjoint(self, ctx: _Context, p: list[list[Tensor]], Zin: Tensor, g: Tensor) -> Tensor:
        """``lambda`` (L, B, *sample) solving ``lambda_l = g_l + J_{l+1}^T lambda_{l+1}``."""
        raise NotImplementedError

    # -- shared machinery ------------------------------------------------------------------------
    def _plan(self, X: Tensor) -> list[_Segment]:
        """The layers as segments for inputs like ``X`` (the closed forms need one-dimensional samples)."""
        vector = X.dim() == 2
        plan = self._plans.get(vector)
        if plan is None:
            plan = self._plans[vector] = _segments(self.layers, vector)
        return plan

    def _forward(self, ctx: _Context, p: list[list[Tensor]], X: Tensor,
                 init: Tensor | None) -> tuple[Tensor, int, bool]:
        """``(states, iterations, fallback)``, states ``(L, *X.shape)``; runs without autograd."""
        n_layers, tol, observer = len(self.layers), self.tol, self.observer
        # Two correct evaluations of a layer (batched here, one by one in the sequential run)
        # differ by their rounding, about sqrt(n) * eps of the largest state (n features per
        # sample). A residual below that says only that the iteration reached its own rounding,
        # which may differ from the sequential run's by that much (in a stack that expands, by
        # far more): it certifies ``tol`` only where ``tol`` is above it.
        resolution = math.sqrt(X[0].numel()) * torch.finfo(X.dtype).eps if X.is_floating_point() else 0.0
        # Zeros: a contractive stack's states are small, and z_1 = f_1(x) is exact after the first step anyway.
        Z = init if init is not None else X.new_zeros((n_layers, *X.shape))  # never written in place
        steps = 0
        for k in range(self.max_iters + 1):
            t0 = time.perf_counter()
            Zin = torch.cat((X.unsqueeze(0), Z[:-1]))
            F, aux = self._evaluate(ctx, p, Zin, X)
            r = F - Z
            # The one read-back per step (a GPU synchronises here).
            residual, scale = torch.stack((r.abs().max(), F.abs().max())).tolist()
            if not math.isfinite(residual):
                break
            floor = resolution * scale
            if residual <= max(tol, floor):
                if floor <= tol:
                    return F, steps, False
                break  # converged to round-off above tol: only the sequential run is within tol of itself
            if k == self.max_iters:
                break
            Z = self._step(ctx, p, Zin, aux, r, Z, F)
            steps += 1
            if observer is not None:
                observer("iterate", t0, time.perf_counter())
        t0 = time.perf_counter()
        states = self._sequential(X, ctx.batched)
        if observer is not None:
            observer("fallback", t0, time.perf_counter())
        return states, steps, True

    def _sequential(self, X: Tensor, batched: bool) -> Tensor:
        """The layers run one after another (the fallback): states ``(L, *X.shape)``."""
        z = X if batched else X[0]
        states = []
        for layer in self.layers:
            z = layer(z)
            states.append(z)
        return torch.stack(states).reshape(len(self.layers), *X.shape)

    def _evaluate(self, ctx: _Context, p: list[list[Tensor]], Zin: Tensor, X: Tensor) -> tuple[Tensor, list[Any]]:
        """Every layer on its input (``Zin[l]`` for layer l) at once: outputs, and per segment
        what its Jacobian reuses."""
        outs, aux = [], []
        try:
            for i, segment in enumerate(ctx.plan):
                zin = Zin[segment.start:segment.stop]
                y, a = segment.evaluate(p[i], ctx.buffers[i], zin, ctx.batched)
                if y.shape != zin.shape or y.dtype != zin.dtype:
                    raise _Mismatch(segment.start)
                outs.append(y)
                aux.append(a)
        except Exception as exc:
            self._diagnose(X, ctx.batched)  # a layer that does not map the shape to itself: say which
            if isinstance(exc, _Mismatch):
                raise
            exc.add_note(f"(in {type(self).__name__}, evaluating the layers batched with torch.func.vmap: a depth "
                         "solver needs layers that are pure functions of their input: no .item(), no random numbers, "
                         "no in-place updates of buffers)")
            raise
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), aux

    def _jacobian(self, ctx: _Context, p: list[list[Tensor]], Zin: Tensor, aux: list[Any]) -> Tensor:
        """Every layer's Jacobian at its input, ``(L, B, n, n)`` (a tensor of our own)."""
        parts = [segment.jacobian(p[i], ctx.buffers[i], Zin[segment.start:segment.stop], aux[i], ctx.batched)
                 for i, segment in enumerate(ctx.plan)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _pullback(self, ctx: _Context, p: list[list[Tensor]], Zin: Tensor,
                  params: bool) -> Callable[[Tensor], tuple[Tensor, list[Tensor] | None]]:
        """``pull(lam) -> (gZin, grads)``: the vector-Jacobian products of every layer at its
        input with ``lam[l]``, w.r.t. its input (``gZin[l] = J_l^T lam_l``) and, with
        ``params``, its parameters (flat, as the solve's inputs)."""
        pulls = [segment.pullback(p[i], ctx.buffers[i], Zin[segment.start:segment.stop], params, ctx.batched)
                 for i, segment in enumerate(ctx.plan)]
        plan = ctx.plan

        def pull(lam: Tensor) -> tuple[Tensor, list[Tensor] | None]:
            gz, grads = [], []
            for segment, fn in zip(plan, pulls, strict=True):
                g, gp = fn(lam[segment.start:segment.stop])
                gz.append(g)
                if gp is not None:
                    grads.extend(gp)
            return (gz[0] if len(gz) == 1 else torch.cat(gz)), (grads if params else None)

        return pull

    def _backward(self, ctx: _Context, p: list[list[Tensor]], X: Tensor, states: Tensor, g: Tensor,
                  params: bool) -> tuple[Tensor, list[Tensor] | None]:
        """Gradients w.r.t. ``X`` and (with ``params``) the flat parameters, from ``g``, the
        gradient w.r.t. the states."""
        Zin = torch.cat((X.unsqueeze(0), states[:-1]))
        lam = self._adjoint(ctx, p, Zin, g)
        gz, grads = self._pullback(ctx, p, Zin, params)(lam)
        return gz[0], grads

    def _diagnose(self, X: Tensor, batched: bool) -> None:
        """Raise a ValueError naming the first layer that does not map a tensor like the input
        to one of the same shape and dtype (or fails on it); return if none does."""
        z = X if batched else X[0]
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                try:
                    y = layer(z)
                except Exception as exc:
                    raise ValueError(f"{type(self).__name__}: layer {i} ({_short(layer)}) fails on a tensor of shape "
                                     f"{tuple(z.shape)} ({type(exc).__name__}: {exc}); a depth solver needs every "
                                     "layer to map the input's shape to itself") from exc
                if not isinstance(y, Tensor) or y.shape != z.shape or y.dtype != z.dtype:
                    got = f"shape {tuple(y.shape)} ({y.dtype})" if isinstance(y, Tensor) else type(y).__name__
                    raise ValueError(f"{type(self).__name__}: layer {i} ({_short(layer)}) maps a tensor of shape "
                                     f"{tuple(z.shape)} ({z.dtype}) to {got}; a depth solver needs every layer to "
                                     "map a tensor to one of the same shape and dtype")
                z = y


class DeepPCR(Solver):
    """Newton steps, each solved by parallel cyclic reduction in ``ceil(log2 L)`` rounds of
    batched matmuls; the backward solves the adjoint system with one more reduction. See
    :class:`Solver` for the arguments and :meth:`Solver.solve`.

    On tanh MLPs with PyTorch's default initialisation a cold solve (from zeros) takes a few
    Newton steps whatever L; started from the states of a nearby input (the previous frame of
    a smooth stream), one or two.
    """

    def _step(self, ctx: _Context, p: list[list[Tensor]], Zin: Tensor, aux: list[Any], r: Tensor,
              Z: Tensor, F: Tensor) -> Tensor:
        # Newton: (z + d)_l = f_l(z_{l-1}) + J_l d_{l-1}, i.e. d_l = r_l + J_l d_{l-1}, d_0 = r_0.
        J = self._jacobian(ctx, p, Zin, aux)
        n_layers, B = Z.shape[:2]
        return Z + _reduce(J, r.reshape(n_layers, B, -1)).reshape(Z.shape)

    def _adjoint(self, ctx: _Context, p: list[list[Tensor]], Zin: Tensor, g: Tensor) -> Tensor:
        # lam_l = g_l + J_{l+1}^T lam_{l+1}: the same recurrence run from the last layer, with
        # transposed matrices; C[k] = J[L-k] (C[0] unused), products taken in transposed order.
        _, aux = self._evaluate(ctx, p, Zin, Zin[0])
        J = self._jacobian(ctx, p, Zin, aux)
        n_layers, B = Zin.shape[:2]
        C = torch.cat((J[:1], J[1:].flip(0)))
        lam = _reduce(C, g.reshape(n_layers, B, -1).flip(0).clone(), transposed=True).flip(0)
        return lam.reshape(g.shape)


class Jacobi(Solver):
    """Jacobi sweeps: every state replaced by its layer's output on the previous guess, all
    layers at once (no Jacobians); the backward sweeps the adjoint system the same way, with
    batched vector-Jacobian products. See :class:`Solver` for the arguments and
    :meth:`Solver.solve`. It converges at the rate the stack contracts (error times about
    the Jacobians' norm per sweep), so it stops early on contractive stacks only.
    """

    def _step(self, ctx: _Context, p: list[list[Tensor]], Zin: Tensor, aux: list[Any], r: Tensor,
              Z: Tensor, F: Tensor) -> Tensor:
        return F

    def _adjoint(self, ctx: _Context, p: list[list[Tensor]], Zin: Tensor, g: Tensor) -> Tensor:
        pull = self._pullback(ctx, p, Zin, params=False)
        lam = g
        # Sweep k makes the last k adjoints exact, so L sweeps end it whatever the tolerance.
        for _ in range(len(self.layers)):
            gz, _ = pull(lam)
            new = g.clone()
            new[:-1] += gz[1:]
            change, scale = torch.stack(((new - lam).abs().max(), new.abs().max())).tolist()
            lam = new
            if not change > self.tol * scale:  # also stops on a non-finite change
                break
        return lam


def fuse(layers: Sequence[nn.Module]) -> list[nn.Module]:
    """``layers`` with every ``nn.Linear`` that maps a width to itself and is followed by an
    elementwise activation joined with it into one layer (an ``nn.Sequential`` of the same two
    modules, nothing copied): the same function, with half the states and a closed-form
    Jacobian per pair."""
    layers = list(layers)
    out: list[nn.Module] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if (i + 1 < len(layers) and type(layer) is nn.Linear and layer.in_features == layer.out_features
                and type(layers[i + 1]) in _CLOSED_FORM_ACTIVATIONS and not _hooked(layer)
                and not _hooked(layers[i + 1])):
            out.append(nn.Sequential(layer, layers[i + 1]))
            i += 2
        else:
            out.append(layer)
            i += 1
    return out


# -- the autograd function --------------------------------------------------------------------
@dataclass
class _Context:
    """One solve's fixed inputs: the segments, how many flat tensors each has, their buffers."""

    plan: list[_Segment]
    counts: list[int]
    buffers: list[list[Tensor]]
    batched: bool

    def unflatten(self, flat: Sequence[Tensor]) -> list[list[Tensor]]:
        out, i = [], 0
        for n in self.counts:
            out.append(list(flat[i:i + n]))
            i += n
        return out


class _Solve(torch.autograd.Function):
    """``states = solve(x)`` as one autograd node: forward by the solver's iterations, backward
    by its adjoint solve (not by autograd through the iterations)."""

    @staticmethod
    def forward(fctx: Any, solver: Solver, ctx: _Context, info: dict[str, Any], X: Tensor, init: Tensor | None,
                *flat: Tensor) -> Tensor:
        states, info["iterations"], info["fallback"] = solver._forward(ctx, ctx.unflatten(flat), X, init)
        fctx.solver, fctx.ctx = solver, ctx
        fctx.save_for_backward(X, states, *flat)
        return states

    @staticmethod
    @once_differentiable
    def backward(fctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        X, states, *flat = fctx.saved_tensors
        want = fctx.needs_input_grad
        params = any(want[5:])
        gx, grads = fctx.solver._backward(fctx.ctx, fctx.ctx.unflatten(flat), X, states, g, params)
        grads = grads if grads is not None else [None] * len(flat)
        return (None, None, None, gx if want[3] else None, None,
                *(gr if w else None for gr, w in zip(grads, want[5:], strict=True)))


# -- the reduction ---------------------------------------------------------------------------
def _reduce(J: Tensor, r: Tensor, transposed: bool = False) -> Tensor:
    """Solve ``d_0 = r_0``, ``d_l = r_l + J_l d_{l-1}`` (or, ``transposed``, ``d_l = r_l +
    J_l^T d_{l-1}``) for ``d`` (L, B, n), with ``J`` (L, B, n, n), by parallel cyclic reduction
    in ``ceil(log2 L)`` rounds; overwrites and returns ``r``, overwrites ``J`` (J[0] unused).

    After round s, ``r_l`` holds the recurrence unrolled over the 2s steps back from l (to the
    start where l < 2s) and ``J_l`` the product of those 2s matrices. Only rows ``l >= 2s`` of
    ``J`` are composed in round s: a shorter row reaches the start, where ``d_{-1} = 0``, and is
    never read again (about L fewer products per round)."""
    n_layers = r.shape[0]
    s = 1
    while s < n_layers:
        # Each right-hand side is computed in full (from the old values) before it is written.
        if transposed:
            r[s:] += (r[:-s].unsqueeze(-2) @ J[s:]).squeeze(-2)
            if 2 * s < n_layers:
                J[2 * s:] = J[s:n_layers - s] @ J[2 * s:]
        else:
            r[s:] += (J[s:] @ r[:-s].unsqueeze(-1)).squeeze(-1)
            if 2 * s < n_layers:
                J[2 * s:] = J[2 * s:] @ J[s:n_layers - s]
        s *= 2
    return r


# -- segments: how runs of layers are evaluated, differentiated and pulled back ------------------
class _Mismatch(ValueError):
    """A layer's output has another shape or dtype than its input (``_diagnose`` names it)."""

    def __init__(self, start: int) -> None:
        super().__init__(f"a layer from layer {start} on maps its input to another shape or dtype")


class _Segment:
    """Layers ``start:stop`` evaluated together. Tensors ``Z`` are the segment's inputs,
    ``(m, B, *sample)``; ``p`` its parameters (stacked: differentiable inputs of the solve),
    ``b`` its buffers (stacked)."""

    start: int
    stop: int

    def params(self) -> list[Tensor]:
        raise NotImplementedError

    def buffers(self) -> list[Tensor]:
        return []

    def evaluate(self, p: list[Tensor], b: list[Tensor], Z: Tensor, batched: bool) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def jacobian(self, p: list[Tensor], b: list[Tensor], Z: Tensor, aux: Any, batched: bool) -> Tensor:
        """``(m, B, n, n)``, a new tensor (the reduction overwrites it)."""
        raise NotImplementedError

    def pullback(self, p: list[Tensor], b: list[Tensor], Z: Tensor, params: bool,
                 batched: bool) -> Callable[[Tensor], tuple[Tensor, list[Tensor] | None]]:
        raise NotImplementedError


class _Affine(_Segment):
    """``act(W z + b)`` for each layer (an ``nn.Linear(d, d)``, alone or with one elementwise
    activation, the same for all): batched matmuls over the stacked weights; the Jacobian
    ``diag(act'(a)) W`` in closed form (``act'`` by its formula for the common activations,
    else by one autograd pass, exact for an elementwise function)."""

    def __init__(self, start: int, linears: list[nn.Linear], act: nn.Module | None) -> None:
        self.start, self.stop = start, start + len(linears)
        self.linears, self.act = linears, act
        self.bias = linears[0].bias is not None
        self.inplace = bool(getattr(act, "inplace", False))

    def params(self) -> list[Tensor]:
        out = [_stack([linear.weight for linear in self.linears])]
        if self.bias:
            out.append(_stack([linear.bias for linear in self.linears]))
        return out

    def _act(self, a: Tensor) -> Tensor:
        if self.act is None:
            return a
        return self.act(a.clone() if self.inplace else a)  # ``a`` is kept for the derivative

    def _slope(self, a: Tensor, y: Tensor | None = None) -> Tensor:
        """``act'(a)``, elementwise (``y``: ``act(a)`` where already computed)."""
        derivative = _DERIVATIVES.get(type(self.act))
        if derivative is not None:
            return derivative(self.act, a, self._act(a) if y is None else y)
        # Elementwise: the gradient of sum(act(a)) is act'(a).
        with torch.enable_grad():
            a = a.detach().requires_grad_()
            return torch.autograd.grad(self._act(a).sum(), a)[0]

    def _pre(self, p: list[Tensor], Z: Tensor) -> Tensor:
        W = p[0]
        return torch.baddbmm(p[1].unsqueeze(1), Z, W.mT) if self.bias else torch.bmm(Z, W.mT)

    def evaluate(self, p: list[Tensor], b: list[Tensor], Z: Tensor, batched: bool) -> tuple[Tensor, Any]:
        a = self._pre(p, Z)
        y = self._act(a)
        return y, (a, y)

    def jacobian(self, p: list[Tensor], b: list[Tensor], Z: Tensor, aux: Any, batched: bool) -> Tensor:
        W = p[0].unsqueeze(1)
        if self.act is None:  # the same for every sample; a copy, as the reduction overwrites it
            return W.expand(-1, Z.shape[1], -1, -1).clone()
        return self._slope(*aux).unsqueeze(-1) * W

    def pullback(self, p: list[Tensor], b: list[Tensor], Z: Tensor, params: bool,
                 batched: bool) -> Callable[[Tensor], tuple[Tensor, list[Tensor] | None]]:
        W = p[0]
        slope = None if self.act is None else self._slope(self._pre(p, Z))
        bias = self.bias

        def pull(lam: Tensor) -> tuple[Tensor, list[Tensor] | None]:
            ga = lam if slope is None else lam * slope
            gz = torch.bmm(ga, W)
            if not params:
                return gz, None
            grads = [torch.bmm(ga.mT, Z)]
            if bias:
                grads.append(ga.sum(1))
            return gz, grads

        return pull


class _Functional(_Segment):
    """Layers of one structure, evaluated with ``torch.func``: ``vmap`` over the layers of
    ``functional_call`` of the first with each layer's parameters and buffers; Jacobians by
    ``vmap`` over the batch of ``jacrev`` (per sample: the layer is called on a batch of one)."""

    def __init__(self, start: int, modules: list[nn.Module]) -> None:
        self.start, self.stop = start, start + len(modules)
        self.modules = modules
        self.base = modules[0]
        self.names = [n for n, _ in self.base.named_parameters()]
        self.buffer_names = [n for n, _ in self.base.named_buffers()]

    def params(self) -> list[Tensor]:
        tensors = [dict(m.named_parameters()) for m in self.modules]
        return [_stack([t[name] for t in tensors]) for name in self.names]

    def buffers(self) -> list[Tensor]:
        tensors = [dict(m.named_buffers()) for m in self.modules]
        return [_stack([t[name] for t in tensors]).detach() for name in self.buffer_names]

    def _call(self, p: Sequence[Tensor], b: Sequence[Tensor], z: Tensor) -> Tensor:
        state = dict(zip(self.names, p, strict=True))
        state.update(zip(self.buffer_names, b, strict=True))
        return functional_call(self.base, state, (z,))

    def _layerwise(self, batched: bool) -> Callable[[Sequence[Tensor], Sequence[Tensor], Tensor], Tensor]:
        """All the segment's layers on their inputs ``Z`` (m, B, *sample) at once."""
        call = self._call if batched else (lambda p, b, z: self._call(p, b, z[0]).unsqueeze(0))
        return vmap(call)

    def evaluate(self, p: list[Tensor], b: list[Tensor], Z: Tensor, batched: bool) -> tuple[Tensor, Any]:
        return self._layerwise(batched)(tuple(p), tuple(b), Z), None

    def jacobian(self, p: list[Tensor], b: list[Tensor], Z: Tensor, aux: Any, batched: bool) -> Tensor:
        def one(p_: Sequence[Tensor], b_: Sequence[Tensor], z: Tensor) -> Tensor:  # a sample of a batched call
            return self._call(p_, b_, z.unsqueeze(0)).squeeze(0)

        sample = one if batched else self._call
        per_layer = vmap(jacrev(sample, argnums=2), in_dims=(None, None, 0))  # over the batch
        J = vmap(per_layer)(tuple(p), tuple(b), Z)                              # over the layers
        m, B = Z.shape[:2]
        n = Z[0, 0].numel()
        return J.reshape(m, B, n, n)

    def pullback(self, p: list[Tensor], b: list[Tensor], Z: Tensor, params: bool,
                 batched: bool) -> Callable[[Tensor], tuple[Tensor, list[Tensor] | None]]:
        layerwise, buffers = self._layerwise(batched), tuple(b)
        if params:
            fn = vjp(lambda p_, z: layerwise(p_, buffers, z), tuple(p), Z)[1]

            def pull(lam: Tensor) -> tuple[Tensor, list[Tensor] | None]:
                gp, gz = fn(lam)
                return gz, list(gp)
        else:
            weights = tuple(p)
            fn = vjp(lambda z: layerwise(weights, buffers, z), Z)[1]

            def pull(lam: Tensor) -> tuple[Tensor, list[Tensor] | None]:
                return fn(lam)[0], None
        return pull


def _segments(layers: Sequence[nn.Module], vector: bool) -> list[_Segment]:
    """``layers`` as runs of consecutive layers that are evaluated together: closed-form
    affine layers (for one-dimensional samples, ``vector``) with the same activation, bias,
    dtype and device; other layers of one structure."""
    groups: list[tuple[Any, int, list[nn.Module]]] = []
    for i, layer in enumerate(layers):
        parts = _affine_parts(layer) if vector else None
        if parts is not None:
            linear, act = parts
            w = linear.weight
            key: Any = ("affine", _activation_key(act), linear.bias is not None, w.dtype, w.device, w.shape)
        else:
            structure = _structure(layer)
            key = ("functional", structure) if structure is not None else ("alone", i)
        if groups and groups[-1][0] == key:
            groups[-1][2].append(layer)
        else:
            groups.append((key, i, [layer]))
    segments: list[_Segment] = []
    for key, start, members in groups:
        if key[0] == "affine":
            pairs = [parts for parts in map(_affine_parts, members) if parts is not None]  # all: grouped as affine
            segments.append(_Affine(start, [lin for lin, _ in pairs], pairs[0][1]))
        else:
            segments.append(_Functional(start, members))
    return segments


def _affine_parts(layer: nn.Module) -> tuple[nn.Linear, nn.Module | None] | None:
    """``(linear, activation or None)`` for a layer with a closed-form Jacobian: an
    ``nn.Linear``, or an ``nn.Sequential`` of an ``nn.Linear`` and at most one elementwise
    activation, without hooks; None for any other."""
    if type(layer) is nn.Linear:
        return (layer, None) if not _hooked(layer) else None
    if type(layer) is nn.Sequential and 1 <= len(layer) <= 2 and type(layer[0]) is nn.Linear and not _hooked(layer):
        if len(layer) == 1:
            return (layer[0], None) if not _hooked(layer[0]) else None
        act = layer[1]
        if type(act) in _CLOSED_FORM_ACTIVATIONS and not _hooked(layer[0]) and not _hooked(act):
            return layer[0], act
    return None


# act'(a) from a and y = act(a), as PyTorch's own backward computes it (ReLU: 0 at 0).
_DERIVATIVES: dict[type, Callable[[Any, Tensor, Tensor], Tensor]] = {
    nn.Identity: lambda act, a, y: torch.ones_like(a),
    nn.Tanh: lambda act, a, y: 1 - y * y,
    nn.Sigmoid: lambda act, a, y: y * (1 - y),
    nn.ReLU: lambda act, a, y: (a > 0).to(a.dtype),
    nn.LeakyReLU: lambda act, a, y: torch.where(a > 0, 1.0, act.negative_slope).to(a.dtype),
}


def _activation_key(act: nn.Module | None) -> Any:
    return None if act is None else (type(act), act.extra_repr())


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


_SIMPLE = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _structure(layer: nn.Module) -> Any:
    """A hashable description of what ``layer`` computes apart from its tensors: every
    submodule's type and plain attributes, the parameters' and buffers' names, shapes and
    dtypes. Layers with equal descriptions compute the same function of their tensors, so
    one ``functional_call`` serves them all. None where that cannot be told (hooks, attributes
    that are not plain values)."""
    parts = []
    for name, sub in layer.named_modules():
        if _hooked(sub):
            return None
        attrs: list[tuple[str, Any]] = []
        for key, value in vars(sub).items():
            if key.startswith("_"):
                continue
            if isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value):
                attrs.append((key, value))
            elif isinstance(value, _SIMPLE):
                attrs.append((key, value))
            else:
                return None
        parts.append((name, type(sub), tuple(sorted(attrs, key=lambda kv: kv[0]))))
    tensors = tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in layer.named_parameters())
    buffers = tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in layer.named_buffers())
    return tuple(parts), tensors, buffers


def _stack(tensors: list[Tensor]) -> Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _short(layer: nn.Module) -> str:
    text = " ".join(repr(layer).split())
    return text if len(text) <= 120 else text[:117] + "..."
