"""Generate tests/fixtures/mining-all-MiniLM-L6-v2.json with Python sentence-transformers'
`mine_hard_negatives` (sentence_transformers/util/hard_negatives.py, 6.2.0) on the real
all-MiniLM-L6-v2, so tests/mine.rs can check that `st-tune mine` picks the same negatives.

Data: tests/fixtures/retrieval-pairs.csv (51 rows, 49 anchors: two anchors have two positives)
and, for most cases, tests/fixtures/retrieval-corpus.txt as extra corpus. One case per option
set: defaults (top), a range window, max_score, absolute margin, relative margin, n-tuple output,
and no extra corpus; the "short" cases leave some anchors fewer negatives than asked (triplets:
fewer rows; n-tuple: the row is left out, as Python does). Each case records the command-line arguments of `st-tune mine` that mean
the same, and per (anchor, positive) the negatives in Python's order (highest score first).

Ties: an anchor whose choice could flip on a rounding difference between torch and candle
(two candidate scores within TIE of each other near the cut, or a score within TIE of a
max_score/margin threshold) is listed under `near_tie_anchors`; the test leaves those out.

Needs `datasets` and `pandas` besides the pinned packages (mine_hard_negatives builds a Dataset):
    pip install --target /tmp/mine-pylib datasets pandas
    PYTHONPATH=/tmp/mine-pylib .venv/bin/python scripts/make_mining_fixture.py
"""
import csv
import json
from pathlib import Path

import numpy as np
import sentence_transformers
import torch
import datasets.arrow_dataset
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import mine_hard_negatives

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"
OUT = FIX / "mining-all-MiniLM-L6-v2.json"
TIE = 1e-4

CASES = [
    ("defaults", {}, True),
    ("range window", {"range_min": 3, "range_max": 12, "num_negatives": 4}, True),
    ("max_score", {"max_score": 0.45, "num_negatives": 3}, True),
    ("absolute margin", {"absolute_margin": 0.1, "num_negatives": 5}, True),
    ("absolute margin, short", {"absolute_margin": 0.55, "range_max": 10, "num_negatives": 3}, True),
    ("relative margin", {"relative_margin": 0.4, "num_negatives": 2}, True),
    ("relative margin, short", {"relative_margin": 0.6, "range_max": 10, "num_negatives": 3}, True),
    ("n-tuple", {"output_format": "n-tuple", "num_negatives": 3, "max_score": 0.5}, True),
    ("n-tuple, short", {"output_format": "n-tuple", "num_negatives": 4, "max_score": 0.3, "range_max": 8}, True),
    ("no corpus", {"num_negatives": 2, "range_min": 1}, False),
]

FLAGS = {
    "num_negatives": "--num-negatives",
    "range_min": "--range-min",
    "range_max": "--range-max",
    "max_score": "--max-score",
    "absolute_margin": "--absolute-margin",
    "relative_margin": "--relative-margin",
    "output_format": "--output-format",
}


def near_tie_anchors(queries, positives_of, corpus, scores, opts, max_pos):
    """Anchors whose negatives could differ by a rounding difference (see the module doc): two
    scores within TIE of each other at or inside the window's edges, or a candidate within TIE
    of a threshold."""
    n = opts.get("num_negatives", 3)
    rmin = opts.get("range_min", 0)
    filtered = any(k in opts for k in ("max_score", "absolute_margin", "relative_margin"))
    rmax = opts.get("range_max") or rmin + (10 * n if filtered else n) + max_pos
    k = min(rmax + max_pos, len(corpus))
    out = []
    for qi, q in enumerate(queries):
        row = scores[qi]
        order = list(np.argsort(-row))
        pos_ids = {corpus.index(p) for p in positives_of[q]}
        low = min(row[i] for i in pos_ids)
        thresholds = []
        if "max_score" in opts:
            thresholds.append(opts["max_score"])
        if "absolute_margin" in opts:
            thresholds.append(low - opts["absolute_margin"])
        if "relative_margin" in opts:
            thresholds.append(low - abs(low) * opts["relative_margin"])
        pool = order[:k]
        near = any(abs(row[i] - t) < TIE for i in pool for t in thresholds)
        kept = [row[i] for i in pool if i not in pos_ids and all(row[i] <= t for t in thresholds)]
        edge = kept[max(rmin - 1, 0): rmin + n + 1]
        near |= bool((np.abs(np.diff(edge)) < TIE).any()) if len(edge) > 1 else False
        # The pool's own cut matters when the window reaches its end.
        if len(kept) < rmin + n + 1 and k < len(corpus):
            near |= abs(row[order[k - 1]] - row[order[k]]) < TIE
        if near:
            out.append(q)
    return out


def main():
    # datasets 5.2 with pyarrow 26 fails to pickle pyarrow's MonthDayNano while hashing a new
    # Dataset for its cache fingerprint; the fingerprint is not used here.
    datasets.arrow_dataset.generate_fingerprint = lambda *args, **kwargs: "mining-fixture"
    with open(FIX / "retrieval-pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    extra = (FIX / "retrieval-corpus.txt").read_text().splitlines()
    data = Dataset.from_dict({"anchor": [r["anchor"] for r in rows], "positive": [r["positive"] for r in rows]})
    model = SentenceTransformer(str(REPO / ".weights" / "all-MiniLM-L6-v2"), device="cpu")
    queries = list(dict.fromkeys(r["anchor"] for r in rows))
    positives_of = {q: [] for q in queries}
    for r in rows:
        if r["positive"] not in positives_of[r["anchor"]]:
            positives_of[r["anchor"]].append(r["positive"])
    max_pos = max(sum(r["anchor"] == q for r in rows) for q in queries)
    q_emb = model.encode(queries, normalize_embeddings=True, convert_to_numpy=True)

    cases = []
    for name, opts, with_corpus in CASES:
        corpus_arg = extra if with_corpus else None
        mined = mine_hard_negatives(
            data, model, corpus=corpus_arg, batch_size=32, verbose=False, **opts
        )
        corpus = list(dict.fromkeys((extra if with_corpus else []) + [r["positive"] for r in rows]))
        c_emb = model.encode(corpus, normalize_embeddings=True, convert_to_numpy=True)
        scores = q_emb @ c_emb.T
        # Every (anchor, positive) in Python's output order; one that got no negative has [].
        order = [(q, p) for q in queries for p in positives_of[q]]
        negatives = {key: [] for key in order}
        for rec in mined:
            key = (rec["anchor"], rec["positive"])
            if opts.get("output_format") == "n-tuple":
                negatives[key] = [rec[f"negative_{i}"] for i in range(1, opts["num_negatives"] + 1)]
            else:
                negatives[key].append(rec["negative"])
        args = []
        for key, value in opts.items():
            args += [FLAGS[key], str(value)]
        cases.append({
            "name": name,
            "options": opts,
            "corpus": with_corpus,
            "args": args,
            "rows": [{"anchor": a, "positive": p, "negatives": negatives[(a, p)]} for a, p in order],
            "near_tie_anchors": near_tie_anchors(queries, positives_of, corpus, scores, opts, max_pos),
        })
        print(f"{name}: {len(order)} rows, {sum(len(v) for v in negatives.values())} negatives, "
              f"{len(cases[-1]['near_tie_anchors'])} near-tie anchors")
    OUT.write_text(json.dumps({
        "model": "all-MiniLM-L6-v2",
        "versions": {"sentence_transformers": sentence_transformers.__version__, "torch": torch.__version__},
        "tie": TIE,
        "cases": cases,
    }, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
