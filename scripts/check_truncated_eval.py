"""Dev Spearman of a model at truncated widths, as sentence-transformers computes it
(SentenceTransformer(truncate_dim=N) + EmbeddingSimilarityEvaluator), to compare with the
"dims" figures st-tune logs for train.matryoshka_dims (the "before" eval line of metrics.jsonl
is the untrained model).

    .venv/bin/python scripts/check_truncated_eval.py MODEL_DIR DEV.csv 384 256 128 64
"""
import csv, json, sys

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

model_dir, dev, widths = sys.argv[1], sys.argv[2], [int(w) for w in sys.argv[3:]]
with open(dev, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
a, b = [r["sentence1"] for r in rows], [r["sentence2"] for r in rows]
scores = [float(r["score"]) for r in rows]
out = {}
for w in widths:
    model = SentenceTransformer(model_dir, device="cpu", truncate_dim=w)
    ev = EmbeddingSimilarityEvaluator(a, b, scores, batch_size=64, name="dev")
    r = ev(model)
    out[w] = {k: v for k, v in r.items() if "spearman" in k or "pearson" in k}
print(json.dumps(out, indent=1))
