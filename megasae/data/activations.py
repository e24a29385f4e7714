"""An activation cache: what the token mask keeps of each target's activations, stored once so that SAEs
train on them without running the host again (`megasae cache`, then `megasae train --activations`).

Layout of a cache directory:

    manifest.json                  the host, the targets and widths, dtype, token policy, data, shards
    shard-00000.safetensors        one tensor per target ("<module path>", or for transcoders
    ...                            "<module path>:input" and ":output"), rows of the same tokens

Each shard's sha256 is in the manifest and checked whenever the shard is read. Training reads shards in a
seeded order, one at a time (never the whole cache in memory), each data-parallel rank taking every
world_size-th row, and resumes exactly from a (epoch, shard, row) position.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

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
    (seed, e, shard); rank r takes the rows at positions p % world_size == r of that order."""

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

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        sizes = np.array([self.shards[i]["tokens"] for i in order], dtype=np.int64)
        return order, np.cumsum(sizes) - sizes

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

    def _my_rows(self, epoch: int, index: int, offset: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch, index]).permutation(self.shards[index]["tokens"])
        return perm[(self.rank - offset) % self.world_size :: self.world_size]

    def __next__(self) -> ActivationBatch:
        epoch, k, taken = self.position
        pieces: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        need = self.rows
        while need:
            order, offsets = self._order(epoch)
            if k == len(order):
                epoch, k, taken = epoch + 1, 0, 0
                continue
            index = int(order[k])
            mine = self._my_rows(epoch, index, int(offsets[k]))[taken : taken + need]
            if len(mine):
                shard = self._shard(index)
                for name in self.names:
                    pieces[name].append(shard[name][torch.from_numpy(mine)].float())
            need -= len(mine)
            taken += len(mine)
            if need:
                k, taken = k + 1, 0
        self.position = (epoch, k, taken)
        inputs = {name: torch.cat(parts) for name, parts in pieces.items()}
        return ActivationBatch(inputs, torch.ones(self.rows, dtype=torch.bool), self.rows)

    def state_dict(self) -> dict:
        return {"kind": "activations", "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "position": list(self.position)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("kind", "rank", "world_size", "seed"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"The data state was saved with {key}={state.get(key)!r}, but this stream has "
                    f"{key}={mine[key]!r}; resume with the same data arguments."
                )
        self.position = tuple(state["position"])
