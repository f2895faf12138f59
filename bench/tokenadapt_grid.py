"""Usage: python bench/tokenadapt_grid.py RUN VAL IMAGES (a `mimkit tokenadapt train` run folder, held-out
images, how many). Held-out token accuracy of a trained TokenAdapt at the tokenizer's grid G and at the grid
U = 7/8 G a token model takes (SeiT++ on ImageNet: 32 -> 28, f-space 64 -> 56).

Pairs as `mimkit tokenadapt train` makes them at G (one draw of the geometry per image). At G: g's ids
against the tokenizer's ids of the augmented image T(A(x)). At U the f-space crop is resized to 2U; no
tokenizer gives ids at U, so the target is T(A(x)) taken to U as the crop path takes a grid (codebook
vectors, bicubic, re-quantised). Scored against it: g used at U; g at G with its output taken to U the
same way; the geometry on the emb map (no TokenAdapt). Prints one JSON object.
"""

import json
import sys

import torch
import torch.nn.functional as F

from mimkit.data.device import to_device
from mimkit.data.source_spec import build_source
from mimkit.data.sources import Subset
from mimkit.interop.load import load_method
from mimkit.methods.token_views import apply_geometry
from mimkit.methods.tokenadapt import PairedViews, _geo_params
from mimkit.runs.tokenizer_lifecycle import image_batches
from mimkit.tokens.codebook import embed, requantize

run, val, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
method, _, _ = load_method(f"{run}/last.pt")
method.eval()
G = method.loaded.model.shape.grid
# the pairs at the tokenizer's grid whatever grid g was trained at (the same draws for every run)
views = PairedViews(
    method.loaded.model, method.spec.mean, method.spec.std, method.cfg.min_crop_scale, G
).eval()
cb = views.codebook
U = G * 7 // 8
source = Subset(build_source(val, image_size=method.spec.img_size), n)


def to_grid(ids, size):
    """ids [B, G, G] -> [B, size, size] as the crop path resizes (codebook vectors, bicubic, re-quantised)."""
    return requantize(
        F.interpolate(embed(ids, cb), size=(size, size), mode="bicubic", align_corners=False), cb
    )


sums, count = {}, 0
with torch.no_grad():
    for batch in image_batches(source, method.train_transform(None), batch_size=250, num_workers=0):
        b = views(to_device(batch, torch.device("cpu")))
        params, target = _geo_params(b), b["target"]
        feat = method.tokenadapt.lift(b["emb"])
        pred_g = method.tokenadapt.invert_logits(apply_geometry(feat, params, 2 * G)).argmax(1)
        pred_u = method.tokenadapt.invert_logits(apply_geometry(feat, params, 2 * U)).argmax(1)
        target_u = to_grid(target, U)
        finer = F.interpolate(b["emb"], scale_factor=2, mode="nearest")
        warped_u = requantize(F.avg_pool2d(apply_geometry(finer, params, 2 * U), 2), cb)
        k = len(target)
        acc = {
            f"G={G}: g (trained grid) vs T(A(x))": (pred_g == target),
            f"G={G}: geometry on emb map, re-quantised": (b["warped"] == target),
            f"U={U}: g used at U vs target at U": (pred_u == target_u),
            f"U={U}: g at G, output taken to U": (to_grid(pred_g, U) == target_u),
            f"U={U}: geometry on emb map at U, re-quantised": (warped_u == target_u),
        }
        for key, hit in acc.items():
            sums[key] = sums.get(key, 0.0) + hit.float().mean().item() * k
        count += k
accuracy = {key: round(100 * total / count, 2) for key, total in sums.items()}
print(json.dumps({"run": run, "val": val, "images": count, "token_accuracy_pct": accuracy}, indent=2))
