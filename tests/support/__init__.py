"""What the tests and the benchmarks share (both may import it; it imports neither): a loopback MJPEG camera,
generated videos and probe models (watch.py), a real Mosquitto broker (mqtt_broker.py), seeded checkpoints
(export.py, needs torch)."""
