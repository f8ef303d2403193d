"""Checkpoint -> verified ONNX file with metadata -> TensorRT engine with a sidecar."""
