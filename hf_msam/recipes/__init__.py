"""Fine-tuning recipes in the style of the ``transformers`` example scripts: ``glue`` (text classification and
regression) and ``vit`` (image classification). Each module has ``main(argv) -> int``; they run as
``hf-msam glue|vit ...``, ``python -m hf_msam.recipes.glue ...`` or ``accelerate launch recipes/glue.py ...``."""
