"""clipopt inside training frameworks.

- :func:`check_double_clipping` (no framework needed) warns when a framework clips too.
- ``clipopt.integrations.lightning.ClipoptCallback``: PyTorch Lightning.
- ``clipopt.integrations.huggingface.ClipoptCallback`` and ``install(trainer)``: the
  Hugging Face ``Trainer``.

The framework modules import their framework when they are imported, not before:
``import clipopt`` never imports Lightning or transformers.
"""

from __future__ import annotations

from ._double import check_double_clipping, framework_clipping

__all__ = ["check_double_clipping", "framework_clipping"]
