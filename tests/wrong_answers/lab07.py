"""Wrong answers of lab 07 (profiling and OOM debugging)."""
import re

import torch

from . import Wrong

KEPT = []


def _parse(message, units=None, alloc_from_in_use=False, swap=False):
    units = units or {"B": 1, "bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    size = r"([\d.]+) (bytes|B|KiB|MiB|GiB|TiB)"
    pats = {"tried": r"Tried to allocate " + size, "free": r"of which " + size + " is free",
            "allocated": (r"this process has " + size + " memory in use") if alloc_from_in_use
            else size + r" is allocated by PyTorch",
            "reserved_unallocated": size + r" is reserved by PyTorch but unallocated"}
    out = {}
    for k, p in pats.items():
        m = re.search(p, message)
        out[k] = int(float(m.group(1)) * units.get(m.group(2), 1)) if m else None
    if swap:
        out["tried"], out["free"] = out["free"], out["tried"]
    return out


def decimal_units(message):
    return _parse(message, units={"B": 1, "bytes": 1, "KiB": 10**3, "MiB": 10**6, "GiB": 10**9})


def gib_only(message):
    out = {}
    for k, p in {"tried": r"Tried to allocate ([\d.]+) GiB", "free": r"of which ([\d.]+) GiB is free",
                 "allocated": r"([\d.]+) GiB is allocated by PyTorch",
                 "reserved_unallocated": r"([\d.]+) GiB is reserved by PyTorch but unallocated"}.items():
        m = re.search(p, message)
        out[k] = int(float(m.group(1)) * 2**30) if m else 0
    return out


def in_use_as_allocated(message):
    return _parse(message, alloc_from_in_use=True)


def free_tried_swapped(message):
    return _parse(message, swap=True)


def working_set_first(info):
    if info["allocated"] > 0.7 * info["total"]:
        return "working_set"
    if info["reserved_unallocated"] >= info["tried"]:
        return "fragmentation"
    return "other_process"


def strict_fragmentation(info):
    if info["reserved_unallocated"] > info["tried"]:
        return "fragmentation"
    if info["allocated"] > 0.7 * info["total"]:
        return "working_set"
    return "other_process"


def share_90(info):
    if info["reserved_unallocated"] >= info["tried"]:
        return "fragmentation"
    if info["allocated"] > 0.9 * info["total"]:
        return "working_set"
    return "other_process"


def free_vs_tried(info):
    if info["free"] < info["tried"] and info["reserved_unallocated"] >= info["tried"]:
        return "fragmentation"
    if info["free"] + info["reserved_unallocated"] < info["tried"] and info["allocated"] > 0.5 * info["total"]:
        return "working_set"
    return "other_process"


def linear_extrapolation(peak_for_batch, budget_bytes):
    p1, p2 = peak_for_batch(1), peak_for_batch(2)
    if p1 > budget_bytes:
        return 0
    return int((budget_bytes - (2 * p1 - p2)) // (p2 - p1))


def strict_fits(peak_for_batch, budget_bytes):
    if peak_for_batch(1) >= budget_bytes:
        return 0
    lo, hi = 1, 2
    while peak_for_batch(hi) < budget_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak_for_batch(mid) < budget_bytes else (lo, mid)
    return lo


def doubling_only(peak_for_batch, budget_bytes):
    if peak_for_batch(1) > budget_bytes:
        return 0
    b = 1
    while peak_for_batch(b * 2) <= budget_bytes:
        b *= 2
    return b


def linear_scan(peak_for_batch, budget_bytes):
    b = 0
    while peak_for_batch(b + 1) <= budget_bytes:
        b += 1
    return b


def never_zero(peak_for_batch, budget_bytes):
    lo, hi = 1, 2
    while peak_for_batch(hi) <= budget_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak_for_batch(mid) <= budget_bytes else (lo, mid)
    return lo


def running_total(model, batches, optimizer):
    total, losses = 0, []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        total += loss  # every graph stays reachable through `total`
        losses.append(float(loss))
    total.backward()
    optimizer.step()
    return losses


def running_total_per_step(model, batches, optimizer):
    total, losses = 0, []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward(retain_graph=True)
        optimizer.step()
        total = total + loss  # "for the average at the end": keeps every step's graph and saved tensors
        losses.append(loss.item())
    KEPT.append(total)
    return losses


def keeps_outputs(model, batches, optimizer):
    losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        KEPT.append(out)
        losses.append(out.loss.item())
    return losses


def tensors_logged(model, batches, optimizer):
    losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss)
    return losses


def made_up(model, batches, optimizer):
    return [1.0 / (i + 1) for i in range(len(batches))]


def no_training(model, batches, optimizer):
    with torch.no_grad():
        return [model(**b).loss.item() for b in batches]


def no_zero_grad(model, batches, optimizer):
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _replay(snapshot, free_action="free_completed", keep="first", at_end=False, first_trace=False, raw_frame=False):
    from memopt_lib.profiler.snapshot import user_frame
    traces = snapshot["device_traces"]
    trace = traces[0] if first_trace else max(traces, key=len)
    live, cur, peak, at = {}, 0, 0, {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if cur > peak or (keep == "last" and cur == peak):
                peak, at = cur, dict(live)
        elif e["action"] == free_action and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
    if at_end:
        at = live
    if not at:
        return {"peak_bytes": 0, "size": 0, "frame": "", "alive": 0}
    big = max(at.values(), key=lambda e: e["size"])
    frame = big["frames"][0]["name"] if raw_frame else user_frame(big["frames"])
    return {"peak_bytes": peak, "size": big["size"], "frame": frame, "alive": len(at)}


def frees_on_request(snapshot):
    return _replay(snapshot, free_action="free_requested")


def blocks_at_the_end(snapshot):
    return _replay(snapshot, at_end=True)


def first_device_only(snapshot):
    return _replay(snapshot, first_trace=True)


def innermost_frame(snapshot):
    return _replay(snapshot, raw_frame=True)


PA, CA, FB, LG = "reads_oom_messages", "names_the_cause", "finds_the_largest_batch", "logging_does_not_leak"
SN = "reads_the_snapshot"
WRONG = [
    Wrong("parse: MiB as 10^6", "parse_oom", decimal_units, (PA,), r"powers of 1024"),
    Wrong("parse: GiB only", "parse_oom", gib_only, (PA,), r"KiB, MiB and GiB"),
    Wrong("parse: 'in use' read as allocated", "parse_oom", in_use_as_allocated, (PA,), r"allocated"),
    Wrong("parse: tried and free swapped", "parse_oom", free_tried_swapped, (PA,), r"tried|free"),
    Wrong("cause: working set checked first", "classify_oom", working_set_first, (CA,), r"checked first"),
    Wrong("cause: reserved > tried (strict)", "classify_oom", strict_fragmentation, (CA,), r"\(>=\)"),
    Wrong("cause: 90 % share", "classify_oom", share_90, (CA,), r"70 %"),
    Wrong("cause: reads free instead", "classify_oom", free_vs_tried, (CA,), r"the cause is"),
    Wrong("batch: linear extrapolation", "find_max_batch", linear_extrapolation, (FB,), r"extrapolate"),
    Wrong("batch: peak < budget (strict)", "find_max_batch", strict_fits, (FB,), r"peak <= budget"),
    Wrong("batch: doubling only", "find_max_batch", doubling_only, (FB,), r"bisect"),
    Wrong("batch: linear scan", "find_max_batch", linear_scan, (FB,), r"measurements for answer"),
    Wrong("batch: never returns 0", "find_max_batch", never_zero, (FB,), r"return 0"),
    Wrong("log: total += loss, one backward", "train_and_log", running_total, (LG,), r"optimizer steps"),
    Wrong("log: running total of loss tensors", "train_and_log", running_total_per_step, (LG,), r"total \+= loss"),
    Wrong("log: outputs kept", "train_and_log", keeps_outputs, (LG,), r"outputs"),
    Wrong("log: loss tensors logged", "train_and_log", tensors_logged, (LG,), r"Python floats"),
    Wrong("log: made-up losses, no training", "train_and_log", made_up, (LG,), r"optimizer steps"),
    Wrong("log: evaluates, does not train", "train_and_log", no_training, (LG,), r"optimizer steps"),
    Wrong("log: no zero_grad", "train_and_log", no_zero_grad, (LG,), r"zero the gradients"),
    Wrong("snapshot: free_requested ends a block", "largest_at_peak", frees_on_request, (SN,), r"free_completed"),
    Wrong("snapshot: blocks alive at the end", "largest_at_peak", blocks_at_the_end, (SN,), r"first\* moment"),
    Wrong("snapshot: first device's trace", "largest_at_peak", first_device_only, (SN,), r"busiest"),
    Wrong("snapshot: innermost frame", "largest_at_peak", innermost_frame, (SN,), r"user_frame"),
]
