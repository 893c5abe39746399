"""Generate tests/fixtures/gist.json with Python sentence-transformers' GISTEmbedLoss.

For small fixed embeddings (numpy default_rng(11), batch 6; the trained model's of width 16, the
guide's of width 12, so nothing can mix them up; drawn as float32 so Rust reads exactly the same
inputs; math in float64) writes the value and the gradient w.r.t. every trained embedding of
GISTEmbedLoss (sentence_transformers/sentence_transformer/losses/gist_embed.py, sentence-transformers
6.2.0) on pairs and triplets, at the default temperature (0.01), another temperature and an
"absolute" margin; on n-tuples with three hard negatives (anchor, positive, negative, negative_2, negative_3)
through CachedGISTEmbedLoss (cached_gist_embed.py: GISTEmbedLoss takes at most one negative, its cached twin
one block per negative column), its calculate_loss over mini-batches of 2 rows ("python" names the class);
and of MatryoshkaLoss wrapped around it (matryoshka.py: it cuts the trained model's
embeddings to each width; the guide is another model and is not cut). The numbers come from the real
classes' forward: the "model" and the "guide" are stand-ins whose forward returns the given embeddings
(features "emb" and "guide"), so the gradient is d loss / d embeddings (torch autograd). Both carry the
tokenizer of .weights/all-MiniLM-L6-v2 (GISTEmbedLoss checks that they have one; the same vocabulary
and max_seq_length, so it does not retokenize).

Each case also records how many similarities the guide masked, and the script checks that no guide
similarity lies within 1e-4 of its threshold, so float32 arithmetic masks the same entries.

It also writes tests/fixtures/gist-real.json: GISTEmbedLoss on real models, all-MiniLM-L6-v2
trained and all-mpnet-base-v2 as the guide (another vocabulary, so the loss decodes the model's tokens
and the guide tokenizes them again), both in eval mode (no dropout), on a few (anchor, positive)
pairs with near-duplicate rows: the guide's input_ids per column (padding removed), the number of
masked similarities, the loss value and its gradient w.r.t. the model's embeddings.

Regenerate (needs the pinned Python packages and both weight folders):
    "$(scripts/setup-python.sh)" scripts/make_gist_fixture.py
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import sentence_transformers
import torch
import transformers
from torch import nn
from transformers import AutoTokenizer
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss, GISTEmbedLoss, MatryoshkaLoss

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "gist.json"
WEIGHTS = Path(os.environ.get("ST_TUNE_WEIGHTS", REPO / ".weights"))
BATCH, DIM, GUIDE_DIM = 6, 16, 12
TOKENIZER = AutoTokenizer.from_pretrained(str(WEIGHTS / "all-MiniLM-L6-v2"))


class StandIn(nn.Module):
    """A model whose sentence embedding is the feature `key` itself."""

    def __init__(self, key, dim):
        super().__init__()
        self.key, self.dim = key, dim
        self.tokenizer = TOKENIZER
        self.max_seq_length = 256

    def forward(self, features):
        return {"sentence_embedding": features[self.key]}

    def get_embedding_dimension(self):
        return self.dim

    def __getitem__(self, i):  # GISTEmbedLoss looks at model[0] only when it must retokenize
        return self


def dump(obj, path):
    text = json.dumps(obj, indent=1)
    text = re.sub(r"\[[\s\d.eE+\-,]*\]", lambda m: re.sub(r"\s+", "", m.group(0)), text)
    path.write_text(text + "\n", encoding="utf-8")
    print("wrote", path.relative_to(REPO))


def cos(x, y):
    x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    return x @ y.T


def masked_and_closest(guide, columns, margin, batch=BATCH):
    """How many entries the guide masks, and the smallest |similarity - threshold| (gist_embed.py's rule)."""
    a, p = guide["anchor"], guide["positive"]
    threshold = np.diag(cos(a, p))[:, None] - margin
    blocks = [(cos(a, p), True), (cos(a, a), False), (cos(p, p), False)]
    for c in columns[2:]:
        blocks.append((cos(a, guide[c]), False))
    masked, closest = 0, np.inf
    for sim, protect_diagonal in blocks:
        off = ~np.eye(batch, dtype=bool) if protect_diagonal else np.ones((batch, batch), dtype=bool)
        masked += int(((sim > threshold) & off).sum())
        gap = np.abs(sim - threshold)
        # The diagonals of the guide's a-a and p-p blocks are self-similarities (1 up to rounding).
        closest = min(closest, gap[off & ~np.eye(batch, dtype=bool)].min())
    return masked, float(closest)


def main():
    rng = np.random.default_rng(11)
    cols = {c: rng.standard_normal((BATCH, DIM)).astype(np.float32) for c in ("anchor", "positive", "negative")}
    guide = {c: rng.standard_normal((BATCH, GUIDE_DIM)).astype(np.float32)
             for c in ("anchor", "positive", "negative")}
    # Make the guide agree with itself a little more on true pairs, so that some rows mask few
    # candidates and others many.
    guide["positive"][:3] += guide["anchor"][:3]
    # More negatives for the n-tuple cases, drawn last so every input above stays as it was.
    for c in ("negative_2", "negative_3"):
        cols[c] = rng.standard_normal((BATCH, DIM)).astype(np.float32)
        guide[c] = rng.standard_normal((BATCH, GUIDE_DIM)).astype(np.float32)
    model, guide_model = StandIn("emb", DIM), StandIn("guide", GUIDE_DIM)
    pair, triplet = ["anchor", "positive"], ["anchor", "positive", "negative"]
    ntuple = triplet + ["negative_2", "negative_3"]
    specs = [  # columns, temperature, margin, matryoshka dims, matryoshka weights
        (pair, 0.01, 0.0, None, None),
        (triplet, 0.01, 0.0, None, None),
        (triplet, 0.05, 0.1, None, None),
        (pair, 0.02, 0.0, [16, 8, 4], None),
        (triplet, 0.01, 0.05, [16, 10, 3], [1.0, 0.5, 2.0]),
        (ntuple, 0.01, 0.0, None, None),
        (ntuple, 0.05, 0.1, None, None),
    ]
    cases = []
    for columns, temperature, margin, dims, weights in specs:
        masked, closest = masked_and_closest(guide, columns, margin)
        assert closest > 1e-4, f"a guide similarity lies {closest} from its threshold: float32 may differ"
        embs = [torch.tensor(cols[c], dtype=torch.float64, requires_grad=True) for c in columns]
        guides = [torch.tensor(guide[c], dtype=torch.float64) for c in columns]
        extra = {}
        if len(columns) > 3:
            loss = CachedGISTEmbedLoss(model, guide_model, temperature=temperature, margin=margin, mini_batch_size=2)
            # The cached loss's own computation over mini-batches of rows (what its forward runs after
            # embedding without gradients); the gradient then flows back through the slices.
            chunks = lambda t: [t[i:i + 2] for i in range(0, BATCH, 2)]
            value = loss.calculate_loss([chunks(e) for e in embs], [chunks(g) for g in guides])
            extra = {"python": "CachedGISTEmbedLoss"}
        else:
            loss = GISTEmbedLoss(model, guide_model, temperature=temperature, margin=margin)
            if dims is not None:
                loss = MatryoshkaLoss(model, loss, matryoshka_dims=dims, matryoshka_weights=weights)
            features = [{"emb": e, "guide": g} for e, g in zip(embs, guides)]
            value = loss(features, None)
        value.backward()
        cases.append({**extra, "columns": columns, "scale": 1.0 / temperature, "margin": margin,
                      "matryoshka_dims": dims, "matryoshka_weights": weights, "masked": masked,
                      "closest_to_threshold": closest, "value": value.item(),
                      "grads": {c: e.grad.tolist() for c, e in zip(columns, embs)}})
        print(f"{columns} scale {1 / temperature:g} margin {margin} dims {dims}: {value.item():.6f}, "
              f"{masked} masked, closest {closest:.1e}")
    dump({"versions": {"sentence_transformers": sentence_transformers.__version__,
                       "transformers": transformers.__version__, "torch": torch.__version__},
          "seed": 11, "dtype": "float64 math on float32 inputs",
          "inputs": {c: v.astype(np.float64).tolist() for c, v in cols.items()},
          "guide": {c: v.astype(np.float64).tolist() for c, v in guide.items()},
          "cases": cases}, OUT)


PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar."),
    ("A man is playing guitar on stage.", "Someone is playing a guitar."),
    ("A plane is taking off.", "An air plane is taking off."),
    ("The airplane leaves the runway.", "A jet takes off from the airport."),
    ("A woman is slicing an onion.", "A woman cuts an onion."),
    ("Kids are playing football in the park.", "Children play soccer outside."),
]


