"""onnxzip: merge ONNX models trained on different tasks into one multi-task model, without training (ZipIt!)."""

__version__ = "0.1.0"

__all__ = ["merge", "merge_models", "MergeOptions", "MergeResult", "__version__"]


def __getattr__(name):
    # The API is imported on first use (PEP 562): `onnxzip --help` and `--version` need none of numpy, onnx or
    # onnxruntime, which take seconds to import.
    if name in ("merge", "merge_models", "MergeOptions", "MergeResult"):
        import importlib

        module = importlib.import_module(".pipeline", __name__)
        for attr in ("merge", "merge_models", "MergeOptions", "MergeResult"):
            globals()[attr] = getattr(module, attr)
        return globals()[name]
    raise AttributeError(f"module 'onnxzip' has no attribute {name!r}")
