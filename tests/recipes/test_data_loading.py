"""hf_msam.data: local text/image data, validation errors that name the file/column and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_msam.data import DataError, image_transform, load_image_dataset, load_text_dataset, tokenize
from builders import write_image_folder, write_text_csv, write_vocab


def test_csv_with_string_labels_and_a_fixed_split(tmp_path):
    path = write_text_csv(tmp_path / "train.csv", n=40)
    a = load_text_dataset(path, seed=3)
    b = load_text_dataset(path, seed=3)
    assert a.label_names == ["neg", "pos"] and a.text_column == "text" and not a.is_regression
    assert len(a.train) + len(a.validation) == 40 and len(a.validation) == 8
    assert a.validation["text"] == b.validation["text"]
    assert set(a.train["label"]) <= {0, 1}


def test_tsv_pairs_jsonl_regression_and_validation_file(tmp_path):
    tsv = write_text_csv(tmp_path / "pairs.tsv", n=20, delimiter="\t", columns=("sentence1", "label"))
    rows = [{"premise": "a good film", "hypothesis": "good", "score": 0.5 + i / 10} for i in range(12)]
    jsonl = tmp_path / "reg.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_text_dataset(jsonl, validation_data=jsonl, text_column="premise", text_pair_column="hypothesis")
    assert data.is_regression and data.num_labels == 1 and len(data.validation) == 12
    assert data.train.features["label"].dtype == "float32"
    tsv_data = load_text_dataset(tsv)
    assert tsv_data.text_column == "sentence1"


@pytest.mark.parametrize(
    "content, kwargs, expected",
    [
        ("", {}, "is empty"),
        ("text,label\n", {}, "no examples"),
        ("text,label\nhello,1\nbye,0\n", {"label_column": "stars"}, "no label column 'stars'"),
        ("text,label\nhello,1\nbye,0\n", {"text_column": "review"}, "no column 'review'"),
        ("text,label\nhello,-1\nbye,0\n", {}, "out of range"),
    ],
)
def test_bad_text_files_name_the_file_and_the_fix(tmp_path, content, kwargs, expected):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=expected) as info:
        load_text_dataset(path, validation_data=path, **kwargs)
    assert "bad.csv" in str(info.value) or "--" in str(info.value)


def test_unseen_validation_label_and_unknown_task(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\na,cat\nb,dog\n")
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\nc,bird\n")
    with pytest.raises(DataError, match="bird.*do not occur in the training data"):
        load_text_dataset(train, validation_data=dev)
    with pytest.raises(DataError, match="Unknown GLUE task 'sst3'.*Did you mean 'sst2'"):
        load_text_dataset(task_name="sst3")
    with pytest.raises(DataError, match="not found"):
        load_text_dataset(tmp_path / "missing.csv")


def test_tokenize_with_a_real_vocabulary(tmp_path):
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab=str(write_vocab(tmp_path / "vocab.txt")))
    data = load_text_dataset(write_text_csv(tmp_path / "t.csv", n=10), validation_split=0.5)
    out = tokenize(data.train, tokenizer, text_column="text", max_length=16)
    assert set(out.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert tokenizer.unk_token_id not in out[0]["input_ids"]


def test_image_folder_pixel_csv_and_transform(tmp_path):
    from transformers import ViTImageProcessor

    folder = write_image_folder(tmp_path / "images", per_class=5)
    data = load_image_dataset(folder, validation_split=0.4, seed=0)
    assert data.label_names == ["bright", "dark"] and len(data.train) == 6 and len(data.validation) == 4
    processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    data.train.set_transform(image_transform(processor))
    assert tuple(data.train[:2]["pixel_values"].shape) == (2, 3, 8, 8)

    rows = np.random.default_rng(0).integers(0, 255, (10, 16))
    csv_path = tmp_path / "pixels.csv"
    csv_path.write_text("label," + ",".join(f"p{i}" for i in range(16)) + "\n"
                        + "\n".join(f"{i % 3}," + ",".join(map(str, r)) for i, r in enumerate(rows)))
    pixels = load_image_dataset(csv_path, validation_split=0.3)
    assert pixels.label_names == ["0", "1", "2"] and np.asarray(pixels.train[0]["image"]).shape == (4, 4)


def test_bad_images_are_refused_up_front(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=3)
    (folder / "dark" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="Unreadable image .*broken.png"):
        load_image_dataset(folder)
    (folder / "dark" / "broken.png").unlink()
    other = write_image_folder(tmp_path / "other", per_class=1)
    (other / "bright").rename(other / "zebra")
    with pytest.raises(DataError, match="zebra.*do not occur"):
        load_image_dataset(folder, validation_data=other)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("label,p0,p1,p2,p3,p4\n1,0,0,0,0,0\n0,1,1,1,1,1\n")
    with pytest.raises(DataError, match="not a square image"):
        load_image_dataset(bad_csv)


def test_image_folder_layouts_keep_the_training_class_ids(tmp_path):
    """train/ + validation/ inside one folder, and a separate evaluation folder holding only some classes:
    the evaluation labels are the training ids (dark stays 1 though it is the only class there)."""
    root = tmp_path / "split"
    write_image_folder(root / "train", per_class=4)
    write_image_folder(root / "validation", per_class=2, seed=1)
    data = load_image_dataset(root)
    assert data.label_names == ["bright", "dark"] and len(data.train) == 8 and len(data.validation) == 4
    assert sorted(data.validation["label"]) == [0, 0, 1, 1]
    only_dark = write_image_folder(tmp_path / "dark_only", per_class=3, seed=2)
    import shutil

    shutil.rmtree(only_dark / "bright")
    data = load_image_dataset(root / "train", validation_data=only_dark)
    assert data.validation["label"] == [1, 1, 1]
    assert np.asarray(data.validation[0]["image"]).mean() < 100  # a dark image under the training id of "dark"


def test_a_held_out_split_keeps_the_class_shares(tmp_path):
    """The split made when no evaluation data is given is stratified by label: 30 of class a, 10 of class b,
    a quarter held out -> 7 or 8 of a and 2 or 3 of b, for every seed (a plain random split misses b often)."""
    path = tmp_path / "skewed.csv"
    path.write_text("text,label\n" + "".join(f"words {i},{'a' if i % 4 else 'b'}\n" for i in range(40)))
    for seed in range(8):
        data = load_text_dataset(path, validation_split=0.25, seed=seed)
        counts = np.bincount(data.validation["label"], minlength=2)
        assert counts.tolist() in ([8, 2], [7, 3]), (seed, counts)
        assert len(data.train) == 30


def test_test_files_for_predictions_drop_labels_and_keep_the_text(tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=20)
    test = tmp_path / "test.csv"
    test.write_text("text\ngood film\nawful plot\nthe acting\n")
    data = load_text_dataset(train, test_data=test, predict=True, max_predict_samples=2)
    assert list(data.test) == [""] and data.test[""]["text"] == ["good film", "awful plot"]
    assert "label" not in data.test[""].column_names
    with pytest.raises(DataError, match="no text column 'text'"):
        bad = tmp_path / "bad_test.csv"
        bad.write_text("review\ngood film\n")
        load_text_dataset(train, test_data=bad, predict=True)


def _box_of(output: torch.Tensor) -> tuple[float, float, bool]:
    """Width and height of the crop behind an upsampled crop of the ramp image (channel 0 = x, channel 1 = y):
    bilinear upsampling of a linear ramp keeps it linear in the interior with slope crop/output size, so the
    slope gives the crop's size; a decreasing x ramp means the crop was flipped."""
    size = output.shape[-1]
    middle = slice(size // 4, 3 * size // 4)
    x_slope = float(torch.diff(output[0, size // 2, middle]).mean())
    y_slope = float(torch.diff(output[1, middle, size // 2]).mean())
    return abs(x_slope) * size, y_slope * size, x_slope < 0


def test_train_augmentation_is_a_random_resized_crop_and_flip():
    from hf_msam.data.images import augment, random_resized_crop

    height = width = 32
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    ramp = torch.stack([xs, ys, xs + ys])
    whole = random_resized_crop(ramp, (64, 64), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    reference = torch.nn.functional.interpolate(ramp[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(whole, reference, atol=1e-5)  # the whole image: a plain resize

    generator = torch.Generator().manual_seed(0)
    out = augment(ramp[None].repeat(60, 1, 1, 1), (64, 64), mean=[0, 0, 0], std=[1, 1, 1], generator=generator)
    assert out.shape == (60, 3, 64, 64) and out.min() >= 0 and out.max() <= 62 + 1e-4
    boxes = [_box_of(image) for image in out]
    areas = np.array([w * h / (height * width) for w, h, _ in boxes])
    ratios = np.array([w / h for w, h, _ in boxes])
    assert areas.min() >= 0.08 - 0.02 and areas.max() <= 1 + 0.02
    assert ratios.min() >= 3 / 4 - 0.05 and ratios.max() <= 4 / 3 + 0.05
    assert 0.3 < areas.mean() < 0.75 and areas.std() > 0.1  # scale drawn over [0.08, 1]
    flips = sum(flipped for *_, flipped in boxes)
    assert 15 <= flips <= 45  # p = 1/2 over 60 draws
    again = augment(ramp[None].repeat(60, 1, 1, 1), (64, 64), [0, 0, 0], [1, 1, 1], torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_image_transform_augments_only_when_asked(tmp_path):
    from PIL import Image
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)) for _ in range(4)]
    batch = {"image": images, "label": [0, 1, 0, 1]}
    plain = image_transform(processor)(batch)
    assert torch.equal(plain["pixel_values"], image_transform(processor)(batch)["pixel_values"])
    torch.manual_seed(0)
    augmented = image_transform(processor, train_augmentation=True)(batch)
    assert augmented["pixel_values"].shape == plain["pixel_values"].shape == (4, 3, 8, 8)
    assert augmented["labels"] == [0, 1, 0, 1]
    assert not torch.allclose(augmented["pixel_values"], plain["pixel_values"])
    assert augmented["pixel_values"].min() >= -1 - 1e-6 and augmented["pixel_values"].max() <= 1 + 1e-6
