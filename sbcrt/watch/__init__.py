"""`sbcrt watch`: classify a camera, stream, video file or watched folder continuously, unattended.

One job per module:
- sources.py: the source argument -> a FrameSource (live capture thread keeping only the newest frame, video file
  reader, folder/glob watcher with settle detection).
- loop.py: the processing loop (fps cap, timing, reconnect with backoff, stall watchdog, clean stop).
- events.py: `--when "fox,coyote>=0.6"` rules with debounce and cool-down.
- stats.py: rolling latency percentiles and fps counters in bounded memory.
- sinks.py: where results go. Every sink receives the per-frame record, the events and the periodic stats through
  the same three methods (JSONL writer, event frame saver, the stderr stats line; MQTT plugs in here later).

The package imports neither OpenCV nor onnxruntime at module level: `sbcrt --help` stays fast.
"""
