"""Command-line inputs -> the image files to classify: files as given, folders' images, glob patterns.

An argument that yields nothing (a missing path, an empty folder, a pattern with no match) becomes a failed
input with its reason, so the run reports it and goes on, like a file that fails to decode.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

# What a folder scan picks up; a file named explicitly is tried whatever its extension.
IMAGE_EXTENSIONS = frozenset(
    [
        ".jpg",
        ".jpeg",
        ".jpe",
        ".png",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".jp2",
        ".ico",
        ".tga",
    ]
)


@dataclass(frozen=True)
class Source:
    """One input: a file to classify, or (with `error`) an argument that gave nothing to classify."""

    name: str
    error: str | None = None


def expand_sources(arguments: list[str]) -> list[Source]:
    """Expand files, folders (their images, sorted, not recursive) and globs (`**` recurses), in order.

    A file reached twice is classified once.
    """
    seen: set[Path] = set()
    sources: list[Source] = []

    def add(path: Path, name: str) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            sources.append(Source(name))

    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            images = folder_images(path)
            if not images:
                sources.append(Source(argument, "no image files in this folder"))
            for image in images:
                add(image, str(image))
        elif path.exists():
            add(path, argument)
        elif glob.has_magic(argument):
            matches = sorted(glob.glob(argument, recursive=True))
            files = []
            for match in matches:
                files.extend(folder_images(Path(match)) if Path(match).is_dir() else [Path(match)])
            if not files:
                sources.append(Source(argument, "no files match this pattern"))
            for file in files:
                add(file, str(file))
        else:
            sources.append(Source(argument, "no such file or folder"))
    return sources


def folder_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )
