"""Messages between ranks: a fixed head, the layout when it changes, then the payload's bytes.

One message is one flat ``uint8`` tensor, so that one ``send`` carries it (a separate header
message costs a round trip per frame)::

    head    8 x 8 bytes: kind, stage, seq, total bytes, layout bytes, flags, busy seconds
            (a float64), reserved
    layout  JSON, only when it differs from the previous message's on this link: the payload's
            pytree structure (torch's own treespec) and, per leaf, what it is ("t": a tensor
            with its dtype and shape; "i"/"f"/"b": a Python int, float or bool; "n": None;
            "s": a string, "x": one of the registered sentinels, both held in the layout)
    body    the leaves in order: each tensor's bytes, each int/float/bool as 8 bytes; every
            piece starts on a 16-byte boundary (decoded tensors view the buffer in place)

A payload whose leaves are not all of these (an object of the user's in the meta of a state,
say) travels as ``torch.save`` bytes and is read back with ``weights_only=True``: no peer
can make this process unpickle arbitrary objects. Shapes and structure may change from
message to message: the layout travels again when they do, and not otherwise.
"""
from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

HEAD = struct.Struct("<6qdq")  # kind, stage, seq, total, layout bytes, flags, busy seconds, reserved
HEAD_BYTES = 64
_ALIGN = 16
_SCALARS = {int: "i", float: "f", bool: "b"}


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(slots=True)
class Message:
    """One decoded message: its ``kind`` (see :mod:`partime_async.ranks.link`), the ``stage``
    and frame ``seq`` it is about, its ``payload``, ``flags``, and the ``busy`` seconds the
    sender's work on it took (replies)."""

    kind: int
    stage: int
    seq: int
    payload: Any
    flags: int = 0
    busy: float = 0.0


BATCH = 30
"""The kind of a message that holds several messages, one after another (see :meth:`Encoder.encode_batch`)."""


class Encoder:
    """Turns messages into flat tensors for one direction of one link (it remembers the last
    layout it sent, so only changes travel)."""

    def __init__(self, sentinels: Mapping[str, object]) -> None:
        self._sentinel_names = {id(obj): name for name, obj in sentinels.items()}
        self._last: tuple[Any, list[Any], bool] | None = None

    def encode(self, kind: int, stage: int, seq: int, payload: Any, *, flags: int = 0,
               busy: float = 0.0) -> torch.Tensor:
        leaves, spec = pytree.tree_flatten(payload)
        described = [self._meta(leaf) for leaf in leaves]
        pickled = any(meta is None for meta in described)
        if pickled:
            leaves, spec, metas = self._pickled(payload)
        else:
            metas = [meta for meta in described if meta is not None]
        layout = b""
        if self._last is None or self._last[1] != metas or self._last[0] != spec or self._last[2] != pickled:
            try:
                named = pytree.treespec_dumps(spec)
            except (TypeError, ValueError, NotImplementedError):  # a node type torch cannot name
                pickled = True
                leaves, spec, metas = self._pickled(payload)
                named = pytree.treespec_dumps(spec)
            layout = json.dumps({"spec": named, "leaves": metas, "pickled": pickled}).encode()
            self._last = spec, metas, pickled
        sizes = [_nbytes(leaf, meta) for leaf, meta in zip(leaves, metas, strict=True)]
        total = HEAD_BYTES + _aligned(len(layout)) + sum(_aligned(n) for n in sizes)
        out = torch.empty(total, dtype=torch.uint8)
        buf = out.numpy().data
        HEAD.pack_into(buf, 0, kind, stage, seq, total, len(layout), flags, busy, 0)
        at = HEAD_BYTES
        buf[at:at + len(layout)] = memoryview(layout)
        at += _aligned(len(layout))
        for leaf, meta, n in zip(leaves, metas, sizes, strict=True):
            tag = meta[0]
            if tag == "t":
                if n:
                    flat = leaf.detach().cpu().resolve_conj().resolve_neg().contiguous().view(-1)
                    out[at:at + n].copy_(flat.view(torch.uint8))
            elif tag == "i" or tag == "b":
                struct.pack_into("<q", buf, at, int(leaf))
            elif tag == "f":
                struct.pack_into("<d", buf, at, leaf)
            at += _aligned(n)
        return out

    def encode_batch(self, messages: list[torch.Tensor]) -> torch.Tensor:
        """One message of kind :data:`BATCH` holding ``messages`` (each from :meth:`encode`, in
        order: a layout one of them carries holds for those after it)."""
        head = torch.empty(HEAD_BYTES, dtype=torch.uint8)
        total = HEAD_BYTES + sum(m.numel() for m in messages)
        HEAD.pack_into(head.numpy().data, 0, BATCH, -1, len(messages), total, 0, 0, 0.0, 0)
        return torch.cat([head, *messages])

    def _meta(self, leaf: Any) -> list[Any] | None:
        if isinstance(leaf, torch.Tensor):
            if leaf.layout != torch.strided or leaf.is_quantized:
                return None
            return ["t", str(leaf.dtype).removeprefix("torch."), list(leaf.shape)]
        if leaf is None:
            return ["n"]
        tag = _SCALARS.get(type(leaf))
        if tag == "i" and not -2**63 <= leaf < 2**63:
            return None  # beyond 8 bytes: pickled
        if tag is not None:
            return [tag]
        if isinstance(leaf, str):
            return ["s", leaf]
        name = self._sentinel_names.get(id(leaf))
        return ["x", name] if name is not None else None

    @staticmethod
    def _pickled(payload: Any) -> tuple[list[Any], Any, list[Any]]:
        data = io.BytesIO()
        torch.save(payload, data)
        raw = torch.frombuffer(bytearray(data.getbuffer()), dtype=torch.uint8)
        leaves, spec = pytree.tree_flatten(raw)
        return leaves, spec, [["t", "uint8", [raw.numel()]]]


