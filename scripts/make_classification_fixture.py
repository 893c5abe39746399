"""Generate st-tune's fixtures for the binary-classification and triplet evaluators with the real
Python BinaryClassificationEvaluator and TripletEvaluator.

Writes into tests/fixtures/:
  classification-pairs.csv   sentence1,sentence2,label: validation rows 200-319 of data/stsb-small, label 1
                             where the score is >= 0.6 (else 0), then row 200 again with its label flipped
                             (two pairs with the same cosine and different labels: the thresholds must not
                             split them).
  classification-triplets.csv  anchor,positive,negative: for each of validation rows 200-299 scored >= 0.6,
                             the sentence2 of the next row scored 0.2-0.6 (taken in order) as negative; every
                             third triplet with positive and negative swapped, so some triplets are wrong.
  classification-all-MiniLM-L6-v2.json
      {"model", "versions", "binary": {figures}, "binary_128": {figures at truncate_dim=128}, "triplet":
      {"cosine_accuracy", "cosine_accuracy_128"}}: the figures of sentence_transformers'
      BinaryClassificationEvaluator and TripletEvaluator (sentence-transformers 6.2.0,
      sentence_transformers/sentence_transformer/evaluation/binary_classification.py and triplet.py) with
      all-MiniLM-L6-v2 on CPU and its defaults (the model's similarity, cosine). Keys lose the
      evaluator's name prefix, as st-tune prints them.

Regenerate (needs the weights and the pinned Python packages):
    scripts/fetch-weights.sh && "$(scripts/setup-python.sh)" scripts/make_classification_fixture.py
Weights are read from $ST_TUNE_WEIGHTS (default <repo>/.weights).
"""
import csv, io, json, os
from pathlib import Path

import sentence_transformers, torch, transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import (
    BinaryClassificationEvaluator, TripletEvaluator)

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"
WEIGHTS = Path(os.environ.get("ST_TUNE_WEIGHTS", REPO / ".weights"))
MODEL = "all-MiniLM-L6-v2"
VERSIONS = {"sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}


def write_csv(path, header, rows):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    path.write_text(buf.getvalue(), encoding="utf-8")
    print("wrote", path.relative_to(REPO))


def strip(metrics, name):
    return {k[len(name) + 1:]: float(v) for k, v in metrics.items()}


def main():
    with open(REPO / "data" / "stsb-small" / "validation.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    pairs = [(r["sentence1"], r["sentence2"], int(float(r["score"]) >= 0.6)) for r in rows[200:320]]
    pairs.append((pairs[0][0], pairs[0][1], 1 - pairs[0][2]))
    write_csv(FIX / "classification-pairs.csv", ["sentence1", "sentence2", "label"], pairs)
    high = [r for r in rows[200:300] if float(r["score"]) >= 0.6]
    middle = [r for r in rows[200:] if 0.2 <= float(r["score"]) < 0.6]
    triplets = [(h["sentence1"], h["sentence2"], m["sentence2"]) for h, m in zip(high, middle)]
    # Every third the other way round, so the accuracy is well below 1 and a comparison flipped
    # the wrong way shows.
    triplets = [(a, n, p) if i % 3 == 2 else (a, p, n) for i, (a, p, n) in enumerate(triplets)]
    write_csv(FIX / "classification-triplets.csv", ["anchor", "positive", "negative"], triplets)

    model = SentenceTransformer(str(WEIGHTS / MODEL), device="cpu")
    s1, s2, labels = zip(*pairs)
    out = {"model": MODEL, "versions": VERSIONS}
    for key, dim in (("binary", None), ("binary_128", 128)):
        ev = BinaryClassificationEvaluator(list(s1), list(s2), list(labels), name="dev", truncate_dim=dim)
        out[key] = strip(ev(model), "dev")
    a, p, n = zip(*triplets)
    out["triplet"] = {}
    for suffix, dim in (("", None), ("_128", 128)):
        ev = TripletEvaluator(list(a), list(p), list(n), name="dev", truncate_dim=dim)
        out["triplet"]["cosine_accuracy" + suffix] = strip(ev(model), "dev")["cosine_accuracy"]
    out["triplets"] = len(triplets)
    path = FIX / f"classification-{MODEL}.json"
    path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print("wrote", path.relative_to(REPO))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
