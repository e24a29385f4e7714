"""The built-in stdlib corpus and the streaming packer."""

import itertools
import sysconfig
from pathlib import Path

import pytest
import torch

from megasae.data import builtin_documents, builtin_paths, pack_tokens, token_batches


class CharTokenizer:
    """One token per character (its code point); 0 is EOS."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=True):
        assert not add_special_tokens
        return [ord(c) for c in text]


def chunks(documents, ctx_len):
    return [c.tolist() for c in pack_tokens(documents, CharTokenizer(), ctx_len, eos_id=0)]


def test_pack_joins_with_eos_between_documents():
    a, b, c, d, e, f, g, h, i, j = map(ord, "abcdefghij")
    # Stream: a b c | EOS d e | EOS f g | h i j  -- no EOS before the first document.
    assert chunks(["abc", "de", "fghij"], 3) == [[a, b, c], [0, d, e], [0, f, g], [h, i, j]]


def test_pack_drops_the_partial_last_chunk():
    a, b, c, d, e, f, g, h = map(ord, "abcdefgh")
    # Stream: a b c EOS d | e EOS f g h | i j (dropped)
    assert chunks(["abc", "de", "fghij"], 5) == [[a, b, c, 0, d], [e, 0, f, g, h]]


def test_pack_splits_a_long_document_and_yields_long_tensors():
    out = list(pack_tokens(["x" * 10], CharTokenizer(), 4, eos_id=0))
    assert [c.tolist() for c in out] == [[ord("x")] * 4] * 2
    assert all(c.dtype == torch.long for c in out)


def test_pack_streams():
    endless = ("doc" for _ in itertools.count())
    first = next(pack_tokens(endless, CharTokenizer(), 8, eos_id=0))
    assert first.tolist() == [ord("d"), ord("o"), ord("c"), 0, ord("d"), ord("o"), ord("c"), 0]


def test_pack_rejects_bad_ctx_len():
    with pytest.raises(ValueError, match="ctx_len must be a positive number of tokens, got 0"):
        list(pack_tokens(["abc"], CharTokenizer(), 0, eos_id=0))


def test_builtin_paths_are_the_stdlib_proper():
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = builtin_paths()
    assert len(paths) > 100
    assert paths == sorted(paths)
    for path in paths:
        parts = path.relative_to(root).parts
        assert path.suffix == ".py"
        assert not {"site-packages", "test", "tests"}.intersection(parts)
        assert path.stat().st_size <= 256 * 1024


def test_builtin_documents_are_deterministic_shuffles():
    first = list(itertools.islice(builtin_documents(seed=0), 20))
    assert first == list(itertools.islice(builtin_documents(seed=0), 20))
    assert first != list(itertools.islice(builtin_documents(seed=1), 20))
    assert sorted(builtin_documents(seed=0)) == sorted(builtin_documents(seed=1))


def test_token_batches():
    batches = token_batches(CharTokenizer(), ctx_len=16, batch_size=3, seed=0)
    first, second = next(batches), next(batches)
    assert first.shape == second.shape == (3, 16)
    assert first.dtype == torch.long
    expected = list(itertools.islice(pack_tokens(builtin_documents(0), CharTokenizer(), 16, 0), 6))
    assert torch.equal(torch.cat([first, second]), torch.stack(expected))


def test_token_batches_needs_eos():
    class NoEos(CharTokenizer):
        eos_token_id = None

    with pytest.raises(ValueError, match="no eos_token_id"):
        next(token_batches(NoEos(), ctx_len=4, batch_size=1))
