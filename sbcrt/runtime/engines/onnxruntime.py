"""The onnxruntime engine: the tuned, cached session of sbcrt/runtime/session.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sbcrt.runtime.engines import TensorSpec
from sbcrt.runtime.session import create_session


class OnnxruntimeEngine:
    name = "onnxruntime"

    def __init__(
        self,
        path: Path,
        *,
        threads: int | None = None,
        spin: bool = True,
        cache_dir: str | os.PathLike | None | bool = None,
        providers: list[str] | None = None,
    ) -> None:
        self.path = path
        self.session, self.info = create_session(
            path, threads=threads, spin=spin, cache_dir=cache_dir, providers=providers
        )
        self.inputs = [TensorSpec(i.name, i.type, list(i.shape)) for i in self.session.get_inputs()]
        self.outputs = [TensorSpec(o.name, o.type, list(o.shape)) for o in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, tensor: np.ndarray) -> np.ndarray:
        return self.session.run([self.outputs[0].name], {self.inputs[0].name: tensor})[0]
