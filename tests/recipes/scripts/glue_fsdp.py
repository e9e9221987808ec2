"""The glue recipe (``hf_msam.recipes.glue.main``) with FSDP allowed on CPU (``tests/fsdp_on_cpu.py``), for
``accelerate launch --config_file recipes/accelerate/fsdp2.yaml ... glue_fsdp.py [RECIPE FLAGS]`` on gloo:

    python -m accelerate.commands.launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 \\
        --mixed_precision no glue_fsdp.py --model_name_or_path ... --sharpness_report false

Run as a plain ``python glue_fsdp.py ...`` it is the recipe in one process (the patch acts only on a
multi-process state given an FSDP plugin). With ``GLUE_FSDP_BATCHES=DIR`` in the environment each process also
writes the examples of its training batches, step by step, to ``DIR/batches-RANK.json``: per step, one
``[token ids under the attention mask, label]`` per example, so that a test can see which examples each process
trained on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(TESTS)]
from fsdp_on_cpu import allow_fsdp_on_cpu  # noqa: E402


def record_batches() -> list[list[list[Any]]]:
    """Record the examples of every ``SAMTrainer.training_step`` of this process (in the order the steps run) in the
    returned list; the caller writes it out."""
    from hf_msam.training.trainer import SAMTrainer

    steps: list[list[list[Any]]] = []
    training_step = SAMTrainer.training_step

    def recorded(self: SAMTrainer, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        rows = zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist(), inputs["labels"].tolist())
        steps.append([[[t for t, m in zip(ids, mask) if m], label] for ids, mask, label in rows])
        return training_step(self, model, inputs, *args, **kwargs)

    SAMTrainer.training_step = recorded
    return steps


def main(argv: list[str]) -> int:
    from hf_msam.recipes.glue import main as glue_main

    allow_fsdp_on_cpu()
    directory = os.environ.get("GLUE_FSDP_BATCHES")
    steps = record_batches() if directory else None
    status = glue_main(argv)
    if steps is not None:
        rank = os.environ.get("RANK", "0")
        (Path(directory) / f"batches-{rank}.json").write_text(json.dumps(steps))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
