"""The data `sbcrt watch` passes around, in one place: what a source delivers (Frame), what the loop makes of it
(Record, with its Timing), what a rule firing produces (Event), and what the loop needs of a classifier.

Sources produce Frames; the loop turns each into a Record; rules turn Records into Events; sinks receive all three
(sinks.py). Nothing here imports numpy, OpenCV or onnxruntime: `sbcrt --help` stays fast.

The per-frame record, as `Record.to_json()` writes it (one line of --jsonl, the MQTT result payload):

    {"frame": 1234, "time": "2025-05-01T06:12:03.481+02:00", "source": "rtsp://cam-pen3/stream1",
     "topk": [{"index": 3, "label": "fox", "prob": 0.82}, ...],
     "events": ["fox,coyote>=0.6"],          (only on a frame where rules fired)
     "timing_ms": {"capture": .., "preprocess": .., "inference": .., "postprocess": .., "total": ..}}

timing_ms, by source:
- live (camera, stream, picamera2): capture = the frame's age when the loop took it (time since the capture
  thread received it); total = the frame's age when its record was ready: the end-to-end latency.
- video file: capture = reading and decoding the frame (and grabbing the frames subsampling skipped).
- folder/glob image: capture = reading and decoding the file (EXIF orientation applied, as `sbcrt classify`).
preprocess/inference/postprocess are the classifier's stages (postprocess adds building the record and
evaluating the rules); total is wall time, so the stages add up to it within microseconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sbcrt.runtime.classifier import Prediction, Result


@dataclass
class Frame:
    """One frame to classify: pixels (live sources, video) or an image file (folders and globs)."""

    number: int  # the source's frame counter: position in a video, capture count of a live source
    wall_time: float  # time.time() when the frame was obtained (the record's "time")
    ready_at: float  # time.perf_counter() when it was obtained (live sources: the start of its age)
    media_time: float  # seconds on the source's own clock: video position, else time.monotonic()
    source: str  # the record's "source": the source's name, or the image file for folders
    image: Any = None  # HxWx3 uint8 BGR numpy array
    path: Path | None = None  # an image file (decoded by the classifier, EXIF-aware)
    capture_ms: float | None = None  # what reading this frame cost on the loop's thread (video files)

    @property
    def time_text(self) -> str:
        """wall_time as the record's "time": local ISO 8601 with milliseconds and the UTC offset."""
        return datetime.fromtimestamp(self.wall_time).astimezone().isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Timing:
    """The record's timing_ms, in ms (see the module docstring for what each stage means per source)."""

    capture: float
    preprocess: float
    inference: float
    postprocess: float
    total: float

    @classmethod
    def from_stages(
        cls, stages: Mapping[str, float], *, capture_ms: float | None, extra_postprocess_ms: float, total_ms: float
    ) -> Timing:
        """The record's stages from the classifier's (decode, preprocess, inference, postprocess).

        capture_ms None: the classifier decoded the file itself, so its "decode" is the capture. Otherwise the
        frame was already pixels and the classifier's "decode" is only its pass-through: it counts as preprocess.
        """
        if capture_ms is None:
            capture_ms, preprocess_ms = stages["decode"], stages["preprocess"]
        else:
            preprocess_ms = stages["decode"] + stages["preprocess"]
        return cls(
            capture=capture_ms,
            preprocess=preprocess_ms,
            inference=stages["inference"],
            postprocess=stages["postprocess"] + extra_postprocess_ms,
            total=total_ms,
        )

    def to_json(self) -> dict[str, float]:
        stages = ("capture", "preprocess", "inference", "postprocess", "total")
        return {stage: round(getattr(self, stage), 3) for stage in stages}


@dataclass
class Record:
    """What the loop made of one frame. `timing` is set once the record is complete (after the rules ran)."""

    frame: int
    time: str
    source: str
    topk: list[Prediction]
    events: list[str] = field(default_factory=list)  # the rules that fired on this frame
    timing: Timing | None = None

    def topk_json(self) -> list[dict[str, Any]]:
        return [{"index": p.index, "label": p.label, "prob": p.prob} for p in self.topk]

    def to_json(self) -> dict[str, Any]:
        """The JSON record (key order as documented above)."""
        out: dict[str, Any] = {"frame": self.frame, "time": self.time, "source": self.source, "topk": self.topk_json()}
        if self.events:
            out["events"] = list(self.events)
        if self.timing is not None:
            out["timing_ms"] = self.timing.to_json()
        return out


@dataclass
class Event:
    """A rule that fired on a frame: the best-scoring of its labels, and the record of that frame.

    `snapshot` is the file the frame was saved to (--save), set by the saver before other sinks see the event;
    None without --save or when saving failed."""

    rule: str
    label: str
    prob: float
    frame: int
    time: str
    source: str
    record: Record | None = field(repr=False, default=None)
    snapshot: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "label": self.label,
            "prob": self.prob,
            "frame": self.frame,
            "time": self.time,
            "source": self.source,
        }


class FrameClassifier(Protocol):
    """What the loop needs of a classifier (sbcrt.Classifier is one)."""

    labels: Sequence[str]

    def classify(self, image: Path, *, top_k: int = 5, source: str | None = None) -> Result: ...

    def classify_frame(self, frame: Any, *, bgr: bool = True, top_k: int = 5) -> Result: ...
