"""`python -m onnxzip`: the same command line as `onnxzip`."""

from onnxzip.cli import main

if __name__ == "__main__":
    main()
