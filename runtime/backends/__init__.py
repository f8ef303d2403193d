"""Backends that evaluate the ε-network: ONNX Runtime and TensorRT."""
