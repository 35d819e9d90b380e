"""Export stage: PyTorch checkpoints to fused, verified, self-describing ONNX (needs torch)."""
