"""Benchmark excitation pullbacks against the vanilla gradient; see excitation_pullbacks.benchmark."""

import sys

from excitation_pullbacks.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
