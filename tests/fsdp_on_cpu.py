"""Test helper: `python -m projector_training` under accelerate's FSDP on the CPU.

accelerate turns FSDP on only for accelerators (on a CPU it falls back to MULTI_CPU), while torch's FSDP itself
runs on the CPU with gloo. This flips the state accelerate computed to FSDP, with the plugin read from the
launcher's FSDP_* variables, before the training script prepares its model; everything else is the real path.
Used by tests/test_training.py through `accelerate launch --config_file <fsdp config> tests/fsdp_on_cpu.py ...`.
"""

import runpy
import sys

import accelerate
import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.Accelerator.__init__


def _init_with_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.state.distributed_type == DistributedType.MULTI_CPU:
        self.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        self.state.device = torch.device("cpu")  # FSDP compares it with torch's current CPU device: no index


accelerate.Accelerator.__init__ = _init_with_fsdp
sys.argv = ["projector_training", *sys.argv[1:]]
runpy.run_module("projector_training", run_name="__main__", alter_sys=True)
