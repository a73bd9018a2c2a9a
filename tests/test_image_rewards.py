"""Verifiable image rewards (target_color, brightness, shape_at) and the reward-set builder."""

import math

import pytest
import torch

from mmpo.errors import ConfigError, UnknownNameError
from mmpo.rewards.image import IMAGE_REWARDS, build_image_rewards
from mmpo.rewards.image_verifiable import COLORS, Brightness, ShapeAt, TargetColor, box_mask

S3 = math.sqrt(3.0)


def solid(rgb, n=1, h=8, w=8):
    """[n, 3, h, w] images of one colour."""
    return torch.tensor(rgb, dtype=torch.float32)[None, :, None, None].expand(n, 3, h, w).clone()


def red_square(box_px, h=8, w=8, bg=(0.0, 0.0, 0.0)):
    """A [1, 3, h, w] image of colour bg with rows/cols box_px = (r0, c0, r1, c1) (exclusive end) pure red."""
    img = solid(bg, 1, h, w)
    r0, c0, r1, c1 = box_px
    img[0, :, r0:r1, c0:c1] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    return img


def test_registry_has_all_components():
    assert IMAGE_REWARDS.names() == ["brightness", "clip_score", "reward_server", "shape_at", "target_color"]


def test_target_color_known_values():
    red = solid((1, 0, 0), n=2)
    assert TargetColor(rgb="red")(red, ["p", "q"], [{}, {}]).tolist() == [1.0, 1.0]
    blue = TargetColor(rgb="blue")(red, ["p", "q"], [{}, {}])
    assert blue.dtype == torch.float32 and blue.shape == (2,)
    assert blue.tolist() == pytest.approx([1 - math.sqrt(2 / 3)] * 2, abs=1e-6)
    # mean colour of a half red / half blue image is (0.5, 0, 0.5) = purple
    half = solid((1, 0, 0))
    half[0, :, :, 4:] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    assert TargetColor(rgb="purple")(half, ["p"], [{}]).item() == pytest.approx(1.0)
    g = TargetColor(rgb=[0.2, 0.4, 0.6])(solid((0, 0, 0)), ["p"], [{}]).item()
    assert g == pytest.approx(1 - math.sqrt(0.04 + 0.16 + 0.36) / S3, abs=1e-6)
    # region: only the left half (red) counts
    assert TargetColor(rgb="red", region=[0, 0, 0.5, 1])(half, ["p"], [{}]).item() == pytest.approx(1.0)


def test_target_color_from_metas_with_default():
    imgs = torch.cat([solid((1, 0, 0)), solid((0, 1, 0)), solid((0, 0, 1))])
    rew = TargetColor(meta_key="color", rgb="blue")
    out = rew(imgs, ["a", "b", "c"], [{"color": "red"}, {"color": [0.0, 1.0, 0.0]}, {}])  # row 2 falls back to rgb
    assert out.tolist() == [1.0, 1.0, 1.0]
    out = TargetColor(meta_key="color")(imgs, ["a"] * 3, [{"color": "Green"}] * 3)  # names are case-insensitive
    assert out.tolist() == pytest.approx([1 - math.sqrt(2) / S3, 1.0, 1 - math.sqrt(2) / S3], abs=1e-6)


