"""Benchmarks at toy size: experiments/bench/optimizer_step.py (every candidate steps and is counted),
lowbit_report.py over the committed compare outputs of results/lowbit_cpu, communication.py
--backward_projection on the micro LLaMA, and lowbit_update_error.py's shadow moments."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

from experiments.bench import communication, lowbit_report, optimizer_step

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results" / "lowbit_cpu"


def test_optimizer_step_times_and_counts_every_candidate(tmp_path, capsys):
    out = tmp_path / "steps.csv"
    torchao = importlib.util.find_spec("torchao") is not None   # its state is a tensor subclass: counted too
    optimizer_step.main(["--shape", "96", "40", "--rank", "8", "--repeats", "1", "--threads", "1", "--csv", str(out),
                         *(["--torchao"] if torchao else [])])
    rows = list(csv.DictReader(out.open()))
    table = capsys.readouterr().out.splitlines()
    fused_row = next(line for line in table if line.startswith("| torch.optim.AdamW (fused)"))
    assert fused_row.split(" | ")[4] == "1.00"          # the second ratio column: × AdamW (fused)
    if torchao:
        assert all(int(row["state_bytes"]) > 0 for row in rows if row["optimizer"].startswith("torchao"))
    labels = {row["optimizer"] for row in rows}
    assert {"torch.optim.AdamW (fused)", "AdamW, 8-bit moments (library plain path)", "DCTProjAdam"} <= labels
    assert all(float(row["ms"]) > 0 for row in rows)
    plain = {row["optimizer"]: int(row["state_bytes"]) for row in rows if "library plain path" in row["optimizer"]}
    # 96×40 = 3840 values: below the 4096 at which moments are quantized, so float32 moments
    assert set(plain.values()) == {2 * 96 * 40 * 4}


def test_lowbit_report_pairs_each_low_bit_row_with_its_counterpart(tmp_path):
    lowbit_report.main(["--inputs", str(RESULTS / "tiny_adamw"), str(RESULTS / "tiny_projected"),
                        "--out", str(tmp_path)])
    rows = {row["key"]: row for row in json.loads((tmp_path / "results.json").read_text())}
    table = (tmp_path / "results.md").read_text().split("### Low-bit moments vs their 32-bit counterpart")[1]
    paired = [line for line in table.splitlines() if line.startswith("| ") and "method" not in line]
    assert len(paired) == sum(key in rows for key in lowbit_report.REFERENCE if lowbit_report.bits_of(key))
    galore4 = rows["galore_4bit"]["final_val_loss"] / rows["galore_adamw"]["final_val_loss"] - 1
    assert f"{100 * galore4:+.2f}%" in next(line for line in paired if line.startswith("| GaLoreAdamW, 4-bit"))
    assert "goal" not in table


def test_communication_under_backward_projection_is_less_than_ddp_after_the_first_step(capsys):
    communication.main(["--backward_projection", "--model_config", "llama_micro", "--steps", "3"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| DCT")
            or line.startswith("| GaLore")]
    assert len(rows) == 2
    for row in rows:
        ddp, first = (int(cell.removesuffix(" B").replace(",", "")) for cell in row[1:3])
        assert first == ddp                                    # no subspace at the first step: every gradient
        assert 0 < float(row[4].rstrip(" |")) < 1              # later steps: the projected accumulators


def test_communication_counts_the_collectives_of_the_optimizer_step_under_fsdp2():
    """Counted through torch's dispatcher: GaLore's refresh all-gathers every weight whole (fp32),
    DCT without the residual sends nothing at an ordinary step."""
    result = communication.measure("llama_micro", 2, 0.25)
    steps = result["optimizers"]
    galore = next(counts for label, counts in steps.items() if label.startswith("GaLoreAdamW") and "refresh" in label)
    whole_weights = sum(math.prod(shape) for shape in result["weights"].values()) * 4
    assert (galore["all-gather calls"], galore["all-gather bytes"]) == (len(result["weights"]), whole_weights)
    assert galore["broadcast calls"] == len(result["weights"])
    assert steps["DCTProjAdam residual=none: ordinary step"] == {}
    assert steps["DCTProjAdam residual=none: refresh step"]["all-reduce calls"] > 0


def test_apollo_scaling_compares_both_projections_at_each_rank(tmp_path):
    from experiments.bench import apollo_scaling

    out = tmp_path / "scaling.md"
    apollo_scaling.main(["--steps", "3", "--warmup", "1", "--gap", "2", "--ranks", "1", "4", "--out", str(out)])
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| random")
            or line.startswith("| dct")]
    assert len(rows) == 4
    assert all(math.isfinite(float(row[2].split(" ")[0])) and float(row[3]) >= 0 and float(row[5].rstrip(" |")) >= 0
               for row in rows)


def test_lowbit_seeds_pairs_each_seed_with_its_counterpart(tmp_path):
    """Three compare outputs (seeds 0, 1, 2): the mean, the spread and the paired Δ% per seed with
    their mean ± standard error, over the seeds both rows have; the library's 4-bit AdamW beside
    torchao's the same way."""
    from experiments.bench import lowbit_seeds

    losses = {0: {"dct_default": 2.0, "dct_4bit": 2.02, "adamw_lib_4bit": 1.98, "torchao_adamw4bit": 2.0},
              1: {"dct_default": 2.1, "dct_4bit": 2.079, "adamw_lib_4bit": 2.1},
              2: {"dct_default": 2.2, "adamw_lib_4bit": 2.2, "torchao_adamw4bit": 2.0}}
    folders = []
    for seed, rows in losses.items():
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        weights = ", float32 weights" if seed else ""          # compare's header now, and before --dtype
        (folder / "results.md").write_text(f"Model `m`, rank 32, update gap 200, seed {seed}{weights}. Device: cpu.\n\n"
                                           f"Command: `compare --seed {seed}`\n")
        (folder / "results.json").write_text(json.dumps([{"key": key, "label": key, "final_val_loss": loss}
                                                         for key, loss in rows.items()]))
        folders.append(str(folder))
    lowbit_seeds.main(["--inputs", *folders, "--out", str(tmp_path / "seeds.md")])
    text = (tmp_path / "seeds.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| dct_4bit"))
    assert "| 0, 1 | 2.0200, 2.0790 | 2.0495 | 0.0590 | 2.0500 | -0.02% | +1.00%, -1.00% | +0.00 ± 1.00% |" in row
    peer = next(line for line in text.splitlines() if line.startswith("| adamw_lib_4bit | torchao_adamw4bit"))
    assert "| 0, 2 | 2.0900 | 2.0000 | +4.50% | -1.00%, +10.00% | +4.50 ± 5.50% |" in peer
    assert "`compare --seed 0`; `compare --seed 1`" in text


