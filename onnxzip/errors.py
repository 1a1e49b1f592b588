"""One family of errors. Every message names the file, node, tensor or option at fault and what to do.

Each class carries the process exit code that the CLI returns for it (documented in README.md).
"""


class OnnxzipError(Exception):
    """Base of every error onnxzip raises on purpose."""

    exit_code = 1


class UsageError(OnnxzipError):
    """An option value is out of range or contradicts another option."""

    exit_code = 2


class ModelError(OnnxzipError):
    """A model file is missing, unreadable, corrupt or fails the ONNX checker."""

    exit_code = 3


class MismatchError(OnnxzipError):
    """The two models do not have the same structure and shapes (heads aside)."""

    exit_code = 4


class CalibrationDataError(OnnxzipError):
    """Calibration data is missing, unreadable, empty, non-finite or of the wrong shape or dtype."""

    exit_code = 5


class UnsupportedModelError(OnnxzipError):
    """With --strict: the graph holds something onnxzip cannot merge, or nothing at all can be zipped."""

    exit_code = 6


class VerificationError(OnnxzipError):
    """The merged model failed verification (not finite, or computes nothing like the originals)."""

    exit_code = 7


class OutputError(OnnxzipError):
    """The output path exists (and --force was not given) or cannot be written."""

    exit_code = 8


class InstallError(OnnxzipError):
    """A package onnxzip needs for this command (onnxruntime, OpenVINO, onnxconverter-common) is missing or broken."""

    exit_code = 9
