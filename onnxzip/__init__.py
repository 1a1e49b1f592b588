"""onnxzip: merge ONNX models trained on different tasks into one multi-task model, without training (ZipIt!)."""

__version__ = "0.1.0"

from .merge import MergeOptions, MergeResult, merge, merge_models  # noqa: E402  (the API needs __version__ above)

__all__ = ["merge", "merge_models", "MergeOptions", "MergeResult", "__version__"]
