"""Held-out wrong answers of lab 10 (sharding): sh-predict, sh-shard, sh-step."""
from cases import Case

CASES = [
    # predict_per_rank_bytes(n_params, strategy, world_size, mixed_precision)
    Case("predict-zero2-shards-weights", "sh-predict", '''
w, g, o = (2, 2, 12) if mixed_precision else (4, 4, 8)
stage = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}[strategy]
return {"weights": w * n_params / (world_size if stage >= 2 else 1),
        "gradients": g * n_params / (world_size if stage >= 2 else 1),
        "optimizer": o * n_params / (world_size if stage >= 1 else 1)}
''', "ZeRO-2 counted as sharding the weights too"),
    Case("predict-mp-no-master", "sh-predict", '''
w, g, o = (2, 2, 8) if mixed_precision else (4, 4, 8)  # forgets the fp32 master copy
stage = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}[strategy]
return {"weights": w * n_params / (world_size if stage >= 3 else 1),
        "gradients": g * n_params / (world_size if stage >= 2 else 1),
        "optimizer": o * n_params / (world_size if stage >= 1 else 1)}
''', "mixed precision without the fp32 master weights in the optimizer state"),
    Case("predict-zero1-shards-grads", "sh-predict", '''
w, g, o = (2, 2, 12) if mixed_precision else (4, 4, 8)
stage = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}[strategy]
return {"weights": w * n_params / (world_size if stage >= 3 else 1),
        "gradients": g * n_params / (world_size if stage >= 1 else 1),
        "optimizer": o * n_params / (world_size if stage >= 1 else 1)}
''', "ZeRO-1 counted as sharding the gradients"),
    Case("predict-ddp-divides", "sh-predict", '''
w, g, o = (2, 2, 12) if mixed_precision else (4, 4, 8)
stage = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}[strategy]
return {"weights": w * n_params / (world_size if stage >= 3 else 1),
        "gradients": g * n_params / world_size,  # "DDP averages the gradients across ranks"
        "optimizer": o * n_params / (world_size if stage >= 1 else 1)}
''', "gradients divided by the world size under every strategy"),
    # shard_model(model, mixed_precision)
    Case("shard-root-only", "sh-shard", '''
kw = {}
if mixed_precision:
    kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
fully_shard(model, **kw)  # one unit: the whole model gathered at once
return model
''', "only the root sharded: every weight gathered for the whole forward"),
    Case("shard-mp-ignored", "sh-shard", '''
for block in model.transformer.h:
    fully_shard(block)
fully_shard(model)
return model
''', "mixed_precision ignored"),
    Case("shard-reduce-bf16", "sh-shard", '''
kw = {}
if mixed_precision:
    kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
for block in model.transformer.h:
    fully_shard(block, **kw)
fully_shard(model, **kw)
return model
''', "gradients reduced in bf16"),
    Case("shard-blocks-no-root", "sh-shard", '''
kw = {}
if mixed_precision:
    kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
for block in model.transformer.h:
    fully_shard(block, **kw)
return model  # embeddings, final norm and head left whole on every rank
''', "blocks sharded, the root never"),
    # sharded_train_step(model, optimizer, batch)
    Case("step-no-zero-grad", "sh-step", '''
loss = model(**batch).loss
loss.backward()
optimizer.step()
return loss.item()
''', "no zero_grad: gradients accumulate across steps"),
    Case("step-loss-over-world", "sh-step", '''
import torch.distributed as dist
optimizer.zero_grad(set_to_none=True)
loss = model(**batch).loss / dist.get_world_size()  # "average over the ranks"
loss.backward()
optimizer.step()
return loss.item()
''', "loss divided by the world size (FSDP already averages)"),
    Case("step-returns-global-mean", "sh-step", '''
import torch.distributed as dist
optimizer.zero_grad(set_to_none=True)
loss = model(**batch).loss
loss.backward()
optimizer.step()
mean = loss.detach().clone()
dist.all_reduce(mean)
return (mean / dist.get_world_size()).item()
''', "returns the mean loss over ranks, not this rank's"),
]
