"""Generate the pooling and prompt fixtures with Python sentence-transformers (6.2.0, pinned).

Writes into tests/fixtures/pooling/:
  model/          a tiny BERT (random weights, torch.manual_seed(0); 2 layers, hidden 16; a WordPiece
                  vocabulary of the words of SENTENCES) saved by SentenceTransformer.save: the
                  6.x folder layout, mean pooling, prompts {"query": "query: ", "passage": "passage: "}.
  cases.json      {"versions", "sentences", "prompts", "cases": [{"name", "pooling_config",
                  "embeddings": {"": [...], "query": [...], "passage": [...]}}]}: for every pooling
                  mode and a few combinations, with include_prompt true and false, in the 6.x layout
                  (written by Pooling.save_config) and the 2.x-5.x layout (pooling_mode_* flags, as
                  5.x wrote them): `model/` with its 1_Pooling/config.json replaced by
                  `pooling_config`, loaded by SentenceTransformer and encoded without a prompt ("") and
                  with prompt_name "query" / "passage". Floats are the exact float32 values.

Regenerate (no weights needed):
    "$(scripts/setup-python.sh)" scripts/make_pooling_fixtures.py
"""
import json, re, shutil, tempfile
from pathlib import Path

import sentence_transformers, torch, transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.transformer import Transformer
from sentence_transformers.sentence_transformer.modules.pooling import Pooling
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "pooling"
VERSIONS = {"sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}
SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "Short.",
    "query passage words appear in the text too, and this one is cut at sixteen tokens",
    "A longer sentence, with a comma and more words than the others have in it.",
]
PROMPTS = {"query": "query: ", "passage": "passage: "}
LEGACY_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
               "mean": "pooling_mode_mean_tokens", "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
               "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}


def dump(obj, path):
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    text = re.sub(r"\[[\s\d.eE+\-,]*\]", lambda m: re.sub(r"\s+", "", m.group(0)), text)
    path.write_text(text + "\n", encoding="utf-8")
    print("wrote", path.relative_to(REPO))


def tiny_model(folder):
    """A BERT small enough to commit: vocabulary from the sentences and prompts, random weights."""
    words = sorted({w for s in SENTENCES + list(PROMPTS.values())
                    for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.BertTokenizerFast(tokenizer_object=tok, model_max_length=16)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    bert = transformers.BertModel(config, add_pooling_layer=False)
    bert.save_pretrained(folder)
    fast.save_pretrained(folder)
    model = SentenceTransformer(modules=[Transformer(str(folder)), Pooling(16, pooling_mode="mean")],
                                prompts=PROMPTS, device="cpu")
    shutil.rmtree(folder)
    model.save(str(folder))


def pooling_config(modes, include_prompt, layout):
    if layout == "v6":
        with tempfile.TemporaryDirectory() as d:
            Pooling(16, pooling_mode=modes if len(modes) > 1 else modes[0],
                    include_prompt=include_prompt).save_config(d)
            return json.loads((Path(d) / "config.json").read_text())
    # As sentence-transformers 3.x-5.x wrote it.
    return {"word_embedding_dimension": 16, **{k: m in modes for m, k in LEGACY_KEYS.items()},
            "include_prompt": include_prompt}


def embeddings(folder, config):
    with tempfile.TemporaryDirectory() as d:
        shutil.copytree(folder, d, dirs_exist_ok=True)
        (Path(d) / "1_Pooling" / "config.json").write_text(json.dumps(config))
        model = SentenceTransformer(d, device="cpu")
        return {name: [[float(x) for x in row] for row in
                       model.encode(SENTENCES, prompt_name=name or None, convert_to_numpy=True)]
                for name in ["", *PROMPTS]}


if __name__ == "__main__":
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    folder = OUT / "model"
    tiny_model(folder)
    (folder / "README.md").unlink()  # a generated card of several KB, not needed
    mode_sets = [[m] for m in LEGACY_KEYS] + [["cls", "mean"], ["max", "mean_sqrt_len_tokens"]]
    cases = []
    for modes in mode_sets:
        for include_prompt in (True, False):
            for layout in ("v6", "legacy"):
                config = pooling_config(modes, include_prompt, layout)
                name = f"{'+'.join(modes)} include_prompt={include_prompt} {layout}"
                cases.append({"name": name, "pooling_config": config,
                              "embeddings": embeddings(folder, config)})
    dump({"versions": VERSIONS, "sentences": SENTENCES, "prompts": PROMPTS, "cases": cases},
         OUT / "cases.json")
