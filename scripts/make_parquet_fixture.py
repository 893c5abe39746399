"""Generate st-tune's Parquet fixtures with Hugging Face `datasets` (Dataset.to_parquet, pyarrow underneath).

Writes into tests/fixtures/:
  parquet-pairs.parquet        anchor,positive: 5 rows, one row group, by Dataset.to_parquet (snappy pages:
                               `datasets` always writes snappy).
  parquet-labelled.parquet     id,sentence1,sentence2,label: 7 rows in row groups of 3 (batch_size=3), by
                               Dataset.to_parquet; label int64 0/1, plus an extra id column st-tune must ignore.
  parquet-distill.parquet      text,embedding: 4 rows, embedding a list of float32 (what a teacher's
                               encode gives): the Dataset's own Arrow table written by pyarrow with zstd
                               pages (as files converted or uploaded with zstd are).
  parquet-corpus.parquet       text: 4 distractor documents (data.corpus), by Dataset.to_parquet.
  parquet-bad-label.parquet    sentence1,sentence2,label: row 2 of row group 1 (row 5 of the file,
                               counting from 0) has label 2; row groups of 3.
  parquet-expected.json        the rows of each good file as Python reads them back ({file: {column: values}}).

`datasets` is not in scripts/requirements-python.txt (the other fixtures do not need it); run this in a
venv of its own:
    python3 -m venv /tmp/pq && /tmp/pq/bin/pip install datasets && /tmp/pq/bin/python scripts/make_parquet_fixture.py
"""
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
from datasets import Dataset, Features, Sequence, Value

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"


def write(name, columns, features=None, zstd=False, **kwargs):
    ds = Dataset.from_dict(columns, features=features)
    if zstd:
        pq.write_table(ds.data.table, str(FIX / name), compression="zstd")
    else:
        ds.to_parquet(str(FIX / name), **kwargs)
    print("wrote", (FIX / name).relative_to(REPO))
    return ds


def main():
    expected = {"datasets": datasets.__version__}
    pairs = {"anchor": ["the cat sat.", "a dog runs.", "Ünïcode, \"quoted\"", "x", "last one"],
             "positive": ["a cat is sitting.", "the dog is running.", "text with\na newline", "y", "z"]}
    expected["parquet-pairs.parquet"] = write("parquet-pairs.parquet", pairs).to_dict()
    labelled = {"id": list(range(7)),
                "sentence1": [f"first {i}" for i in range(7)],
                "sentence2": [f"second {i}" for i in range(7)],
                "label": [1, 0, 0, 1, 1, 0, 1]}
    expected["parquet-labelled.parquet"] = write(
        "parquet-labelled.parquet", labelled, batch_size=3).to_dict()
    rng = np.random.default_rng(3)
    distill = {"text": ["one", "two", "three", "four"],
               "embedding": rng.standard_normal((4, 6)).astype(np.float32).tolist()}
    features = Features({"text": Value("string"), "embedding": Sequence(Value("float32"))})
    ds = write("parquet-distill.parquet", distill, features=features, zstd=True)
    expected["parquet-distill.parquet"] = ds.to_dict()
    corpus = {"text": ["a corpus text.", "another document", "third", "the fourth one"]}
    expected["parquet-corpus.parquet"] = write("parquet-corpus.parquet", corpus).to_dict()
    bad = {k: v[:6] for k, v in labelled.items() if k != "id"}
    bad["label"] = [1, 0, 0, 1, 1, 2]
    write("parquet-bad-label.parquet", bad, batch_size=3)
    (FIX / "parquet-expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    print("wrote", (FIX / "parquet-expected.json").relative_to(REPO))


if __name__ == "__main__":
    main()
