"""The benchmarking harness: `megasae bench <name>`; each benchmark prints a table and writes JSON."""

from collections.abc import Callable


def _kernels(args: list[str]) -> None:
    from megasae.bench.kernels import main

    main(args)


def _train(args: list[str]) -> None:
    from megasae.bench.train import main

    main(args)


def _parallel(args: list[str]) -> None:
    from megasae.bench.parallel import main

    main(args)


def _quality(args: list[str]) -> None:
    from megasae.bench.quality import main

    main(args)


def _interop(args: list[str]) -> None:
    from megasae.bench.interop import main

    main(args)


def _sweep(args: list[str]) -> None:
    from megasae.bench.sweep import main

    main(args)


BENCHMARKS: dict[str, Callable[[list[str]], None]] = {
    "kernels": _kernels,
    "train": _train,
    "parallel": _parallel,
    "interop": _interop,
    "sweep": _sweep,
    "quality": _quality,
}
