"""Which parameters ``DCTProjAdam(model.parameters())`` projects by default: everything 2-D except
the vocabulary matrices (token embedding and output head) and the other embedding tables
(positions, token types).

GaLore's recipe, whose quality this library is measured against, projects the attention and MLP
linears and gives embeddings, head and norms full AdamW. Without module names the optimizer sees
only shapes and their order, so the rule reads the structure of a transformer's parameter list:

* **by name** (``model.named_parameters()``): a name containing one of
  :data:`EMBEDDING_NAME_PATTERNS`, or a top-level ``output.weight`` (Meta's LLaMA), is a
  vocabulary matrix;
* **by shape**, for the *end* parameters, the first and the last 2-D parameter (where embedding
  and head sit in the parameter lists of LLaMA-family models of every size): an end parameter
  with a dimension that no *interior* 2-D parameter has (the vocabulary size) is a vocabulary
  matrix. An end parameter shaped like an interior one is a block weight (a tied-embedding
  model ends with its last ``down_proj``). An end parameter that is neither cannot be told: it is
  projected, and a warning names its shape once.
* **tables by shape**: an *interior* 2-D parameter with a dimension that no other 2-D parameter
  has is a lookup table, not a block weight (GPT-2's and nanoGPT's ``wpe``, BERT's position and
  token-type embeddings: their 1024, 512 or 2 rows are a model width nowhere else). Block weights
  share every dimension with another weight (``q, k, v, o``; ``gate``/``up``; grouped-query
  ``k``/``v``), so LLaMA-family lists lose nothing to this rule.

**By module** (the optimizer built on the model itself, ``DCTProjAdam(model)``): every parameter
of an ``nn.Embedding`` or ``nn.EmbeddingBag`` (and a head tied to one) is a table, whatever its name
or shape (:func:`embedding_table_names`).

LLaMA-7B's ``32000×4096`` embedding (aspect ratio 7.8) and Llama-2-70B's are caught by shape, as
are a 2-layer tiny model's. With at most two 2-D parameters there is no interior to compare with
(an optimizer over one weight): then a matrix more than :data:`VOCABULARY_ASPECT_RATIO` times longer
than wide is a vocabulary matrix, and nothing is warned. A param group with its own ``rank``
projects anything.
"""
from __future__ import annotations

from collections import Counter

from torch import nn

EMBEDDING_NAME_PATTERNS = ("embed", "wte", "wpe", "lm_head", "tok_embeddings")
TOP_LEVEL_HEAD_NAMES = ("output.weight",)
VOCABULARY_ASPECT_RATIO = 8.0
NOTHING_PROJECTED_BY_DEFAULT = (
    "no parameter is projected (no 2-D parameter outside the embedding and output head is larger than its rank): "
    "this is plain AdamW. Give a param group its own rank to project its weights")


def is_vocabulary_name(name: str | None) -> bool:
    """Whether a parameter name marks an embedding or output head (module doc)."""
    return name is not None and (any(p in name for p in EMBEDDING_NAME_PATTERNS) or name in TOP_LEVEL_HEAD_NAMES)


def vocabulary_matrices(entries: list[tuple[str | None, tuple[int, int]]]) -> tuple[set[int], list[int]]:
    """``(vocabulary, undecided)``: positions in ``entries`` (the 2-D parameters, in order, with
    their names or None) of the vocabulary matrices, and of the end parameters the shape rule
    could not tell (module doc)."""
    vocabulary = {i for i, (name, _) in enumerate(entries) if is_vocabulary_name(name)}
    if len(entries) <= 2:
        return vocabulary | {i for i, (_, shape) in enumerate(entries)
                             if max(shape) > VOCABULARY_ASPECT_RATIO * min(shape)}, []
    ends = [0, len(entries) - 1]
    interior = [tuple(shape) for i, (_, shape) in enumerate(entries) if i not in ends]
    interior_dims = {dim for shape in interior for dim in shape}
    holders = Counter(dim for _, shape in entries for dim in set(shape))     # how many matrices have each size
    vocabulary |= {i for i, (_, shape) in enumerate(entries) if i not in ends and any(holders[d] == 1 for d in shape)}
    undecided = []
    for i in ends:
        if i in vocabulary:
            continue
        shape = tuple(entries[i][1])
        if any(dim not in interior_dims for dim in shape):
            vocabulary.add(i)
        elif shape not in interior:
            undecided.append(i)
    return vocabulary, undecided


def embedding_table_names(model: nn.Module) -> frozenset[str]:
    """The names (as ``model.named_parameters()`` gives them) of the parameters of ``model``'s
    ``nn.Embedding`` and ``nn.EmbeddingBag`` modules; a head tied to an embedding shares its name."""
    tables = {id(param) for module in model.modules() if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
              for param in module.parameters(recurse=False)}
    return frozenset(name for name, param in model.named_parameters() if id(param) in tables)