class Decoder:
    """Reads the messages of one direction of one link, in order (it keeps the layout the
    last message that carried one said). A message that cannot be read (a pickled payload
    that ``weights_only`` refuses) becomes ``undecodable(kind, stage, seq, error)`` where that
    is given, so that one frame fails and not the link."""

    def __init__(self, sentinels: Mapping[str, object],
                 undecodable: Callable[[int, int, int, Exception], Message] | None = None) -> None:
        self._sentinels = dict(sentinels)
        self._undecodable = undecodable
        self._layout: tuple[Any, list[Any], bool] | None = None

    @staticmethod
    def head(buffer: torch.Tensor) -> tuple[int, int]:
        """The kind and total size of the message whose first bytes are ``buffer``."""
        kind, _, _, total, *_ = HEAD.unpack_from(buffer.numpy().data, 0)
        return kind, total

    def decode(self, buffer: torch.Tensor) -> Message:
        """The message in ``buffer`` (give each message its own: its tensors view it, or, for a
        message much smaller than the buffer, are copied out). A :data:`BATCH` gives the
        messages it holds, in order, as its payload."""
        buf = buffer.numpy().data
        kind, stage, seq, total, n_layout, flags, busy, _ = HEAD.unpack_from(buf, 0)
        if kind == BATCH:
            messages, at = [], HEAD_BYTES
            for _ in range(seq):
                size = HEAD.unpack_from(buf, at)[3]
                messages.append(self.decode(buffer[at:at + size]))
                at += size
            return Message(BATCH, stage, seq, messages)
        try:
            return self._decode(buffer, buf, kind, stage, seq, total, n_layout, flags, busy)
        except Exception as exc:
            if self._undecodable is None:
                raise
            return self._undecodable(kind, stage, seq, exc)

    def _decode(self, buffer: torch.Tensor, buf: memoryview, kind: int, stage: int, seq: int, total: int,
                n_layout: int, flags: int, busy: float) -> Message:
        # A small message in a big receive buffer: its tensors are copied out, so that an
        # output kept for long does not keep the whole buffer alive.
        copy = buffer.untyped_storage().nbytes() > 2 * total
        at = HEAD_BYTES
        if n_layout:
            layout = json.loads(bytes(buf[at:at + n_layout]))
            self._layout = pytree.treespec_loads(layout["spec"]), layout["leaves"], layout["pickled"]
            at += _aligned(n_layout)
        if self._layout is None:
            raise RuntimeError("a message came without the layout it needs: the link is out of step")
        spec, metas, pickled = self._layout
        leaves: list[Any] = []
        for meta in metas:
            tag = meta[0]
            n = _nbytes(None, meta)
            if tag == "t":
                dtype = getattr(torch, meta[1])
                t = buffer[at:at + n].view(dtype).view(meta[2]) if n else torch.empty(meta[2], dtype=dtype)
                leaves.append(t.clone() if copy and n else t)
            elif tag == "i":
                leaves.append(struct.unpack_from("<q", buf, at)[0])
            elif tag == "b":
                leaves.append(bool(struct.unpack_from("<q", buf, at)[0]))
            elif tag == "f":
                leaves.append(struct.unpack_from("<d", buf, at)[0])
            elif tag == "n":
                leaves.append(None)
            elif tag == "s":
                leaves.append(meta[1])
            else:
                leaves.append(self._sentinels[meta[1]])
            at += _aligned(n)
        payload = pytree.tree_unflatten(leaves, spec)
        if pickled:
            payload = torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=True)
        return Message(kind, stage, seq, payload, flags, busy)


def _nbytes(leaf: Any, meta: list[Any]) -> int:
    tag = meta[0]
    if tag == "t":
        dtype = getattr(torch, meta[1])
        numel = 1
        for d in meta[2]:
            numel *= d
        return numel * dtype.itemsize
    return 8 if tag in ("i", "f", "b") else 0
