"""The images a host saw, back from its processor's pixel values, with a latent's activations as a heat map.

Qwen2-VL-style processors (those that return `image_grid_thw`) flatten each image into rows of patches,
grouped merge x merge to one language-model token each; this undoes that layout and the normalisation.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def image_runs(is_image: Tensor) -> Tensor:
    """For [batch, seq] image-token flags: the index of the image each position belongs to (images counted in
    row order, the order processors concatenate their pixels in), -1 for text positions."""
    starts = is_image.clone()
    starts[:, 1:] &= ~is_image[:, :-1]
    index = starts.reshape(-1).long().cumsum(0).view_as(is_image) - 1
    return torch.where(is_image, index, torch.full_like(index, -1))


def unpatchify_qwen(pixel_values: Tensor, grid_thw: Tensor, image_processor) -> list[np.ndarray]:
    """Each image of a Qwen2-VL-style batch as uint8 [height, width, 3], resized as the model saw it."""
    p, m = image_processor.patch_size, image_processor.merge_size
    t_patch = image_processor.temporal_patch_size
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    images, offset = [], 0
    for t, h, w in grid_thw.tolist():
        rows = pixel_values[offset: offset + t * h * w].float().cpu()
        offset += t * h * w
        # Rows are (t, h/m, w/m, m, m) and columns (channel, temporal, p, p); keep the first frame.
        patches = rows.view(t, h // m, w // m, m, m, 3, t_patch, p, p)[0, :, :, :, :, :, 0]
        image = patches.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * p, w * p)
        pixels = (image * std + mean) / image_processor.rescale_factor
        images.append(pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    return images


def token_grid(grid_thw: Tensor, image_processor) -> tuple[int, int]:
    """(rows, columns) of language-model tokens one image of this grid becomes."""
    _, h, w = (int(v) for v in grid_thw)
    return h // image_processor.merge_size, w // image_processor.merge_size


def heatmap_png(image: np.ndarray, activations: Tensor, grid: tuple[int, int], vmax: float) -> bytes:
    """The image, darkened, with each token's patch tinted red in proportion to its activation / vmax."""
    rows, cols = grid
    heat = (activations.float().clamp_min(0) / max(vmax, 1e-12)).clamp(max=1).view(rows, cols).numpy()
    heat = np.kron(heat, np.ones((image.shape[0] // rows, image.shape[1] // cols)))[..., None]
    red = np.array([255.0, 40.0, 0.0])
    blended = image * (0.45 + 0.2 * (1 - heat)) + red * heat * 0.55
    out = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
    # Tiny processor images are a few dozen pixels; scale up (nearest) so patches stay sharp on the page.
    scale = max(1, 224 // max(out.size))
    out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()