def real():
    model = SentenceTransformer(str(WEIGHTS / "all-MiniLM-L6-v2"), device="cpu").eval()
    guide = SentenceTransformer(str(WEIGHTS / "all-mpnet-base-v2"), device="cpu").eval()
    loss = GISTEmbedLoss(model, guide)
    assert loss.must_retokenize
    columns = [[a for a, _ in PAIRS], [p for _, p in PAIRS]]
    features = [model.preprocess(texts) for texts in columns]
    guide_ids = []
    for f in features:
        decoded = model.tokenizer.batch_decode(f["input_ids"], skip_special_tokens=True)
        g = guide.preprocess(decoded)
        guide_ids.append([row[m.bool()].tolist() for row, m in zip(g["input_ids"], g["attention_mask"])])
    # The embeddings as leaves, to read the loss's gradient with respect to them.
    with torch.no_grad():
        emb = [model(dict(f))["sentence_embedding"] for f in features]
        gemb = [guide(guide.preprocess(model.tokenizer.batch_decode(f["input_ids"], skip_special_tokens=True)))
                ["sentence_embedding"] for f in features]
    leaves = [e.clone().requires_grad_(True) for e in emb]
    features_in = [{"emb": e, "guide": g} for e, g in zip(leaves, gemb)]
    stand_in = GISTEmbedLoss(StandIn("emb", 384), StandIn("guide", 768))
    value = stand_in(features_in, None)
    value.backward()
    whole = loss([dict(f) for f in features], None).item()  # the real forward, for the record
    assert abs(whole - value.item()) <= 1e-6 * max(1.0, abs(whole)), (whole, value.item())
    masked, closest = masked_and_closest({"anchor": gemb[0].numpy(), "positive": gemb[1].numpy()},
                                         ["anchor", "positive"], 0.0, batch=len(PAIRS))
    print(f"real: {whole:.6f}, {masked} masked, closest {closest:.1e}")
    dump({"versions": {"sentence_transformers": sentence_transformers.__version__,
                       "transformers": transformers.__version__, "torch": torch.__version__},
          "model": "all-MiniLM-L6-v2", "guide": "all-mpnet-base-v2", "scale": 100.0,
          "anchors": columns[0], "positives": columns[1], "guide_ids": guide_ids,
          "masked": masked, "closest_to_threshold": closest, "value": whole,
          "grads": [l.grad.tolist() for l in leaves]}, OUT.with_name("gist-real.json"))


if __name__ == "__main__":
    main()
    real()
