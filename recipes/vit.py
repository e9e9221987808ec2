#!/usr/bin/env python
"""Launcher for `hf_msam.recipes.vit` (the same script as `hf-msam vit`), e.g.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/vit.py [FLAGS | args.json]

Run `python recipes/vit.py --help` for every flag."""

import sys

from hf_msam.recipes.vit import main

if __name__ == "__main__":
    sys.exit(main())
