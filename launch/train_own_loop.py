"""Train a TopK SAE on SmolLM2-135M-Instruct from your own loop, with megasae's public API only.

    python launch/train_own_loop.py                 # what `make demo` runs
    python launch/train_own_loop.py --steps 50 --out /tmp/sae

It loads the built-in host model (frozen), attaches a TopK SAE to the residual stream after
decoder layer 15, trains it on the Python standard library's sources, saves the adapter as a
standard PEFT directory, reloads it on a fresh host and checks it reconstructs the same.
"""

import argparse
import os
import time

import torch

import megasae
from megasae import PeftSaeModel, TopKSaeConfig, get_peft_sae_model
from megasae.data import token_batches
from megasae.models import load_host_model
from megasae.train import sae_step

TARGET = "model.layers.15"  # the output of decoder layer 15 (of 30): the residual stream there
# Attention sinks have norms 25-150x the median token's and would hold most of the variance:
# megasae drops tokens whose norm exceeds this multiple of the median of the masked batch.
OUTLIER_FACTOR = 10.0
LOG_EVERY = 25


def token_mask(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False  # position 0 of every chunk is a sink, whatever its token
    return mask


@torch.no_grad()
def reconstruct(peft_model, ids: torch.Tensor) -> megasae.SaeOutput:
    peft_model.eval()
    with peft_model.stop_after_targets(token_mask=token_mask(ids), outlier_factor=OUTLIER_FACTOR) as out:
        peft_model(input_ids=ids)
    return out[TARGET]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: %(default)s)")
    parser.add_argument("--ctx-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    parser.add_argument(
        "--out", default="out/demo-sae", help="adapter directory to write (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the SAE init and data order (default: %(default)s)"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)  # the host forward and the SAE step are GEMM-bound
    device = "cuda" if torch.cuda.is_available() else "cpu"

    start = time.perf_counter()
    model, tokenizer = load_host_model(device=device)  # None = the built-in SmolLM2-135M-Instruct
    print(f"host model loaded in {time.perf_counter() - start:.1f}s")

    config = TopKSaeConfig(k=32, expansion_factor=8, target_modules=[TARGET])
    peft_model = get_peft_sae_model(model, config)  # the host stays frozen; only the SAE trains
    peft_model.train()  # train mode = capture: the host's output passes through unchanged
    lr = megasae.default_lr(config.expansion_factor * model.config.hidden_size)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=lr)

    batches = token_batches(tokenizer, args.ctx_len, args.batch_size, seed=args.seed)
    fvus, l0s = [], []  # since the last print: one batch alone is a noisy estimate
    start = time.perf_counter()
    for step, ids in zip(range(1, args.steps + 1), batches):
        ids = ids.to(device)
        # The forward stops right after layer 15: layers 16-29 and the LM head never run.
        with peft_model.stop_after_targets(
            token_mask=token_mask(ids), outlier_factor=OUTLIER_FACTOR
        ) as outputs:
            peft_model(input_ids=ids)
        loss = sum(out.loss for out in outputs.values())
        loss.backward()
        # The trainer's step: the decoder rows' parallel gradient removed, Adam, the rows renormalised.
        sae_step(peft_model, optimizer)

        fvus.append(outputs[TARGET].fvu.item())
        l0s.append(outputs[TARGET].l0.item())
        if step == 1 or step % LOG_EVERY == 0:
            tokens_per_s = step * ids.numel() / (time.perf_counter() - start)
            print(
                f"step {step:4d}  fvu {sum(fvus) / len(fvus):.3f}  l0 {sum(l0s) / len(l0s):.1f}  "
                f"(mean of {len(fvus)} steps; {outputs[TARGET].num_tokens}/{ids.numel()} tokens counted)  "
                f"{tokens_per_s:.0f} tokens/s"
            )
            fvus.clear()
            l0s.clear()

    peft_model.save_pretrained(args.out)
    print(f"adapter saved to {args.out}")

    # Reload on a fresh host and compare reconstructions on a batch the SAE never trained on.
    held_out = next(batches).to(device)
    loaded = PeftSaeModel.from_pretrained(load_host_model(device=device)[0], args.out)
    trained, reloaded = reconstruct(peft_model, held_out), reconstruct(loaded, held_out)
    diff = (trained.x_hat - reloaded.x_hat).abs().max().item()
    print(
        f"held-out fvu {trained.fvu.item():.3f} (trained) vs {reloaded.fvu.item():.3f} (reloaded); "
        f"max |x_hat difference| {diff:.1e}"
    )
    if diff > 1e-4:
        raise SystemExit(
            f"The adapter reloaded from {args.out} reconstructs differently (max difference {diff:.1e})."
        )


if __name__ == "__main__":
    main()
