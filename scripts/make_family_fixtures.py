"""Random-weight sentence-transformers folders of the XLM-RoBERTa, RoBERTa, DistilBERT and ModernBERT families, and what
Python computes with them: st-tune's parity fixtures for families whose real weights cannot be
downloaded here.

usage: make_family_fixtures.py [small [FAMILY ...] | base OUT_DIR [FAMILY ...]]
  small (default)  writes tests/fixtures/families/{xlm-roberta,roberta,distilbert,modernbert}/ (or only the FAMILYs
                   named):
      model/             the folder (Transformer + mean Pooling + Normalize), saved by SentenceTransformer.save:
                         hidden 32, 2 layers, 4 heads, intermediate 64; the family's real layout otherwise
                         (XLM-R and RoBERTa: type_vocab_size 1, pad 1, positions offset by 2, layer_norm_eps 1e-5;
                         DistilBERT: q_lin/k_lin/v_lin/out_lin names, sinusoidal_pos_embds = true;
                         ModernBERT: 3 layers, global attention every 3rd (layer 0), the others local with
                         local_attention 8 (each token sees +-4, so most sentences are longer than the window),
                         rotary theta 160000 global / 10000 local, no biases, intermediate 48, GeGLU,
                         max_seq_length 512; expected.json also holds "long": two texts of several
                         hundred tokens, longer than st-tune's 64-query blocks of a local layer)
      expected.json      for tests/fixtures/sentences.txt: max_seq_length, the token ids the model feeds its
                         encoder (padding removed), encode(batch_size=16) embeddings; and the loss case:
                         MultipleNegativesRankingLoss (scale 20) of PAIRS with dropout off, its value
      grads.safetensors  the gradient of that loss w.r.t. every parameter that gets one (torch autograd),
                         under the checkpoint's own tensor names
  base OUT_DIR     writes OUT_DIR/{xlm-roberta,distilbert,modernbert}-base: the real base shapes (XLM-R 768 x 12,
                   vocab 250002; DistilBERT 768 x 6, vocab 30522; ModernBERT-base 768 x 22, intermediate 1152,
                   local_attention 128, vocab 50368, 8192 positions), same small tokenizers; for benchmarks, not
                   committed.

Tokenizers: no real XLM-R, RoBERTa or DistilBERT tokenizer ships in a package here, so each is trained with
the `tokenizers` library on sentences.txt and a few extra lines: XLM-R a Unigram (SentencePiece-style: NFKC,
Metaspace "▁", <s> $A </s>, ids <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last), RoBERTa a byte-level BPE (GPT-2
style, RobertaProcessing, same special ids), DistilBERT a lower-casing WordPiece ([CLS] $A [SEP]), ModernBERT a
byte-level BPE as GPT-NeoX's (ModernBERT's is one) with [CLS] $A [SEP] and ids [UNK]=0 [CLS]=1 [SEP]=2 [PAD]=3
[MASK]=4. Wrapped as XLMRobertaTokenizerFast / RobertaTokenizerFast / DistilBertTokenizerFast /
PreTrainedTokenizerFast (ModernBERT's class).
Weights: AutoModel.from_config (seed 0), then every tensor but DistilBERT's sinusoidal table redrawn
(normal(0, 0.1); norms at 1 ± 0.1) so biases and norms are not the trivial 0 and 1. ModernBERT runs with
transformers' eager attention (the same function as sdpa, one less kernel to trust).

Run with the project venv: "$(scripts/setup-python.sh)" scripts/make_family_fixtures.py
"""
import json, re, shutil, sys, tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
import sentence_transformers, transformers
from transformers import (AutoModel, DistilBertConfig, DistilBertTokenizerFast, ModernBertConfig,
                          PreTrainedTokenizerFast, RobertaConfig, RobertaTokenizerFast, XLMRobertaConfig,
                          XLMRobertaTokenizerFast)
