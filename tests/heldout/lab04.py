"""Held-out wrong answers of lab 04 (gradient accumulation): cells ga-count, ga-accumulate."""
from cases import Case

CASES = [
    # count_target_tokens(labels)
    Case("count-no-shift", "ga-count", '''
return int((labels != -100).sum())
''', "counts every label, without the shift"),
    Case("count-padding-too", "ga-count", '''
return int(labels[:, 1:].numel())
''', "counts the shifted positions, padding (-100) included"),
    Case("count-shift-wrong-end", "ga-count", '''
return int((labels[:, :-1] != -100).sum())
''', "drops the last label instead of the first"),
    # accumulate_gradients(model, micro_batches)
    Case("acc-mean-of-means", "ga-accumulate", '''
window_loss = 0.0
for mb in micro_batches:
    loss = model(**mb).loss / len(micro_batches)
    loss.backward()
    window_loss += loss.item()
return window_loss
''', "each micro-batch's mean loss / number of micro-batches (the HF default)"),
    Case("acc-rows-weighted", "ga-accumulate", '''
rows = sum(mb["input_ids"].shape[0] for mb in micro_batches)
window_loss = 0.0
for mb in micro_batches:
    loss = model(**mb).loss * mb["input_ids"].shape[0] / rows
    loss.backward()
    window_loss += loss.item()
return window_loss
''', "micro-batches weighted by rows, not target tokens"),
    Case("acc-count-no-shift", "ga-accumulate", '''
total = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
window_loss = 0.0
for mb in micro_batches:
    loss = model(**mb, num_items_in_batch=torch.tensor(total)).loss
    loss.backward()
    window_loss += loss.item()
return window_loss
''', "N counted without the shift"),
    Case("acc-one-backward", "ga-accumulate", '''
total = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
window = 0
for mb in micro_batches:
    window = window + model(**mb, num_items_in_batch=torch.tensor(total)).loss
window.backward()  # one backward for the window: every micro-batch's graph alive until here
return window.item()
''', "sums the losses, one backward (every graph alive)"),
    Case("acc-zero-grad-inside", "ga-accumulate", '''
total = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
window_loss = 0.0
for mb in micro_batches:
    model.zero_grad(set_to_none=True)
    loss = model(**mb, num_items_in_batch=torch.tensor(total)).loss
    loss.backward()
    window_loss += loss.item()
return window_loss
''', "zero_grad inside the loop: only the last micro-batch's gradient is left"),
    Case("acc-last-loss", "ga-accumulate", '''
total = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
for mb in micro_batches:
    loss = model(**mb, num_items_in_batch=torch.tensor(total)).loss
    loss.backward()
return loss.item() * len(micro_batches)
''', "returns the last micro-batch's loss x number of micro-batches"),
]
