"""pitstop.inference: TensorRT and ONNX Runtime loops (see issue: inference)."""
