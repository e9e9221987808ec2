#!/usr/bin/env python
"""Launcher for `hf_msam.recipes.glue` (the same script as `hf-msam glue`), e.g.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/glue.py [FLAGS | args.json]

Run `python recipes/glue.py --help` for every flag."""

import sys

from hf_msam.recipes.glue import main

if __name__ == "__main__":
    sys.exit(main())
