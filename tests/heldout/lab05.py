"""Held-out wrong answers of lab 05 (gradient checkpointing): cells gc-blocks, gc-predict, gc-prepare."""
from cases import Case

CASES = [
    # checkpoint_blocks(model, every=1)
    Case("blocks-late-binding", "gc-blocks", '''
model.config.use_cache = False
blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
for i, block in enumerate(blocks):
    if i % every == 0:
        plain = block.forward
        def forward(*args, **kwargs):
            return checkpoint(plain, *args, use_reentrant=False, **kwargs)  # `plain` is looked up when called
        block.forward = forward
''', "closure over the loop variable: every wrapped block runs the last one's forward"),
    Case("blocks-start-at-one", "gc-blocks", '''
model.config.use_cache = False
blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
for i in range(1, len(blocks), every):
    block = blocks[i]
    def forward(*args, _plain=block.forward, **kwargs):
        return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
    block.forward = forward
''', "blocks 1, 1 + every, ... (block 0 never checkpointed)"),
    Case("blocks-attention-only", "gc-blocks", '''
model.config.use_cache = False
blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
for i, block in enumerate(blocks):
    if i % every == 0:
        attn = block.attn if hasattr(block, "attn") else block.self_attn
        def forward(*args, _plain=attn.forward, **kwargs):
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
        attn.forward = forward  # "attention is the expensive part"
''', "checkpoints only the attention of each block"),
    Case("blocks-whole-model", "gc-blocks", '''
model.config.use_cache = False
blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
first = blocks[0]
def forward(*args, _plain=first.forward, **kwargs):
    return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
first.forward = forward
for i, block in enumerate(blocks):
    if i % every == 0 and i > 0:
        block.forward = torch.no_grad()(block.forward)  # "no need to keep anything here"
''', "block 0 checkpointed, the others run under no_grad"),
    # predict_kept_bytes(n_layers, every, block_input_bytes, block_bytes)
    Case("predict-inputs-free", "gc-predict", '''
n_ckpt = len(range(0, n_layers, every))
return (n_layers - n_ckpt) * block_bytes  # "checkpointed blocks keep nothing"
''', "checkpointed blocks keep nothing (their inputs forgotten)"),
    Case("predict-count-plus-one", "gc-predict", '''
n_ckpt = n_layers // every + 1
return n_ckpt * block_input_bytes + (n_layers - n_ckpt) * block_bytes
''', "n_layers // every + 1 checkpointed blocks"),
    Case("predict-recompute-peak", "gc-predict", '''
n_ckpt = len(range(0, n_layers, every))
return n_ckpt * block_input_bytes + (n_layers - n_ckpt) * block_bytes + block_bytes  # + the recomputed block
''', "adds one recomputed block (backward's transient) to what is kept"),
    # prepare_for_checkpointed_training(model)
    Case("prepare-config-flag", "gc-prepare", '''
model.config.gradient_checkpointing = True
model.train()
''', "sets a config flag; checkpointing never enabled"),
    Case("prepare-reentrant-input-grads", "gc-prepare", '''
model.enable_input_require_grads()
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
model.train()
''', "reentrant checkpointing made to work with enable_input_require_grads"),
    Case("prepare-train-submodules-eval", "gc-prepare", '''
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.training = True  # sets the flag on the top module only
''', "model.training = True instead of model.train()"),
]
