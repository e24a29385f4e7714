"""The peers' own Pythons: the git-ignored environments that hold SAELens and sparsify, and how a bench runs
a script in one of them without mixing it with megasae's."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VENVS = {"saelens": ".venv-saelens", "sparsify": ".venv-sparsify"}


def peer_python(peer: str) -> str | None:
    """The peer's environment's Python in the repository or the working directory, if there is one."""
    for root in (REPO_ROOT, Path.cwd()):
        python = root / VENVS[peer] / "bin" / "python"
        if python.is_file():
            return str(python)
    return None


def runner_command(python: str, runner: Path, *args: str) -> list[str]:
    """The command that runs `runner` in `python`'s environment from any working directory: the path made
    absolute but not resolved (which would leave a venv's symlinked Python), and -I, which keeps the
    runner's folder off sys.path (there bench/kernels.py would shadow the `kernels` package transformers
    imports) and PYTHONPATH out."""
    return [os.path.abspath(python), "-I", str(runner), *args]
