"""Corpus, tokenizers and data loaders of ``experiments``."""

from __future__ import annotations

import pytest
import torch

import experiments.data_c4
from experiments.corpus import VALIDATION_PLAYS, load_shakespeare, play_title  # noqa: E402
from experiments.data import ChunkLoader, build_data, encode_documents, validation_chunks  # noqa: E402
from experiments.data_c4 import DocumentLoader, pad_or_truncate, validation_batches  # noqa: E402
from experiments.data_interface import DataSpec  # noqa: E402
from experiments.errors import UsageError
from experiments.tokenizer import ByteTokenizer, build_tokenizer  # noqa: E402


def test_embedded_corpus_is_real_english_split_by_play():
    splits = load_shakespeare()
    titles = [play_title(play) for play in splits.train + splits.validation]
    assert len(titles) == len(set(titles)) == 38
    assert sorted(play_title(play) for play in splits.validation) == sorted(VALIDATION_PLAYS)
    assert sum(map(len, splits.train)) > 4_000_000
    hamlet = next(play for play in splits.validation if play_title(play) == "Hamlet")
    assert "To be, or not to be" in hamlet
    assert not any("To be, or not to be: that is the question" in play for play in splits.train)


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode_batch(["Thou art — façade"])[0]
    assert tokenizer.decode(ids) == "Thou art — façade"
    stream = encode_documents(tokenizer, ["ab", "c"])
    assert stream.tolist() == [97, 98, tokenizer.eos_id, 99, tokenizer.eos_id]


def test_bpe_tokenizer_is_trained_once_and_cached(tmp_path):
    texts = load_shakespeare().train[:3]
    calls = []

    def training_texts():
        calls.append(1)
        return texts

    tokenizer = build_tokenizer("bpe:512", training_texts, tmp_path)
    assert tokenizer.vocab_size == 512 and len(list(tmp_path.glob("bpe-512-*.json"))) == 1
    ids = tokenizer.encode_batch(["To be, or not to be"])[0]
    assert tokenizer.decode(ids) == "To be, or not to be"
    assert len(ids) < len("To be, or not to be")
    again = build_tokenizer("bpe:512", training_texts, tmp_path)
    assert again.encode_batch(["To be, or not to be"])[0] == ids
    with pytest.raises(ValueError, match="at least 258"):
        build_tokenizer("bpe:100", training_texts, tmp_path)


def _drain(loader: ChunkLoader, steps: int) -> list[torch.Tensor]:
    return [loader.next_batch() for _ in range(steps)]


def test_chunk_loader_resumes_exactly_across_epochs():
    tokens = torch.arange(1000, dtype=torch.int16)
    loader = ChunkLoader(tokens, seq_len=10, batch_size=8, seed=3)
    _drain(loader, 17)  # 99 chunks per epoch, 12 batches: crosses an epoch boundary
    state = loader.state_dict()
    expected = _drain(loader, 20)
    resumed = ChunkLoader(tokens, seq_len=10, batch_size=8, seed=999)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, _drain(resumed, 20), strict=True))
    # Chunks are contiguous windows of the stream.
    batch = expected[0]
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(8, 9, dtype=torch.long))


