"""Generate tests/fixtures/matryoshka.json with Python sentence-transformers' MatryoshkaLoss.

For small fixed embeddings (numpy default_rng(7), batch 6, dim 16; drawn as float32 so Rust reads
exactly the same inputs; math in float64) and fixed scores, writes the value and the gradient w.r.t.
every embedding of MatryoshkaLoss wrapped around MultipleNegativesRankingLoss (pairs and triplets),
CoSENTLoss and CosineSimilarityLoss, at several width lists (with and without the full width, default
and explicit weights); and around MultipleNegativesSymmetricRankingLoss, TripletLoss, ContrastiveLoss,
OnlineContrastiveLoss (on 0/1 labels) and MarginMSELoss (on margins), each case naming its label input
("labels"). MSELoss is left out: Python's MatryoshkaLoss does not cut its teacher embeddings, so it
fails at any width below the full one (st-tune cuts them with the student's, see src/losses/mse.rs). The numbers come from the real MatryoshkaLoss.forward
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
    ContrastiveLoss, CoSENTLoss, CosineSimilarityLoss, MarginMSELoss, MatryoshkaLoss, MultipleNegativesRankingLoss,
    MultipleNegativesSymmetricRankingLoss, OnlineContrastiveLoss, TripletLoss)

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
    # Drawn after the inputs above, so those stay as they were.
    label_inputs = {"scores": scores,
                    "labels": np.array([1, 0, 1, 1, 0, 0], dtype=np.float32),
                    "margins": rng.normal(0, 0.5, BATCH).astype(np.float32)}
    model = Embeddings()
    specs = [
        ("mnrl", ["anchor", "positive"], [16, 8, 4], None),
        ("mnrl", ["anchor", "positive", "negative"], [16, 12, 6, 2], [1.0, 0.5, 0.25, 2.0]),
        ("mnrl", ["anchor", "positive"], [12, 3], [2.0, 1.0]),
        ("cosent", ["anchor", "positive"], [16, 8, 4, 2], None),
        ("cosent", ["anchor", "positive"], [10, 5, 1], [0.5, 1.5, 1.0]),
        ("cosine", ["anchor", "positive"], [16, 8, 4], [1.0, 2.0, 3.0]),
        ("mnsrl", ["anchor", "positive", "negative"], [16, 8, 4], [1.0, 0.5, 2.0]),
        ("triplet", ["anchor", "positive", "negative"], [16, 8, 4], None),
        ("contrastive", ["anchor", "positive"], [16, 6, 2], [1.0, 0.5, 2.0]),
        ("online_contrastive", ["anchor", "positive"], [16, 8, 4], None),
        ("margin_mse", ["anchor", "positive", "negative"], [16, 8, 4], [1.0, 2.0, 0.5]),
    ]
    label_of = {"contrastive": "labels", "online_contrastive": "labels", "margin_mse": "margins"}
    cases = []
    for loss_name, columns, dims, weights in specs:
        inner = {"mnrl": lambda: MultipleNegativesRankingLoss(model, scale=20.0),
                 "cosent": lambda: CoSENTLoss(model, scale=20.0),
                 "cosine": lambda: CosineSimilarityLoss(model),
                 "mnsrl": lambda: MultipleNegativesSymmetricRankingLoss(model, scale=20.0),
                 "triplet": lambda: TripletLoss(model),
                 "contrastive": lambda: ContrastiveLoss(model),
                 "online_contrastive": lambda: OnlineContrastiveLoss(model),
                 "margin_mse": lambda: MarginMSELoss(model)}[loss_name]()
        loss = MatryoshkaLoss(model, inner, matryoshka_dims=dims, matryoshka_weights=weights)
        embs = [torch.tensor(cols[c], dtype=torch.float64, requires_grad=True) for c in columns]
        label_name = label_of.get(loss_name, "scores")
        value = loss([{"emb": e} for e in embs], torch.tensor(label_inputs[label_name], dtype=torch.float64))
        value.backward()
        case = {"loss": loss_name, "columns": columns, "labels": label_name, "dims": dims, "weights": weights,
                "value": value.item(), "grads": {c: e.grad.tolist() for c, e in zip(columns, embs)}}
        if loss_name in ("mnrl", "cosent", "mnsrl"):
            case["scale"] = 20.0
        cases.append(case)
    fixture = {"versions": {"sentence_transformers": sentence_transformers.__version__,
                            "torch": torch.__version__},
               "seed": 7, "dtype": "float64 math on float32 inputs",
               "inputs": {**{c: v.astype(np.float64).tolist() for c, v in cols.items()},
                          **{k: v.astype(np.float64).tolist() for k, v in label_inputs.items()}},
               "cases": cases}
    # One JSON line per vector, as scripts/make_fixtures.py writes them.
    text = json.dumps(fixture, indent=1)
    text = re.sub(r"\[[\s\d.eE+\-,]*\]", lambda m: re.sub(r"\s+", "", m.group(0)), text)
    OUT.write_text(text + "\n", encoding="utf-8")
    print("wrote", OUT.relative_to(REPO))


if __name__ == "__main__":
    main()
