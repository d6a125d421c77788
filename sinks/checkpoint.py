"""The checkpoint sink: the pipeline's state written atomically every N frames."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from partime_async.checkpoint import save_atomic_async
from partime_async.core.frame import Frame

from .base import Sink


class Checkpoint(Sink):
    """Writes ``pipe``'s state (weights, per-stage optimiser state, stream position) every
    ``every`` frames, atomically (temporary file + rename: a crash never leaves a partial
    file). Resume with::

        state = partime_async.checkpoint.load(path)
        pipe.load_state_dict(state)           # then stream from state["position"]

    With learning, each checkpoint is a consistent cut taken by the stages as frame t passes
    them (see :mod:`partime_async.pipeline.cuts`); without, it is the model and the position.
    The pipeline takes cuts for this sink from when it is opened (a graph opens its sinks
    before the first frame) until it is closed; several sinks may checkpoint one pipeline,
    each at its own period. Its channel always blocks (a drop policy is refused): a frame it
    dropped could carry a cut.

    ``path``'s file name may hold ``{seq}``, the frame of the cut (``str.format`` syntax, a
    format spec allowed: ``ckpt-{seq:06d}.pt``), to keep one file per checkpoint; without it
    the file is replaced each time. Only the file name is a template, ``{seq}`` its one field
    and ``{{`` / ``}}`` its literal braces; the folders are used as written (a folder named
    ``exp{1}`` is fine; one holding ``{seq}`` is refused). A file name that is not such a
    template raises ``ValueError`` here, not at the first cut.
    """

    name = "checkpoint"

    def __init__(self, pipe: Any, path: str | Path, *, every: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.policy != "block":
            raise ValueError(f"a Checkpoint sink sees every frame (one that it dropped could carry a cut, and that "
                             f"checkpoint would be lost), so its policy is 'block', not {self.policy!r}; give it a "
                             f"larger capacity to let it fall behind for a while")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.pipe = pipe
        self.path = str(path)
        self._folder = Path(path).parent
        self._name = _file_name_template(Path(path))
        self.every = every
        self.saved: list[Path] = []
        self._asked = False

    def path_of(self, seq: int) -> Path:
        """The file of the checkpoint cut at frame ``seq``."""
        return self._folder / self._name.format(seq=seq)

    async def open(self) -> None:
        if not self._asked:
            self.pipe.cuts.ask(self.every)
            self._asked = True

    async def write(self, frame: Frame) -> None:
        if not self._asked:
            raise RuntimeError("this Checkpoint sink is not open: the pipeline takes cuts only for open checkpoint "
                               "sinks; run it in a graph (pa.run(source >> pipe >> sink)) or `await sink.open()` "
                               "before the frames flow")
        cut = frame.checkpoint
        if cut is None or self.every not in cut.periods:  # none, or another sink's cut
            return
        state = await cut.state()
        self.saved.append(await save_atomic_async(state, self.path_of(frame.seq)))

    async def close(self) -> None:
        if self._asked:
            self.pipe.cuts.release(self.every)
            self._asked = False


def _file_name_template(path: Path) -> str:
    """``path``'s file name, checked to be a template whose only field is ``{seq}``."""
    name = path.name
    if "{seq" in str(path.parent):  # it once made a folder per cut: say so rather than write one file
        raise ValueError(f"Checkpoint path {str(path)!r}: only the file name may hold {{seq}}, not a folder "
                         "(write e.g. 'runs/ckpt-{seq}.pt')")
    try:
        name.format(seq=0)
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"Checkpoint path {str(path)!r}: its file name {name!r} is not a valid template "
                         f"({type(exc).__name__}: {exc}); its only field is {{seq}}, the frame of the cut "
                         f"(e.g. 'ckpt-{{seq}}.pt' or 'ckpt-{{seq:06d}}.pt'); write a literal brace as '{{{{' or "
                         f"'}}}}'") from None
    return name
