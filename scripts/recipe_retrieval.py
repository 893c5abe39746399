"""The retrieval recipe of configs/retrieval.toml in Python sentence-transformers, as its users
run it: `mine_hard_negatives` (one negative per pair, relative margin 0.05, top sampling, the
split's other sentences as extra corpus), then `SentenceTransformerTrainer` with
`MatryoshkaLoss(MultipleNegativesRankingLoss)` at 384/256/128/64 dims,
`BatchSamplers.NO_DUPLICATES`, the prompts "query: " (anchor) and "passage: " (positive,
negative), and `InformationRetrievalEvaluator` (same prompts, the dev split's other sentences as
distractors) before and after. Same hyperparameters as the config: 1 epoch, batch 32, lr 2e-5,
warmup 10 % (floored, as st-tune counts it), weight decay 0.01, clipping 1.0, max_seq_length
128, seed 42. scripts/bench-recipe.sh runs it beside st-tune.

    PYTHONPATH=/tmp/recipe-pylib .venv/bin/python scripts/recipe_retrieval.py \
        .weights/all-MiniLM-L6-v2 data/stsb-retrieval OUT_DIR

Needs `datasets`, `pandas` and `accelerate` besides the pinned packages (the trainer and
mine_hard_negatives use them): pip install --no-deps --target /tmp/recipe-pylib datasets pandas
accelerate pyarrow dill multiprocess xxhash psutil python-dateutil tzdata six
Prints one JSON line: ndcg@10 before and after (full width), mining and training seconds,
training samples/s (rows / seconds of trainer.train()), peak RSS of the process.
"""
import csv
import json
import resource
import sys
import time
from pathlib import Path

import torch
import datasets.arrow_dataset
from datasets import Dataset
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.evaluation import InformationRetrievalEvaluator
from sentence_transformers.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
from sentence_transformers.training_args import BatchSamplers
from sentence_transformers.util import mine_hard_negatives

PROMPTS = {"query": "query: ", "passage": "passage: "}
DIMS = [384, 256, 128, 64]
BATCH, LR, SEED = 32, 2e-5, 42


def pairs(path: Path) -> list[tuple[str, str]]:
    return [(r["anchor"], r["positive"]) for r in csv.DictReader(open(path, encoding="utf-8"))]


def lines(path: Path) -> list[str]:
    return [t for t in path.read_text(encoding="utf-8").splitlines() if t]


def evaluator(data: Path) -> InformationRetrievalEvaluator:
    # Each text is its own id, so a repeated text is one query or one document (as st-tune).
    dev = pairs(data / "dev.csv")
    relevant: dict[str, set[str]] = {}
    for a, p in dev:
        relevant.setdefault(a, set()).add(p)
    corpus = {t: t for t in [p for _, p in dev] + lines(data / "dev-corpus.txt")}
    return InformationRetrievalEvaluator(
        queries={a: a for a in relevant},
        corpus=corpus,
        relevant_docs=relevant,
        query_prompt=PROMPTS["query"],
        corpus_prompt=PROMPTS["passage"],
        name="dev",
        show_progress_bar=False,
    )


def ndcg(evaluate: InformationRetrievalEvaluator, model: SentenceTransformer) -> float:
    scores = evaluate(model)
    return scores[evaluate.primary_metric]  # set by the first call: "dev_cosine_ndcg@10"


def main() -> None:
    # datasets 5.2 fails to pickle pyarrow's MonthDayNano while hashing a new Dataset for its
    # cache fingerprint (as in make_mining_fixture.py); nothing here is cached to disk.
    fingerprints = iter(range(1 << 30))
    datasets.arrow_dataset.generate_fingerprint = lambda *a, **k: f"recipe-{next(fingerprints)}"
    model_dir, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.manual_seed(SEED)
    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = 128
    evaluate = evaluator(data)
    result = {"threads": torch.get_num_threads()}
    result["ndcg@10_before"] = ndcg(evaluate, model)

    t0 = time.perf_counter()
    train = pairs(data / "train.csv")
    mined = mine_hard_negatives(
        Dataset.from_dict({"anchor": [a for a, _ in train], "positive": [p for _, p in train]}),
        model,
        corpus=lines(data / "corpus.txt"),
        num_negatives=1,
        relative_margin=0.05,
        sampling_strategy="top",
        output_format="triplet",
        batch_size=32,
        verbose=False,
    )
    result["mine_s"] = round(time.perf_counter() - t0, 2)
    result["train_rows"] = len(mined)

    steps = -(-len(mined) // BATCH)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"),
        num_train_epochs=1,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        warmup_steps=int(0.1 * steps),
        weight_decay=0.01,
        max_grad_norm=1.0,
        seed=SEED,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        prompts={"anchor": PROMPTS["query"], "positive": PROMPTS["passage"], "negative": PROMPTS["passage"]},
        eval_strategy="no",
        save_strategy="no",
        logging_steps=5,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    loss = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), DIMS)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=mined, loss=loss)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    result["train_s"] = round(train_s, 2)
    result["steps"] = trainer.state.global_step
    result["samples_per_s"] = round(len(mined) / train_s, 2)
    result["ndcg@10_after"] = ndcg(evaluate, model)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
