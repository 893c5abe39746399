"""Cut data/stsb-retrieval (the retrieval recipe's data, configs/retrieval.toml) from
data/stsb-small: the pairs scored 0.6 or more (3 of 5) become (anchor, positive) rows, and the
other sentences of the same split become extra corpus texts that no anchor is relevant to.

    python3 scripts/cut_stsb_retrieval.py data/stsb-small data/stsb-retrieval

Writes train.csv (anchor,positive), corpus.txt (the train split's other sentences: candidates
for `st-tune mine --corpus`), dev.csv and dev-corpus.txt (the same from validation.csv:
the dev evaluation's queries, relevant documents and distractors). Each corpus text once,
sorted; none is an anchor or positive of its split.
"""
import csv
import sys
from pathlib import Path

MIN_SCORE = 0.6


def cut(src: Path, pairs_out: Path, corpus_out: Path) -> None:
    rows = list(csv.DictReader(open(src, encoding="utf-8", newline="")))
    pairs = [(r["sentence1"], r["sentence2"]) for r in rows if float(r["score"]) >= MIN_SCORE]
    taken = {t for pair in pairs for t in pair}
    others = {t for r in rows for t in (r["sentence1"], r["sentence2"])} - taken
    with open(pairs_out, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["anchor", "positive"])
        w.writerows(pairs)
    corpus_out.write_text("".join(t + "\n" for t in sorted(others)), encoding="utf-8")
    print(f"{pairs_out}: {len(pairs)} pairs; {corpus_out}: {len(others)} texts")


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    cut(src / "train.csv", dst / "train.csv", dst / "corpus.txt")
    cut(src / "validation.csv", dst / "dev.csv", dst / "dev-corpus.txt")


if __name__ == "__main__":
    main()
