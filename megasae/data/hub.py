"""`--data hf:NAME[:CONFIG][:SPLIT]`: a Hugging Face hub dataset, through the optional `datasets` package.

`datasets.load_dataset` downloads it once into its cache (or finds it there, offline too) as Arrow
files, which are then read like a `save_to_disk` directory's: memory-mapped, one record batch at a time.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "hf:"


def is_hub_dataset(data: str | Path) -> bool:
    return str(data).startswith(PREFIX)


def hub_dataset_files(data: str) -> list[Path]:
    """The cached Arrow files of the hub dataset `data` names (split 'train' unless it names one)."""
    name, config, split = (str(data).removeprefix(PREFIX).split(":") + [None, None])[:3]
    if not name:
        raise ValueError(f"--data {data}: name a dataset, hf:NAME[:CONFIG][:SPLIT].")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data {data} needs the `datasets` package: pip install datasets.") from None
    try:
        dataset = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as err:  # the hub, the cache and the builders each raise their own kinds
        raise ValueError(
            f"--data {data}: the dataset could not be loaded from the hub or the local cache "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}); offline, only "
            "a dataset downloaded before can be used."
        ) from None
    return [Path(entry["filename"]) for entry in dataset.cache_files]
