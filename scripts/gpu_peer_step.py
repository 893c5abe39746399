"""One training step of Python sentence-transformers, timed, beside `st-tune bench memory`.

usage: python gpu_peer_step.py MODEL_DIR [--shapes 32x128,128x256] [--precisions f32,bf16]
                               [--device cuda] [--warmup 2] [--steps 3]
Prints one JSON line per (shape, precision): median step seconds and peak memory.

The step is the one `st-tune bench memory` times: CoSENT on BATCH scored pairs whose texts are
each exactly SEQ tokens (no padding, tokenization outside the timing), forward and backward,
gradient clipping at 1.0 and AdamW (lr 2e-5), with dropout on. bf16 is torch.autocast, which
keeps f32 master weights as st-tune's bf16 does. Memory: on CUDA torch.cuda.max_memory_allocated
and the driver's used memory at the end (the caching allocator keeps what it reserved, so that
is the process's peak, CUDA context included); on CPU the process's peak RSS so far (it only
grows, so later configurations include earlier ones). Adapted from ../shared/peer/st_step_bench.py.
"""
import argparse
import json
import resource
import statistics
import time

import torch
from sentence_transformers import SentenceTransformer

try:  # sentence-transformers 6 moved the losses
    from sentence_transformers.sentence_transformer import losses
except ImportError:
    from sentence_transformers import losses


def features(model, batch, seq, column, device):
    """BATCH texts of exactly SEQ tokens: a long text truncated, its inner ids replaced by
    varied ones (as st-tune's synthetic rows), special tokens kept."""
    prep = getattr(model, "preprocess", None) or model.tokenize
    f = prep(["word " * (2 * seq)] * batch)
    ids = f["input_ids"]
    assert ids.shape == (batch, seq), f"tokenizer gave {tuple(ids.shape)}, wanted {(batch, seq)}"
    r = torch.arange(batch).unsqueeze(1)
    i = torch.arange(1, seq - 1).unsqueeze(0)
    ids[:, 1:-1] = 1000 + (r * 31 + column * 17 + i * 7) % 997
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in f.items()}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, batch, seq, bf16, device, warmup, steps):
    loss_fn = losses.CoSENTLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    fa, fb = features(model, batch, seq, 0, device), features(model, batch, seq, 1, device)
    labels = torch.tensor([(r % 5) / 4.0 for r in range(batch)], device=device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    times = []
    for step in range(warmup + steps):
        if step == warmup and kind == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn([fa, fb], labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    row = {"batch": batch, "seq": seq, "precision": "bf16" if bf16 else "f32", "device": device,
           "steps": steps, "median_step_s": statistics.median(times), "loss": loss.item()}
    if kind == "cuda":
        free, total = torch.cuda.mem_get_info()
        row["max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        row["max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        row["driver_used_bytes"] = total - free
    else:
        row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del opt, loss_fn, fa, fb
    if kind == "cuda":
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--shapes", default="32x128,128x256")
    ap.add_argument("--precisions", default="f32,bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = SentenceTransformer(a.model, device=a.device)
    model.train()
    for shape in a.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        model.max_seq_length = seq
        for p in a.precisions.split(","):
            row = measure(model, batch, seq, p == "bf16", a.device, a.warmup, a.steps)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
