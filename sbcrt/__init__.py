"""sbcrt: a small, torch-free runtime for image classifiers (SBCFormer, EfficientNet-Lite0) on SBCs.

`import sbcrt` stays light: heavy modules (onnxruntime, OpenCV, torch for export) load on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# onnxruntime >= 1.29 sends usage telemetry from Linux too, unless this is set before it initialises. A board in a
# barn should not phone home (nor wait on DNS for it); a user who wants it sets ORT_DISABLE_TELEMETRY=0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

if TYPE_CHECKING:
    from sbcrt.runtime.classifier import Classifier, Result

__all__ = ["Classifier", "Result", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: the Classifier pulls in onnxruntime, which a CLI `--help` or the export stage never needs.
    if name in ("Classifier", "Result"):
        from sbcrt.runtime import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'sbcrt' has no attribute {name!r}")
