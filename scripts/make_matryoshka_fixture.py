"""Generate tests/fixtures/matryoshka.json with Python sentence-transformers' MatryoshkaLoss.

For small fixed embeddings (numpy default_rng(7), batch 6, dim 16; drawn as float32 so Rust reads
exactly the same inputs; math in float64) and fixed scores, writes the value and the gradient w.r.t.
every embedding of MatryoshkaLoss wrapped around MultipleNegativesRankingLoss (pairs and triplets),
CoSENTLoss and CosineSimilarityLoss, at several width lists (with and without the full width, default
and explicit weights). The numbers come from the real MatryoshkaLoss.forward
(sentence_transformers/sentence_transformer/losses/matryoshka.py, sentence-transformers 6.2.0): it
patches the model's forward to cut and re-normalise `sentence_embedding` to each width, calls the
wrapped loss once per width and sums the weighted results. The "model" here is a stand-in whose
forward returns the given embeddings unchanged, so the gradient is d loss / d embeddings (torch
autograd).

Regenerate (needs the pinned Python packages, no weights):
    "$(scripts/setup-python.sh)" scripts/make_matryoshka_fixture.py
"""
import json
import re
from pathlib import Path

import numpy as np
import sentence_transformers
import torch
from torch import nn
from sentence_transformers.sentence_transformer.losses import (
    CoSENTLoss, CosineSimilarityLoss, MatryoshkaLoss, MultipleNegativesRankingLoss)

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "matryoshka.json"
BATCH, DIM = 6, 16


class Embeddings(nn.Module):
    """A model whose sentence embedding is the `emb` feature itself."""

    def forward(self, features):
        return {"sentence_embedding": features["emb"]}

    def get_embedding_dimension(self):
        return DIM


def main():
    rng = np.random.default_rng(7)
    cols = {c: rng.standard_normal((BATCH, DIM)).astype(np.float32) for c in ("anchor", "positive", "negative")}
    scores = rng.uniform(0, 1, BATCH).round(2).astype(np.float32)
    scores[4] = scores[1]  # a tie
    labels = torch.tensor(scores, dtype=torch.float64)
    model = Embeddings()
    specs = [
        ("mnrl", ["anchor", "positive"], [16, 8, 4], None),
        ("mnrl", ["anchor", "positive", "negative"], [16, 12, 6, 2], [1.0, 0.5, 0.25, 2.0]),
        ("mnrl", ["anchor", "positive"], [12, 3], [2.0, 1.0]),
        ("cosent", ["anchor", "positive"], [16, 8, 4, 2], None),
        ("cosent", ["anchor", "positive"], [10, 5, 1], [0.5, 1.5, 1.0]),
        ("cosine", ["anchor", "positive"], [16, 8, 4], [1.0, 2.0, 3.0]),
    ]
    cases = []
    for loss_name, columns, dims, weights in specs:
        inner = {"mnrl": lambda: MultipleNegativesRankingLoss(model, scale=20.0),
                 "cosent": lambda: CoSENTLoss(model, scale=20.0),
                 "cosine": lambda: CosineSimilarityLoss(model)}[loss_name]()
        loss = MatryoshkaLoss(model, inner, matryoshka_dims=dims, matryoshka_weights=weights)
        embs = [torch.tensor(cols[c], dtype=torch.float64, requires_grad=True) for c in columns]
        value = loss([{"emb": e} for e in embs], labels)
        value.backward()
        case = {"loss": loss_name, "columns": columns, "dims": dims, "weights": weights,
                "value": value.item(), "grads": {c: e.grad.tolist() for c, e in zip(columns, embs)}}
        if loss_name != "cosine":
            case["scale"] = 20.0
        cases.append(case)
    fixture = {"versions": {"sentence_transformers": sentence_transformers.__version__,
                            "torch": torch.__version__},
               "seed": 7, "dtype": "float64 math on float32 inputs",
               "inputs": {**{c: v.astype(np.float64).tolist() for c, v in cols.items()},
                          "scores": scores.astype(np.float64).tolist()},
               "cases": cases}
    # One JSON line per vector, as scripts/make_fixtures.py writes them.
    text = json.dumps(fixture, indent=1)
    text = re.sub(r"\[[\s\d.eE+\-,]*\]", lambda m: re.sub(r"\s+", "", m.group(0)), text)
    OUT.write_text(text + "\n", encoding="utf-8")
    print("wrote", OUT.relative_to(REPO))


if __name__ == "__main__":
    main()
