"""One rank of the per-layer FSDP2 check in test_layer_sync.py (run by torchrun, gloo on CPU).

Shards every decoder layer and the root with `fully_shard`, runs one Bitune step with activation
checkpointing, and writes the largest gradient difference to an unsharded copy of the same model.
"""

import json
import sys

import torch.distributed as dist
from peft import LoraConfig
from tiny_models import tiny_model
from torch.distributed.fsdp import fully_shard

from bitune import BituneModel, collate

layer_synchronous, output = sys.argv[1] == "layer_sync", sys.argv[2]
dist.init_process_group("gloo")
lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
sharded, reference = (
    BituneModel.from_base(tiny_model("llama", num_layers=3), lora).train() for _ in range(2)
)
reference.load_state_dict(sharded.state_dict())
for model in (sharded, reference):
    model.bitune_config.implementation = "layer_synchronous" if layer_synchronous else "three_pass"
    model.activation_checkpointing_enable()
batch = collate([[1, 5, 6, 7, 8, 9, 10], [1, 11, 12]], [[20, 21, 2], [22, 2]])
reference(**batch).loss.backward()
for layer in sharded.base_model.get_decoder().layers:
    fully_shard(layer)
fully_shard(sharded)
result = {}
try:
    sharded(**batch).loss.backward()
    result["max_grad_diff"] = max(
        (p.grad.full_tensor() - r.grad).abs().max().item()
        for p, r in zip(sharded.parameters(), reference.parameters())
        if r.grad is not None
    )
except RuntimeError as error:
    result["error"] = str(error)[:500]
if dist.get_rank() == 0:
    with open(output, "w") as file:
        json.dump(result, file)
dist.destroy_process_group()
