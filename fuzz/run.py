#!/usr/bin/env python3
"""Run one fuzz target under atheris (coverage-guided): ``fuzz/run.py TARGET [libFuzzer
flags]``. scripts/fuzz runs every target for a bounded time."""

import sys

import atheris

with atheris.instrument_imports(include=["kvmm"]):
    import targets

if __name__ == "__main__":
    target = targets.TARGETS[sys.argv[1]]

    def one_input(data: bytes) -> None:
        target(data)  # its operation count is for the replay test, not libFuzzer

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    atheris.Fuzz()
