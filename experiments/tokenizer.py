"""Tokenizers: byte-level (default), a BPE trained locally and cached, or one from the Hugging Face hub.

``--tokenizer`` takes one of

* ``byte``: UTF-8 bytes 0..255 plus ``<pad>`` 256, ``<bos>`` 257, ``<eos>`` 258 (vocabulary 259).
  Needs nothing, and loss in nats per token is loss per byte.
* ``bpe`` or ``bpe:<vocab_size>`` (default 4096): a byte-level BPE trained with the ``tokenizers``
  package on the training split, cached as JSON under the cache directory (keyed by vocabulary size
  and a hash of the training text), so it is trained once.
* anything else: a hub name for ``transformers.AutoTokenizer`` (``t5-base`` is GaLore's); needs the
  network or a local Hugging Face cache.

A malformed ``bpe:<vocab>`` or a name ``transformers`` cannot load is a
:class:`~experiments.errors.UsageError` of ``--tokenizer``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from experiments.errors import UsageError, excerpt

DEFAULT_BPE_VOCAB = 4096
# 256 byte symbols of the byte-level alphabet plus the two special tokens.
MIN_BPE_VOCAB = 258


class Tokenizer(Protocol):
    """What training needs from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens, with three special tokens after the 256 byte values."""

    name: str = "byte"
    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258
    vocab_size: int = 259

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A ``tokenizers`` byte-level BPE with ``<pad>`` (id 0) and ``<eos>`` (id 1) special tokens."""

    def __init__(self, backend, name: str) -> None:
        self._backend = backend
        self.name = name
        self.vocab_size = backend.get_vocab_size()
        self.pad_id = backend.token_to_id("<pad>")
        self.eos_id = backend.token_to_id("<eos>")

    @classmethod
    def trained_or_cached(cls, texts: Sequence[str], vocab_size: int, cache_dir: Path) -> BPETokenizer:
        """Load the BPE for (``texts``, ``vocab_size``) from ``cache_dir``, training it on first use."""
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers, trainers

        digest = hashlib.sha256("\f".join(texts).encode("utf-8")).hexdigest()[:16]
        path = Path(cache_dir) / f"bpe-{vocab_size}-{digest}.json"
        if path.exists():
            return cls(Backend.from_file(str(path)), name=f"bpe:{vocab_size}")
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        backend.save(str(temporary))
        temporary.replace(path)
        return cls(backend, name=f"bpe:{vocab_size}")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._backend.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids))


class HubTokenizer:
    """A ``transformers.AutoTokenizer`` (e.g. ``t5-base``), without special tokens added on encode."""

    def __init__(self, name: str) -> None:
        from transformers import AutoTokenizer

        try:
            self._backend = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise UsageError(
                "--tokenizer",
                f"transformers cannot load {name!r} ({excerpt(error)}); expected byte, bpe[:vocab] or the name of "
                "a Hugging Face tokenizer on the hub (online) or in the local cache",
            ) from None
        self.name = name
        # The base vocabulary, without added tokens: T5's 100 sentinel ids (32000..32099) never come
        # out of plain text, which is why GaLore's configs use vocab_size 32000 with t5-base.
        self.vocab_size = self._backend.vocab_size
        self.eos_id = self._backend.eos_token_id
        # Tokenizers without a pad token (GPT-2) pad with <eos>; padded targets are masked anyway.
        self.pad_id = self._backend.pad_token_id if self._backend.pad_token_id is not None else self.eos_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._backend(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids))


def build_tokenizer(spec: str, training_texts: Callable[[], Sequence[str]], cache_dir: Path) -> Tokenizer:
    """The tokenizer named by ``spec`` (see the module docstring).

    ``training_texts`` is called only when a BPE has to be trained or looked up in the cache.
    """
    kind, _, argument = spec.partition(":")
    if spec == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if argument and not argument.isdigit():
            raise UsageError("--tokenizer", f"expected bpe or bpe:<vocabulary size> such as bpe:4096, got {spec!r}")
        vocab_size = int(argument) if argument else DEFAULT_BPE_VOCAB
        if vocab_size < MIN_BPE_VOCAB:
            raise UsageError(
                "--tokenizer", f"expected a BPE vocabulary size of at least {MIN_BPE_VOCAB}, got {vocab_size}"
            )
        return BPETokenizer.trained_or_cached(training_texts(), vocab_size, cache_dir)
    return HubTokenizer(spec)
