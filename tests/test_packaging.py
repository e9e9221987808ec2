"""Packaging: the wheel carries every package of hf_msam and the model card template (package data of
hf_msam.publish), the installed package finds the template there, the version comes from the installed
metadata, ``hf_msam.update`` imports without transformers, and the example-card script copies a run's card."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from example_cards import EXAMPLES, copy_example  # benchmarks/, on sys.path from conftest

from hf_msam.publish.card import write_model_card

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (no build/ or egg-info left in the repository)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "hf_msam", src / "hf_msam", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("hf_msam-*.whl")
    return path


def test_wheel_holds_the_template_and_every_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "hf_msam/publish/model_card_template.md" in names
    packages = [p.parent.relative_to(REPO).as_posix() for p in (REPO / "hf_msam").rglob("__init__.py")]
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert missing == [], f"{missing} missing: see [tool.setuptools.packages.find] in pyproject.toml"


def test_installed_package_renders_a_card_with_its_own_template(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import hf_msam.publish.card as m, sys; p = m.TEMPLATE_PATH; "
            f"assert p.is_file() and p.is_relative_to({str(site)!r}), p; "
            f"print(m.write_model_card({str(tmp_path / 'out')!r}, {{'model_name': 'x'}}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## mSAM settings" in (tmp_path / "out" / "README.md").read_text()


def test_the_update_imports_with_torch_alone():
    """``hf_msam.update`` (the mSAM rule and both engines) needs torch only: transformers, accelerate, datasets
    and huggingface_hub are blocked (a None entry in sys.modules makes their import fail)."""
    blocked = ["transformers", "accelerate", "datasets", "huggingface_hub", "peft", "scipy"]
    code = ("import sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "import hf_msam, hf_msam.update\n"
            "assert hf_msam.update.MicroBatchSAM and hf_msam.MicroBatchSAM is hf_msam.update.MicroBatchSAM\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in {'transformers', 'accelerate', 'datasets'}]\n"
            "assert all(sys.modules[m] is None for m in loaded), loaded\n"
            "print(hf_msam.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from importlib.metadata import version

    assert proc.stdout.strip() == version("hf_msam")
    blocked_trainer = subprocess.run([sys.executable, "-c", "import sys; sys.modules['transformers'] = None\n"
                                      "import hf_msam; hf_msam.SAMTrainer"], cwd=REPO, capture_output=True, text=True,
                                     timeout=120)
    assert blocked_trainer.returncode != 0 and "transformers" in blocked_trainer.stderr


def test_example_card_copy_keeps_the_card_links_alive(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "sharpness.json").write_text(json.dumps({"lambda_max": 2.0, "stable_sgd": True}))
    (run / "sharpness.png").write_bytes(b"\x89PNG")
    (run / "model.safetensors").write_bytes(b"weights")
    card = write_model_card(run, {"model_name": "run"}).read_text()
    target = copy_example(run, "glue", examples=tmp_path / "examples")
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "sharpness.json", "sharpness.png"]
    assert (target / "README.md").read_text() == card
    relative = [link for link in re.findall(r"\]\(([^)\s]+)\)", card) if not link.startswith("http")]
    assert relative and all((target / link).is_file() for link in relative)
    with pytest.raises(FileNotFoundError, match="README.md"):
        copy_example(tmp_path / "examples", "x", examples=tmp_path / "examples")


def test_example_cards_go_where_the_docs_link_them():
    # docs/results.md and docs/recipes.md link model_cards/glue and model_cards/vit beside them
    links = set(re.findall(r"\]\(model_cards/(\w+)\)", (REPO / "docs" / "results.md").read_text()))
    assert links == {"glue", "vit"}
    assert all((EXAMPLES / name / "README.md").is_file() for name in links)
    assert EXAMPLES == REPO / "docs" / "model_cards"


def test_no_file_points_at_notes_outside_the_repository():
    """The design notes a reader is sent to are in docs/ (docs/design.md), not in files this repository lacks."""
    outside = re.compile(r"DESIGN\.md|notes/papers\.md|notes/trainer-and-peers\.md|/work/shared")
    tracked = subprocess.run(["git", "ls-files", "hf_msam", "tests", "benchmarks", "docs", "recipes"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    hits = [f"{name}:{number}" for name in tracked if name.endswith((".py", ".md", ".yaml", ".sh"))
            and name != "tests/test_packaging.py"
            for number, line in enumerate((REPO / name).read_text().splitlines(), 1) if outside.search(line)]
    assert hits == []
    assert (REPO / "docs" / "design.md").is_file()
