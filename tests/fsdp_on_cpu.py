"""FSDP on CPU for the tests: lift accelerate's accelerator-only gate so that FSDP2 runs on gloo.

accelerate selects ``DistributedType.FSDP`` only on accelerators. On a machine without one, ``AcceleratorState``
keeps ``MULTI_CPU`` even when it is given an ``fsdp_plugin`` (from ``Trainer(fsdp=...)``'s arguments, or built by
``Accelerator`` from ``accelerate launch --config_file recipes/accelerate/fsdp2.yaml``'s ``ACCELERATE_USE_FSDP``):
the run silently becomes plain data parallelism, with the whole weights on every process. The patch below turns
such a state into FSDP with that plugin, so that the Trainer's own FSDP2 preparation (``fully_shard``) and
SAMTrainer's sharded step run on gloo as they would on GPUs. It acts only in the process that installs it, and only
where a plugin is given under ``MULTI_CPU``: a single process, or a run without FSDP, is unchanged.
"""

from __future__ import annotations

from typing import Any

import accelerate.state
from accelerate.utils import DistributedType


def allow_fsdp_on_cpu() -> None:
    """Patch ``AcceleratorState.__init__`` in this process: a ``MULTI_CPU`` state given an ``fsdp_plugin`` becomes
    ``DistributedType.FSDP`` with that plugin (and its mixed precision policy from ``mixed_precision``), in the state shared with ``PartialState`` too (each later
    ``AcceleratorState()`` reads its type from there). Installing it twice patches once."""
    state = accelerate.state.AcceleratorState
    if getattr(state.__init__, "_fsdp_on_cpu", False):
        return
    original = state.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":  # the plugin's MixedPrecisionPolicy, as accelerate sets it on GPUs
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            # every later AcceleratorState() copies PartialState's shared state over its own: FSDP must be there too
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init._fsdp_on_cpu = True
    state.__init__ = init
