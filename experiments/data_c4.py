"""C4 ``en`` streamed through ``datasets``, preprocessed the way GaLore's ``torchrun_main.py`` does it.

Every document becomes one sequence: its tokens plus ``eos``, truncated to ``max_length`` and padded
with ``pad_id`` (padded targets are masked in the loss). The training stream is shuffled with a
seeded buffer and split across data-parallel ranks with ``split_dataset_by_node``; the loader's
state is the number of documents read, and resuming skips that many.

Needs the network and ``pip install datasets``; it cannot run in an offline sandbox.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from collections.abc import Callable, Iterator, Sequence

import torch

from experiments.data_interface import DataBundle, DataSpec
from experiments.errors import UsageError
from experiments.tokenizer import Tokenizer, build_tokenizer

C4_PATH = "allenai/c4"
HUB_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 5.0
C4_CONFIG = "en"
SHUFFLE_BUFFER = 10_000
# GaLore evaluates on a shuffled slice of the validation split with a fixed seed; every run here uses
# the same slice whatever its --seed.
VALIDATION_SEED = 42
# Documents read from the training stream to train a local BPE (``--tokenizer bpe``) on C4.
BPE_TRAINING_DOCUMENTS = 20_000


def pad_or_truncate(sequences: Sequence[Sequence[int]], seq_len: int, eos_id: int, pad_id: int) -> torch.Tensor:
    """One row per document: ``ids + [eos]`` cut to ``seq_len``, right-padded with ``pad_id``."""
    batch = torch.full((len(sequences), seq_len), pad_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        kept = (list(ids) + [eos_id])[:seq_len]
        batch[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
    return batch


class DocumentLoader:
    """Batches of whole documents from a stream that can be reopened after skipping ``n`` documents."""

    def __init__(
        self, open_stream: Callable[[int], Iterator[str]], tokenizer: Tokenizer, seq_len: int, batch_size: int
    ) -> None:
        self.open_stream = open_stream
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.documents_read = 0
        self._documents = open_stream(0)

    def _next_document(self) -> str:
        try:
            return next(self._documents)
        except StopIteration:  # end of the stream: start the next pass from the beginning
            self.documents_read = 0
            self._documents = self.open_stream(0)
            return next(self._documents)

    def next_batch(self) -> torch.Tensor:
        texts = [self._next_document() for _ in range(self.batch_size)]
        self.documents_read += len(texts)
        ids = self.tokenizer.encode_batch(texts)
        return pad_or_truncate(ids, self.seq_len, self.tokenizer.eos_id, self.tokenizer.pad_id)

    def state_dict(self) -> dict:
        return {"documents_read": self.documents_read}

    def load_state_dict(self, state: dict) -> None:
        self.documents_read = state["documents_read"]
        self._documents = self.open_stream(self.documents_read)


def validation_batches(
    documents: Iterator[str], tokenizer: Tokenizer, seq_len: int, batch_size: int, max_tokens: int
) -> Iterator[torch.Tensor]:
    """Padded validation batches until ``max_tokens`` non-pad tokens have been yielded."""
    seen = 0
    while seen < max_tokens:
        texts = [text for _, text in zip(range(batch_size), documents, strict=False)]
        if not texts:
            return
        batch = pad_or_truncate(tokenizer.encode_batch(texts), seq_len, tokenizer.eos_id, tokenizer.pad_id)
        seen += int((batch != tokenizer.pad_id).sum())
        yield batch


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (``None``: it can, or a proxy decides), in at most
    :data:`PROBE_TIMEOUT_S` seconds; ``datasets`` itself retries five times before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", HUB_ENDPOINT))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as error:
        return f"{host}:{port} cannot be reached ({error})"


def build_c4_data(spec: DataSpec) -> DataBundle:
    """Streaming C4 training and validation data for ``spec`` (rank-sharded); offline, a
    :class:`UsageError` within seconds."""
    problem = hub_unreachable()
    if problem:
        raise UsageError(
            "--dataset",
            f"c4 streams {C4_PATH} from the Hugging Face Hub, but {problem}; offline, train on the embedded "
            "corpus (--dataset shakespeare)",
        )
    try:
        import datasets
        from datasets.distributed import split_dataset_by_node
    except ImportError:
        raise UsageError("--dataset", "c4 needs the datasets package (pip install datasets)") from None

    def stream(split: str, seed: int):
        dataset = datasets.load_dataset(C4_PATH, C4_CONFIG, split=split, streaming=True)
        dataset = dataset.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        return split_dataset_by_node(dataset, rank=spec.rank, world_size=spec.world_size)

    train_stream = stream("train", spec.seed)

    def open_train(skip: int) -> Iterator[str]:
        return (example["text"] for example in train_stream.skip(skip))

    def bpe_training_texts() -> list[str]:
        return [text for _, text in zip(range(BPE_TRAINING_DOCUMENTS), open_train(0), strict=False)]

    tokenizer = build_tokenizer(spec.tokenizer, bpe_training_texts, spec.cache_dir)
    validation_stream = stream("validation", VALIDATION_SEED)

    def validation() -> Iterator[torch.Tensor]:
        documents = (example["text"] for example in validation_stream)
        return validation_batches(documents, tokenizer, spec.max_length, spec.batch_size, spec.eval_tokens)

    train = DocumentLoader(open_train, tokenizer, spec.max_length, spec.batch_size)
    return DataBundle(tokenizer=tokenizer, train=train, validation_batches=validation)