def test_update_error_of_an_unquantized_shadow_is_zero(tmp_path):
    """lowbit_update_error.py on the tiny LLaMA (rank 32: its 128×32 projected moments are
    quantized): a shadow with both moments in float is the float moments themselves (error 0, norm
    ratio 1, projected and plain tensors); 8-bit shadows move the update a little, 4-bit ones more."""
    from experiments.bench import lowbit_update_error

    lowbit_update_error.main(["--optimizer", "dct_adamw", "--model_config", "llama_tiny", "--num_training_steps", "6",
                              "--eval_every", "6", "--eval_tokens", "2048", "--batch_size", "2", "--max_length",
                              "32", "--rank", "32", "--update_proj_gap", "3", "--schemes", "float,float",
                              "block:256:dyn8,block:256:dyn8", "block:128:dyn,block:128:sqrt:srs",
                              "--out", str(tmp_path / "out"), "--runs_dir", str(tmp_path / "runs")])
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    error = {(row["scheme"], row["kind"]): row["relative_error"] for row in rows}
    assert {kind for _, kind in error} == {"projected", "plain"}
    for kind in ("projected", "plain"):
        assert error["float,float", kind] == 0.0
        assert 0 < error["block:256:dyn8,block:256:dyn8", kind] < error["block:128:dyn,block:128:sqrt:srs", kind]
    assert all(row["norm_ratio"] == 1.0 for row in rows if row["scheme"] == "float,float")
