"""``hf-msam``: the package's command line. Each sub-command is a module with a ``main(argv)``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "glue": ("hf_msam.recipes.glue", "fine-tune a text classifier/regressor (GLUE task or local files) with mSAM"),
    "vit": ("hf_msam.recipes.vit", "fine-tune an image classifier (ViT by default) with mSAM"),
    "sharpness": ("hf_msam.curvature.cli", "curvature report (eigenvalues, trace, coherence) of a saved model"),
    "push": ("hf_msam.publish.hub", "push a finished output_dir (model + card) to the Hugging Face Hub"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        lines = ["usage: hf-msam COMMAND [ARGS...]", "", "commands:"]
        lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stdout if argv and argv[0] in {"-h", "--help"} else sys.stderr)
        if argv and argv[0] not in {"-h", "--help"}:
            print(f"\nhf-msam: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
