"""What both front-ends, ``ClippedOptimizer`` and ``Attachment``, show of their engine."""

from __future__ import annotations

from typing import Any

from ._engine import Clipper, NonfinitePolicy
from ._protocol import ClipStats, ClipStrategy

__all__ = ["ClipperView"]


class ClipperView:
    """Read-only views of the :class:`clipopt.Clipper` a front-end steps with."""

    clipper: Clipper

    @property
    def strategy(self) -> ClipStrategy:
        """The clipping strategy."""
        return self.clipper.strategy

    @property
    def nonfinite(self) -> NonfinitePolicy:
        """The non-finite policy."""
        return self.clipper.nonfinite

    @property
    def process_group(self) -> Any:
        """The process group over which plain-tensor gradients are sharded, or None."""
        return self.clipper.process_group

    @property
    def last_stats(self) -> ClipStats | None:
        """:class:`clipopt.ClipStats` of the last step that had gradients, or None."""
        return self.clipper.last_stats

    def counts(self) -> dict[str, int]:
        """Return the running counts as plain ints (see :meth:`clipopt.Clipper.counts`).

        The counts are saved in the state dict, so they survive a resume.
        """
        return self.clipper.counts()
