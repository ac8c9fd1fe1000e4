"""FP8 accuracy report (flashattn.bench.fp8_accuracy): relative RMS error of FP8 attention vs float64,
next to bf16's, on normal data and data with outliers, with and without the Hadamard rotation.

    PYTHONPATH=src python benchmarks/fp8_accuracy.py                      # GPU: the Triton kernels
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/fp8_accuracy.py   # CPU: PyTorch path + interpreter
Options: python benchmarks/fp8_accuracy.py --help
"""
import sys

from flashattn.bench.fp8_accuracy import main

if __name__ == "__main__":
    sys.exit(main())
