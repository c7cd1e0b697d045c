"""Held-out wrong answers of lab 07 (profiling and OOM): parse-oom, classify-oom, train-and-log, find-max-batch,
largest-at-peak."""
from cases import Case

_KEEP = '''
global _KEPT
try:
    _KEPT
except NameError:
    _KEPT = []
'''
_SNAP = '''
traces = snapshot["device_traces"]
trace = max(traces, key=len)
live, current, peak, at_peak = {}, 0, 0, {}
'''

CASES = [
    # parse_oom(message)
    Case("parse-integers-only", "parse-oom", '''
import re
units = {"B": 1, "bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
size = r"(\\d+)(?:\\.\\d+)? (bytes|B|KiB|MiB|GiB|TiB)"  # the decimals dropped
patterns = {"tried": r"Tried to allocate " + size, "free": r"of which " + size + " is free",
            "allocated": size + r" is allocated by PyTorch",
            "reserved_unallocated": size + r" is reserved by PyTorch but unallocated"}
out = {}
for key, pat in patterns.items():
    m = re.search(pat, message)
    out[key] = int(int(m.group(1)) * units[m.group(2)]) if m else None
return out
''', "sizes read as integers (1.50 GiB -> 1 GiB)"),
    Case("parse-free-is-capacity", "parse-oom", '''
import re
units = {"B": 1, "bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
size = r"([\\d.]+) (bytes|B|KiB|MiB|GiB|TiB)"
patterns = {"tried": r"Tried to allocate " + size, "free": r"total capacity of " + size,
            "allocated": size + r" is allocated by PyTorch",
            "reserved_unallocated": size + r" is reserved by PyTorch but unallocated"}
out = {}
for key, pat in patterns.items():
    m = re.search(pat, message)
    out[key] = int(float(m.group(1)) * units[m.group(2)]) if m else None
return out
''', "'free' read from the total capacity"),
    Case("parse-in-mib", "parse-oom", '''
import re
units = {"B": 2**-20, "bytes": 2**-20, "KiB": 2**-10, "MiB": 1, "GiB": 2**10, "TiB": 2**20}
size = r"([\\d.]+) (bytes|B|KiB|MiB|GiB|TiB)"
patterns = {"tried": r"Tried to allocate " + size, "free": r"of which " + size + " is free",
            "allocated": size + r" is allocated by PyTorch",
            "reserved_unallocated": size + r" is reserved by PyTorch but unallocated"}
out = {}
for key, pat in patterns.items():
    m = re.search(pat, message)
    out[key] = float(m.group(1)) * units[m.group(2)] if m else None
return out
''', "returns MiB, not bytes"),
    # classify_oom(info)
    Case("cause-any-reserved", "classify-oom", '''
if info["reserved_unallocated"] > 0:
    return "fragmentation"
if info["allocated"] > 0.7 * info["total"]:
    return "working_set"
return "other_process"
''', "fragmentation whenever anything is reserved but unallocated"),
    Case("cause-reserved-in-working-set", "classify-oom", '''
if info["reserved_unallocated"] >= info["tried"]:
    return "fragmentation"
if info["allocated"] + info["reserved_unallocated"] > 0.7 * info["total"]:
    return "working_set"
return "other_process"
''', "working set judged on allocated + reserved"),
    Case("cause-two-way", "classify-oom", '''
if info["reserved_unallocated"] >= info["tried"]:
    return "fragmentation"
return "working_set"  # "it's always our tensors"
''', "never blames another process"),
    # train_and_log(model, batches, optimizer)
    Case("log-step-before-backward", "train-and-log", '''
losses = []
for batch in batches:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    optimizer.step()
    loss.backward()
    losses.append(loss.item())
return losses
''', "optimizer.step() before backward"),
    Case("log-one-step-at-end", "train-and-log", '''
losses = []
optimizer.zero_grad(set_to_none=True)
for batch in batches:
    loss = model(**batch).loss
    loss.backward()
    losses.append(loss.item())
optimizer.step()  # one update for all batches
return losses
''', "one optimizer step after all batches"),
    Case("log-detached-mean", "train-and-log", '''
losses = []
for batch in batches:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    losses.append(loss.detach())
return [float(x) for x in torch.stack(losses).cumsum(0) / torch.arange(1, len(losses) + 1)]
''', "logs the running mean of the losses"),
    Case("mem-log-total-of-tensors", "train-and-log", _KEEP + '''
total, losses = 0, []
for batch in batches:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward(retain_graph=True)
    optimizer.step()
    total = total + loss  # "for the average at the end"
    losses.append(loss.item())
_KEPT.append(total)
return losses
''', "running total of loss tensors (graphs retained)", origin="memory-only"),
    Case("mem-log-outputs-kept", "train-and-log", _KEEP + '''
losses = []
for batch in batches:
    optimizer.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    optimizer.step()
    _KEPT.append(out)
    losses.append(out.loss.item())
return losses
''', "model outputs kept in a list", origin="memory-only"),
    # find_max_batch(peak_for_batch, budget_bytes)
    Case("batch-returns-hi", "find-max-batch", '''
if peak_for_batch(1) > budget_bytes:
    return 0
lo, hi = 1, 2
while peak_for_batch(hi) <= budget_bytes:
    lo, hi = hi, hi * 2
while hi - lo > 1:
    mid = (lo + hi) // 2
    if peak_for_batch(mid) <= budget_bytes:
        lo = mid
    else:
        hi = mid
return hi
''', "returns the first batch that does not fit"),
    Case("batch-affine-two-points", "find-max-batch", '''
p1, p2 = peak_for_batch(1), peak_for_batch(2)
if p1 > budget_bytes:
    return 0
per_row = max(p2 - p1, 1)
return int(1 + (budget_bytes - p1) // per_row)  # peak = p1 + (b - 1) * per_row
''', "extrapolates a line through batch 1 and 2"),
    Case("batch-capped-1024", "find-max-batch", '''
if peak_for_batch(1) > budget_bytes:
    return 0
lo, hi = 1, 1024  # "no GPU fits more than 1024 rows"
while hi - lo > 1:
    mid = (lo + hi) // 2
    if peak_for_batch(mid) <= budget_bytes:
        lo = mid
    else:
        hi = mid
return lo
''', "bisects in [1, 1024] only"),
    # largest_at_peak(snapshot)
    Case("snap-never-frees", "largest-at-peak", _SNAP + '''
for e in trace:
    if e["action"] == "alloc":
        live[e["addr"]] = e
        current += e["size"]
        if current > peak:
            peak, at_peak = current, dict(live)
if not at_peak:
    return {"peak_bytes": 0, "size": 0, "frame": "", "alive": 0}
big = max(at_peak.values(), key=lambda e: e["size"])
return {"peak_bytes": peak, "size": big["size"], "frame": user_frame(big.get("frames")), "alive": len(at_peak)}
''', "frees ignored: the peak is everything ever allocated"),
    Case("snap-largest-ever", "largest-at-peak", _SNAP + '''
biggest = None
for e in trace:
    if e["action"] == "alloc":
        live[e["addr"]] = e
        current += e["size"]
        if biggest is None or e["size"] > biggest["size"]:
            biggest = e
        if current > peak:
            peak, at_peak = current, dict(live)
    elif e["action"] == "free_completed" and e["addr"] in live:
        current -= live.pop(e["addr"])["size"]
if not at_peak:
    return {"peak_bytes": 0, "size": 0, "frame": "", "alive": 0}
return {"peak_bytes": peak, "size": biggest["size"], "frame": user_frame(biggest.get("frames")), "alive": len(at_peak)}
''', "the largest block of the whole trace, not the largest alive at the peak"),
    Case("snap-alloc-count", "largest-at-peak", _SNAP + '''
n_allocs = 0
for e in trace:
    if e["action"] == "alloc":
        n_allocs += 1
        live[e["addr"]] = e
        current += e["size"]
        if current > peak:
            peak, at_peak = current, dict(live)
    elif e["action"] == "free_completed" and e["addr"] in live:
        current -= live.pop(e["addr"])["size"]
if not at_peak:
    return {"peak_bytes": 0, "size": 0, "frame": "", "alive": 0}
big = max(at_peak.values(), key=lambda e: e["size"])
return {"peak_bytes": peak, "size": big["size"], "frame": user_frame(big.get("frames")), "alive": n_allocs}
''', "'alive' counts every allocation up to the end"),
]
