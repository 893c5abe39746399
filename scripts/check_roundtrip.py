"""Check that a model folder saved by st-tune loads in Python sentence-transformers, unchanged, and
embeds as st-tune does.

usage: check_roundtrip.py SAVED_MODEL_DIR SENTENCES.txt ST_TUNE_JSONL [PROMPT_NAME]
  SAVED_MODEL_DIR  folder written by st-tune (loaded with SentenceTransformer(path, device="cpu"), no edits)
  SENTENCES.txt    one sentence a line, blank lines skipped (the rule of shared/peer/st_embed.py)
  ST_TUNE_JSONL    st-tune's embeddings of the same lines, one {"text": ..., "embedding": [...]} a line
  PROMPT_NAME      encode with prompt_name=PROMPT_NAME (st-tune encode --prompt PROMPT_NAME made the JSONL)
Prints the max abs difference; exit 0 if it is <= 1e-5, 1 if larger or the texts disagree, 2 on bad usage.
Run with the project venv: "$(scripts/setup-python.sh)" scripts/check_roundtrip.py ...
"""
import json, sys
from pathlib import Path

TOL = 1e-5  # the project's parity bar (a cosine > 0.999 test would hide real drift)

if len(sys.argv) not in (4, 5):
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    sys.exit(2)
model_dir, sentences_path, jsonl_path = sys.argv[1:4]
prompt_name = sys.argv[4] if len(sys.argv) == 5 else None
if not (Path(model_dir) / "modules.json").is_file():
    # Without this, SentenceTransformer would take the path for a hub id and try the network.
    print(f"{model_dir}: not a sentence-transformers folder (no modules.json)", file=sys.stderr)
    sys.exit(2)

import numpy as np
from sentence_transformers import SentenceTransformer

lines = Path(sentences_path).read_text(encoding="utf-8").split("\n")
sentences = [s for s in lines if s.strip()]
rows = [json.loads(l) for l in Path(jsonl_path).read_text(encoding="utf-8").splitlines() if l.strip()]
texts = [r["text"] for r in rows]
if texts != sentences:
    bad = next((i for i, (a, b) in enumerate(zip(texts, sentences)) if a != b), min(len(texts), len(sentences)))
    print(f"texts differ: {len(texts)} JSONL rows vs {len(sentences)} sentences; first difference at row {bad + 1}")
    sys.exit(1)

model = SentenceTransformer(model_dir, device="cpu")
expected = model.encode(sentences, batch_size=16, prompt_name=prompt_name, convert_to_numpy=True).astype(np.float64)
got = np.array([r["embedding"] for r in rows], dtype=np.float64)
if got.shape != expected.shape:
    print(f"shape differs: st-tune {got.shape}, sentence-transformers {expected.shape}")
    sys.exit(1)
diff = np.abs(got - expected)
row = int(diff.max(axis=1).argmax())
print(f"max abs diff {diff.max():.3e} over {len(sentences)} sentences x {expected.shape[1]} dims "
      f"(worst row {row + 1}){f', prompt {prompt_name!r}' if prompt_name else ''}; tolerance {TOL:g}")
sys.exit(0 if diff.max() <= TOL else 1)
