"""An activation cache: what the token mask keeps of each target's activations, stored once so that SAEs
train on them without running the host again (`megasae cache`, then `megasae train --activations`).

Layout of a cache directory:

    manifest.json                  the host, the targets and widths, dtype, token policy, data, shards
    shard-00000.safetensors        one tensor per target ("<module path>", or for transcoders
    ...                            "<module path>:input" and ":output"), rows of the same tokens

Each shard's sha256 is in the manifest and checked whenever the shard is read. Training reads shards in a
seeded order, one at a time (never the whole cache in memory), each data-parallel rank taking its share
of every global batch, and resumes exactly, on any number of ranks, from an (epoch, shard, row) position.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from megasae.data.sources import check_order_of

MANIFEST = "manifest.json"
FORMAT = "megasae-activations/1"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_names(path: str, transcode: bool) -> list[str]:
    return [f"{path}:input", f"{path}:output"] if transcode else [path]


def read_manifest(cache: Path) -> dict:
    path = Path(cache) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"--activations {cache} is no activation cache: it has no {MANIFEST} "
                                "(write one with megasae cache).")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a megasae activation cache of format {FORMAT}.")
    return manifest


@dataclass
class ActivationBatch:
    inputs: dict[str, torch.Tensor]  # keyword arguments of the replay host: one tensor per cached name
    token_mask: torch.Tensor  # every cached row was kept by the token mask
    num_tokens: int


class ActivationBatches:
    """Endless batches of `rows` cached rows for one data-parallel rank, exactly resumable.

    Epoch e reads the shards in a permutation seeded by (seed, e) and each shard's rows in one seeded by
    (seed, e, shard); each global batch is the next world_size x rows of that order, of which rank r takes
    the r-th `rows`. The order does not depend on the number of ranks, nor does the position."""

    def __init__(self, cache: Path, rows: int, rank: int, world_size: int, seed: int):
        self.cache, self.rows = Path(cache), rows
        self.manifest = read_manifest(cache)
        self.shards = self.manifest["shards"]
        if sum(s["tokens"] for s in self.shards) < world_size * rows:
            raise ValueError(
                f"The activation cache {cache} holds fewer rows than one batch of {rows} per rank "
                f"on {world_size} ranks."
            )
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.names = [name for path, target in self.manifest["targets"].items()
                      for name in tensor_names(path, target["transcode"])]
        self.position = (0, 0, 0)  # (epoch, index in the epoch's shard order, rows taken of that shard)
        self._loaded: tuple[int, dict[str, torch.Tensor]] | None = None

    def __iter__(self):
        return self

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def _shard(self, index: int) -> dict[str, torch.Tensor]:
        if self._loaded is None or self._loaded[0] != index:
            entry = self.shards[index]
            path = self.cache / entry["file"]
            if not path.is_file():
                raise FileNotFoundError(f"The activation cache is missing {path}; write it again with "
                                        "megasae cache.")
            if sha256(path) != entry["sha256"]:
                raise ValueError(f"{path} does not match the sha256 in {self.cache / MANIFEST}: the shard is "
                                 "corrupt; write the cache again with megasae cache.")
            self._loaded = (index, load_file(path))
        return self._loaded[1]

    def __next__(self) -> ActivationBatch:
        epoch, k, taken = self.position
        pieces: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        start, stop = self.rank * self.rows, (self.rank + 1) * self.rows  # this rank's share of the batch
        read, need = 0, self.world_size * self.rows
        while read < need:
            order = self._order(epoch)
            if k == len(order):
                epoch, k, taken = epoch + 1, 0, 0
                continue
            index = int(order[k])
            size = self.shards[index]["tokens"]
            count = min(size - taken, need - read)
            # This rank's rows among the batch's [read, read + count), which this shard gives.
            first, last = max(start, read), min(stop, read + count)
            if first < last:
                perm = np.random.default_rng([self.seed, epoch, index]).permutation(size)
                mine = perm[taken + first - read : taken + last - read]
                shard = self._shard(index)
                for name in self.names:
                    pieces[name].append(shard[name][torch.from_numpy(mine)].float())
            read += count
            taken += count
            if taken == size:
                k, taken = k + 1, 0
        self.position = (epoch, k, taken)
        inputs = {name: torch.cat(parts) for name, parts in pieces.items()}
        return ActivationBatch(inputs, torch.ones(self.rows, dtype=torch.bool), self.rows)

    def state_dict(self) -> dict:
        return {"kind": "activations", "seed": self.seed, "position": list(self.position)}

    def load_state_dict(self, state: dict) -> None:
        check_order_of(state)
        mine = self.state_dict()
        for key in ("kind", "seed"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"The data state was saved with {key}={state.get(key)!r}, but this stream has "
                    f"{key}={mine[key]!r}; resume with the same data arguments."
                )
        self.position = tuple(state["position"])
