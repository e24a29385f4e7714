"""Held-out batches: one pass over the data, up to a token budget, never a row twice."""

from __future__ import annotations

from collections.abc import Iterator

from megasae.data import Batch, DataColumns, build_batches


def held_out_batches(
    data: str,
    processor,
    *,
    max_tokens: int,
    ctx_len: int,
    batch_size: int,
    seed: int,
    columns: DataColumns = DataColumns(),
) -> Iterator[Batch]:
    """Batches until `max_tokens` real tokens have been read or the data's first epoch ends.

    The training stream is endless; a batch that reached into the second epoch would repeat rows,
    so it is dropped. Data too small for one batch is an error rather than an empty evaluation.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive number of tokens, got {max_tokens}.")
    stream = build_batches(data, processor, ctx_len=ctx_len, batch_size=batch_size, rank=0, world_size=1,
                           seed=seed, columns=columns)
    read = 0
    while read < max_tokens:
        batch = next(stream)
        if stream.state_dict()["position"][0] > 0:  # a position is (epoch, ...): this batch wrapped around
            if read == 0:
                raise ValueError(
                    f"{stream.name} holds less than one batch of {batch_size} sequences of {ctx_len} tokens; "
                    "pass a smaller batch size or context length, or more data."
                )
            return
        read += batch.num_tokens
        yield batch
