"""Re-save a model folder with the pinned sentence-transformers (6.x folder layout), with prompts.

usage: save_st6_folder.py SRC_MODEL_DIR OUT_DIR
  Loads SRC_MODEL_DIR (any layout) with SentenceTransformer, declares the prompts
  {"query": "query: ", "passage": "passage: "} and saves it with SentenceTransformer.save into OUT_DIR:
  modules.json types such as sentence_transformers.base.modules.transformer.Transformer,
  1_Pooling/config.json with embedding_dimension / pooling_mode / include_prompt, max_seq_length in
  tokenizer_config.json. scripts/roundtrip.sh fine-tunes such a folder with st-tune and checks that
  Python loads the result with parity.
Run with the project venv: "$(scripts/setup-python.sh)" scripts/save_st6_folder.py SRC OUT
"""
import sys

if len(sys.argv) != 3:
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    sys.exit(2)
src, out = sys.argv[1:]

from sentence_transformers import SentenceTransformer

model = SentenceTransformer(src, device="cpu", prompts={"query": "query: ", "passage": "passage: "})
model.save(out)
print(f"saved {src} as {out} (sentence-transformers 6.x layout, prompts query/passage)", file=sys.stderr)
