"""Evaluation and inspection of trained SAEs: `megasae eval`, `megasae inspect`, and the held-out check
that training runs every --eval-every steps."""

from megasae.eval.config import EvalConfig, InspectConfig
from megasae.eval.evaluate import evaluate, run_eval
from megasae.eval.held_out import HeldOutEval
from megasae.eval.inspect import run_inspect

__all__ = ["EvalConfig", "HeldOutEval", "InspectConfig", "evaluate", "run_eval", "run_inspect"]
