"""`megasae bench interop`: do the peers' own loaders read megasae's exports as the same SAEs?

1. Builds SAEs in megasae (or reads --adapter): by default an SAE and a transcoder of SmolLM2-135M's width
   (d 576, 4608 latents, k 32) with random weights and encoder biases around -6, so that about half the
   tokens have fewer than k positive pre-activations: where sparsify's order (ReLU, then top-k) and
   megasae's (top-k, then ReLU) could differ.
2. Exports them with `megasae export` to SAELens and to sparsify (a format that cannot express an SAE
   refuses it, and the table says so).
3. Runs interop_runner.py in each peer's Python (its own environment, like sparsify_runner.py): the peer's
   loader (`sae_lens.SAE.load_from_disk`, `sparsify.SparseCoder.load_from_disk`) reads each exported folder
   and encodes and decodes the same activations.
4. Compares the peer's dense codes and reconstructions with megasae's (its kernels, through megasae.sae):
   max |diff| over the largest |value|, which must be at most 1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from megasae.bench.output import report
from megasae.bench.peers import VENVS, peer_python, runner_command

RUNNER = Path(__file__).with_name("interop_runner.py")
TOLERANCE = 1e-5


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megasae bench interop",
                                description="megasae's SAELens and sparsify exports, run by the peers' code.")
    for peer, venv in VENVS.items():
        p.add_argument(f"--{peer}-python", default=peer_python(peer),
                       help=f"a Python with {peer} installed (default {venv}/bin/python if present)")
    p.add_argument("--adapter", default=None, help="export this adapter's SAEs instead of the random ones")
    p.add_argument("--tokens", type=int, default=4096, help="activation rows per SAE (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def random_adapters(work: Path, seed: int) -> list[Path]:
    """A TopK SAE, a TopK transcoder and a BatchTopK SAE on standardised tokens (d 576, 4608 latents, k 32)
    saved as megasae adapters."""
    from megasae.formats import SaeSet, SaeWeights, adapter
    from megasae.peft import TopKSaeConfig

    g = torch.Generator().manual_seed(seed)
    d, latents, k = 576, 4608, 32
    paths = []
    kinds = (("sae", False, "model.layers.15", "topk"), ("transcoder", True, "model.layers.15.mlp", "topk"),
             ("batchtopk", False, "model.layers.15", "batchtopk"))
    for name, transcode, target, architecture in kinds:
        W_dec = torch.randn(latents, d, generator=g)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        W_enc = W_dec + 0.1 * torch.randn(latents, d, generator=g) / d**0.5
        # TopK's biases leave many tokens fewer than k positive codes (which top-k-then-ReLU and
        # ReLU-then-top-k may treat differently); BatchTopK's threshold keeps some tens a token.
        batchtopk = architecture == "batchtopk"
        b_enc = torch.randn(latents, generator=g) - (0 if batchtopk else 6)
        threshold = torch.tensor(4.5) if batchtopk else None
        weights = SaeWeights(W_enc, b_enc, W_dec, torch.randn(d, generator=g), threshold)
        # BatchTopK as megasae trains it by default: on each token standardised.
        config = TopKSaeConfig(k=k, num_latents=latents, target_modules=[target], transcode=transcode,
                               architecture=architecture,
                               normalize_activations="layer_norm" if batchtopk else "none")
        paths.append(work / f"adapter-{name}")
        paths[-1].mkdir()
        adapter.write(SaeSet(config, {target: weights}, paths[-1], "megasae"), paths[-1])
    return paths


def megasae_outputs(weights, config, x: Tensor) -> tuple[Tensor, Tensor]:
    """megasae's dense codes and reconstruction of `x`, through its kernels (a BatchTopK SAE's inference
    rule: the latents above its threshold)."""
    from megasae import sae

    pre_bias = None if config.transcode else weights.b_dec
    norm = sae.RowNorm.of(x) if config.normalize_activations == "layer_norm" else None
    x = x if norm is None else norm.apply(x)
    if config.architecture == "batchtopk":
        k_max = sae.candidates_per_row(config.k, weights.num_latents, config.k_max)
        values, indices = sae.batchtopk_encode(x, weights.W_enc, weights.b_enc, pre_bias, config.k, k_max,
                                               weights.threshold)
    else:
        values, indices = sae.encode(x, weights.W_enc, weights.b_enc, pre_bias, config.k,
                                     relu=config.relu_codes)
    codes = torch.zeros(x.shape[0], weights.num_latents).scatter_(-1, indices, values)
    x_hat = sae.decode(values, indices, weights.W_dec, weights.b_dec)
    return codes, x_hat if norm is None else norm.undo(x_hat)


def relative_max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(torch.float32).tiny))


def run_peer(python: str, peer: str, folders: dict[str, str], inputs: Path, work: Path) -> tuple[dict, dict]:
    spec = work / f"{peer}-spec.json"
    outputs = work / f"{peer}-outputs.pt"
    spec.write_text(json.dumps({"peer": peer, "saes": folders, "inputs": str(inputs),
                                "outputs": str(outputs)}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(SPARSIFY_DISABLE_TRITON="1", OMP_NUM_THREADS="2")
    done = subprocess.run(runner_command(python, RUNNER, str(spec)), capture_output=True, text=True, env=env,
                          cwd=work)
    if done.returncode:
        raise RuntimeError(f"{peer}'s runner failed:\n{done.stderr[-3000:]}")
    return torch.load(outputs), json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    from megasae import formats

    torch.set_num_threads(2)
    rows, versions = [], {}
    with tempfile.TemporaryDirectory(prefix="megasae-interop-") as tmp:
        work = Path(tmp)
        sources = [Path(args.adapter)] if args.adapter else random_adapters(work, args.seed)
        g = torch.Generator().manual_seed(args.seed + 1)
        for peer in VENVS:
            python = getattr(args, f"{peer}_python")
            folders, expected, inputs = {}, {}, {}
            for source in sources:
                saes = formats.read(source)
                out = work / f"{peer}-{source.name}"
                try:
                    formats.export(source, peer, out)
                except ValueError as refused:
                    rows.append({"peer": peer, "sae": source.name, "note": f"refused: {refused}"})
                    continue
                for path, weights in saes.saes.items():
                    name = f"{source.name}:{path}"
                    folder = out / (path if peer == "saelens" else formats.sparsify.hookpoint(path, "model"))
                    folders[name] = str(folder)
                    inputs[name] = 2 * torch.randn(args.tokens, weights.d_in, generator=g)
                    expected[name] = (*megasae_outputs(weights, saes.config, inputs[name]), saes.config.k)
            if not folders:
                continue
            if python is None or not Path(python).is_file():
                rows.append({"peer": peer, "sae": ", ".join(folders),
                             "note": f"not run: no Python with {peer} (--{peer}-python)"})
                continue
            torch.save(inputs, work / f"{peer}-inputs.pt")
            got, versions[peer] = run_peer(python, peer, folders, work / f"{peer}-inputs.pt", work)
            for name, (codes, x_hat, k) in expected.items():
                peer_codes = got[name]["codes"]
                rows.append({
                    "peer": peer, "sae": name, "tokens": args.tokens,
                    "codes_rel_max_diff": relative_max_diff(peer_codes, codes),
                    "x_hat_rel_max_diff": relative_max_diff(got[name]["x_hat"], x_hat),
                    "same_nonzero_codes": bool(torch.equal(peer_codes != 0, codes != 0)),
                    "tokens_with_fewer_than_k_positive": int(((codes > 0).sum(-1) < k).sum()),
                })
    return {"rows": rows, "versions": versions, "tolerance": TOLERANCE, "torch": torch.__version__}


def format_table(result: dict) -> str:
    lines = ["| peer | SAE | codes max abs diff (rel) | x_hat max abs diff (rel) | same nonzero codes "
             "| tokens with < k positive | within 1e-5 |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "note" in row:
            lines.append(f"| {row['peer']} | {row['sae']} | {row['note']} | | | | |")
            continue
        ok = max(row["codes_rel_max_diff"], row["x_hat_rel_max_diff"]) <= result["tolerance"]
        lines.append(f"| {row['peer']} | {row['sae']} | {row['codes_rel_max_diff']:.2e} | "
                     f"{row['x_hat_rel_max_diff']:.2e} | {row['same_nonzero_codes']} | "
                     f"{row['tokens_with_fewer_than_k_positive']}/{row['tokens']} | "
                     f"{'yes' if ok else 'NO'} |")
    versions = ", ".join(f"{peer} {v['version']} (torch {v['torch']})"
                         for peer, v in result["versions"].items())
    lines.append(f"\npeers: {versions}; megasae torch {result['torch']}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    result = run(args)
    report(format_table(result), result, args.json)
