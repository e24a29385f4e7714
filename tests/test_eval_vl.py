"""`megasae eval` and `megasae inspect` on a tiny Qwen2.5-VL with images: every figure split by text and
image tokens, and the images the host saw recovered from its pixel values."""

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from megasae import TopKSaeConfig, get_peft_sae_model
from megasae.eval import EvalConfig, InspectConfig, evaluate, run_inspect
from megasae.eval.images import image_runs, unpatchify_qwen
from megasae.eval.plots import density_png, l0_png
from megasae.eval.report import report_markdown
from megasae.models import load_host_model

from data_fixtures import tiny_qwen25vl_processor

TARGET = "model.language_model.layers.1"


@pytest.fixture(scope="module")
def vl_adapter(qwen25vl_dir, tmp_path_factory):
    host, _ = load_host_model(qwen25vl_dir)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vl-adapter")
    config = TopKSaeConfig(k=4, num_latents=64, target_modules=[TARGET])
    get_peft_sae_model(host, config).save_pretrained(path)
    return path


def test_unpatchify_gives_back_the_image_the_model_saw():
    processor = tiny_qwen25vl_processor()
    # 28 x 112 keeps the processor's 56 x 56 pixel area, so it is not resized: 2 x 8 patches, 1 x 4 tokens.
    pixels = np.random.default_rng(0).integers(0, 256, (28, 112, 3), dtype=np.uint8)
    inputs = processor.image_processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 8]]
    (image,) = unpatchify_qwen(inputs["pixel_values"], inputs["image_grid_thw"], processor.image_processor)
    assert image.shape == (28, 112, 3)
    assert np.abs(image.astype(int) - pixels.astype(int)).max() <= 1  # normalisation round trip


def test_image_runs_number_images_in_row_order():
    is_image = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert image_runs(is_image).tolist() == [[-1, 0, 0, -1, 1, -1], [2, 2, -1, -1, -1, -1]]


def test_eval_splits_every_figure_by_text_and_image_tokens(qwen25vl_dir, vl_adapter, chat_data):
    cfg = EvalConfig(adapter=vl_adapter, model=str(qwen25vl_dir), data=str(chat_data), max_tokens=10**6,
                     batch_size=4, ctx_len=64, device="cpu", outlier_factor=None)
    result = evaluate(cfg)
    assert result["sequences"] == 12  # the 12 rows, once
    groups = result["targets"][TARGET]["groups"]
    assert list(groups) == ["all", "text", "image"]
    all_, text, image = groups["all"], groups["text"], groups["image"]
    assert image["tokens"] == 4 * 12  # a 56x56 image is 4 <|image_pad|> tokens, all read by the SAE
    # Every figure is a sum over tokens: the two groups add up to all of them.
    assert text["tokens"] + image["tokens"] == all_["tokens"]
    assert text["predictions"] + image["predictions"] == all_["predictions"]
    for key, count in (("mse", "tokens"), ("cosine_similarity", "tokens"), ("l0", "tokens"),
                       ("ce_clean", "predictions"), ("ce_spliced", "predictions"),
                       ("kl_clean_spliced", "predictions")):
        summed = text[key] * text[count] + image[key] * image[count]
        assert summed == pytest.approx(all_[key] * all_[count]), key
    fired = [np.asarray(g["firing_frequency"]) * g["tokens"] for g in (all_, text, image)]
    np.testing.assert_allclose(fired[1] + fired[2], fired[0], atol=1e-9)
    assert text["fvu"] != image["fvu"] and image["loss_recovered"] is not None


def test_inspect_overlays_the_activating_patches_on_the_image(qwen25vl_dir, vl_adapter, chat_data, tmp_path):
    cfg = InspectConfig(adapter=vl_adapter, model=str(qwen25vl_dir), data=str(chat_data), max_tokens=10**6,
                        batch_size=4, ctx_len=64, device="cpu", outlier_factor=None, tokens="image", top=3,
                        output=tmp_path / "page.html")
    page = run_inspect(cfg).read_text()
    assert len(re.findall(r'<section class="latent"', page)) == 3
    # Only image tokens are read, so every example's strongest token is a patch: one heat map per example.
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == page.count("<li>") > 0
    with Image.open(io.BytesIO(base64.b64decode(images[0]))) as heatmap:
        assert heatmap.size == (224, 224)  # 56 x 56 scaled up 4x
        colors = np.asarray(heatmap.convert("RGB")).reshape(-1, 3)
    assert (colors[:, 0] > colors[:, 2] + 80).any()  # a red-tinted patch
    assert "[image]" in page


def test_image_tokens_only_leave_the_text_column_empty(qwen25vl_dir, vl_adapter, chat_data):
    cfg = EvalConfig(adapter=vl_adapter, model=str(qwen25vl_dir), data=str(chat_data), max_tokens=10**6,
                     batch_size=4, ctx_len=64, device="cpu", outlier_factor=None, tokens="image")
    result = evaluate(cfg)
    groups = result["targets"][TARGET]["groups"]
    assert groups["text"]["tokens"] == 0 and groups["text"]["fvu"] is None
    assert groups["image"]["tokens"] == groups["all"]["tokens"] == 4 * 12
    report = report_markdown(result)
    assert "| tokens read | 48 | 0 | 48 |" in report and "| FVU | " in report and " – |" in report
    for plot in (density_png, l0_png):  # an empty group is left out of the plots
        assert plot(result).startswith(b"\x89PNG")
