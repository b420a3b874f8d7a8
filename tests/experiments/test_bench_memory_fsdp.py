"""experiments/bench/memory_fsdp.py on a tiny LLaMA (2 gloo processes per configuration): every rank
reports its peak over a measured step with the peak reset verified, the ratios are to AdamW on the
same rank, the table is written, and under step in backward no gradient outlives the backward pass
while AdamW holds its sharded gradients."""

from __future__ import annotations

import json

from experiments.bench import memory_fsdp

# Width 256 at rank 32: 256×32 projected moments (8192 values, quantized at 8 bits), 128 rows per rank,
# whole blocks of moment_block_size=128.
TINY = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
            vocab_size=512, max_position_embeddings=64, hidden_act="silu", rms_norm_eps=1e-6,
            tie_word_embeddings=False)


def test_fsdp_memory_bench_per_rank_table(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY), encoding="utf-8")
    out = tmp_path / "out"
    result = memory_fsdp.main(["--model", str(config), "--rank", "32", "--seq", "32", "--moment_block_size", "128",
                               "--configs", "adamw_fused", "dct_8bit_sib", "--out", str(out)])
    assert result["reference"] == "adamw_fused"
    for key in ("adamw_fused", "dct_8bit_sib"):
        ranks = result["results"][key]["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        for r in ranks:
            assert r["peak_reset_verified"] and r["peak"] >= r["resident_before"] > r["baseline"] > 0
            assert r["peak"] == max(r["peak_forward_backward"], r["peak_step"])
            assert r["placements"] and all("Shard" in p for p in r["placements"])
    assert result["derived"]["adamw_fused"]["ratios"] == [1.0, 1.0]
    assert all(r["grad_bytes_after_backward"] > 0 for r in result["results"]["adamw_fused"]["ranks"])
    assert all(r["grad_bytes_after_backward"] == 0 for r in result["results"]["dct_8bit_sib"]["ranks"])
    assert all(r["state_bytes"] < q["state_bytes"] for r, q in zip(result["results"]["dct_8bit_sib"]["ranks"],
                                                                    result["results"]["adamw_fused"]["ranks"]))
    text = (out / "results.md").read_text(encoding="utf-8")
    assert "rank 1 peak MiB" in text and "2 gloo processes" in text and "`dct_8bit_sib`" in text
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["reference"] == "adamw_fused"
