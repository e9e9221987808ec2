"""Copy the model card of a finished run (README.md, with the curvature plot and report it links) into
docs/model_cards/NAME/, where the cards of the reference runs sit.

    hf-msam glue --output_dir runs/glue && python benchmarks/example_cards.py runs/glue --name glue
    hf-msam vit --output_dir runs/vit && python benchmarks/example_cards.py runs/vit --name vit

Copies README.md (required), sharpness.png and sharpness.json (when the run has them; the card links both).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "model_cards"
CARD_FILES = ["README.md", "sharpness.png", "sharpness.json"]


def copy_example(run_dir: Path, name: str, examples: Path = EXAMPLES) -> Path:
    """Copy the card files of ``run_dir`` into ``examples/name`` (replacing an older copy); return that folder."""
    if not (run_dir / "README.md").is_file():
        raise FileNotFoundError(
            f"{run_dir / 'README.md'} does not exist: pass the output_dir of a finished `hf-msam glue` / `hf-msam vit` run."
        )
    target = examples / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for file in CARD_FILES:
        if (run_dir / file).is_file():
            shutil.copy2(run_dir / file, target / file)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="output_dir of a finished recipe run")
    parser.add_argument("--name", required=True, help="folder name under docs/model_cards/ (e.g. glue, vit)")
    args = parser.parse_args(argv)
    try:
        target = copy_example(args.run_dir, args.name)
    except FileNotFoundError as exc:
        print(f"example_cards: {exc}", file=sys.stderr)
        return 2
    print(f"Copied the card of {args.run_dir} to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
