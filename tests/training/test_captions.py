"""kohya-ss caption tools: tag shuffling after kept tokens, tag dropout, caption dropout, prefix/suffix; the same
captions for the same (seed, epoch, index), and after a resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import training.train_text_to_image as t2i
from training.captions import CaptionOptions, add_affixes, process_caption, split_tags
from training.data import ImageCaptionDataset
from training.records import Subset, load_subsets
from training.train_text_to_image import train

from .test_train_text_to_image import assert_same_weights, config, unet_weights

TAGS = [f"tag{i}" for i in range(12)]
CAPTION = ", ".join(TAGS)


def test_shuffling_keeps_the_first_tags_and_permutes_the_rest():
    options = CaptionOptions(shuffle=True, keep_tokens=3)
    generator = torch.Generator().manual_seed(0)
    orders = set()
    for _ in range(50):
        tags = split_tags(process_caption(CAPTION, options, generator))
        assert tags[:3] == TAGS[:3] and sorted(tags[3:]) == sorted(TAGS[3:])
        orders.add(tuple(tags[3:]))
    assert len(orders) > 40  # 9! orders: 50 draws are almost all different


def test_tag_dropout_drops_each_free_tag_with_probability_p():
    p, draws = 0.3, 4000
    options = CaptionOptions(keep_tokens=2, tag_dropout=p)
    generator = torch.Generator().manual_seed(1)
    kept = torch.zeros(len(TAGS))
    for _ in range(draws):
        tags = split_tags(process_caption(CAPTION, options, generator))
        assert tags[:2] == TAGS[:2] and tags == [t for t in TAGS if t in tags]  # order kept without shuffling
        kept += torch.tensor([t in tags for t in TAGS], dtype=torch.float)
    dropped = 1 - kept[2:].sum() / (draws * (len(TAGS) - 2))
    # 40,000 Bernoulli(0.3) draws: the standard deviation of the rate is 0.0023
    assert abs(float(dropped) - p) < 0.01
    assert kept[:2].tolist() == [draws, draws]


def test_caption_dropout_and_affixes():
    generator = torch.Generator().manual_seed(2)
    results = [process_caption("a dog", CaptionOptions(dropout=0.25), generator) for _ in range(4000)]
    assert set(results) == {"", "a dog"} and abs(results.count("") / 4000 - 0.25) < 0.025
    assert add_affixes("dog, grass", "sks", "best quality") == "sks dog, grass best quality"
    assert add_affixes("dog", "", "") == "dog"


def test_no_option_no_change_and_no_draw():
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    assert process_caption(" odd ,, spacing ", CaptionOptions(), generator) == " odd ,, spacing "
    assert torch.equal(generator.get_state(), state)


def tagged_folder(shapes_dir: str, folder: Path) -> Path:
    """The shapes images with comma-separated tag captions in side-car .txt files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(sorted(Path(shapes_dir).glob("*.png"))):
        shutil.copy(image, folder / image.name)
        (folder / image.with_suffix(".txt").name).write_text(f"shape{i}, drawn, flat, simple, bright, centred, clean")
    return folder


def test_dataset_captions_are_a_function_of_seed_epoch_and_index(shapes_dir, tmp_path):
    subset = Subset(path=str(tagged_folder(shapes_dir, tmp_path / "tags")), shuffle_caption=True, keep_tokens=1)
    records = load_subsets([subset])

    def captions(epoch: int) -> list[str]:
        dataset = ImageCaptionDataset(records, resolution=16, subsets=[subset], seed=5)
        dataset.set_epoch(epoch)
        return [dataset[i]["caption"] for i in range(len(dataset))]

    assert captions(0) == captions(0) and captions(0) != captions(1)
    assert all(c.startswith(f"shape{i}, ") for i, c in enumerate(captions(1)))


def test_resumed_run_sees_the_same_captions(shapes_dir, tiny_sd_dir, tmp_path, monkeypatch):
    data = str(tagged_folder(shapes_dir, tmp_path / "tags"))
    seen: list[list[str]] = []
    drop = t2i.drop_captions

    def recording(captions: list[str], probability: float, generator: torch.Generator) -> list[str]:
        seen.append(list(captions))
        return drop(captions, probability, generator)

    monkeypatch.setattr(t2i, "drop_captions", recording)
    settings = dict(dataset=data, shuffle_caption=True, keep_tokens=1, caption_tag_dropout=0.2, caption_prefix="a")
    straight = train(config(tiny_sd_dir, shapes_dir, tmp_path / "straight", **settings))
    straight_captions, seen[:] = list(seen), []
    train(config(tiny_sd_dir, shapes_dir, tmp_path / "parts", max_train_steps=3, **settings))
    resumed = train(config(tiny_sd_dir, shapes_dir, tmp_path / "parts", resume="latest", **settings))
    assert seen == straight_captions and len(seen) == 6
    assert_same_weights(unet_weights(straight), unet_weights(resumed))
    # the captions were changed: prefixed, first tag kept, the rest shuffled and some dropped
    flat = [c for batch in seen for c in batch]
    assert all(c.startswith("a shape") for c in flat)
    assert any(len(split_tags(c)) < 7 for c in flat) and len(set(flat)) == len(flat)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(keep_tokens=-1), "keep_tokens must be >= 0"),
        (dict(caption_tag_dropout=1.0), "caption_tag_dropout must be in"),
        (dict(caption_extension="txt"), "caption_extension must start with a dot"),
        (dict(shuffle_caption=True, cache=True), "cannot hold"),
        (dict(mask_dir="/nonexistent"), "mask_dir needs --masked-loss"),
    ],
)
def test_bad_caption_settings_name_the_field(tiny_sd_dir, shapes_dir, tmp_path, overrides, message):
    from training.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        config(tiny_sd_dir, shapes_dir, tmp_path, **overrides)