def test_unknown_colour_errors_name_it():
    with pytest.raises(ConfigError, match=r"rgb: unknown colour 'pink'; valid names: red, green, blue"):
        TargetColor(rgb="pink")
    with pytest.raises(ConfigError, match=r"metas\[1\]\['color'\]: unknown colour 'teal'.*orange, purple"):
        TargetColor(meta_key="color")(solid((1, 0, 0), n=2), ["a", "b"], [{"color": "red"}, {"color": "teal"}])
    with pytest.raises(ConfigError, match=r"metas\[0\] has no 'color'"):
        TargetColor(meta_key="color")(solid((1, 0, 0)), ["a"], [{"shape": "square"}])
    with pytest.raises(ConfigError, match=r"rgb: .*\[r, g, b\] in 0..1, got \[1.5, 0, 0\]"):
        TargetColor(rgb=[1.5, 0, 0])
    with pytest.raises(ConfigError, match="set rgb .* or meta_key"):
        TargetColor()
    names = {"red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "gray", "orange", "purple"}
    assert set(COLORS) >= names


def test_brightness():
    quarter = solid((0.25, 0.25, 0.25), n=2)
    assert Brightness()(quarter, ["a", "b"], [{}, {}]).tolist() == pytest.approx([0.25, 0.25])
    assert Brightness(target=0.75)(quarter, ["a", "b"], [{}, {}]).tolist() == pytest.approx([0.5, 0.5])
    # Rec. 601 weights
    assert Brightness()(solid((1, 0, 0)), ["a"], [{}]).item() == pytest.approx(0.299)
    lum = Brightness()(solid((0.2, 0.4, 0.6)), ["a"], [{}]).item()
    assert lum == pytest.approx(0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6)
    with pytest.raises(ConfigError, match=r"target: must be in \[0.0, 1.0\]"):
        Brightness(target=2)


def test_box_mask_pixel_centres():
    m = box_mask(torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.5, 1.0], [0.51, 0.51, 0.52, 0.52]]), 8, 8)
    assert m.shape == (3, 8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True
    assert torch.equal(m[0], expected)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:, 0:4] = True  # x in [0, 0.5): columns 0..3, every row
    assert torch.equal(m[1], expected)
    assert m[2].sum() == 1 and m[2, 4, 4]  # no pixel centre inside: the pixel under the box centre


def test_shape_at_exact_values():
    rew = ShapeAt(box=[0.5, 0.5, 1.0, 1.0], rgb="red")
    on_target = red_square((4, 4, 8, 8))
    # inside: all red (match 1); outside: black, match 1 - 1/sqrt(3)
    assert rew(on_target, ["p"], [{}]).item() == pytest.approx(1 / S3, abs=1e-6)
    # same square in the top-left quadrant: inside 16 black; outside 16 red + 32 black
    a = 1 - 1 / S3
    elsewhere = red_square((0, 0, 4, 4))
    assert rew(elsewhere, ["p"], [{}]).item() == pytest.approx(a - (16 + 32 * a) / 48, abs=1e-6)
    assert a - (16 + 32 * a) / 48 == pytest.approx(-1 / (3 * S3))
    # half-overlapping square (rows/cols 2..5): 4 red + 12 black inside, 12 red + 36 black outside -> 0
    assert rew(red_square((2, 2, 6, 6)), ["p"], [{}]).item() == pytest.approx(0.0, abs=1e-6)
    # red square on a cyan background: the complement, match 0 outside -> maximal contrast 1
    assert rew(red_square((4, 4, 8, 8), bg=(0, 1, 1)), ["p"], [{}]).item() == pytest.approx(1.0, abs=1e-6)
    # uniform image: no contrast
    assert rew(solid((1, 0, 0)), ["p"], [{}]).item() == pytest.approx(0.0, abs=1e-6)
    # box covering every pixel: outside term is 0, reward = inside mean
    assert ShapeAt(box=[0, 0, 1, 1], rgb="red")(on_target, ["p"], [{}]).item() == pytest.approx(
        (16 + 48 * (1 - 1 / S3)) / 64, abs=1e-6
    )


def test_shape_at_boxes_and_colours_from_metas_vectorised():
    imgs = torch.cat([red_square((2, 2, 6, 6)), red_square((0, 0, 4, 4)), red_square((0, 0, 4, 4))])
    metas = [
        {"box": [0.25, 0.25, 0.75, 0.75], "color": "red"},
        {"box": [0.0, 0.0, 0.5, 0.5], "color": "red"},  # the red square is where this prompt wants it
        {"box": [0.0, 0.0, 0.5, 0.5], "color": "blue"},
    ]
    out = ShapeAt(box_key="box", color_key="color")(imgs, ["a", "b", "c"], metas)
    # row 2: blue target; inside 16 red pixels (distance sqrt 2), outside 48 black ones (distance 1)
    blue_in = 1 - math.sqrt(2) / S3
    blue_out = 1 - 1 / S3
    assert out.tolist() == pytest.approx([1 / S3, 1 / S3, blue_in - blue_out], abs=1e-6)
    # default colour is white ("a bright shape")
    white = ShapeAt(box=[0.25, 0.25, 0.75, 0.75])
    img = solid((0, 0, 0))
    img[0, :, 2:6, 2:6] = 1.0
    assert white(img, ["p"], [{}]).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ConfigError, match=r"box: a box must be \[x0, y0, x1, y1\].*got \[0.5, 0, 0.2, 1\]"):
        ShapeAt(box=[0.5, 0, 0.2, 1])


