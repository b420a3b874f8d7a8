"""Training and validation data: the embedded corpus as shuffled fixed-length chunks, or C4.

A batch is a LongTensor ``[batch_size, max_length]`` of token ids; the model reads all of it and the
loss predicts ``ids[:, 1:]`` from ``ids[:, :-1]`` with ``pad_id`` targets masked (the Hugging Face
shift, as in GaLore). Every loader has ``next_batch()``, ``state_dict()`` and ``load_state_dict()``,
so a resumed run reads exactly the batches an uninterrupted one would have read.

Data-parallel sharding works like ``DistributedSampler``: every rank draws the same global order and
takes its own slice of each global batch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from experiments.corpus import SHAKESPEARE_PATH, load_shakespeare
from experiments.data_c4 import build_c4_data
from experiments.data_interface import DataBundle, DataSpec
from experiments.errors import UsageError, expected_one_of
from experiments.tokenizer import Tokenizer, build_tokenizer


class ChunkLoader:
    """Non-overlapping ``seq_len`` chunks of one token stream, in a new random order every epoch.

    Each epoch draws a random start offset in ``[0, seq_len)`` (so chunk boundaries move between
    epochs) and a permutation of the chunks from one ``torch.Generator``. The state is the epoch, the
    number of global sequences already read in it, and the generator state at the start of the
    epoch, from which the epoch's order is drawn again on resume.
    """

    def __init__(
        self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.global_batch = batch_size * world_size
        if (len(tokens) - seq_len) // seq_len < self.global_batch:
            raise UsageError(
                "--batch_size",
                f"the {len(tokens):,} training tokens are too few for a global batch of {self.global_batch} "
                f"sequences (batch_size x world_size) of length {seq_len}; expected a smaller batch_size or max_length",
            )
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._epoch_generator_state = self.generator.get_state()
        self._offset = int(torch.randint(0, self.seq_len, (1,), generator=self.generator))
        num_chunks = (len(self.tokens) - self._offset) // self.seq_len
        self._order = torch.randperm(num_chunks, generator=self.generator)
        self.position = 0

    def next_batch(self) -> torch.Tensor:
        if self.position + self.global_batch > len(self._order):
            self.epoch += 1
            self._start_epoch()
        first = self.position + self.rank * self.batch_size
        chunks = self._order[first : first + self.batch_size]
        self.position += self.global_batch
        starts = self._offset + chunks * self.seq_len
        return self.tokens[starts[:, None] + torch.arange(self.seq_len)].long()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "generator": self._epoch_generator_state}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._start_epoch()
        self.epoch = state["epoch"]
        self.position = state["position"]


def validation_chunks(
    tokens: torch.Tensor, seq_len: int, batch_size: int, max_tokens: int, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """The first ``max_tokens`` validation tokens as ``seq_len`` chunks; rank r gets chunks r, r+W, ...

    The chunk count is rounded down to a multiple of ``world_size``: every rank runs as many
    forward passes (FSDP2's are collective)."""
    num_chunks = min(max_tokens, len(tokens)) // seq_len
    if num_chunks < world_size:
        raise UsageError(
            "--eval_tokens",
            f"{max_tokens} tokens give {num_chunks} validation sequences of length {seq_len}; expected at least "
            f"one per rank ({world_size}): eval_tokens >= max_length x world_size",
        )
    num_chunks -= num_chunks % world_size
    chunks = tokens[: num_chunks * seq_len].view(num_chunks, seq_len)[rank::world_size].long()
    return list(chunks.split(batch_size))


def encode_documents(tokenizer: Tokenizer, documents: Sequence[str]) -> torch.Tensor:
    """All documents as one stream, ``eos`` after each (int16 when the vocabulary allows)."""
    ids: list[int] = []
    for document in tokenizer.encode_batch(documents):
        ids.extend(document)
        ids.append(tokenizer.eos_id)
    dtype = torch.int16 if tokenizer.vocab_size <= torch.iinfo(torch.int16).max else torch.int32
    return torch.tensor(ids, dtype=dtype)


def cached_encoding(
    tokenizer: Tokenizer, splits: dict[str, Sequence[str]], source_digest: str, cache_dir: Path
) -> dict[str, torch.Tensor]:
    """Token streams of ``splits``, encoded once and cached under ``cache_dir``."""
    safe_name = tokenizer.name.replace("/", "_").replace(":", "-")
    path = Path(cache_dir) / f"tokens-{safe_name}-{source_digest}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    encoded = {name: encode_documents(tokenizer, documents) for name, documents in splits.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(encoded, temporary)
    temporary.replace(path)  # atomic: concurrent ranks or runs may race to write the same file
    return encoded


def shakespeare_data(spec: DataSpec) -> DataBundle:
    """The embedded Shakespeare corpus (``experiments/corpus.py``), shuffled chunks for training."""
    splits = load_shakespeare()
    tokenizer = build_tokenizer(spec.tokenizer, lambda: splits.train, spec.cache_dir)
    digest = hashlib.sha256(SHAKESPEARE_PATH.read_bytes()).hexdigest()[:16]
    tokens = cached_encoding(
        tokenizer, {"train": splits.train, "validation": splits.validation}, digest, spec.cache_dir
    )
    train = ChunkLoader(tokens["train"], spec.max_length, spec.batch_size, spec.seed, spec.rank, spec.world_size)
    validation = validation_chunks(
        tokens["validation"], spec.max_length, spec.batch_size, spec.eval_tokens, spec.rank, spec.world_size
    )
    return DataBundle(tokenizer=tokenizer, train=train, validation_batches=lambda: iter(validation))


# c4: ``allenai/c4`` ``en`` streamed from the hub (needs the network and ``datasets``), ``data_c4.py``.
DATASETS: dict[str, Callable[[DataSpec], DataBundle]] = {
    "shakespeare": shakespeare_data,
    "c4": build_c4_data,
}


def build_data(spec: DataSpec) -> DataBundle:
    """The :class:`DataBundle` of ``spec.dataset``."""
    try:
        builder = DATASETS[spec.dataset]
    except KeyError:
        raise UsageError("--dataset", f"unknown dataset: {expected_one_of(spec.dataset, DATASETS)}") from None
    return builder(spec)
