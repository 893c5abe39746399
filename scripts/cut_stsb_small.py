#!/usr/bin/env python3
"""Cut data/stsb-small (the quickstart's data) out of the full STS-B CSV files.

    python3 scripts/cut_stsb_small.py SRC_DIR data/stsb-small     # SRC_DIR: shared/data/stsb

A seeded random sample (not the first N rows: the full files are ordered by genre, captions
first, so a head would hold only image captions). Rows keep their original order. Standard
library only; output is written with the same dialect as the source (header, minimal RFC 4180
quoting, LF line ends), which the assertion below checks by re-writing the source byte for byte.
"""
import csv, io, random, shutil, sys
from pathlib import Path

SIZES = {"train.csv": 1000, "validation.csv": 500}
SEED = 0


def write(rows):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for name, n in SIZES.items():
    text = (src / name).read_text(encoding="utf-8")
    header, *rows = list(csv.reader(io.StringIO(text, newline="")))
    assert write([header, *rows]) == text, f"{name}: dialect differs from the source"
    keep = sorted(random.Random(SEED).sample(range(len(rows)), n))
    (dst / name).write_text(write([header, *(rows[i] for i in keep)]), encoding="utf-8")
    print(f"{dst / name}: {n} of {len(rows)} rows")
shutil.copy(src / "LICENSE.txt", dst / "LICENSE.txt")