def test_build_and_weighted_combination():
    rs = build_image_rewards(
        [
            {"name": "target_color", "meta_key": "color"},
            {"name": "brightness", "weight": 0.5},
            {"name": "target_color", "rgb": "blue", "weight": -2.0},
            {"name": "shape_at", "box": [0, 0, 1, 1], "key": "fill", "weight": 0},
        ]
    )
    assert list(rs.components) == ["target_color_1", "brightness", "target_color_2", "fill"]
    imgs = torch.cat([solid((1, 0, 0)), solid((0, 0, 1))])
    out = rs(imgs, ["a red image", "a blue image"], [{"color": "red"}, {"color": "blue"}])
    tc_blue = 1 - math.sqrt(2 / 3)
    assert out.components["target_color_1"].tolist() == [1.0, 1.0]
    assert out.components["brightness"].tolist() == pytest.approx([0.299, 0.114])
    assert out.components["target_color_2"].tolist() == pytest.approx([tc_blue, 1.0], abs=1e-6)
    assert out.components["fill"].tolist() == pytest.approx([1 - math.sqrt(2) / S3] * 2, abs=1e-6)  # white vs red/blue
    expected = [1 + 0.5 * 0.299 - 2 * tc_blue, 1 + 0.5 * 0.114 - 2 * 1.0]
    assert out.rewards.dtype == torch.float32 and out.rewards.tolist() == pytest.approx(expected, abs=1e-6)
    assert "target_color_1*1" in repr(rs)


def test_spec_validation_errors():
    def err(specs, pattern, exc=ConfigError):
        with pytest.raises(exc, match=pattern):
            build_image_rewards(specs)

    err(
        [{"name": "target_color", "rgb": "red", "colour": "x"}],
        r"task.rewards\[0\].colour: unknown option of image reward 'target_color'; "
        r"valid options: name, weight, key, rgb, meta_key, region",
    )
    err(
        [{"name": "brightness"}, {"name": "target_colr", "rgb": "red"}],
        r"task.rewards\[1\].name: Unknown image reward 'target_colr'. Did you mean 'target_color'\?",
        UnknownNameError,
    )
    err([{"weight": 1.0}], r"task.rewards\[0\].name is missing; valid names: brightness, clip_score")
    err([{"name": "brightness", "weight": "high"}], r"task.rewards\[0\].weight: must be a finite number, got 'high'")
    err([{"name": "target_color", "rgb": "pink"}], r"task.rewards\[0\].rgb: unknown colour 'pink'; valid names")
    err([{"name": "brightness", "target": True}], r"task.rewards\[0\].target: must be a finite number")
    err([{"name": "reward_server"}], r"task.rewards\[0\].url is required for image reward 'reward_server'")
    b = {"name": "brightness"}
    err([{**b, "key": "b"}, {**b, "key": "b"}], r"key 'b' is used by more than one reward")
    err([b, b, {**b, "key": "brightness_1"}], r"reward key 'brightness_1' clashes")  # auto keys brightness_1, _2
    err([], r"task.rewards must be a non-empty list")
    err({"name": "brightness"}, r"task.rewards must be a non-empty list")
    err(["brightness"], r"task.rewards\[0\] must be a mapping")
    with pytest.raises(ConfigError, match=r"diffusion.rewards\[0\].box: set box"):
        build_image_rewards([{"name": "shape_at"}], where="diffusion.rewards")


def test_batch_validation():
    rs = build_image_rewards([{"name": "brightness"}])
    with pytest.raises(ValueError, match=r"images must be a tensor \[N, 3, H, W\]"):
        rs(torch.zeros(2, 8, 8), ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match="got 2 images but 1 prompts"):
        rs(torch.zeros(2, 3, 8, 8), ["a"], [{}, {}])
    assert rs(torch.zeros(2, 3, 8, 8), ["a", "b"]).rewards.tolist() == [0.0, 0.0]  # metas default to {}
