"""onnxzip: merge two ONNX models trained on different tasks into one multi-task model, without training (ZipIt!)."""

__version__ = "0.1.0"
