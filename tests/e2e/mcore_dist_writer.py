"""Writes a torch_dist checkpoint with Megatron-Core's own dist_checkpointing.save (a peer, not our
code): hand-built ShardedTensors (layer axis prepended, TP shards as separate chunks, a TE
_extra_state ShardedObject), args in the common state. A script (not a test), run by
tests/e2e/test_megatron_core_cli.py: python mcore_dist_writer.py DIR FAMILY TP."""
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def model_for(family):
    from megatron_ru import GPTModel, ModelConfig
    cfg = ModelConfig.from_preset(f"tiny-{family}", num_layers=4, num_attention_heads=8, vocab_size=1000,
                                  num_key_value_heads=4 if family == "llama" else 8, max_position_embeddings=64)
    return GPTModel(cfg, seed=3)


def main(out, family, tp):
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import ShardedTensor, save
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from tests import mcore_fixtures as fx
    torch.cuda.synchronize = lambda *a, **k: None  # Megatron's writer assumes CUDA; CPU-only here
    torch.cuda.current_device = lambda: "cpu"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    model = model_for(family)
    cfg, L = model.config, model.config.num_layers
    sharded = {}
    for key, t in fx.te_names(fx.full_core(model, tp)).items():
        axis = None if "layer_norm" in key or "layernorm" in key or "position" in key else \
            1 if key.endswith(("linear_proj.weight", "linear_fc2.weight")) else 0
        stacked = key.startswith("decoder.layers.")
        name = "decoder.layers." + key.split(".", 3)[3] if stacked else key
        layer = [(0, int(key.split(".")[2]), L)] if stacked else []
        for r in range(tp if axis is not None else 1):
            local = t.chunk(tp, axis)[r].clone() if axis is not None else t.clone()
            offsets = layer + ([(axis + len(layer), r, tp)] if axis is not None else [])
            sharded[f"{key}#{r}"] = ShardedTensor.from_rank_offsets(name, local, *offsets, replica_id=0,
                                                                    prepend_axis_num=len(layer))
        if stacked and key.endswith("linear_qkv.weight"):
            sharded[f"{key}#extra"] = ShardedObject("decoder.layers.self_attention.linear_qkv._extra_state",
                                                    b"te", (L,), (layer[0][1],), replica_id=0)
    it = Path(out) / "iter_0000020"
    it.mkdir(parents=True)
    save({"model": sharded, "args": fx.core_args(cfg, tp, 1, True), "checkpoint_version": 3.0,
          "iteration": 20}, str(it))
    (Path(out) / "latest_checkpointed_iteration.txt").write_text("20")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
