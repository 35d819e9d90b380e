"""The .ncnn model file: one self-describing file holding pnnx's ncnn conversion of an exported ONNX model.

    magic      b"SBCRT-NCNN\\n"
    length     8 bytes, little-endian: the header's size
    digest     32 bytes: SHA-256 of the header
    header     UTF-8 JSON: {"format", "metadata" (the ONNX file's metadata_props, same keys and JSON values),
               "input": {"name", "shape"}, "output": {"name", "shape"}, "parts": [{"name", "size", "sha256"}],
               "source": {"size", "sha256"} (the ONNX file it was converted from), "converter"}
    parts      the ncnn param text, then the weights (.bin), back to back, in the header's order

Everything is checked before ncnn sees a byte: the header against its digest, each part against its own. ncnn
parses param text and weights without bounds checks of its own, so a damaged file must never reach it.
Torch-free and ncnn-free: the export writes it, the runtime reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sbcrt.errors import UsageError

MAGIC = b"SBCRT-NCNN\n"
FORMAT = 1
SUFFIX = ".ncnn"
DIGEST_SIZE = 32
MAX_HEADER = 64 << 20  # labels of a huge head fit many times over; a damaged length must not allocate gigabytes
PARTS = ("param", "bin")


@dataclass
class NcnnModel:
    """An ncnn model with the sbcrt metadata and tensor signature that travel with it."""

    param: bytes
    weights: bytes
    metadata: dict[str, str]
    input_name: str
    input_shape: list[int]
    output_name: str
    output_shape: list[int]
    source_size: int = 0
    source_sha256: str = ""
    converter: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        parts = {"param": self.param, "bin": self.weights}
        header = {
            "format": FORMAT,
            "metadata": dict(self.metadata),
            "input": {"name": self.input_name, "shape": list(self.input_shape)},
            "output": {"name": self.output_name, "shape": list(self.output_shape)},
            "parts": [
                {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for name, data in parts.items()
            ],
            "source": {"size": self.source_size, "sha256": self.source_sha256},
            "converter": self.converter,
            **self.extra,
        }
        text = json.dumps(header, sort_keys=True).encode()
        return b"".join([MAGIC, struct.pack("<Q", len(text)), hashlib.sha256(text).digest(), text, *parts.values()])

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> NcnnModel:
        """Parse and verify; any damage is a UsageError naming `where` (one line)."""

        def bad(why: str) -> UsageError:
            return UsageError(f"model {where}: damaged ncnn model file ({why}); export it again")

        if not data.startswith(MAGIC):
            raise UsageError(
                f"model {where}: not an sbcrt ncnn model file (sbcrt's export writes one with the ncnn engine)"
            )
        offset = len(MAGIC)
        if len(data) < offset + 8 + DIGEST_SIZE:
            raise bad("truncated header")
        (length,) = struct.unpack_from("<Q", data, offset)
        offset += 8
        digest = data[offset : offset + DIGEST_SIZE]
        offset += DIGEST_SIZE
        if length > MAX_HEADER or offset + length > len(data):
            raise bad("truncated header")
        text = data[offset : offset + length]
        offset += length
        if hashlib.sha256(text).digest() != digest:
            raise bad("its header does not match its digest")
        try:
            header = json.loads(text)
            if header.get("format") != FORMAT:
                raise UsageError(
                    f"model {where}: ncnn model format {header.get('format')!r}, this sbcrt reads format {FORMAT}"
                )
            parts = {}
            for part in header["parts"]:
                size = int(part["size"])
                chunk = data[offset : offset + size]
                if len(chunk) != size:
                    raise bad(f"its {part['name']} part is truncated")
                if hashlib.sha256(chunk).hexdigest() != part["sha256"]:
                    raise bad(f"its {part['name']} part does not match its digest")
                parts[part["name"]] = chunk
                offset += size
            if offset != len(data):
                raise bad(f"{len(data) - offset} bytes after the last part")
            if set(parts) != set(PARTS):
                raise bad(f"parts {sorted(parts)}, expected {list(PARTS)}")
            metadata = header["metadata"]
            if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
                raise bad("its metadata is not a map of strings")
            known = {"format", "metadata", "input", "output", "parts", "source", "converter"}
            return cls(
                param=parts["param"],
                weights=parts["bin"],
                metadata=metadata,
                input_name=str(header["input"]["name"]),
                input_shape=[int(d) for d in header["input"]["shape"]],
                output_name=str(header["output"]["name"]),
                output_shape=[int(d) for d in header["output"]["shape"]],
                source_size=int(header["source"]["size"]),
                source_sha256=str(header["source"]["sha256"]),
                converter=str(header.get("converter", "")),
                extra={k: v for k, v in header.items() if k not in known},
            )
        except UsageError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # The digest matched, so the writer made this header: an sbcrt version that wrote something else.
            raise bad(f"unreadable header: {type(exc).__name__} {exc}") from None

    @classmethod
    def read(cls, path: Path) -> NcnnModel:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise UsageError(f"model {path}: no such file") from None
        except IsADirectoryError:
            raise UsageError(f"model {path}: not a file") from None
        except OSError as exc:
            raise UsageError(f"model {path}: cannot read it ({exc.strerror or exc})") from None
        return cls.from_bytes(data, str(path))


def companion(model: Path) -> Path:
    """The .ncnn file that goes with an .onnx file (same folder, same stem)."""
    return model.with_suffix(SUFFIX)


def source_digest(path: Path) -> tuple[int, str]:
    """(size, SHA-256) of the ONNX file an ncnn model was converted from."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return size, digest.hexdigest()
