"""`sbcrt train`: a new classifier head on a base model's features, fitted on the board (numpy + onnxruntime).

Torch-free and onnx-free like the rest of the runtime: the trained file is written by sbcrt/train/onnx_wire.py.
"""
