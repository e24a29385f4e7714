"""`megasae bench train`: end-to-end training throughput and held-out FVU, megasae next to sparsify.

What it does, in one process (plus one subprocess per sparsify variant):

1. Builds megasae's real `Trainer` for the built-in default (SmolLM2-135M-Instruct, model.layers.15,
   k 32, 8x expansion = 4608 latents, 8 x 256 = 2048 tokens a step) and draws the token batches ONCE
   from its own batch stream: `--steps` batches to train on, then `--eval-batches` held-out batches.
   The trainer's stream is replaced by the pre-drawn training batches, so `Trainer.train_step` (what
   `megasae train` runs) trains on exactly the tokens the other trainers get.
2. When a Python with `eai-sparsify` is available (`--sparsify-python`), hands the same input_ids to
   `sparsify_runner.py` in that interpreter (the two environments never mix), once per variant:
   "shipped" (sparsify as users get it: every position trains) and "masked" (sparsify's trainer on
   megasae's token mask: no position 0, no special tokens, no norm outliers). Same k, latents,
   hookpoint, batch, Adam, learning rate, schedule and AuxK settings.
3. Runs everything in interleaved rounds of `--round-steps` steps (megasae, each sparsify variant,
   and a host-only forward), rotating the order every round, so load from other processes on the
   machine hits every trainer alike. Only one of them computes at a time.
4. Evaluates every trained SAE with ONE function (`heldout_fvu`, plain PyTorch) on the same held-out
   activations, on two token sets: megasae's default mask and all positions.

Timing: tokens/s counts every input token (batch x ctx_len) and leaves out the first step of each
trainer (initialisation, first-touch allocation). The host/SAE split times the host's truncated
forward alone (the plain host, stopped by a hook on the target module) on training batches:
SAE time = megasae step - host forward.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

from megasae.bench.output import report
from megasae.bench.peers import peer_python, runner_command

RUNNER = Path(__file__).with_name("sparsify_runner.py")
VARIANTS = ("shipped", "masked")
VARIANT_LABELS = {"shipped": "sparsify, as shipped", "masked": "sparsify, megasae's mask"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="megasae bench train",
        description=(
            "End-to-end SAE training tokens/s and held-out FVU of megasae, side by side with sparsify."
        ),
    )
    p.add_argument("--steps", type=int, default=64, help="optimizer steps each trainer runs (default 64)")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches for FVU (default 4)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every trainer (default 2)")
    p.add_argument("--round-steps", type=int, default=8,
                   help="steps each trainer runs before the next one takes a turn (default 8)")
    p.add_argument("--host-batches", type=int, default=1,
                   help="batches per round timed through the host alone, truncated and full (default 1)")
    p.add_argument("--sparsify-python", default=peer_python("sparsify"),
                   help="a Python with eai-sparsify installed (default .venv-sparsify/bin/python if present)")
    p.add_argument("--sparsify-variants", default=",".join(VARIANTS),
                   help="comma-separated: shipped (all positions), masked (megasae's mask); default both")
    p.add_argument("--skip-sparsify", action="store_true", help="benchmark megasae alone")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--model", default=None,
                   help="host model directory or .gguf (default SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="builtin", help="'builtin' or Parquet file/directory (default builtin)")
    p.add_argument("--target", default="model.layers.15", help="target module (default model.layers.15)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion-factor", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--ctx-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="learning-rate warmup of both trainers (default 0: then both schedules are the same "
                        "linear decay; sparsify's warmup starts at lr 0, megasae's at lr/warmup)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-cache", action="store_true",
                   help="also write an activation cache of the training tokens (megasae cache; its write "
                        "time and size are reported) and train from it, in the same rounds")
    p.add_argument("--compile", action="store_true",
                   help="megasae train --compile: compiled host layers for megasae and its host-only ceiling")
    args = p.parse_args(argv)
    for name in ("steps", "eval_batches", "threads", "round_steps", "batch_size", "ctx_len", "k"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.host_batches < 0 or args.warmup_steps < 0:
        p.error("--host-batches and --warmup-steps must be >= 0.")
    variants = [v for v in args.sparsify_variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--sparsify-variants: unknown {bad}; valid: {', '.join(VARIANTS)}.")
    args.sparsify_variants = variants
    if args.skip_sparsify:
        args.sparsify_variants = []
    return args


# -- shared measurement helpers ----------------------------------------------------------------


class _Stop(Exception):
    pass


def truncated_forward(host: torch.nn.Module, target: str, inputs: dict[str, Tensor]) -> Tensor:
    """The target module's output, running the host only up to it (a hook stops the forward)."""
    captured: list[Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = host.get_submodule(target).register_forward_hook(hook)
    try:
        host(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def megasae_mask(acts: Tensor, token_mask: Tensor, outlier_factor: float | None) -> Tensor:
    """megasae's default training mask of one batch: the data's token mask (no position 0, no
    special tokens) less tokens whose activation norm exceeds outlier_factor x the median norm of
    the kept tokens (what the SAE layer applies during training)."""
    keep = token_mask.reshape(-1).clone()
    if outlier_factor is not None and keep.any():
        norms = acts.detach().reshape(-1, acts.shape[-1]).float().norm(dim=-1)
        keep &= norms <= outlier_factor * norms[keep].median()
    return keep


@torch.no_grad()
def heldout_fvu(weights: dict[str, Tensor], rows: Tensor, k: int, chunk: int = 4096) -> dict[str, float]:
    """FVU = sum((x - x_hat)^2) / sum((x - mean(x))^2) over all `rows`, for a TopK SAE given as
    W_enc [M, d], b_enc [M], W_dec [M, d], b_dec [d]: x_hat = relu(topk_k(W_enc (x - b_dec) + b_enc))
    W_dec + b_dec. Plain dense PyTorch, the same for every SAE. Also the fraction of latents that
    fire (a positive value) on some row."""
    W_enc, b_enc = weights["W_enc"].float(), weights["b_enc"].float()
    W_dec, b_dec = weights["W_dec"].float(), weights["b_dec"].float()
    x_all = rows.float()
    total = (x_all.double() - x_all.double().mean(0)).pow(2).sum()
    residual = torch.zeros((), dtype=torch.float64)
    fired = torch.zeros(W_enc.shape[0], dtype=torch.bool)
    for x in x_all.split(chunk):
        pre = (x - b_dec) @ W_enc.T + b_enc
        values, indices = pre.topk(k, dim=-1)
        values = values.relu()
        fired[indices[values > 0]] = True
        decoded = torch.nn.functional.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
        x_hat = decoded + b_dec
        residual += (x.double() - x_hat.double()).pow(2).sum()
    return {"fvu": float(residual / total), "latents_fired_pct": 100 * float(fired.float().mean()),
            "tokens": int(x_all.shape[0])}


class Clock:
    """Wall-clock and CPU seconds (this process, all threads) of repeated timed calls."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self):
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall.append(time.perf_counter() - self._t)
        self.cpu.append(time.process_time() - self._c)


def timing(wall: list[float], cpu: list[float], tokens_per_step: int, skip: int = 1) -> dict:
    """Throughput of timed steps, leaving out the first `skip` (initialisation): tokens/s from the
    median step (robust to bursts of load from other processes) and from the mean, and tokens per
    CPU-second of the process (less sensitive to sharing the cores than wall time)."""
    w = wall[skip:] if len(wall) > skip else wall
    c = cpu[skip:] if len(cpu) > skip else cpu
    step_s, cpu_s = statistics.median(w), statistics.median(c) if c else None
    return {
        "tokens_per_s": tokens_per_step / step_s, "step_s": step_s,
        "tokens_per_s_mean": tokens_per_step * len(w) / sum(w),
        "cpu_s": cpu_s, "tokens_per_cpu_s": tokens_per_step / cpu_s if cpu_s else None,
        "step_times": wall, "step_cpu": cpu,
    }


# -- the sparsify subprocesses -------------------------------------------------------------------


@dataclass
class SparsifyRun:
    variant: str
    proc: subprocess.Popen
    log_path: Path
    weights_path: Path
    info: dict = field(default_factory=dict)
    round_walls: list[float] = field(default_factory=list)
    result: dict | None = None
    error: str | None = None

    def read(self, expected: tuple[str, ...]) -> dict:
        line = self.proc.stdout.readline()
        kind, _, payload = line.strip().partition(" ")
        if kind not in expected:
            if not line:  # the runner exited: let it finish writing its log
                self.proc.wait(timeout=30)
            raise RuntimeError(
                f"sparsify ({self.variant}) sent {line.strip()!r} where {'/'.join(expected)} was expected; "
                f"the last lines of its log {self.log_path}:\n{self.log_tail()}"
            )
        return {"kind": kind, **json.loads(payload or "{}")}

    def go(self, expected: tuple[str, ...]) -> dict:
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()
        return self.read(expected)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_sparsify(python: str, variant: str, work: Path, model_dir: str, hookpoint: str, tokens_path: Path,
                   args: argparse.Namespace, lr: float, num_latents: int, cfg) -> SparsifyRun:
    run_dir = work / f"sparsify-{variant}"
    run_dir.mkdir()
    spec = {
        "variant": variant, "model": model_dir, "hookpoint": hookpoint, "tokens": str(tokens_path),
        "k": args.k, "num_latents": num_latents, "batch_size": args.batch_size, "lr": lr,
        "warmup_steps": args.warmup_steps, "auxk_alpha": cfg.auxk_alpha,
        "dead_tokens_threshold": cfg.dead_tokens_threshold, "outlier_factor": cfg.outlier_factor,
        "threads": args.threads, "round_steps": args.round_steps, "work_dir": str(run_dir),
        "weights_out": str(run_dir / "sae.pt"),
    }
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               SPARSIFY_DISABLE_TRITON="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    log_path = run_dir / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(runner_command(python, RUNNER, str(spec_path)), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=run_dir)
    return SparsifyRun(variant, proc, log_path, run_dir / "sae.pt")


# -- the benchmark ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    from megasae import ops
    from megasae.models import compile_blocks, load_host_model
    from megasae.peft import sae_layers
    from megasae.train import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    tokens_per_step = args.batch_size * args.ctx_len
    with tempfile.TemporaryDirectory(prefix="megasae-bench-train-") as tmp:
        work = Path(tmp)
        cfg = TrainConfig(
            model=args.model, data=args.data, target_modules=(args.target,), k=args.k,
            expansion_factor=args.expansion_factor, max_tokens=args.steps * tokens_per_step,
            batch_tokens=tokens_per_step, micro_batch_size=args.batch_size, ctx_len=args.ctx_len,
            warmup_steps=args.warmup_steps, wandb_mode="disabled", output_dir=work / "megasae",
            device="cpu", seed=args.seed, compile=args.compile,
        )
        trainer = Trainer(cfg)
        (num_latents,) = set(trainer.num_latents.values())
        (lr,) = trainer.lr.values()
        # The token batches, drawn once: training batches first, held-out batches after them.
        batches = [next(trainer.batches) for _ in range(args.steps + args.eval_batches)]
        train_batches, heldout = batches[:args.steps], batches[args.steps:]
        trainer.batches = iter(train_batches)

        host, _ = load_host_model(args.model, device="cpu")
        model_dir = host.config._name_or_path
        hookpoint = args.target.removeprefix(f"{host.base_model_prefix}.")

        # Held-out activations and masks (this also warms the host up).
        eval_rows_masked, eval_rows_all = [], []
        for batch in heldout:
            with torch.no_grad():
                acts = truncated_forward(host, args.target, batch.inputs)
            rows = acts.reshape(-1, acts.shape[-1])
            eval_rows_masked.append(rows[megasae_mask(acts, batch.token_mask, cfg.outlier_factor)])
            eval_rows_all.append(rows[batch.inputs["attention_mask"].reshape(-1).bool()])
        eval_rows_masked, eval_rows_all = torch.cat(eval_rows_masked), torch.cat(eval_rows_all)
        # megasae's ceiling is the host as megasae runs it; the full forward stays sparsify's (eager).
        ceiling_host = host
        if args.compile:
            ceiling_host = copy.deepcopy(host)
            compile_blocks(ceiling_host)
            with torch.no_grad():
                # Compiles outside the timings.
                truncated_forward(ceiling_host, args.target, heldout[0].inputs)

        cached, cache_facts = None, None
        if args.from_cache:
            cached, cache_facts = trainer_from_cache(args, cfg, train_batches, work)

        all_runs: list[SparsifyRun] = []
        sparsify_error = None
        if args.sparsify_variants:
            if args.sparsify_python is None or not Path(args.sparsify_python).is_file():
                wanted = args.sparsify_python or ".venv-sparsify/bin/python"
                sparsify_error = (f"no Python with eai-sparsify ({wanted} not found); "
                                  "pass --sparsify-python or --skip-sparsify")
            else:
                tokens_path = work / "tokens.pt"
                torch.save({"input_ids": torch.cat([b.inputs["input_ids"] for b in train_batches]),
                            "token_mask": torch.cat([b.token_mask for b in train_batches])}, tokens_path)
                for variant in args.sparsify_variants:
                    all_runs.append(start_sparsify(args.sparsify_python, variant, work, model_dir, hookpoint,
                                               tokens_path, args, lr, num_latents, cfg))
        try:
            for r in all_runs:
                try:
                    r.info = r.read(("READY",))
                except RuntimeError as err:
                    r.error = str(err)
                    r.stop()
                    print(f"warning: {err}", file=sys.stderr)
            runs = [r for r in all_runs if r.error is None]

            megasae_clock, host_clock, full_clock, cache_clock = Clock(), Clock(), Clock(), Clock()
            train_fvu: list[float] = []
            trained_tokens = cache_trained_tokens = 0
            base_model = host.get_submodule(host.base_model_prefix)
            num_rounds = -(-args.steps // args.round_steps)
            for rnd in range(num_rounds):
                first, last = rnd * args.round_steps, min((rnd + 1) * args.round_steps, args.steps)

                def megasae_round():
                    nonlocal trained_tokens
                    for _ in range(first, last):
                        with megasae_clock:
                            metrics, _ = trainer.train_step()
                        (sums,) = metrics.sums.values()
                        train_fvu.append(sums["fvu"])
                        trained_tokens += int(sums["tokens"])

                def cache_round():
                    nonlocal cache_trained_tokens
                    for _ in range(rnd * cached.steps // num_rounds, (rnd + 1) * cached.steps // num_rounds):
                        with cache_clock:
                            metrics, _ = cached.train_step()
                        cache_trained_tokens += int(next(iter(metrics.sums.values()))["tokens"])

                def host_round():
                    for batch in train_batches[first:first + args.host_batches]:
                        with host_clock:
                            truncated_forward(ceiling_host, args.target, batch.inputs)
                        with full_clock:
                            base_model(**batch.inputs)

                def sparsify_round(r: SparsifyRun):
                    def step():
                        if r.error is not None:
                            return
                        t0 = time.perf_counter()
                        try:
                            msg = r.go(("ROUND", "END") if last == args.steps else ("ROUND",))
                        except RuntimeError as err:
                            r.error = str(err)
                            r.stop()
                            print(f"warning: {err}", file=sys.stderr)
                            return
                        r.round_walls.append(time.perf_counter() - t0)
                        if msg["kind"] == "END":
                            r.result = msg
                    return step

                turns = [megasae_round, host_round] + [sparsify_round(r) for r in runs]
                if cached is not None:
                    turns.append(cache_round)
                shift = rnd % len(turns)
                for turn in turns[shift:] + turns[:shift]:
                    turn()
                print(f"round {rnd + 1}/{num_rounds}: megasae {megasae_clock.wall[-1]:.2f} s/step"
                      + "".join(f", sparsify {r.variant} {r.round_walls[-1] / (last - first):.2f} s/step"
                                for r in runs if r.error is None and r.round_walls),
                      file=sys.stderr, flush=True)

            for r in runs:
                if r.error is None and r.result is None:
                    r.error = "it ended without reporting its results"
                if r.error is None:
                    r.proc.wait(timeout=120)
        finally:
            for r in all_runs:
                r.stop()

        layer = sae_layers(trainer.model)[0]
        ours = {name: getattr(layer, f"sae_{name}")["default"].detach()
                for name in ("W_enc", "b_enc", "W_dec", "b_dec")}

        rows = []
        if host_clock.wall:  # the first host forward of the rounds is warm (the held-out batches ran first)
            rows.append({"name": f"host forward to {args.target} (ceiling)",
                         **timing(host_clock.wall, host_clock.cpu, tokens_per_step, skip=0)})
            rows.append({"name": "host forward, all layers (sparsify's host)",
                         **timing(full_clock.wall, full_clock.cpu, tokens_per_step, skip=0)})
        mask_desc = ("positions >= 1, no special tokens, no norm outliers "
                     f"(> {cfg.outlier_factor}x median): megasae's default mask")
        ours_row = {
            "name": "megasae train step", **timing(megasae_clock.wall, megasae_clock.cpu, tokens_per_step),
            "train_fvu": train_fvu, "trained_on": mask_desc, "trained_tokens": trained_tokens,
            "heldout_masked": heldout_fvu(ours, eval_rows_masked, args.k),
            "heldout_all": heldout_fvu(ours, eval_rows_all, args.k),
        }
        if host_clock.wall:
            host_s = rows[0]["step_s"]
            ours_row.update(host_s=host_s, sae_s=ours_row["step_s"] - host_s,
                            sae_share=(ours_row["step_s"] - host_s) / ours_row["step_s"])
        rows.append(ours_row)
        if cached is not None:
            cache_layer = sae_layers(cached.model)[0]
            from_cache = {name: getattr(cache_layer, f"sae_{name}")["default"].detach()
                          for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
            cache_row = {"name": "megasae train step, from the cache",
                         **timing(cache_clock.wall, cache_clock.cpu, tokens_per_step),
                         "trained_on": mask_desc, "trained_tokens": cache_trained_tokens,
                         "heldout_masked": heldout_fvu(from_cache, eval_rows_masked, args.k),
                         "heldout_all": heldout_fvu(from_cache, eval_rows_all, args.k)}
            cache_row["vs_host"] = cache_row["tokens_per_s"] / ours_row["tokens_per_s"]
            rows.append(cache_row)
        sparsify_rows = []
        for r in all_runs:
            row = {"name": VARIANT_LABELS[r.variant], "variant": r.variant, "error": r.error,
                   "trained_on": "all positions" if r.variant == "shipped" else mask_desc}
            if r.error is None:
                weights = torch.load(r.weights_path)
                row.update(**timing(r.result["step_times"], r.result.get("step_cpu", []), tokens_per_step),
                           round_walls=r.round_walls, trained_tokens=r.result["trained_tokens"],
                           heldout_masked=heldout_fvu(weights, eval_rows_masked, args.k),
                           heldout_all=heldout_fvu(weights, eval_rows_all, args.k))
            sparsify_rows.append(row)
            rows.append(row)
        # The speed target is against sparsify as it ships; the FVU target against its best.
        timed = [row for row in sparsify_rows if row.get("tokens_per_s")]
        baseline = next((row for row in timed if row["variant"] == "shipped"), next(iter(timed), None))
        for row in rows:
            if baseline is not None and row.get("tokens_per_s"):
                row["vs_sparsify"] = row["tokens_per_s"] / baseline["tokens_per_s"]
                if row.get("tokens_per_cpu_s") and baseline.get("tokens_per_cpu_s"):
                    row["vs_sparsify_cpu"] = row["tokens_per_cpu_s"] / baseline["tokens_per_cpu_s"]

        info = next((r.info for r in all_runs if r.info), {})
        return {
            "benchmark": "train",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["megasae bench train", *args.argv]),
            "machine": machine_description(args.threads),
            "load_average": {"start": load_start, "end": os.getloadavg()},
            "backend": ops.backend(),
            "torch": torch.__version__,
            "sparsify": info.get("sparsify"),
            "sparsify_torch": info.get("torch"),
            "sparsify_error": sparsify_error,
            "settings": {
                "model": args.model or "SmolLM2-135M-Instruct (built-in)", "model_dir": model_dir,
                "target": args.target, "sparsify_hookpoint": hookpoint, "k": args.k,
                "num_latents": num_latents,
                "batch": f"{args.batch_size} x {args.ctx_len}", "tokens_per_step": tokens_per_step,
                "steps": args.steps, "train_tokens": args.steps * tokens_per_step, "data": args.data,
                "lr": lr, "warmup_steps": args.warmup_steps, "schedule": "linear decay to 0",
                "optimizer": "Adam", "auxk_alpha": cfg.auxk_alpha,
                "dead_tokens_threshold": cfg.dead_tokens_threshold,
                "megasae_grad_clip": cfg.grad_clip, "megasae_compile": args.compile, "threads": args.threads,
                "round_steps": args.round_steps,
                "eval_batches": args.eval_batches,
                "eval_tokens_masked": int(eval_rows_masked.shape[0]),
                "eval_tokens_all": int(eval_rows_all.shape[0]),
            },
            "rows": rows,
            "cache": cache_facts,
            "targets": targets(rows),
        }


def trainer_from_cache(args: argparse.Namespace, cfg, train_batches: list, work: Path):
    """(a Trainer on an activation cache of the activations `train_batches` keep, what writing it cost):
    `megasae cache` over the same data and seed stores the same rows the host trainer reads."""
    from megasae.data.activations import MANIFEST
    from megasae.train import TrainConfig, Trainer
    from megasae.train.cache import CacheConfig, write_cache

    cache_dir = work / "cache"
    kept = int(sum(batch.token_mask.sum() for batch in train_batches))
    start = time.perf_counter()
    write_cache(CacheConfig(output_dir=cache_dir, model=args.model, data=args.data,
                            target_modules=(args.target,), max_tokens=kept, ctx_len=args.ctx_len,
                            micro_batch_size=args.batch_size, seed=args.seed, device="cpu"))
    seconds = time.perf_counter() - start
    activations = json.loads((cache_dir / MANIFEST).read_text())["tokens"]
    size = sum(f.stat().st_size for f in cache_dir.iterdir())
    trainer = Trainer(TrainConfig(
        activations=cache_dir, target_modules=(args.target,), k=args.k,
        expansion_factor=args.expansion_factor, max_tokens=activations, batch_tokens=cfg.batch_tokens,
        micro_batch_size=args.batch_size, ctx_len=args.ctx_len, warmup_steps=args.warmup_steps,
        wandb_mode="disabled", output_dir=work / "cached", device="cpu", seed=args.seed,
        outlier_factor=cfg.outlier_factor,
    ))
    facts = {"activations": activations, "write_s": seconds, "bytes": size, "steps": trainer.steps,
             "write_s_per_million": seconds * 1e6 / activations,
             "bytes_per_million": size * 1e6 / activations}
    return trainer, facts


def targets(rows: list[dict]) -> dict:
    ours = next(r for r in rows if r["name"] == "megasae train step")
    done = [r for r in rows if r.get("variant") and r.get("error") is None]
    out = {}
    shipped = next((r for r in done if r["variant"] == "shipped"), None)
    if shipped is not None:
        ratio = ours["tokens_per_s"] / shipped["tokens_per_s"]
        out["speed_2x"] = {"ratio": ratio, "ratio_cpu": ours.get("vs_sparsify_cpu"), "met": ratio >= 2.0}
    if done:
        best = min(r["heldout_masked"]["fvu"] for r in done)
        out["fvu_no_worse"] = {"megasae": ours["heldout_masked"]["fvu"], "best_sparsify": best,
                               "met": ours["heldout_masked"]["fvu"] <= best}
    return out


def machine_description(threads: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {threads}, "
            f"{platform.system()} {platform.release()}")


def format_table(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"megasae bench train: {s['model']}, {s['target']}, k {s['k']}, {s['num_latents']} latents, "
        f"{s['steps']} steps x {s['tokens_per_step']} tokens ({s['train_tokens']:,}), batch {s['batch']}",
        f"backend {result['backend']}, torch {result['torch']}, sparsify {result['sparsify'] or '-'}, "
        f"{result['machine']}",
        f"Adam lr {s['lr']:.3g}, warmup {s['warmup_steps']}, linear decay; AuxK alpha {s['auxk_alpha']:.4g}; "
        f"held-out FVU on {s['eval_tokens_masked']:,} masked / {s['eval_tokens_all']:,} tokens",
        "",
    ]
    width = max(len(row["name"]) for row in result["rows"]) + 1
    header = (f"{'':{width}} {'tokens/s':>8} {'s/step':>6} {'CPU s':>6} {'vs sparsify':>11} {'(CPU)':>6} "
              f"{'FVU masked':>10} {'FVU all':>7}  trained on")
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        if row.get("error"):
            lines.append(f"{row['name']:{width}} failed: {row['error'].splitlines()[0]}")
            continue
        ratio = f"{row['vs_sparsify']:.2f}x" if "vs_sparsify" in row else "-"
        ratio_cpu = f"{row['vs_sparsify_cpu']:.2f}x" if "vs_sparsify_cpu" in row else "-"
        cpu = f"{row['cpu_s']:.2f}" if row.get("cpu_s") else "-"
        fm = f"{row['heldout_masked']['fvu']:.3f}" if "heldout_masked" in row else "-"
        fa = f"{row['heldout_all']['fvu']:.3f}" if "heldout_all" in row else "-"
        trained = ""
        if "trained_on" in row:
            trained = ("all positions" if row["trained_on"] == "all positions" else "megasae's mask")
            trained += f" ({row['trained_tokens']:,} tokens)"
        lines.append(f"{row['name']:{width}} {row['tokens_per_s']:8.0f} {row['step_s']:6.2f} {cpu:>6} "
                     f"{ratio:>11} {ratio_cpu:>6} {fm:>10} {fa:>7}  {trained}")
        if "sae_s" in row:
            lines.append(f"{'  of which SAE (step - host forward)':{width}} "
                         f"{'':8} {row['sae_s']:6.2f} {'':6} ({100 * row['sae_share']:.0f}% of the step)")
    lines.append("")
    lines.append("tokens/s and s/step: median steady step (first step left out); CPU s: CPU seconds of the "
                 "process per step; vs sparsify: against sparsify as shipped.")
    lines.append("FVU masked: positions >= 1, no special tokens, no norm outliers (megasae's default mask); "
                 "FVU all: every position. Same held-out tokens and the same evaluation code for every SAE.")
    t = result["targets"]
    if "speed_2x" in t:
        cpu = t["speed_2x"]["ratio_cpu"]
        lines.append(f"target tokens/s >= 2x sparsify (as shipped): {t['speed_2x']['ratio']:.2f}x"
                     + (f" (per CPU-second {cpu:.2f}x)" if cpu else "")
                     + f" -> {'met' if t['speed_2x']['met'] else 'NOT met'}")
    if "fvu_no_worse" in t:
        f = t["fvu_no_worse"]
        lines.append(f"target held-out FVU (masked) no worse than sparsify's best: {f['megasae']:.3f} vs "
                     f"{f['best_sparsify']:.3f} -> {'met' if f['met'] else 'NOT met'}")
    cache = result.get("cache")
    if cache is not None:
        cached = next(row for row in result["rows"] if row["name"] == "megasae train step, from the cache")
        lines.append(f"from the cache: {cached['vs_host']:.1f}x the tokens/s of the host step; the cache of "
                     f"{cache['activations']:,} activations took {cache['write_s']:.0f} s and "
                     f"{cache['bytes'] / 1e6:.1f} MB ({cache['write_s_per_million']:.0f} s and "
                     f"{cache['bytes_per_million'] / 1e9:.2f} GB per million activations)")
    if result.get("sparsify_error"):
        lines.append(f"sparsify not run: {result['sparsify_error']}")
    la = result["load_average"]
    lines.append(f"load average (1 min) at start {la['start'][0]:.2f}, at end {la['end'][0]:.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.argv = list(argv)
    result = run(args)
    report(format_table(result), result, args.json)
