"""Generate st-tune's reference fixtures with Python sentence-transformers (the behaviour st-tune copies).

Writes into tests/fixtures/:
  parity-all-MiniLM-L6-v2.json, parity-all-mpnet-base-v2.json
      {"model", "max_seq_length", "dim", "versions", "sentences", "token_ids", "embeddings"} for the lines
      of tests/fixtures/sentences.txt: SentenceTransformer(folder, device="cpu").encode(batch_size=16), and the
      input_ids the model itself feeds its encoder (model.preprocess: truncated to max_seq_length, padding
      removed). Floats are the exact float32 values (written as the shortest double that equals them).
  losses.json
      Value and gradient w.r.t. every embedding of small fixed embeddings (numpy default_rng(0), batch 4,
      dim 8; drawn as float32 so Rust reads exactly the same inputs; math in float64) for
      MultipleNegativesRankingLoss (scale 20, cos_sim) on (anchor, positive) and (anchor, positive, negative),
      CoSENTLoss (scale 20) and CosineSimilarityLoss (MSE) on (anchor, positive) with scores;
      MultipleNegativesSymmetricRankingLoss (scale 20) on pairs and triplets; TripletLoss with each
      TripletDistanceMetric and margins that leave some rows at zero; ContrastiveLoss and
      OnlineContrastiveLoss with SiameseDistanceMetrics on 0/1 labels (and all-positive labels, the
      fallback bar of OnlineContrastiveLoss); MSELoss against teacher embeddings; MarginMSELoss against
      teacher margins; and n-tuples (anchor, positive, negative, negative_2, negative_3: three hard negatives,
      as `st-tune mine --output-format n-tuple` writes them) for MultipleNegativesRankingLoss, its cached twin
      CachedMultipleNegativesRankingLoss (calculate_loss over mini-batches of 2 rows; "python" names the class)
      and MultipleNegativesSymmetricRankingLoss. Each case names its input columns, its label input ("labels") and its parameters
      ("scale", "margin", "distance"). The numbers come from the real loss classes: each loss's
      compute_loss_from_embeddings (sentence-transformers 6.2.0, sentence_transformers/sentence_transformer/
      losses/*.py; cos_sim / pairwise_cos_sim in sentence_transformers/util/similarity.py), then torch
      autograd for the gradients.

Only the loss fixture (no weights needed): "$(scripts/setup-python.sh)" scripts/make_fixtures.py losses

Regenerate (needs the weights and the pinned Python packages):
    scripts/fetch-weights.sh && "$(scripts/setup-python.sh)" scripts/make_fixtures.py
Weights are read from $ST_TUNE_WEIGHTS (default <repo>/.weights).
"""
import json, os, re, sys
from pathlib import Path

