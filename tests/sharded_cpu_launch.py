"""Run `contentv-rlhf ARGS` under `accelerate launch` with an FSDP or DeepSpeed config, on the CPU.

accelerate (1.15) turns every multi-process CPU launch into plain MULTI_CPU, so its FSDP2 and DeepSpeed code
paths cannot run without a GPU. This launcher, used only by tests, makes accelerate treat the gloo/CPU group
as a GPU group (device pinned to the CPU); everything after that - accelerate's FSDP2 / DeepSpeed prepare,
torch's `fully_shard`, the DeepSpeed engine and our trainer - is the unmodified code a GPU run executes.

    accelerate launch --config_file fsdp.yaml tests/sharded_cpu_launch.py train --config ...
"""

import os
import sys

import accelerate.state
from accelerate.utils import DistributedType

os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
_partial_state_init = accelerate.state.PartialState.__init__
_accelerator_state_init = accelerate.state.AcceleratorState.__init__


def _init_as_gpu_group(self, cpu: bool = False, **kwargs):
    _partial_state_init(self, cpu=False, **kwargs)


def _accelerator_init_as_gpu_group(self, mixed_precision=None, cpu: bool = False, *args, **kwargs):
    _accelerator_state_init(self, mixed_precision, False, *args, **kwargs)


def _gloo_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_GPU


accelerate.state.PartialState.__init__ = _init_as_gpu_group
accelerate.state.PartialState._prepare_backend = _gloo_backend
accelerate.state.AcceleratorState.__init__ = _accelerator_init_as_gpu_group


def _nan_loss_on_call(call: int) -> None:
    """Make the Flow-DPO loss non-finite on its `call`-th evaluation in this process (1-based)."""
    import torch

    import dpo.trainer

    real_loss, calls = dpo.trainer.flow_dpo_loss, [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        value, metrics = real_loss(*args, **kwargs)
        return (value * torch.nan if calls[0] == call else value), metrics

    dpo.trainer.flow_dpo_loss = loss


if __name__ == "__main__":
    from rlhf.cli import main

    if "CONTENTV_TEST_NAN_LOSS_CALL" in os.environ:
        _nan_loss_on_call(int(os.environ["CONTENTV_TEST_NAN_LOSS_CALL"]))

    sys.exit(main(sys.argv[1:]))
