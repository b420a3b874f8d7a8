"""The experiments' LLaMA: shapes, causality, module names, and agreement with Hugging Face."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.errors import UsageError  # noqa: E402
from experiments.model import Llama, LlamaConfig  # noqa: E402
from experiments.model_factory import CONFIGS_DIR, build_model, config_path, model_config_dict  # noqa: E402

SMALL = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4)


def test_logits_shape_and_causality():
    torch.manual_seed(0)
    model = Llama(SMALL)
    ids = torch.randint(0, 97, (2, 12))
    logits = model(ids)
    assert logits.shape == (2, 12, 97)
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 97
    assert torch.allclose(model(changed)[:, :8], logits[:, :8], atol=1e-6)
    assert not torch.allclose(model(changed)[:, 8:], logits[:, 8:])


def test_projected_linears_are_named_attn_and_mlp():
    names = {name for name, module in Llama(SMALL).named_modules() if isinstance(module, torch.nn.Linear)}
    projected = {name for name in names if "attn" in name or "mlp" in name}
    assert names - projected == {"lm_head"}
    assert "layers.0.attn.q_proj" in projected and "layers.1.mlp.up_proj" in projected
    assert len(projected) == 2 * 7


def test_galore_configs_have_the_paper_sizes():
    expected = {
        "llama_60m": (512, 1376, 8, 8),
        "llama_130m": (768, 2048, 12, 12),
        "llama_350m": (1024, 2736, 24, 16),
        "llama_1b": (2048, 5461, 24, 32),
        "llama_7b": (4096, 11008, 32, 32),
    }
    for name, sizes in expected.items():
        values = json.loads((CONFIGS_DIR / f"{name}.json").read_text())
        assert (
            values["hidden_size"],
            values["intermediate_size"],
            values["num_hidden_layers"],
            values["num_attention_heads"],
            values["vocab_size"],
        ) == (*sizes, 32000)
    config = LlamaConfig.from_dict(model_config_dict("llama_60m", 259))
    with torch.device("meta"):
        parameters = sum(p.numel() for p in Llama(config).parameters())
    assert 57e6 < parameters < 60e6  # GaLore's "60M" counts embeddings and head: 58.1M


def test_tiny_config_takes_the_tokenizer_vocabulary():
    assert model_config_dict("llama_tiny", 259)["vocab_size"] == 259
    assert config_path("llama_micro.json") == CONFIGS_DIR / "llama_micro.json"
    with pytest.raises(ValueError, match="smaller than the tokenizer's 32100"):
        model_config_dict("llama_60m", 32100)
    with pytest.raises(UsageError, match="--model_config: no such file.*llama_tiny, got 'llama_3m'"):
        config_path("llama_3m")


def test_matches_hugging_face_llama_with_the_same_weights():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = Llama(SMALL)
    hf_config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    hf_config._attn_implementation = "sdpa"
    theirs = transformers.LlamaForCausalLM(hf_config)
    renamed = {}
    for name, tensor in ours.state_dict().items():
        if name == "lm_head.weight":
            renamed[name] = tensor
        else:
            renamed["model." + name.replace(".attn.", ".self_attn.")] = tensor
    missing, unexpected = theirs.load_state_dict(renamed, strict=False)
    assert not unexpected and all("rotary" in name for name in missing)
    ids = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_hf_implementation_builds_from_a_config_file():
    pytest.importorskip("transformers")
    model = build_model("llama_micro", "hf", tokenizer_vocab_size=259)
    ids = torch.randint(0, 259, (1, 8))
    assert model(ids).shape == (1, 8, 259)
    names = [name for name, _ in model.named_modules()]
    assert any(name.endswith("self_attn.q_proj") for name in names)
    assert any(name.endswith("mlp.up_proj") for name in names)
    with pytest.raises(ValueError, match="unknown model_impl 'jax'"):
        build_model("llama_micro", "jax", 259)


def _twins():
    torch.manual_seed(0)
    plain, checkpointed = Llama(SMALL).double(), Llama(SMALL).double()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing = True
    return plain, checkpointed


def test_activation_checkpointing_gives_the_same_gradients():
    plain, checkpointed = _twins()
    ids = torch.randint(0, 97, (2, 12))
    for model in (plain, checkpointed):
        model(ids).sum().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-12)


def test_stepping_in_backward_while_layers_recompute_follows_the_standard_loop():
    """Each checkpointed layer recomputes before its own weights step in their hooks, so the
    trajectory is the standard loop's (float64, 4 steps across a refresh)."""
    from lowrank_optim import DCTProjAdam

    plain, checkpointed = _twins()
    standard = DCTProjAdam(plain.named_parameters(), lr=1e-2, rank=8, update_proj_gap=2)
    in_backward = DCTProjAdam(checkpointed.named_parameters(), lr=1e-2, rank=8, update_proj_gap=2,
                              step_in_backward=True)
    for step in range(4):
        batch = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(step))
        for model, optimizer in ((plain, standard), (checkpointed, in_backward)):
            torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(plain.parameters(), checkpointed.parameters()))
    assert not torch.equal(plain.lm_head.weight, _twins()[0].lm_head.weight)


HF_BUILD = """
import sys
from experiments.model_factory import build_model
build_model("llama_micro", "hf", tokenizer_vocab_size=259)
print("torchao imported" if "torchao" in sys.modules else "torchao not imported")
"""


def test_hf_build_imports_no_torchao_and_prints_nothing():
    """transformers imports torchao whenever it is installed (its import prints ``Failed to load
    ..._C_mxfp8...so`` and pytree warnings); building the LLaMA must not."""
    pytest.importorskip("transformers")
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed: nothing could import it")
    completed = subprocess.run([sys.executable, "-c", HF_BUILD], cwd=Path(__file__).resolve().parents[2],
                               capture_output=True, text=True, timeout=300, check=True)
    assert completed.stdout.strip() == "torchao not imported"
    assert completed.stderr == ""
