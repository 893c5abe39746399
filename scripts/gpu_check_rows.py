"""Rows of the GPU check's table (scripts/gpu-check.sh), one per call, from what the check's
runs wrote. Needs numpy and safetensors (installed with sentence-transformers) for `train`.
A row whose inputs are missing or malformed says so instead of failing the check.

  kernels DEVICE KERNELS.jsonl   (one row per kernel, from `st-tune bench kernels --json`)
  emb   MODEL DEVICE REF.jsonl DEV.jsonl
  train MODEL PREC SIZE DEVICE INIT_MODEL REF_RUN DEV_RUN
  plan  DEVICE LIMIT PLAN.json SOURCE FREE_MIB TOTAL_MIB
  oom   MODEL SIZE DEVICE RUN_DIR TRAIN_STDOUT EXIT_CODE
  step  MODEL PREC SHAPE DEVICE BENCH.json PEAK_BYTES|-|"" PEER.jsonl|- [PEER_IDLE_BYTES]
        (PEAK_BYTES: sampled device peak; -: bench's own (the counting allocator, CPU); "": none)
Columns: | # | check | model | precision | size | st-tune on the device | reference | difference | verdict |
"""
import json
import math
import os
import sys

GIB = 1024**3
# Rough flags for the parity rows, not proofs: f32 should agree to rounding, bf16 to bf16's.
LIMITS = {"f32": {"emb": 1e-4, "loss": 1e-4, "update": 1e-2},
          "bf16": {"emb": 1e-2, "loss": 1e-2, "update": 0.3}}


def row(*cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def gib(b):
    return f"{b / GIB:.2f} GiB"


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().startswith("{")]


def verdict(ok):
    return "OK" if ok else "CHECK"


def kernels(device, path):
    """Each kernel against its CPU twin: masks must be equal, the rest agree to f32 rounding
    (the layer-norm row is already relative to each output's scale)."""
    checks = jsonl(path)
    if not checks:
        raise ValueError("bench kernels wrote nothing (see the log)")
    out = []
    for c in checks:
        exact = c["kernel"].startswith("dropout")
        rel = c["max_abs_diff"] / max(c["max_abs"], 1e-30)
        ok = c["max_abs_diff"] == 0 if exact else rel <= 1e-5
        flag = "must be 0" if exact else "flag > 1e-05 relative"
        out.append(row(0, f"`cuda` kernel: {c['kernel']}", "—", "f32", "—", f"{device}: {c['device_side']}",
                       c["twin"], f"max abs diff {c['max_abs_diff']:.1e}, relative {rel:.1e} ({flag})",
                       verdict(ok)))
    return "\n".join(out)


def emb(model, device, ref, dev):
    a = [r["embedding"] for r in jsonl(ref)]
    b = [r["embedding"] for r in jsonl(dev)]
    if len(a) != len(b) or not a:
        raise ValueError(f"{len(a)} reference and {len(b)} device embeddings")
    d = max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))
    lim = LIMITS["f32"]["emb"]
    return row(1, f"embeddings of {len(a)} sentences (encode)", model, "f32", f"{len(a)} texts",
               device, "cpu engine", f"max abs diff {d:.1e} (flag > {lim:g})", verdict(d <= lim))


def losses(run):
    return [r["loss"] for r in jsonl(os.path.join(run, "metrics.jsonl")) if "loss" in r and "step" in r]


def weights_diff(init, ref, dev):
    """max |w_dev - w_ref| / max |w_ref| over all weights; the L2 distance of the two runs'
    updates (w - w_init) relative to the reference's; the tensor whose update differs most, among
    those whose RMS update is at least a tenth of the whole model's (AdamW scales every gradient
    element to about lr, so tensors whose true gradient is about 0, such as attention key biases,
    move by noise that differs between any two devices)."""
    import numpy as np
    from safetensors.numpy import load_file
    w0 = load_file(os.path.join(init, "model.safetensors"))
    a = load_file(os.path.join(ref, "final", "model.safetensors"))
    b = load_file(os.path.join(dev, "final", "model.safetensors"))
    if a.keys() != b.keys():
        raise ValueError("the two runs saved different tensors")
    dmax = wmax = num = den = 0.0
    per = []
    for k in a:
        ra, rb = a[k].astype(np.float64), b[k].astype(np.float64)
        d, u = ra - rb, ra - w0[k].astype(np.float64)
        dmax, wmax = max(dmax, np.abs(d).max()), max(wmax, np.abs(ra).max())
        dn, un = float((d * d).sum()), float((u * u).sum())
        num, den = num + dn, den + un
        per.append((dn, un, u.size, k))
    rms = math.sqrt(den / sum(n for _, _, n, _ in per))
    moved = [(math.sqrt(dn / un), k) for dn, un, n, k in per if un > 0 and math.sqrt(un / n) >= rms / 10]
    return dmax / wmax, math.sqrt(num / den) if den > 0 else math.inf, max(moved, default=(0.0, "none"))


def engine(run, fallback):
    """The engine a run's summary names (its --json output is RUN.out)."""
    try:
        return [r["data"]["engine"] for r in jsonl(run + ".out") if r.get("event") == "summary"][0]
    except (OSError, IndexError, KeyError):
        return fallback


