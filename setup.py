"""Packaging for onnxzip. The version lives in onnxzip/__init__.py; it is read as text so that installing
does not import the package (and its dependencies)."""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "onnxzip", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.MULTILINE)
    if not match:
        raise RuntimeError("__version__ not found in onnxzip/__init__.py")
    return match.group(1)


def read_readme():
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


setup(
    name="onnxzip",
    version=read_version(),
    description="Merge two ONNX models trained on disjoint tasks into one multi-task model, without training (ZipIt!)",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["onnxzip", "onnxzip.*"]),
    python_requires=">=3.9",
    install_requires=[
        "onnx",
        # onnxruntime-gpu runs on CPU too. Never install it next to plain onnxruntime: both own the
        # `onnxruntime` import folder and break each other.
        "onnxruntime-gpu",
        "onnx-graphsurgeon",
        "numpy",
        "click",
        "scipy",
        # `--fp16`: its float16 converter. It requires only numpy, onnx, packaging and protobuf (never onnxruntime,
        # which would break onnxruntime-gpu); it is imported only when --fp16 is asked for.
        "onnxconverter-common",
    ],
    extras_require={
        "test": [
            "pytest",
            "hypothesis",
            # Triton's ModelConfig schema (tritonclient.grpc.model_config_pb2), to parse the configs `deploy` writes
            "tritonclient[grpc]",
            # the second runtime (`eval --runtime openvino`, the OpenVINO parity tests)
            "openvino",
            # `merge --ray`: the sharded calibration pass is tested on a local two-worker cluster
            "ray",
        ],
        "openvino": ["openvino"],
        # `merge --ray`: the calibration pass sharded over a Ray cluster's workers
        "distributed": ["ray"],
    },
    entry_points={"console_scripts": ["onnxzip=onnxzip.cli:main"]},
)
