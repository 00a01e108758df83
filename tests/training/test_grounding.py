"""The token grounding loss: recorded attention, the phrases' tokens, box masks, the loss, and regions in the data."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from ldm.errors import UserError
from training.data import CropWindow, regions_in_window
from training.grounding import AttentionRecorder, box_masks, grounded_tokens, grounding_loss, phrase_positions
from training.record_formats import Region, parse_regions
from training.train_text_to_image import TrainConfig, train


def test_recording_keeps_the_unets_output_and_records_every_cross_attention(tiny_components):
    unet = tiny_components["unet"].eval()
    before = dict(unet.attn_processors)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=text).sample
        with AttentionRecorder(unet) as recorder:
            recorded = unet(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-5)
    cross = [name for name in before if ".attn2." in name]
    assert len(recorder.maps) == len(cross) > 0
    for probs, heads in recorder.maps:
        assert probs.shape[0] == 2 * heads and probs.shape[-1] == 77
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))  # a distribution over tokens
    assert dict(unet.attn_processors) == before  # restored


def test_a_phrases_tokens_are_found_where_the_caption_has_them(tiny_components):
    tokenizer = tiny_components["tokenizer"]
    caption = "a red circle to the left of a blue square"
    ids = tokenizer(caption).input_ids  # start token, then one token a word
    assert phrase_positions(ids, tokenizer("blue square", add_special_tokens=False).input_ids) == [9, 10]
    assert phrase_positions(ids, tokenizer("green square", add_special_tokens=False).input_ids) == []
    boxes = [Region("red circle", (0.1, 0.4, 0.3, 0.6)), Region("blue square", (0.7, 0.4, 0.9, 0.6))]
    found = grounded_tokens(tokenizer, [caption, ""], [boxes, boxes])
    assert found == [[(2, boxes[0].box), (3, boxes[0].box), (9, boxes[1].box), (10, boxes[1].box)], []]


def test_box_masks_are_the_share_of_each_cell_inside_each_box():
    masks = box_masks(torch.tensor([[0.1, 0.0, 0.5, 0.5], [0.0, 0.25, 1.0, 1.0]]), height=2, width=4)
    expected = torch.tensor([[[0.6, 1.0, 0.0, 0.0], [0.0] * 4], [[0.5] * 4, [1.0] * 4]])
    torch.testing.assert_close(masks, expected)


def test_grounding_loss_is_the_squared_share_of_attention_outside_the_box():
    # one sample, 2 heads, a 2x2 map (query positions row by row), 3 tokens; token 1 is grounded in the left column
    probs = torch.zeros(2, 4, 3)
    probs[0, :, 1] = torch.tensor([0.4, 0.2, 0.4, 0.2])  # head 0: inside 0.8 of 1.2
    probs[1, :, 1] = torch.tensor([0.1, 0.3, 0.1, 0.3])  # head 1: inside 0.2 of 0.8
    probs[..., 0] = 1 - probs[..., 1]
    loss = grounding_loss([(probs, 2)], [[(1, (0.0, 0.0, 0.5, 1.0))]], latent_size=(4, 4))  # a 2x2 map of a 4x4
    mean = probs.mean(0)[:, 1]  # the heads' mean: 0.25, 0.25, 0.25, 0.25 -> inside 0.5 of 1.0
    assert mean.tolist() == pytest.approx([0.25] * 4)
    assert loss.item() == pytest.approx((1 - 0.5) ** 2)
    # all of it inside: no loss; nothing grounded: zero, still part of the graph
    inside = torch.zeros(1, 4, 2)
    inside[0, [0, 2], 1] = 0.5
    assert grounding_loss([(inside, 1)], [[(1, (0.0, 0.0, 0.5, 1.0))]], (2, 2)).item() == pytest.approx(0.0)
    assert grounding_loss([(probs.requires_grad_(), 2)], [[]], (4, 4)).requires_grad
    # a batch of two: the mean of each sample's terms (0.25 as above; 0 for one with all of token 1 inside)
    second = torch.zeros(2, 4, 3)
    second[:, [0, 2], 1], second[:, [1, 3], 0] = 0.5, 1.0
    left = (0.0, 0.0, 0.5, 1.0)
    loss = grounding_loss([(torch.cat([probs.detach(), second]), 2)], [[(1, left)], [(1, left)]], (4, 4))
    assert loss.item() == pytest.approx(0.125)


def test_regions_follow_the_crop_and_the_flip():
    # a 100x50 (w x h) image resized to 128x64 and cropped to 64x64 at left 32
    window = CropWindow(original_size=(50, 100), resized_size=(64, 128), crop_top_left=(0, 32), target_size=(64, 64))
    regions = (Region("a", (0.25, 0.0, 0.5, 0.5)), Region("gone", (0.0, 0.0, 0.2, 1.0)))
    (kept,) = regions_in_window(regions, window)
    assert kept.phrase == "a" and kept.box == pytest.approx((0.0, 0.0, 0.5, 0.5))
    (flipped,) = regions_in_window(regions, window, flipped=True)
    assert flipped.box == pytest.approx((0.5, 0.0, 1.0, 0.5))


def test_bad_regions_name_the_row_and_the_expected_form():
    assert parse_regions(None, "row 1") == ()
    assert parse_regions([{"phrase": " cat ", "box": [0, 0.5, 1, 1]}], "row 1") == (Region("cat", (0, 0.5, 1, 1)),)
    for bad in ("cat", [{"phrase": "cat"}], [{"phrase": "cat", "box": [0.5, 0, 0.2, 1]}], [{"box": [0, 0, 1, 1]}]):
        with pytest.raises(UserError, match=r"row 7: .*like \[\{\"phrase\""):
            parse_regions(bad, "row 7")


@pytest.fixture(scope="module")
def grounded_shapes(tmp_path_factory):
    from shapes.make_dataset import make_dataset

    folder = tmp_path_factory.mktemp("grounded")
    make_dataset(folder, n=8, size=64, seed=0, progress=False, two_object_fraction=0.5)
    return folder


def test_the_grounding_loss_moves_the_attention_into_the_boxes(tiny_sd_dir, grounded_shapes, tmp_path, caplog):
    rows = [json.loads(line) for line in (grounded_shapes / "metadata.jsonl").read_text().splitlines()]
    assert all(row["regions"] for row in rows)

    def run(out, weight, steps=20, cache=False):
        config = TrainConfig(
            pretrained_model=tiny_sd_dir,
            dataset=str(grounded_shapes),
            output_dir=str(out),
            resolution=64,
            train_batch_size=8,
            max_train_steps=steps,
            learning_rate=3e-3,
            lr_warmup_steps=0,
            caption_dropout=0.0,
            grounding_loss_weight=weight,
            cache=cache,
            report_to="none",
            log_steps=1,
            checkpointing_steps=1000,
        )
        config.validate()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="training"):
            train(config)
        return [float(m) for m in re.findall(r"grounding_loss ([-+.e0-9]+)", caplog.text)]

    grounded, control = run(tmp_path / "grounded", 1.0), run(tmp_path / "control", 1e-9)  # the control only measures
    assert len(grounded) == len(control) == 20
    assert grounded[0] == pytest.approx(control[0])  # the same start
    assert sum(grounded[-5:]) / 5 < sum(control[-5:]) / 5 - 0.05
    assert len(run(tmp_path / "cached", 1.0, steps=2, cache=True)) == 2  # cached samples carry their regions too
    assert run(tmp_path / "off", 0.0, steps=2) == []  # off: nothing recorded or logged