from sentence_transformers import SentenceTransformer
from sentence_transformers.models import Normalize, Pooling, Transformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"
VERSIONS = {"sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}
EXTRA = ["Der schnelle braune Fuchs springt über den faulen Hund.", "El gato se sentó en la alfombra.",
         "Le chat est assis sur le tapis.", "Кошка сидит на коврике.", "a man is playing guitar",
         "the cat sat on the mat", "big red dog runs fast", "a woman is taking the plane"]
# The loss case: (anchor, positive) rows.
PAIRS = [("A man is playing a guitar.", "Someone plays an instrument."),
         ("The quick brown fox jumps over the lazy dog.", "A fox leaps over a dog."),
         ("Le chat est assis sur le tapis.", "The cat sat on the mat."),
         ("a plane is taking off", "an aircraft departs")]
SMALL = dict(hidden=32, layers=2, heads=4, intermediate=64)
SMALL_MODERNBERT = dict(hidden=32, layers=3, heads=4, intermediate=48, local_attention=8, positions=512,
                        max_seq_length=512)


def sentences():
    lines = (FIX / "sentences.txt").read_text(encoding="utf-8").split("\n")
    return [s for s in lines if s.strip()]


def corpus():
    return sentences() + EXTRA + [t for p in PAIRS for t in p]


def xlmr_tokenizer(max_len):
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=max_len)


def roberta_tokenizer(max_len):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                      add_prefix_space=False)
    return RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                model_max_length=max_len)


def distilbert_tokenizer(max_len):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(corpus(), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return DistilBertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                   cls_token="[CLS]", mask_token="[MASK]", model_max_length=max_len)


def modernbert_tokenizer(max_len):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]", model_max_length=max_len,
                                   model_input_names=["input_ids", "attention_mask"])