def test_chunk_loader_shards_one_global_order_across_ranks():
    tokens = torch.arange(5000, dtype=torch.int32)
    single = ChunkLoader(tokens, seq_len=16, batch_size=8, seed=0)
    ranks = [ChunkLoader(tokens, seq_len=16, batch_size=4, seed=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        together = torch.cat([loader.next_batch() for loader in ranks])
        assert torch.equal(together, single.next_batch())


def test_validation_chunks_are_sharded_and_capped():
    tokens = torch.arange(1000)
    chunks = torch.cat(validation_chunks(tokens, seq_len=10, batch_size=4, max_tokens=200))
    assert chunks.shape == (20, 10)
    shards = [torch.cat(validation_chunks(tokens, 10, 4, 200, rank=r, world_size=3)) for r in range(3)]
    assert [len(shard) for shard in shards] == [6, 6, 6]  # 20 chunks rounded down: equal forward passes per rank
    assert sorted(torch.cat(shards)[:, 0].tolist()) == chunks[:18, 0].tolist()


def test_shakespeare_bundle(tmp_path):
    spec = DataSpec(
        dataset="shakespeare",
        tokenizer="byte",
        max_length=64,
        batch_size=4,
        eval_tokens=1024,
        seed=0,
        cache_dir=tmp_path,
    )
    data = build_data(spec)
    batch = data.train.next_batch()
    assert batch.shape == (4, 64) and batch.dtype == torch.long
    validation = list(data.validation_batches())
    assert sum(len(b) for b in validation) == 1024 // 64
    assert list(tmp_path.glob("tokens-byte-*.pt"))  # encoded once, then cached
    with pytest.raises(ValueError, match="--dataset: unknown dataset: expected one of .*, got 'wikipedia'"):
        build_data(DataSpec("wikipedia", "byte", 64, 4, 1024, 0, tmp_path))


def test_c4_style_documents_are_truncated_padded_and_resumable():
    tokenizer = ByteTokenizer()
    batch = pad_or_truncate([[1, 2, 3], list(range(10))], seq_len=5, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    assert batch.tolist() == [[1, 2, 3, tokenizer.eos_id, tokenizer.pad_id], [0, 1, 2, 3, 4]]
    documents = [f"document {i}" for i in range(7)]
    loader = DocumentLoader(lambda skip: iter(documents[skip:]), tokenizer, seq_len=16, batch_size=2)
    loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(4)]  # wraps around the 7 documents
    resumed = DocumentLoader(lambda skip: iter(documents[skip:]), tokenizer, seq_len=16, batch_size=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [resumed.next_batch() for _ in range(4)], strict=True))
    batches = list(validation_batches(iter(documents), tokenizer, seq_len=16, batch_size=2, max_tokens=30))
    assert len(batches) == 2  # 11 real tokens per document (10 bytes + eos): stop once 30 are reached


def test_c4_pipeline_runs_offline_on_an_in_memory_stream(monkeypatch, tmp_path):
    """``--dataset c4`` end to end, with ``datasets.load_dataset`` serving local documents."""
    datasets = pytest.importorskip("datasets")
    documents = {
        "train": [f"training document {i}. " * (1 + i % 4) for i in range(40)],
        "validation": [f"held-out document {i}." for i in range(20)],
    }
    requests = []

    def load_dataset(path, name, split, streaming):
        requests.append((path, name, split, streaming))
        return datasets.Dataset.from_dict({"text": documents[split]}).to_iterable_dataset(num_shards=4)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(experiments.data_c4, "hub_unreachable", lambda: None)  # the hub is not asked
    spec = DataSpec("c4", "byte", max_length=24, batch_size=4, eval_tokens=100, seed=0, cache_dir=tmp_path)
    data = build_data(spec)
    assert ("allenai/c4", "en", "train", True) in requests and ("allenai/c4", "en", "validation", True) in requests
    for _ in range(3):
        batch = data.train.next_batch()
        assert batch.shape == (4, 24)
    state = data.train.state_dict()
    expected = [data.train.next_batch() for _ in range(3)]
    resumed = build_data(spec)
    resumed.train.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [resumed.train.next_batch() for _ in range(3)]))
    validation = list(data.validation_batches())
    assert sum(int((b != 256).sum()) for b in validation) >= 100
    assert all(torch.equal(a, b) for a, b in zip(validation, data.validation_batches()))  # same slice every time

    def first_tokens(rank: int) -> set[bytes]:
        loader = build_data(DataSpec("c4", "byte", 24, 2, 100, 0, tmp_path, rank=rank, world_size=2)).train
        return {bytes(row[row < 256].tolist()) for _ in range(10) for row in loader.next_batch()}

    assert not first_tokens(0) & first_tokens(1)  # ranks read disjoint documents


def test_c4_offline_is_one_usage_error_within_seconds(monkeypatch, tmp_path):
    """``datasets`` retried five times and ended in a 14-frame traceback; the probe answers at once."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid:8443")
    calls = []

    def refuse(address, timeout):
        calls.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(experiments.data_c4.socket, "create_connection", refuse)
    spec = DataSpec("c4", "byte", max_length=24, batch_size=4, eval_tokens=100, seed=0, cache_dir=tmp_path)
    with pytest.raises(UsageError) as refused:
        build_data(spec)
    assert str(refused.value) == (
        "--dataset: c4 streams allenai/c4 from the Hugging Face Hub, but hub.invalid:8443 cannot be reached "
        "(Network is unreachable); offline, train on the embedded corpus (--dataset shakespeare)"
    )
    assert calls == [(("hub.invalid", 8443), experiments.data_c4.PROBE_TIMEOUT_S)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="but HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set; offline, train on"):
        build_data(spec)
    assert len(calls) == 1


def test_hub_tokenizer_path_loads_a_saved_tokenizer(tmp_path):
    """The ``--tokenizer <hub name>`` path, offline: AutoTokenizer also loads a local directory."""
    transformers = pytest.importorskip("transformers")
    bpe = build_tokenizer("bpe:300", lambda: load_shakespeare().train[:2], tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._backend, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(tmp_path / "local_tokenizer")
    tokenizer = build_tokenizer(str(tmp_path / "local_tokenizer"), lambda: [], tmp_path)
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (300, 1, 0)
    ids = tokenizer.encode_batch(["Good night, sweet prince"])[0]
    assert ids == bpe.encode_batch(["Good night, sweet prince"])[0]
    assert tokenizer.decode(ids) == "Good night, sweet prince"
