"""`sbcrt watch`: classify a camera, stream, video file or watched folder continuously, unattended.

One job per module:
- types.py: the data passed around (Frame, Record and its JSON schema, Timing, Event, what a classifier must do).
- sources.py: the source argument -> a FrameSource (live capture thread keeping only the newest frame, video file
  reader, folder/glob watcher with settle detection).
- loop.py: the processing loop (fps cap, timing, reconnect with backoff, stall watchdog, clean stop).
- events.py: `--when "fox,coyote>=0.6"` rules with debounce and cool-down.
- stats.py: rolling latency percentiles and fps counters in bounded memory.
- sinks.py: where results go, and the Sink interface every sink implements (record/event/stats/close): the JSONL
  writer, the event frame saver, the stderr stats line, the heartbeat file; mqtt.py: the MQTT sink.
- urls.py: URLs without their passwords, for logs and records.

The package imports neither OpenCV nor onnxruntime at module level: `sbcrt --help` stays fast.
"""
