"""Train EleutherAI sparsify's TopK SAE on token batches handed over by `megasae bench train`.

Run by the Python of an environment where `eai-sparsify` is installed (never imported by megasae):

    python sparsify_runner.py SPEC.json

SPEC.json names the host model directory, a .pt file of token batches ({"input_ids": [S*B, T] long,
"token_mask": [S*B, T] bool}) and the SAE settings. The runner builds sparsify's own `Trainer`
on those tokens and runs `Trainer.fit()` unchanged, in lock step with the parent: before the first
step and after every `round_steps` steps it writes a line to its protocol stream (the original
stdout; everything else the process prints goes to stderr) and waits for "GO" on stdin, so that the
parent can interleave the trainers' timed rounds on a shared machine. At the end it saves the
SAE's weights (W_enc, b_enc, W_dec, b_dec, megasae's names) and reports its per-step times.

Variants:
- "shipped": sparsify as it ships: every position trains (no excluded tokens).
- "masked": the same trainer, trained on megasae's default token mask: the parent's token_mask
  (position 0 and special tokens excluded) and, like megasae, tokens whose activation norm exceeds
  `outlier_factor` x the median of the kept tokens. sparsify can only exclude token ids, so the
  runner substitutes the mask where sparsify's trainer computes it (its `torch.isin` call) and
  narrows it in place with a forward hook registered before sparsify's own.

Step timing: step s starts when sparsify's data loader asks for batch s and ends when it asks for
batch s + 1 (the last step ends where fit() would save its final checkpoint; the runner replaces
that save with its own, untimed). Waiting for the parent falls outside every step.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python sparsify_runner.py SPEC.json")
    spec = json.loads(open(argv[0]).read())
    # The protocol stream is the original stdout; whatever sparsify, tqdm or transformers print
    # (Python or C level) goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def say(kind: str, payload: dict | None = None) -> None:
        proto.write(f"{kind} {json.dumps(payload or {})}\n")
        proto.flush()

    def wait_for_go() -> None:
        line = sys.stdin.readline()
        if line.strip() != "GO":
            raise SystemExit(f"sparsify_runner: expected GO from the parent, got {line!r}")

    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs CUDA
    import torch

    torch.set_num_threads(spec["threads"])
    import sparsify
    import sparsify.trainer as sparsify_trainer
    from sparsify import SaeConfig, TrainConfig, Trainer
    from transformers import AutoModel

    data = torch.load(spec["tokens"])
    input_ids, token_mask = data["input_ids"], data["token_mask"]
    batch_size, round_steps = spec["batch_size"], spec["round_steps"]
    steps = input_ids.shape[0] // batch_size

    # sparsify's own command line loads AutoModel (no LM head) for the FVU loss.
    model = AutoModel.from_pretrained(spec["model"], dtype=torch.float32).eval()
    step_times: list[float] = []  # wall-clock seconds
    step_cpu: list[float] = []  # CPU seconds of this process (all its threads)
    clock = {"start": None, "cpu": None}

    class Batches(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return input_ids.shape[0]

        def __getitem__(self, i: int) -> dict:
            if i % batch_size == 0:
                now, cpu = time.perf_counter(), time.process_time()
                step = i // batch_size
                if clock["start"] is not None:
                    step_times.append(now - clock["start"])
                    step_cpu.append(cpu - clock["cpu"])
                if step > 0 and step % round_steps == 0:
                    say("ROUND", {"steps_done": step})
                    wait_for_go()
                clock["start"], clock["cpu"] = time.perf_counter(), time.process_time()
            return {"input_ids": input_ids[i]}

    cfg = TrainConfig(
        SaeConfig(k=spec["k"], num_latents=spec["num_latents"]),
        batch_size=batch_size,
        hookpoints=[spec["hookpoint"]],
        optimizer="adam",
        lr=spec["lr"],
        lr_warmup_steps=spec["warmup_steps"],
        auxk_alpha=spec["auxk_alpha"],
        dead_feature_threshold=spec["dead_tokens_threshold"],
        log_to_wandb=False,
        save_every=10**9,
        save_dir=spec["work_dir"],
    )
    trainer = Trainer(cfg, Batches(), model)

    def end_of_training() -> None:  # replaces the final checkpoint save
        step_times.append(time.perf_counter() - clock["start"])
        step_cpu.append(time.process_time() - clock["cpu"])

    trainer.save = end_of_training

    trained_tokens = {"count": 0}
    if spec["variant"] == "masked":
        _substitute_megasae_mask(sparsify_trainer, model, spec, token_mask, batch_size, trained_tokens)
    elif spec["variant"] != "shipped":
        raise SystemExit(f"sparsify_runner: unknown variant {spec['variant']!r}")

    say("READY", {"sparsify": getattr(sparsify, "__version__", None) or _dist_version("eai-sparsify"),
                  "torch": torch.__version__, "steps": steps})
    wait_for_go()
    trainer.fit()

    sae = next(iter(trainer.saes.values()))
    weights = {"W_enc": sae.encoder.weight, "b_enc": sae.encoder.bias, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    torch.save({name: w.detach().cpu().contiguous() for name, w in weights.items()}, spec["weights_out"])
    total = input_ids.shape[0] * input_ids.shape[1]
    trained = trained_tokens["count"] or total
    say("END", {"step_times": step_times, "step_cpu": step_cpu, "trained_tokens": trained})


def _substitute_megasae_mask(sparsify_trainer, model, spec, token_mask, batch_size, trained_tokens) -> None:
    """Make sparsify's trainer train on megasae's token mask (see the module docstring)."""
    import torch

    current = {"batch": 0, "mask": None}

    class TorchWithMask:
        """sparsify.trainer's `torch`, except that isin() returns the parent's mask of the batch."""

        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def isin(x, test, *, invert=False):
            mask = torch.isin(x, test, invert=invert)
            b = current["batch"]
            mask &= token_mask[b * batch_size:(b + 1) * batch_size].to(mask.device)
            current["batch"], current["mask"] = b + 1, mask
            return mask

    sparsify_trainer.torch = TorchWithMask()
    factor = spec["outlier_factor"]

    def drop_outliers(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        mask = current["mask"].view(-1)
        if factor is not None:
            norms = hidden.detach().flatten(0, -2).float().norm(dim=-1)
            if mask.any():
                mask &= norms <= factor * norms[mask].median()
        trained_tokens["count"] += int(mask.sum())

    # Registered before fit(), so it runs before the hook sparsify registers for each batch.
    model.base_model.get_submodule(spec["hookpoint"]).register_forward_hook(drop_outliers)


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main(sys.argv[1:])
