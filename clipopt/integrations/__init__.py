"""clipopt inside training frameworks.

``check_double_clipping`` needs no framework; the callbacks import theirs on first use.
"""

from __future__ import annotations

from ._double import check_double_clipping, framework_clipping

__all__ = ["check_double_clipping", "framework_clipping"]
