"""Benchmark flashattn against its peers: the same as `flashattn bench` (see `--help`).

    python benchmarks/bench_attention.py --quick --json bench.json --plot bench.png
    python benchmarks/bench_attention.py --device cpu --seqlens 8192
"""
import sys

from flashattn.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
