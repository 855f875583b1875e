"""atheris entry point (``scripts/fuzz TARGET [atheris/libFuzzer options]``).

TARGET is one of frame, hello, handshake, rest (``tests.reliability.fuzz_targets``). Example:
``scripts/fuzz frame -atheris_runs=200000``. A crash (any exception other than the project's
own refusals) stops the run with the input saved by libFuzzer.
"""

from __future__ import annotations

import sys


def main() -> None:
    import atheris  # type: ignore[import-untyped]

    with atheris.instrument_imports():
        from tests.reliability.fuzz_targets import TARGETS
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        print(f"usage: scripts/fuzz {{{','.join(TARGETS)}}} [libFuzzer options]")
        sys.exit(2)
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
