"""kohya-ss data layouts: N_name folders (repeats, class-name captions, caption extensions) and multi-subset dataset
files whose samples carry their subset's loss weight and settings."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.training.test_records import captioned_folder, solid
from training.config import ConfigError
from training.data import ImageCaptionDataset, collate
from training.records import Subset, dataset_subsets, load_image_caption_records, load_subsets, read_subsets

RED, GREEN, BLUE = (220, 30, 30), (30, 170, 60), (40, 60, 220)


def kohya_folder(root: Path) -> Path:
    """``3_sks dog/`` with a captioned and an uncaptioned image, ``1_dog/`` with one captioned by a .caption file."""
    images = {"3_sks dog/a.png": solid(RED), "3_sks dog/b.png": solid(GREEN), "1_dog/c.png": solid(BLUE)}
    captioned_folder(root, images, {"3_sks dog/a.png": "sks dog on grass"})
    (root / "1_dog" / "c.caption").write_text("a brown dog\n")
    return root


def epoch_counts(dataset: ImageCaptionDataset) -> Counter:
    """How many samples of each image (by file name) one epoch holds."""
    return Counter(Path(dataset.records.image_name(dataset.record_of_index[i])).name for i in range(len(dataset)))


def test_kohya_folders_repeat_their_images_and_caption_them_with_the_class_name(tmp_path):
    root = kohya_folder(tmp_path)
    records = load_image_caption_records(str(root))
    captions = {Path(r.image).name: r.captions[0] for r in records.records}
    assert captions == {"a.png": "sks dog on grass", "b.png": "sks dog", "c.png": "dog"}
    dataset = ImageCaptionDataset(records, resolution=16)
    assert len(dataset) == 3 + 3 + 1
    assert epoch_counts(dataset) == {"a.png": 3, "b.png": 3, "c.png": 1}
    # each repeat of an image is its own sample, from the same record
    samples = [dataset[i] for i in range(len(dataset))]
    assert sorted(s["caption"] for s in samples).count("sks dog") == 3
    assert {s["index"] for s in samples} == {0, 1, 2}

    # kohya's .caption extension: c gets its caption file; a has none and falls back to its class name
    records = load_image_caption_records(str(root), caption_extension=".caption")
    captions = {Path(r.image).name: r.captions[0] for r in records.records}
    assert captions == {"a.png": "sks dog", "b.png": "sks dog", "c.png": "a brown dog"}


def test_a_held_out_dataset_does_not_repeat(tmp_path):
    records = load_image_caption_records(str(kohya_folder(tmp_path)))
    assert len(ImageCaptionDataset(records, resolution=16, repeat=False)) == 3


def test_subsets_file_concatenates_folders_with_their_repeats_and_loss_weights(tmp_path, shapes_dir):
    kohya = kohya_folder(tmp_path / "kohya")
    (tmp_path / "subsets.toml").write_text(
        f"""caption_extension = ".caption"
[[subsets]]
path = "{shapes_dir}"
num_repeats = 2
loss_weight = 0.5
caption_prefix = "photo of"
[[subsets]]
image_dir = "{kohya}"
caption_extension = ".txt"
loss_weight = 2.0
"""
    )
    dataset_file = str(tmp_path / "subsets.toml")
    subsets = dataset_subsets(dataset_file, Subset(shuffle_caption=False))
    assert [(s.num_repeats, s.loss_weight, s.caption_extension) for s in subsets] == [
        (2, 0.5, ".caption"),
        (1, 2.0, ".txt"),
    ]
    records = load_subsets(subsets, source=dataset_file)
    assert records.format == "subsets" and records.total == 8 + 3
    # the same file through --dataset alone (any command's load_records)
    assert load_image_caption_records(dataset_file).records == records.records
    dataset = ImageCaptionDataset(records, resolution=16, subsets=subsets)
    assert len(dataset) == 8 * 2 + (3 + 3 + 1)
    counts = epoch_counts(dataset)
    assert all(counts[f"{i:03d}.png"] == 2 for i in range(8)) and counts["a.png"] == 3 and counts["c.png"] == 1

    sampler = dataset.batch_sampler(5, shuffle=True)
    sampler.set_epoch(0)
    weights, seen = {}, 0
    for batch_indices in sampler:
        batch = collate([dataset[i] for i in batch_indices])
        assert batch["loss_weight"].dtype == torch.float32 and batch["loss_weight"].shape == (len(batch_indices),)
        for caption, weight in zip(batch["captions"], batch["loss_weight"].tolist()):
            weights[caption] = weight
        seen += len(batch_indices)
    assert seen == len(dataset)
    assert weights["photo of a red circle on the left"] == 0.5
    assert weights["sks dog on grass"] == weights["sks dog"] == 2.0


def test_a_plain_dataset_has_weight_one_and_its_captions_as_written(shapes_dir):
    records = load_subsets(dataset_subsets(shapes_dir))
    plain = load_image_caption_records(shapes_dir)
    assert records.records == plain.records
    batch = collate([ImageCaptionDataset(records, resolution=16)[i] for i in range(4)])
    assert batch["loss_weight"].tolist() == [1.0] * 4 and "loss_mask" not in batch


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[[subsets]]\npath = 'x'\nnum_repeat = 2\n", "did you mean 'num_repeats'"),
        ("[[subsets]]\npath = 'x'\nloss_weight = -1\n", "loss_weight must be a finite number >= 0"),
        ("[[subsets]]\nnum_repeats = 2\n", "has no 'path'"),
        ("[[subsets]]\npath = 'x'\ncaption_extension = 'txt'\n", "caption_extension must start with a dot"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n", "[[datasets]] nesting is not read"),
        ("keep_tokens = 1\n", "non-empty 'subsets' list"),
    ],
)
def test_bad_subsets_files_name_the_key(tmp_path, body, message):
    (tmp_path / "d.toml").write_text(body)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        read_subsets(tmp_path / "d.toml")


def test_yaml_general_defaults_and_kohya_key_names(tmp_path):
    (tmp_path / "d.yaml").write_text(
        "general:\n  shuffle_caption: true\n  keep_tokens: 2\n"
        "subsets:\n  - image_dir: a\n    caption_tag_dropout_rate: 0.25\n  - path: b\n    keep_tokens: 0\n"
    )
    a, b = read_subsets(tmp_path / "d.yaml", Subset(caption_prefix="p"))
    assert (a.path, a.shuffle_caption, a.keep_tokens, a.caption_tag_dropout, a.caption_prefix) == (
        "a",
        True,
        2,
        0.25,
        "p",
    )
    assert (b.path, b.keep_tokens, b.caption_tag_dropout) == ("b", 0, 0.0)
