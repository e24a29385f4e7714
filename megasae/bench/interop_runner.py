"""Load SAEs exported by `megasae export` with a peer's own loader and run them on given activations.

Run by the Python of an environment where the peer is installed (never imported by megasae, and megasae is
not imported here):

    python interop_runner.py SPEC.json

SPEC.json: {"peer": "saelens" or "sparsify", "saes": {name: exported folder}, "inputs": a .pt file of
{name: activations [N, d]}, "outputs": where to write {name: {"codes": dense codes [N, M], "x_hat": [N, d]}}}.
"""

from __future__ import annotations

import json
import os
import sys


def _saelens(folder: str, x):
    from sae_lens import SAE

    sae = SAE.load_from_disk(folder)
    codes = sae.encode(x)
    return codes, sae.decode(codes)


def _sparsify(folder: str, x):
    import torch
    from sparsify import SparseCoder

    sae = SparseCoder.load_from_disk(folder)
    out = sae.encode(x)
    codes = torch.zeros(x.shape[0], sae.num_latents, dtype=x.dtype)
    codes.scatter_(-1, out.top_indices, out.top_acts)
    return codes, sae.decode(out.top_acts, out.top_indices)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python interop_runner.py SPEC.json")
    spec = json.loads(open(argv[0]).read())
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs CUDA
    import torch

    run = {"saelens": _saelens, "sparsify": _sparsify}[spec["peer"]]
    inputs = torch.load(spec["inputs"])
    results = {}
    with torch.no_grad():
        for name, folder in spec["saes"].items():
            codes, x_hat = run(folder, inputs[name])
            results[name] = {"codes": codes.float().contiguous(), "x_hat": x_hat.float().contiguous()}
    torch.save(results, spec["outputs"])
    dist = {"saelens": "sae-lens", "sparsify": "eai-sparsify"}[spec["peer"]]
    print(json.dumps({"version": _version(dist), "torch": torch.__version__}))


if __name__ == "__main__":
    main(sys.argv[1:])
