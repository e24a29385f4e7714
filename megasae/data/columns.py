"""The data arguments every batch stream, held-out pass and activation cache shares."""

from __future__ import annotations

from dataclasses import dataclass

from megasae.token_policy import DEFAULT_TOKEN_POLICY, Modality


@dataclass(frozen=True)
class DataColumns:
    """Where a Parquet row keeps its text, chat messages and images, and which positions the token mask
    keeps by modality. Configs hold these as flat fields (one flag each); `DataColumns.of(config)` is their
    value."""

    text_column: str = "text"
    """Column of plain text."""
    messages_column: str = "messages"
    """Column of chat messages (a list of {role, content})."""
    images_column: str = "images"
    """Column of encoded image bytes for chat rows."""
    tokens: Modality = DEFAULT_TOKEN_POLICY["tokens"]
    """Positions to keep: "all", "text" (not image) or "image"."""

    @classmethod
    def of(cls, config) -> DataColumns:
        """The value of a config that holds these as flat fields (one flag each)."""
        return cls(config.text_column, config.messages_column, config.images_column, config.tokens)
