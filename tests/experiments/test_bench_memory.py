"""experiments/bench/memory_worker.py (the per-configuration process of experiments.bench.memory):
on a tiny LLaMA, the JSON it writes has the documented fields, its components add up to the peak,
and backward projection holds fewer gradient bytes than the standard optimizer at an ordinary step;
stepping in the backward pass holds none (APOLLO's rows too, whose hooks step with the full gradient)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Width 128 at rank 32: the 128×32 projected moments have 4096 values (quantized at 8 bits).
TINY = dict(model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=300, max_position_embeddings=64, hidden_act="silu", rms_norm_eps=1e-6,
            tie_word_embeddings=False)
STEP_FIELDS = {"step", "peak", "peak_forward_backward", "peak_step", "resident_before", "grad_bytes",
               "accumulator_bytes", "full_projected_grads", "expected_refreshing", "state_bytes", "components",
               "seconds_forward_backward", "seconds_step"}
TOP_FIELDS = {"optimizer", "label", "model", "dtype", "rank", "update_proj_gap", "device", "torch", "peak_method",
              "peak_reset_verified", "parameters", "projected_weights", "baseline", "weights",
              "expected_accumulator_bytes", "steps", "whole_run_peak", "build_peak"}


def _start(tmp_path: Path, config: Path, optimizer: str, gap: int) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / f"{optimizer}.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, "-m", "experiments.bench.memory_worker", "--model", str(config), "--dtype", "fp32",
               "--optimizer", optimizer, "--rank", "32", "--gap", str(gap), "--steps", "2", "--seq", "32",
               "--threads", "1", "--out", str(out)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out


def test_worker_output_and_backward_projection_holds_fewer_gradient_bytes(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY), encoding="utf-8")
    runs = {key: _start(tmp_path, config, key, gap)
            for key, gap in (("dct_8bit", 2), ("dct_8bit_bp", 200), ("dct_8bit_sib", 2), ("apollo_8bit_sib", 2),
                             ("apollo_mini_8bit_sib_ckpt", 2), ("int8_apollo_mini_8bit_sib_ckpt", 2))}
    results = {}
    for key, (process, out) in runs.items():
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr[-3000:]
        results[key] = json.loads(out.read_text(encoding="utf-8"))

    for key, result in results.items():
        assert TOP_FIELDS <= set(result), TOP_FIELDS - set(result)
        assert result["optimizer"] == key and result["projected_weights"] == 14  # 2 layers × 7 linears
        assert result["peak_method"] in ("VmHWM (reset via /proc/self/clear_refs)", "ru_maxrss")
        assert [s["step"] for s in result["steps"]] == [1, 2]
        for step in result["steps"]:
            assert STEP_FIELDS <= set(step), STEP_FIELDS - set(step)
            parts = step["components"]
            assert set(parts) == {"weights", "gradients", "state", "transients"}
            assert parts["weights"] == result["weights"] > 0
            assert parts["gradients"] == step["grad_bytes"] + step["accumulator_bytes"]
            assert parts["state"] == step["state_bytes"] > 0
            assert sum(parts.values()) + result["baseline"] == step["peak"]
            assert step["peak"] == max(step["peak_forward_backward"], step["peak_step"]) >= step["resident_before"]
        assert result["whole_run_peak"] >= max(s["peak"] for s in result["steps"])

    standard, backward = results["dct_8bit"]["steps"], results["dct_8bit_bp"]["steps"]
    # first step: no subspace yet, every gradient full-size in both
    assert backward[0]["full_projected_grads"] == standard[0]["full_projected_grads"] == 14
    assert backward[0]["components"]["gradients"] == standard[0]["components"]["gradients"]
    # ordinary step: the hooks projected every weight (gap 200: no staggered refresh at step 2)
    assert backward[1]["expected_refreshing"] == backward[1]["full_projected_grads"] == 0
    assert backward[1]["accumulator_bytes"] == results["dct_8bit_bp"]["expected_accumulator_bytes"] > 0
    assert standard[1]["accumulator_bytes"] == 0 and standard[1]["full_projected_grads"] == 14
    assert backward[1]["components"]["gradients"] < standard[1]["components"]["gradients"]

    # step in backward: every parameter stepped in its hook, nothing left after backward, and the
    # same training step as the standard optimizer (same loss at step 2)
    in_backward = results["dct_8bit_sib"]["steps"]
    assert all(s["grad_bytes"] == s["accumulator_bytes"] == s["full_projected_grads"] == 0 for s in in_backward)
    assert results["dct_8bit_sib"]["expected_accumulator_bytes"] == 0
    assert in_backward[1]["loss"] == standard[1]["loss"]

    # APOLLO under step in backward (no backward projection: its hooks step each weight with its full
    # gradient): nothing left after backward either; APOLLO-Mini (rank 1, GaLore's groups: the same 14
    # weights) keeps less state than APOLLO at rank 32
    for key in ("apollo_8bit_sib", "apollo_mini_8bit_sib_ckpt"):
        assert not results[key]["backward_projection"] and results[key]["expected_accumulator_bytes"] == 0
        assert all(s["grad_bytes"] == s["accumulator_bytes"] == s["full_projected_grads"] == 0
                   for s in results[key]["steps"])
    assert results["apollo_mini_8bit_sib_ckpt"]["steps"][1]["state_bytes"] < \
        results["apollo_8bit_sib"]["steps"][1]["state_bytes"]

    # int8 weights (quantize_model_weights before the optimizer): the 14 linears as 1-byte codes + one fp32
    # scale per row (this fp32 model), the embedding, head and norms unchanged; the same optimizer state
    lean, mini = results["int8_apollo_mini_8bit_sib_ckpt"], results["apollo_mini_8bit_sib_ckpt"]
    assert lean["int8_weights"] == 14 and mini["int8_weights"] == 0
    linear_values = 2 * (4 * 128 * 128 + 3 * 128 * 352)
    linear_rows = 2 * (4 * 128 + 2 * 352 + 128)
    assert mini["weights"] - lean["weights"] == 4 * linear_values - (linear_values + 4 * linear_rows)
    assert [s["state_bytes"] for s in lean["steps"]] == [s["state_bytes"] for s in mini["steps"]]
    assert all(s["grad_bytes"] == s["accumulator_bytes"] == 0 for s in lean["steps"])
