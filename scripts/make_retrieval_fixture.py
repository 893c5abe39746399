"""Generate st-tune's retrieval-evaluation fixtures with the real Python InformationRetrievalEvaluator.

Writes into tests/fixtures/:
  retrieval-pairs.csv      anchor,positive: the first 50 rows of data/stsb-small/validation.csv with
                           score >= 0.4 (sentence1 -> anchor, sentence2 -> positive), then every later
                           such row whose sentence1 or sentence2 repeats a text already taken (the file
                           then holds a repeated row, an anchor with two positives and a positive of two
                           anchors, so the dedupe rule matters).
  retrieval-triplets.csv   anchor,positive,negative: the first 40 of those rows, each with the sentence2
                           of a row scored <= 0.2 (taken in file order) as its negative.
  retrieval-corpus.txt     distractors (data.corpus): the sentence2 of validation rows 100-179 that are in
                           neither file, one per line; evaluated with retrieval-pairs.csv as a third case.
  retrieval-all-MiniLM-L6-v2.json
      {"model", "versions", "cases": [{"file", "queries", "corpus", "metrics"}]}: the figures of
      sentence_transformers' InformationRetrievalEvaluator (sentence-transformers 6.2.0,
      sentence_transformers/sentence_transformer/evaluation/information_retrieval.py) for each file,
      with all-MiniLM-L6-v2 on CPU, its defaults (accuracy/precision/recall@1,3,5,10, MRR@10,
      NDCG@10, MAP@100; the model's similarity, cosine). Metric keys lose the "cosine_" prefix.

How a file becomes queries, corpus and relevant documents (st-tune's src/train/retrieval.rs does the
same): every id is the text itself. The evaluator breaks score ties by corpus id and treats two ids as
two documents, so ids per row would make a text that appears twice two documents, one of them wrongly
irrelevant for the other row's anchor; text ids merge them. Queries: the distinct anchors, in order
of first appearance; a repeated anchor is one query whose relevant documents are the positives of
all its rows. Corpus: the distinct positive and negative texts.

Regenerate (needs the weights and the pinned Python packages):
    scripts/fetch-weights.sh && "$(scripts/setup-python.sh)" scripts/make_retrieval_fixture.py
Weights are read from $ST_TUNE_WEIGHTS (default <repo>/.weights).
"""
import csv, io, json, os
from pathlib import Path

import sentence_transformers, torch, transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

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


def build_files():
    with open(REPO / "data" / "stsb-small" / "validation.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    high = [r for r in rows if float(r["score"]) >= 0.4]
    low = [r for r in rows if float(r["score"]) <= 0.2]
    pairs = [(r["sentence1"], r["sentence2"]) for r in high[:50]]
    seen = {t for p in pairs for t in p}
    pairs += [(r["sentence1"], r["sentence2"]) for r in high[50:]
              if r["sentence1"] in seen or r["sentence2"] in seen]
    triplets = [(a, p, n["sentence2"]) for (a, p), n in zip(pairs[:40], low)]
    write_csv(FIX / "retrieval-pairs.csv", ["anchor", "positive"], pairs)
    write_csv(FIX / "retrieval-triplets.csv", ["anchor", "positive", "negative"], triplets)
    used = {t for row in pairs + triplets for t in row}
    extra = list(dict.fromkeys(r["sentence2"] for r in rows[100:180] if r["sentence2"] not in used))
    (FIX / "retrieval-corpus.txt").write_text("".join(t + "\n" for t in extra), encoding="utf-8")
    print("wrote", (FIX / "retrieval-corpus.txt").relative_to(REPO))
    return {"retrieval-pairs.csv": pairs, "retrieval-triplets.csv": triplets}, extra


def evaluate(model, rows, extra=()):
    queries, corpus, relevant = {}, {}, {}
    for row in rows:
        anchor, positive, negatives = row[0], row[1], row[2:]
        queries.setdefault(anchor, anchor)
        relevant.setdefault(anchor, set()).add(positive)
        for text in (positive, *negatives):
            corpus.setdefault(text, text)
    for text in extra:
        corpus.setdefault(text, text)
    ev = InformationRetrievalEvaluator(queries, corpus, relevant, write_csv=False)
    metrics = ev(model)
    prefix = f"{model.similarity_fn_name}_"
    assert all(k.startswith(prefix) for k in metrics), metrics
    return {"queries": len(queries), "corpus": len(corpus),
            "metrics": {k[len(prefix):]: float(v) for k, v in metrics.items()}}


if __name__ == "__main__":
    torch.manual_seed(0)
    files, extra = build_files()
    model = SentenceTransformer(str(WEIGHTS / MODEL), device="cpu")
    assert model.similarity_fn_name == "cosine", model.similarity_fn_name
    cases = [{"file": name, **evaluate(model, rows)} for name, rows in files.items()]
    cases.append({"file": "retrieval-pairs.csv", "corpus_file": "retrieval-corpus.txt",
                  **evaluate(model, files["retrieval-pairs.csv"], extra)})
    out = FIX / f"retrieval-{MODEL}.json"
    out.write_text(json.dumps({"model": MODEL, "versions": VERSIONS, "cases": cases}, indent=1) + "\n",
                   encoding="utf-8")
    print("wrote", out.relative_to(REPO))
