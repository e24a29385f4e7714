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

TARGET = "model.layers.15"  # the output of decoder layer 15 (of 30): the residual stream there


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: %(default)s)")
    parser.add_argument("--ctx-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--out", default="out/demo-sae", help="adapter directory to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the SAE init and data order (default: %(default)s)")
    parser.add_argument("--log-every", type=int, default=25, help="print FVU and L0 every N steps (default: %(default)s)")
    return parser.parse_args()


def token_mask(ids: torch.Tensor) -> torch.Tensor:
    # Position 0 of every chunk is an attention sink with ~100x the norm of the other tokens:
    # left in, it alone would hold most of the variance and decide the FVU.
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    return mask


# A few other tokens are sinks too (norm 27x the median, 60% of a batch's variance): megasae drops
# tokens whose norm exceeds this multiple of the median of the masked batch.
OUTLIER_FACTOR = 10.0


def main() -> None:
    args = parse_args()
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
    window = []  # (fvu, l0, tokens counted) of each step since the last print: one batch is a noisy estimate
    start = time.perf_counter()
    for step, ids in zip(range(1, args.steps + 1), batches):
        ids = ids.to(device)
        # The forward stops right after layer 15: layers 16-29 and the LM head never run.
        with peft_model.stop_after_targets(token_mask=token_mask(ids), outlier_factor=OUTLIER_FACTOR) as outputs:
            peft_model(input_ids=ids)
        loss = sum(out.loss for out in outputs.values())
        loss.backward()
        peft_model.remove_parallel_decoder_grads()
        optimizer.step()
        optimizer.zero_grad()
        peft_model.normalize_decoders()

        out = outputs[TARGET]
        window.append((out.fvu.item(), out.l0.item(), out.num_tokens))
        if step == 1 or step % args.log_every == 0:
            fvu, l0, counted = (sum(values) / len(window) for values in zip(*window))
            tokens_per_s = step * ids.numel() / (time.perf_counter() - start)
            print(
                f"step {step:4d}  fvu {fvu:.3f}  l0 {l0:.1f}  (mean of {len(window)} steps, "
                f"{counted:.0f}/{ids.numel()} tokens counted)  {tokens_per_s:.0f} tokens/s"
            )
            window.clear()

    peft_model.save_pretrained(args.out)
    print(f"adapter saved to {args.out}")

    # Reload on a fresh host and compare reconstructions on a batch the SAE never trained on.
    held_out = next(batches).to(device)
    mask = token_mask(held_out)
    fresh_host, _ = load_host_model(device=device)
    loaded = PeftSaeModel.from_pretrained(fresh_host, args.out)
    results = {}
    for name, candidate in [("trained", peft_model), ("reloaded", loaded)]:
        candidate.eval()
        with torch.no_grad(), candidate.stop_after_targets(token_mask=mask, outlier_factor=OUTLIER_FACTOR) as outputs:
            candidate(input_ids=held_out)
        results[name] = outputs[TARGET]
    diff = (results["trained"].x_hat - results["reloaded"].x_hat).abs().max().item()
    print(
        f"held-out fvu {results['trained'].fvu.item():.3f} (trained) vs {results['reloaded'].fvu.item():.3f} "
        f"(reloaded); max |x_hat difference| {diff:.1e}"
    )
    if diff > 1e-4:
        raise SystemExit(f"The reloaded adapter in {args.out} reconstructs differently (max difference {diff:.1e}).")


if __name__ == "__main__":
    main()
