"""The torch-free runtime: model files in, predictions out (onnxruntime, numpy, Pillow, optional OpenCV).

Never imports sbcrt.export, sbcrt.models or the CLI (tests/test_layout.py checks it).
"""