def train(model, prec, size, device, init, ref, dev):
    la, lb = losses(ref), losses(dev)
    if len(la) != len(lb) or not la:
        raise ValueError(f"{len(la)} reference and {len(lb)} device losses logged")
    lrel = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la, lb))
    wrel, urel, (trel, tname) = weights_diff(init, ref, dev)
    lim = LIMITS[prec]
    fmt = lambda ls: " ".join(f"{x:.5f}" for x in ls)
    diff = (f"loss max rel {lrel:.1e}; weights after {len(la)} steps max rel {wrel:.1e}; "
            f"updates (gradients through AdamW) L2 rel {urel:.1e}, worst tensor {tname} {trel:.1e}")
    return row(1, f"train {len(la)} steps: loss and weights", model, prec, size,
               f"{engine(dev, device)}: loss {fmt(lb)}", f"{engine(ref, 'cpu')}: loss {fmt(la)}", diff,
               verdict(lrel <= lim["loss"] and urel <= lim["update"]))


def plan(device, limit, path, source, free_mib, total_mib):
    """The budget `plan` derived, against the free memory (limit unset) or the share of the
    total (a percentage) that `source` reports."""
    p = json.load(open(path))
    budget = p["budget_bytes"]
    free, total = float(free_mib) * 2**20, float(total_mib) * 2**20
    want = free if limit == "unset" else float(limit.rstrip("%")) / 100 * total
    return row(3, f"memory.limit {limit}: the budget (plan --json)", "MPNet", "f32", "—",
               f"{device}: {gib(budget)} ({p['budget_source']})",
               f"{source}: {gib(free)} free of {gib(total)}",
               f"budget / {'free' if limit == 'unset' else limit + ' of total'} {budget / want:.3f}",
               verdict(abs(budget / want - 1) < 0.05))


def oom(model, size, device, run, stdout, rc):
    events = jsonl(os.path.join(run, "events.jsonl")) if os.path.exists(os.path.join(run, "events.jsonl")) else []
    ooms = [e for e in events if e.get("event") == "oom"]
    regrows = [e for e in events if e.get("event") == "regrow"]
    summary = [r["data"] for r in jsonl(stdout) if r.get("event") == "summary"]
    path = " ".join(f"{e['micro_before']}→{e['micro_after']} ({e['phase']}, step {e['step']})" for e in ooms)
    if summary:
        s = summary[0]
        got = (f"{len(ooms)} OOMs: {path}; {len(regrows)} regrow(s); finished {s['steps']} steps, "
               f"ooms_recovered {s['ooms_recovered']}, final micro-batch {s['final_micro_batch_size']}, "
               f"engine {s['engine']}, exit {rc}")
    else:
        got = f"{len(ooms)} OOMs: {path}; no summary (did not finish), exit {rc}"
    ok = bool(summary) and rc == "0" and len(ooms) > 0
    return row(2, "OOM recovered, run goes on", model, "f32", size, got, "—", "—", verdict(ok))


def step(model, prec, shape, device, bench, peak, peer, peer_idle="0"):
    b = jsonl(bench) if os.path.exists(bench) else []
    batch, seq = (int(x) for x in shape.split("x"))
    p = [r for r in (jsonl(peer) if peer != "-" and os.path.exists(peer) else [])
         if r["batch"] == batch and r["seq"] == seq and r["precision"] == prec]
    pm = None
    if p:
        p = p[0]
        if "max_allocated_bytes" in p:
            pm = p["driver_used_bytes"] - int(peer_idle)
            ref = (f"peer: {p['median_step_s']:.3f} s (median of {p['steps']}), "
                   f"{gib(p['max_allocated_bytes'])} allocated, {gib(pm)} driver minus idle")
        else:
            pm = p["peak_rss_bytes"]
            ref = f"peer: {p['median_step_s']:.3f} s ({p['steps']} step), RSS so far {gib(pm)}"
    else:
        ref = "peer: not run for this size (see the log)"
    if not b:  # the peer's figures still make the row
        return row(4, "one training step, CoSENT", model, prec, shape,
                   f"{device}: FAILED, no measurement (see the log)", ref, "—", "FAIL")
    b = b[0]
    if peak == "-":
        peak, how = b["peak_bytes"], "counting allocator"
    elif peak:
        peak, how = int(float(peak)), "driver, sampled every 20 ms, minus idle"
    else:
        peak, how = None, "not sampled"
    st = f"{device}: {b['seconds']:.3f} s, peak {gib(peak) if peak else '?'} ({how})"
    est = b["estimated_bytes"]
    diff = f"plan {gib(est)}" + (f": {100 * (est / peak - 1):+.0f} % of st-tune's peak" if peak else "")
    if p:
        mem = f"memory {peak / pm:.2f}x peer; " if peak and pm else ""
        diff = f"time {b['seconds'] / p['median_step_s']:.2f}x peer; {mem}{diff}"
    return row(4, "one training step, CoSENT", model, prec, shape, st, ref, diff, "—")


def main():
    what, args = sys.argv[1], sys.argv[2:]
    fn = {"kernels": kernels, "emb": emb, "train": train, "plan": plan, "oom": oom, "step": step}[what]
    try:
        print(fn(*args))
    except Exception as e:  # a broken part is a row of the table, not the end of the check
        print(row({"kernels": 0, "emb": 1, "train": 1, "plan": 3, "oom": 2, "step": 4}[what], what, *args[:1],
                  "", "", f"FAILED: {type(e).__name__}: {e}".replace("|", "/"), "", "", "FAIL"))


if __name__ == "__main__":
    main()
