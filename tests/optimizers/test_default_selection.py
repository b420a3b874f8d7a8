"""``DCTProjAdam(model.parameters())`` keeps the vocabulary matrices out of the projection at every
LLaMA size (defect 3 of the engine-v2 issue: LLaMA-7B's 32000×4096 embedding, aspect ratio 7.8,
was projected), named or not; models are built on the meta device."""
import warnings

import pytest
import torch

from lowrank_optim import DCTProjAdam
from lowrank_optim.selection import vocabulary_matrices

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "llama_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    "llama2_70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
    "tiny_2_layer": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4),
}


def _meta_llama(name, tied=False):
    config = transformers.LlamaConfig(**CONFIGS[name], tie_word_embeddings=tied)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def _projected_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    by_key = {row.name: row for row in optimizer.projection_summary()}
    rows = list(optimizer.projection_summary())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(rows) == len(params) and by_key
    return {names[id(p)] for p, row in zip(params, rows) if row.projected}


def _linear_weights(model):
    return {f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ("self_attn" in n or "mlp" in n)}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("named", [False, True], ids=["parameters", "named_parameters"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_exactly_the_attention_and_mlp_linears_are_projected(name, named, tied):
    model = _meta_llama(name, tied)
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # LLaMA-family layouts are told without a warning
        optimizer = DCTProjAdam(model.named_parameters() if named else model.parameters())
    assert _projected_names(model, optimizer) == _linear_weights(model)


def _meta(cls_name, **config):
    config = getattr(transformers, cls_name.replace("LMHeadModel", "").replace("ForMaskedLM", "") + "Config")(**config)
    with torch.device("meta"):
        return getattr(transformers, cls_name)(config)


@pytest.mark.parametrize("named", [False, True], ids=["parameters", "named_parameters"])
@pytest.mark.parametrize("cls_name, config, tables", [
    ("GPT2LMHeadModel", dict(n_layer=2), {"transformer.wpe.weight"}),
    ("BertForMaskedLM", dict(num_hidden_layers=2),
     {"bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"}),
])
def test_position_and_token_type_tables_stay_plain(cls_name, config, tables, named):
    """Told by name, and by shape without names (a size no other matrix has)."""
    model = _meta(cls_name, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = DCTProjAdam(model.named_parameters() if named else model.parameters())
    projected = _projected_names(model, optimizer)
    matrices = {n for n, p in model.named_parameters() if p.ndim == 2}
    assert projected and not projected & tables
    assert matrices - projected - tables == {n for n in matrices if "word_embeddings" in n or "wte" in n}


def test_an_end_parameter_the_rule_cannot_tell_is_projected_with_one_warning():
    # One block whose last weight has a shape found nowhere else, and no vocabulary dimension.
    layers = [torch.nn.Parameter(torch.zeros(s)) for s in [(16, 8), (16, 8), (8, 16), (16, 16)]]
    with pytest.warns(UserWarning, match=r"cannot tell .*\(shape \(16, 16\)\).*named_parameters") as record:
        optimizer = DCTProjAdam(layers)
    assert len(record) == 1
    assert [row.projected for row in optimizer.projection_summary()] == [True, True, True, True]


def test_the_rule_on_shapes():
    block = [(None, (4096, 4096))] * 4 + [(None, (11008, 4096))] * 2 + [(None, (4096, 11008))]
    llama = [(None, (32000, 4096))] + block * 2
    assert vocabulary_matrices(llama + [(None, (32000, 4096))]) == ({0, 15}, [])
    assert vocabulary_matrices(llama) == ({0}, [])                           # tied: ends with down_proj
    assert vocabulary_matrices([("model.embed_tokens.weight", (64, 64)), (None, (64, 64)), (None, (64, 64))]) == (
        {0}, [])
    assert vocabulary_matrices([(None, (10, 100))]) == ({0}, [])             # no interior: aspect ratio
    assert vocabulary_matrices([(None, (64, 16))]) == (set(), [])
    gpt2 = [(None, (50257, 768)), (None, (1024, 768))] + [(None, (768, 2304)), (None, (768, 768)),
                                                          (None, (768, 3072)), (None, (3072, 768))] * 2
    assert vocabulary_matrices(gpt2) == ({0, 1}, [])                          # wpe: 1024 is no width
    gqa = [(None, (4096, 4096)), (None, (1024, 4096)), (None, (1024, 4096)), (None, (4096, 4096))] * 2
    assert vocabulary_matrices([(None, (32000, 4096))] + gqa) == ({0}, [])     # k/v share their 1024


class _CustomNames(torch.nn.Module):
    """Embedding tables whose names and shapes the parameter-list rules cannot tell: a token table
    as wide as long (no vocabulary-sized dimension) and a position table shaped like a block weight."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(64, 64)
        self.pos = torch.nn.Embedding(64, 64)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(3))
        self.out = torch.nn.Linear(64, 64, bias=False)
        self.out.weight = self.tok.weight        # tied head


def test_given_the_model_its_embedding_tables_stay_plain_whatever_their_names_and_shapes():
    model = _CustomNames()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_names = DCTProjAdam(model.named_parameters(), rank=8)
    assert {"tok.weight", "pos.weight"} & _projected_names(model, from_names)   # the list rules cannot tell
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_model = DCTProjAdam(model, rank=8)
    projected = _projected_names(model, from_model)
    assert projected == {f"blocks.{i}.weight" for i in range(3)}
    assert [row.name for row in from_model.projection_summary()] == [n for n, _ in model.named_parameters()]
    copied = __import__("copy").deepcopy(from_model)
    assert [row.projected for row in copied.projection_summary()] == [
        row.projected for row in from_model.projection_summary()]


def test_given_the_model_a_group_with_its_own_rank_still_projects_anything():
    model = _CustomNames()
    optimizer = DCTProjAdam(model, rank=8)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.randn(64, 64))], "param_names": ["extra"],
                               "rank": 8})
    assert optimizer.projection_summary()[-1].projected
