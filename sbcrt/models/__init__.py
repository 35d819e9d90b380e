"""PyTorch definitions of the supported architectures and their registry (export stage only)."""
