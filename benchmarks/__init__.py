"""Benchmarks: each module runs as a script (`python benchmarks/latency.py ...`) or as a module
(`python -m benchmarks.latency ...`). Shared infrastructure is in benchmarks/common.py; what they share with the
tests (the photos' location, the export cache key, the loopback camera and broker) in tests/support/."""
