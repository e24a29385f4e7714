"""What a finished run leaves for a person: curves.png beside metrics.jsonl, and a closing summary."""

from __future__ import annotations

import io
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megasae.files import write_atomic

PANELS = (("loss", "loss"), ("fvu", "FVU"), ("l0", "L0"), ("dead_pct", "dead latents (%)"))


def read_metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def per_target(records: list[dict], key: str, lone: str) -> dict[str, list[float]]:
    """Each SAE's values of `key` over the records: metrics.jsonl has `key/<module path>` when a run trains
    several SAEs, a plain `key` (shown as `lone`) when it trains one."""
    targets = sorted(name.removeprefix("fvu/") for name in records[-1] if name.startswith("fvu/"))
    if not targets:
        return {lone: [r[key] for r in records]}
    return {t: [r[f"{key}/{t}"] for r in records] for t in targets}


def write_curves(output_dir: Path, lone: str) -> Path | None:
    """curves.png: loss, FVU, L0 and dead % against tokens, one line per SAE."""
    records = read_metrics(output_dir)
    if not records:
        return None
    fig = Figure(figsize=(10, 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    tokens = [r["tokens"] for r in records]
    for ax, (key, label) in zip(fig.subplots(2, 2).flat, PANELS):
        for target, values in per_target(records, key, lone).items():
            ax.plot(tokens, values, label=target)
        ax.set(xlabel="tokens", ylabel=label)
        if key in ("loss", "fvu"):
            ax.set_yscale("log")
        ax.legend(loc="best", fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return write_atomic(output_dir / "curves.png", buffer.getvalue())


def summary(output_dir: Path, lone: str, model: str | None, eval_data: str | None,
            adapters: list[Path]) -> str:
    """A few lines per SAE from the last logged step, where the adapters are, and the commands to run next."""
    records = read_metrics(output_dir)
    if not records:
        return f"no metrics were logged in {output_dir}"
    last = records[-1]
    where = adapters[0] if len(adapters) == 1 else f"{output_dir}/<SAE>"
    lines = [f"trained {last['tokens']:,} tokens in {last['step']} steps; the adapter is in {where}"]
    columns = {key: per_target(records, key, lone) for key in ("fvu", "l0", "dead_pct", "trained_tokens")}
    for target in columns["fvu"]:
        fvu, l0, dead, counted = (
            columns[key][target][-1] for key in ("fvu", "l0", "dead_pct", "trained_tokens")
        )
        lines.append(f"  {target}: FVU {fvu:.3f}, L0 {l0:.1f}, dead {dead:.1f}% (last step, on the "
                     f"{counted:,.0f} tokens the mask kept)")
    model_flag = f" --model {model}" if model else ""
    data_flag = f" --data {eval_data}" if eval_data else ""
    commands = [f"megasae eval --adapter {adapter}{model_flag}{data_flag} --output-dir {adapter / 'eval'}"
                for adapter in adapters]
    lines.append(f"curves: {output_dir / 'curves.png'}; next:" + (
        f" {commands[0]}" if len(commands) == 1 else "".join(f"\n  {command}" for command in commands)
    ))
    return "\n".join(lines)