import numpy as np
import sentence_transformers, torch, transformers
from torch import nn
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import (
    ContrastiveLoss, CoSENTLoss, CosineSimilarityLoss, MarginMSELoss, MSELoss, MultipleNegativesRankingLoss,
    CachedMultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss, OnlineContrastiveLoss, SiameseDistanceMetric, TripletDistanceMetric,
    TripletLoss)

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"
WEIGHTS = Path(os.environ.get("ST_TUNE_WEIGHTS", REPO / ".weights"))
VERSIONS = {"sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}


def dump(obj, path):
    # One JSON line per vector: readable and diffable. Only all-number arrays are collapsed, and no
    # sentence in the fixtures has brackets around digits only, so strings are never touched.
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    text = re.sub(r"\[[\s\d.eE+\-,]*\]", lambda m: re.sub(r"\s+", "", m.group(0)), text)
    path.write_text(text + "\n", encoding="utf-8")
    print("wrote", path.relative_to(REPO))


def parity(name, sentences):
    model = SentenceTransformer(str(WEIGHTS / name), device="cpu")
    emb = model.encode(sentences, batch_size=16, convert_to_numpy=True)  # float32 [n, dim]
    feats = model.preprocess(sentences)  # exactly what encode feeds the transformer
    ids = [row[mask.bool()].tolist() for row, mask in zip(feats["input_ids"], feats["attention_mask"])]
    dump({"model": name, "max_seq_length": model.max_seq_length, "dim": int(emb.shape[1]),
          "versions": VERSIONS, "sentences": sentences, "token_ids": ids,
          "embeddings": [[float(x) for x in row] for row in emb]}, FIX / f"parity-{name}.json")


def losses():
    rng = np.random.default_rng(0)
    cols = {c: rng.standard_normal((4, 8)).astype(np.float32) for c in ("anchor", "positive", "negative")}
    scores = rng.uniform(0, 1, 4).round(2).astype(np.float32)
    scores[3] = scores[1]  # a tie: CoSENT must not rank tied pairs against each other
    # Drawn after the inputs above, so those stay as they were.
    labels = {"scores": scores,
              "labels": np.array([1, 0, 1, 0], dtype=np.float32),
              "all_positive": np.ones(4, dtype=np.float32),
              "margins": rng.normal(0, 2, 4).astype(np.float32),
              "teacher": rng.standard_normal((4, 8)).astype(np.float32)}
    # More negatives for the n-tuple cases, drawn last so every input above stays as it was.
    cols.update({c: rng.standard_normal((4, 8)).astype(np.float32) for c in ("negative_2", "negative_3")})
    triplet = ["anchor", "positive", "negative"]
    ntuple = triplet + ["negative_2", "negative_3"]
    pair = ["anchor", "positive"]
    T, S = TripletDistanceMetric, SiameseDistanceMetric
    specs = [("mnrl", pair, "scores", {"scale": 20.0}, MultipleNegativesRankingLoss(None, scale=20.0)),
             ("mnrl", triplet, "scores", {"scale": 20.0}, MultipleNegativesRankingLoss(None, scale=20.0)),
             ("cosent", pair, "scores", {"scale": 20.0}, CoSENTLoss(None, scale=20.0)),
             ("cosine", pair, "scores", {}, CosineSimilarityLoss(None)),
             ("mnsrl", pair, "scores", {"scale": 20.0}, MultipleNegativesSymmetricRankingLoss(None, scale=20.0)),
             ("mnsrl", triplet, "scores", {"scale": 7.0}, MultipleNegativesSymmetricRankingLoss(None, scale=7.0)),
             ("triplet", triplet, "scores", {}, TripletLoss(None)),
             ("triplet", triplet, "scores", {"distance": "euclidean", "margin": 0.5},
              TripletLoss(None, distance_metric=T.EUCLIDEAN, triplet_margin=0.5)),
             ("triplet", triplet, "scores", {"distance": "cosine", "margin": 0.3},
              TripletLoss(None, distance_metric=T.COSINE, triplet_margin=0.3)),
             ("triplet", triplet, "scores", {"distance": "manhattan", "margin": 2.0},
              TripletLoss(None, distance_metric=T.MANHATTAN, triplet_margin=2.0)),
             ("contrastive", pair, "labels", {}, ContrastiveLoss(None)),
             ("contrastive", pair, "labels", {"distance": "cosine", "margin": 1.2},
              ContrastiveLoss(None, distance_metric=S.COSINE_DISTANCE, margin=1.2)),
             ("contrastive", pair, "labels", {"distance": "euclidean", "margin": 5.0},
              ContrastiveLoss(None, distance_metric=S.EUCLIDEAN, margin=5.0)),
             ("contrastive", pair, "labels", {"distance": "manhattan", "margin": 9.0},
              ContrastiveLoss(None, distance_metric=S.MANHATTAN, margin=9.0)),
             ("online_contrastive", pair, "labels", {}, OnlineContrastiveLoss(None)),
             ("online_contrastive", pair, "labels", {"distance": "euclidean", "margin": 5.0},
              OnlineContrastiveLoss(None, distance_metric=S.EUCLIDEAN, margin=5.0)),
             ("online_contrastive", pair, "all_positive", {}, OnlineContrastiveLoss(None)),
             ("mse", ["anchor"], "teacher", {}, MSELoss(None)),
             ("mse", pair, "teacher", {}, MSELoss(None)),
             ("margin_mse", triplet, "margins", {}, MarginMSELoss(None)),
             ("mnrl", ntuple, "scores", {"scale": 20.0}, MultipleNegativesRankingLoss(None, scale=20.0)),
             ("mnrl", ntuple, "scores", {"scale": 20.0, "python": "CachedMultipleNegativesRankingLoss"},
              CachedMultipleNegativesRankingLoss(nn.Sequential(nn.Identity()), scale=20.0, mini_batch_size=2)),
             ("mnsrl", ntuple, "scores", {"scale": 7.0}, MultipleNegativesSymmetricRankingLoss(None, scale=7.0))]
    cases = []
    for loss_name, columns, label_name, params, loss in specs:
        embs = [torch.tensor(cols[c], dtype=torch.float64, requires_grad=True) for c in columns]
        y = torch.tensor(labels[label_name], dtype=torch.float64)
        if isinstance(loss, CachedMultipleNegativesRankingLoss):
            # The cached loss's own computation over mini-batches of rows (what its forward runs after
            # embedding without gradients); the gradient then flows back through the slices.
            value = loss.calculate_loss([[e[i:i + 2] for i in range(0, len(e), 2)] for e in embs])
        elif loss_name == "mse":  # EmbedDistillLoss.forward: a 2D label is every column's teacher
            value = loss.compute_loss_from_embeddings(embs, [y for _ in embs])
        else:
            value = loss.compute_loss_from_embeddings(embs, y)
        value.backward()
        cases.append({"loss": loss_name, "columns": columns, "labels": label_name, **params,
                      "value": value.item(), "grads": {c: e.grad.tolist() for c, e in zip(columns, embs)}})
    dump({"versions": VERSIONS, "seed": 0, "dtype": "float64 math on float32 inputs",
          "inputs": {**{c: v.astype(np.float64).tolist() for c, v in cols.items()},
                     **{k: v.astype(np.float64).tolist() for k, v in labels.items()}},
          "cases": cases}, FIX / "losses.json")


if __name__ == "__main__":
    torch.manual_seed(0)
    if sys.argv[1:] == ["losses"]:
        losses()
        sys.exit()
    # Same reading rule as shared/peer/st_embed.py: one sentence a line, blank lines skipped.
    lines = (FIX / "sentences.txt").read_text(encoding="utf-8").split("\n")
    sentences = [s for s in lines if s.strip()]
    for name in ("all-MiniLM-L6-v2", "all-mpnet-base-v2"):
        parity(name, sentences)
    losses()
