"""Sweeps: several SAEs on every target, trained side by side on one host forward per micro-batch.

A run sweeps when it is given `--sweep FILE` (a YAML or JSON list with one mapping of SWEPT settings per SAE,
unset ones taking the run's flags) or comma lists of those flags (`--k 16,32 --lr 1e-4,3e-4`: every
combination). Each SAE is then a named PEFT adapter with its own Adam state, learning rate, gradient clipping
and metrics, saved in its own subdirectory of the output directory (as peft saves named adapters). Seeded
alike, each one is the SAE that a run of its settings alone trains.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro
import yaml

from megasae.checks import check_at_least, check_types
from megasae.errors import SettingError
from megasae.peft.config import DEFAULT_ADAPTER

SWEPT = ("k", "num_latents", "expansion_factor", "lr", "auxk_alpha")
# How a generated adapter name spells each swept setting: k16-lr0p0003.
SHORT_NAMES = {"k": "k", "num_latents": "m", "expansion_factor": "x", "lr": "lr", "auxk_alpha": "auxk"}


def default_learning_rate(num_latents: int) -> float:
    """2e-4 at 2^14 latents, scaled by 1/sqrt(num_latents) (Gao et al. 2024)."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


def _comma_list(parse):
    """A flag that takes one value or a comma list of them (`--k 16,32,64`): a list becomes a tuple."""

    def from_str(args: list[str]):
        values = tuple(parse(value) for value in args[0].split(","))
        return values if len(values) > 1 else values[0]

    def to_str(value) -> list[str]:
        return [",".join(map(str, value)) if isinstance(value, tuple) else str(value)]

    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar=f"{parse.__name__.upper()}[,...]", instance_from_str=from_str,
        is_instance=lambda value: True, str_from_instance=to_str,
    )


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


_optional_float.__name__ = "float"
SweptInt = Annotated[int | tuple[int, ...], _comma_list(int)]
SweptFloat = Annotated[float | tuple[float, ...], _comma_list(float)]
SweptOptionalFloat = Annotated[float | None | tuple[float, ...], _comma_list(_optional_float)]


@dataclass
class SaeSettings:
    """The settings of one SAE of a run: the run's own, or one entry of its sweep."""

    name: str
    k: int
    num_latents: int
    expansion_factor: int
    lr: float | None
    auxk_alpha: float

    def __post_init__(self):
        check_types(self)
        check_at_least(self, 1, "k", "expansion_factor")
        check_at_least(self, 0, "num_latents", "auxk_alpha")
        if self.lr is not None and self.lr <= 0:
            raise SettingError(f"--lr must be above 0, got {self.lr}.")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise SettingError(
                f"SAE name {self.name!r} must be letters, digits, '_' and '-' (it names a directory and a "
                "PEFT adapter)."
            )

    def learning_rate(self, num_latents: int) -> float:
        return self.lr if self.lr is not None else default_learning_rate(num_latents)


def is_sweep(cfg) -> bool:
    """Whether `cfg` (a TrainConfig) trains several SAEs per target: a sweep file or a comma list."""
    return cfg.sweep is not None or any(isinstance(getattr(cfg, name), tuple) for name in SWEPT)


def comma_lists(cfg, names: tuple[str, ...]) -> dict[str, tuple]:
    """The settings among `names` that `cfg` gives as comma lists, with their values."""
    return {name: getattr(cfg, name) for name in names if isinstance(getattr(cfg, name), tuple)}


def combinations(lists: dict[str, tuple]) -> list[dict]:
    """Every combination of the values of `lists` (one empty mapping when there are none), in order."""
    return [dict(zip(lists, values)) for values in itertools.product(*lists.values())]


def sae_settings(cfg) -> list[SaeSettings]:
    """The SAEs `cfg` (a TrainConfig) trains on each target, in order; one named DEFAULT_ADAPTER unless it
    sweeps."""
    lists = comma_lists(cfg, SWEPT)
    if cfg.sweep is not None and lists:
        raise SettingError(
            f"--sweep lists the SAEs to train; put {', '.join('--' + n.replace('_', '-') for n in lists)} in "
            f"{cfg.sweep} instead of giving a comma list on the command line."
        )
    if cfg.sweep is not None:
        entries = read_sweep(cfg.sweep)
    else:
        entries = combinations(lists)
    shared = {name: getattr(cfg, name) for name in SWEPT if name not in lists}
    if not is_sweep(cfg):
        return [SaeSettings(name=DEFAULT_ADAPTER, **shared)]
    settings = []
    for number, entry in enumerate(entries):
        name = entry.pop("name", None) or _name(entry, number)
        try:
            settings.append(SaeSettings(name=str(name), **{**shared, **entry}))
        except SettingError as err:
            raise SettingError(f"SAE {number} of the sweep: {err}") from None
    names = [s.name for s in settings]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SettingError(f"The sweep names several SAEs {repeated}; give each entry its own 'name'.")
    return settings


def _name(entry: dict, number: int) -> str:
    """A name that says what the SAE sweeps: k16-lr0p0003 (sae<number> when it sets nothing)."""
    parts = [f"{SHORT_NAMES[key]}{format(entry[key], 'g').replace('.', 'p')}" for key in SWEPT
             if entry.get(key) is not None]
    return "-".join(parts) or f"sae{number}"


def read_sweep(path: Path) -> list[dict]:
    """The entries of a sweep file, each a mapping of SWEPT settings (and an optional 'name')."""
    if not path.is_file():
        raise FileNotFoundError(f"Sweep file {path} does not exist.")
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"Sweep file {path} is not valid YAML or JSON: {str(err).splitlines()[0]}") from None
    valid = sorted((*SWEPT, "name"))
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"Sweep file {path} must hold a non-empty list of mappings of {valid}, one per SAE.")
    for number, entry in enumerate(entries):
        unknown = sorted(set(entry) - set(valid))
        if unknown:
            raise ValueError(f"SAE {number} of sweep file {path} sets {unknown}; it may set {valid}.")
    return [dict(entry) for entry in entries]


def settings_record(settings: list[SaeSettings]) -> list[dict]:
    """The SAEs of a run as config.json records them (compared on --resume)."""
    return [dataclasses.asdict(s) for s in settings]