def config(family, s, vocab):
    if family == "modernbert":
        return ModernBertConfig(vocab_size=vocab, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                                num_attention_heads=s["heads"], intermediate_size=s["intermediate"],
                                max_position_embeddings=s["positions"], local_attention=s["local_attention"],
                                global_attn_every_n_layers=3, global_rope_theta=160000.0, local_rope_theta=10000.0,
                                pad_token_id=3, bos_token_id=1, cls_token_id=1, eos_token_id=2, sep_token_id=2,
                                attn_implementation="eager")
    if family in ("xlm-roberta", "roberta"):
        cls = XLMRobertaConfig if family == "xlm-roberta" else RobertaConfig
        return cls(vocab_size=vocab, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                   num_attention_heads=s["heads"], intermediate_size=s["intermediate"],
                   max_position_embeddings=s["positions"], type_vocab_size=1, layer_norm_eps=1e-5,
                   pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return DistilBertConfig(vocab_size=vocab, dim=s["hidden"], n_layers=s["layers"], n_heads=s["heads"],
                            hidden_dim=s["intermediate"], max_position_embeddings=s["positions"],
                            sinusoidal_pos_embds=True, pad_token_id=0)


def redraw(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "embeddings.position_embeddings.weight" and model.config.model_type == "distilbert":
                continue  # the sinusoidal table stays sinusoidal
            noise = torch.randn(p.shape, generator=g) * 0.1
            is_norm = "LayerNorm" in name or "layer_norm" in name or "norm." in name
            p.copy_(1.0 + noise if is_norm and name.endswith("weight") else noise)


def build(family, shapes, out, random_weights=True):
    """Writes the sentence-transformers folder `out` and returns it loaded."""
    positions = shapes["positions"]
    max_len = {"distilbert": positions, "modernbert": shapes.get("max_seq_length", 64)}.get(family, positions - 2)
    tok = {"xlm-roberta": xlmr_tokenizer, "roberta": roberta_tokenizer, "distilbert": distilbert_tokenizer,
           "modernbert": modernbert_tokenizer}[family](max_len)
    torch.manual_seed(0)
    model = AutoModel.from_config(config(family, shapes, shapes.get("vocab", len(tok))))
    if random_weights:
        redraw(model)
    with tempfile.TemporaryDirectory() as hf:
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
        tr = Transformer(hf, max_seq_length=max_len)
        st = SentenceTransformer(modules=[tr, Pooling(shapes["hidden"], "mean"), Normalize()], device="cpu")
        if out.exists():
            shutil.rmtree(out)
        st.save(str(out))
    return SentenceTransformer(str(out), device="cpu")


def dump(obj, path):
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    text = re.sub(r"\[[\s\d.eE+\-,]*\]", lambda m: re.sub(r"\s+", "", m.group(0)), text)
    path.write_text(text + "\n", encoding="utf-8")
    print("wrote", path.relative_to(REPO))


def hf_model(st):
    tr = st[0]
    return getattr(tr, "auto_model", None) or tr.model


def small(family):
    root = FIX / "families" / family
    root.mkdir(parents=True, exist_ok=True)
    shapes = SMALL_MODERNBERT if family == "modernbert" else {**SMALL, "positions": 64 if family == "distilbert" else 66}
    st = build(family, shapes, root / "model")
    sents = sentences()
    emb = st.encode(sents, batch_size=16, convert_to_numpy=True)
    feats = st.preprocess(sents)
    ids = [row[mask.bool()].tolist() for row, mask in zip(feats["input_ids"], feats["attention_mask"])]
    # The loss case, dropout off (eval), as st-tune's test computes it.
    st.eval()
    texts = [a for a, _ in PAIRS] + [p for _, p in PAIRS]
    f = st.preprocess(texts)
    e = st(f)["sentence_embedding"]
    n = len(PAIRS)
    loss = MultipleNegativesRankingLoss(st, scale=20.0).compute_loss_from_embeddings([e[:n], e[n:]], None)
    loss.backward()
    grads = {k: p.grad.detach().contiguous() for k, p in hf_model(st).named_parameters() if p.grad is not None}
    save_file(grads, str(root / "grads.safetensors"))
    print("wrote", (root / "grads.safetensors").relative_to(REPO), len(grads), "gradients")
    long = {}
    if family == "modernbert":
        text = " ".join(sents)
        texts = [text + " " + text, text[: len(text) // 5]]
        lf = st.preprocess(texts)
        long = {"long": {"texts": texts, "tokens": lf["attention_mask"].sum(1).tolist(),
                         "embeddings": [[float(x) for x in row] for row in st.encode(texts, convert_to_numpy=True)]}}
    dump({"family": family, "max_seq_length": st.max_seq_length, "dim": int(emb.shape[1]), "versions": VERSIONS,
          **long, "sentences": sents, "token_ids": ids, "embeddings": [[float(x) for x in row] for row in emb],
          "loss": {"name": "mnrl", "scale": 20.0, "anchors": [a for a, _ in PAIRS],
                   "positives": [p for _, p in PAIRS], "value": loss.item()}}, root / "expected.json")


BASE = {"xlm-roberta": dict(hidden=768, layers=12, heads=12, intermediate=3072, positions=514, vocab=250002),
        "distilbert": dict(hidden=768, layers=6, heads=12, intermediate=3072, positions=512, vocab=30522),
        "modernbert": dict(hidden=768, layers=22, heads=12, intermediate=1152, positions=8192, vocab=50368,
                           local_attention=128, max_seq_length=8192)}

if __name__ == "__main__":
    args = sys.argv[1:] or ["small"]
    if args[0] == "small":
        for fam in args[1:] or ("xlm-roberta", "roberta", "distilbert", "modernbert"):
            small(fam)
    elif args[0] == "base" and len(args) >= 2:
        for fam, shapes in BASE.items():
            if args[2:] and fam not in args[2:]:
                continue
            out = Path(args[1]) / f"{fam}-base"
            build(fam, shapes, out, random_weights=False)
            print("wrote", out)
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
