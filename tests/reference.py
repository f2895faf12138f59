"""An independent implementation of the reference MAE and LUT computations, written from the spec
(mae_lut.md sections 1-3) with plain tensor operations on state dicts in the official layout. It shares
no code with mimkit, so agreement with it checks mimkit's models, masks, heads, teacher and losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def block(x, sd, name, heads):
    n, t, d = x.shape
    h = layer_norm(x, sd, f"{name}.norm1")
    qkv = h @ sd[f"{name}.attn.qkv.weight"].T + sd[f"{name}.attn.qkv.bias"]
    q, k, v = (z.reshape(n, t, heads, d // heads).transpose(1, 2) for z in qkv.split(d, dim=-1))
    attn = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(n, t, d)
    x = x + out @ sd[f"{name}.attn.proj.weight"].T + sd[f"{name}.attn.proj.bias"]
    h = layer_norm(x, sd, f"{name}.norm2")
    h = F.gelu(h @ sd[f"{name}.mlp.fc1.weight"].T + sd[f"{name}.mlp.fc1.bias"])
    return x + h @ sd[f"{name}.mlp.fc2.weight"].T + sd[f"{name}.mlp.fc2.bias"]


def depth(sd, prefix):
    return len({k.split(".")[1] for k in sd if k.startswith(prefix)})


def patchify(imgs, p):
    """Per patch, row-major over the grid; values in (py, px, c) order."""
    n, _, h, w = imgs.shape
    patches = []
    for row in range(h // p):
        for col in range(w // p):
            cell = imgs[:, :, row * p : (row + 1) * p, col * p : (col + 1) * p]
            patches.append(cell.permute(0, 2, 3, 1).reshape(n, -1))
    return torch.stack(patches, dim=1)


def encode(sd, imgs, keep, heads):
    """cls + kept tokens (in the order of ``keep``; all tokens if None), after the final norm."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    tokens = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    tokens = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
    if keep is not None:
        tokens = torch.stack([tokens[i, keep[i]] for i in range(len(imgs))])
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(len(imgs), -1, -1)
    x = torch.cat([cls, tokens], dim=1)
    for b in range(depth(sd, "blocks.")):
        x = block(x, sd, f"blocks.{b}", heads)
    return layer_norm(x, sd, "norm")


def decode(sd, latent, keep, num_patches, heads=16):
    x = latent @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    n, _, width = x.shape
    full = sd["mask_token"].expand(n, num_patches, width).clone()
    for i in range(n):
        full[i, keep[i]] = x[i, 1:]
    x = torch.cat([x[:, :1], full], dim=1) + sd["decoder_pos_embed"]
    for b in range(depth(sd, "decoder_blocks.")):
        x = block(x, sd, f"decoder_blocks.{b}", heads)
    x = layer_norm(x, sd, "decoder_norm")
    return (x @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:]


def mae_loss(pred, imgs, keep, norm_pix):
    p = round((pred.shape[-1] / 3) ** 0.5)
    target = patchify(imgs, p)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (
            target.var(-1, keepdim=True, unbiased=True) + 1e-6
        ) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    removed = torch.ones(per_patch.shape)
    for i in range(len(keep)):
        removed[i, keep[i]] = 0
    return (per_patch * removed).sum() / removed.sum()


def keep_ids(noise, mask_ratio):
    """Ascending noise is kept; view 1 the first K, view 2 the next K."""
    k = int(noise.shape[1] * (1 - mask_ratio))
    order = torch.argsort(noise, dim=1)
    return order[:, :k], order[:, k : 2 * k]


def mae_forward_loss(sd, imgs, noise, *, mask_ratio, norm_pix, heads, decoder_heads=16):
    keep, _ = keep_ids(noise, mask_ratio)
    latent = encode(sd, imgs, keep, heads)
    return mae_loss(decode(sd, latent, keep, noise.shape[1], decoder_heads), imgs, keep, norm_pix)


def mlp(sd, prefix, x, *, training):
    """Sequential of Linear (no bias), BatchNorm / LayerNorm, ReLU, read off the layout's indices."""
    indices = sorted({int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)})
    for i in range(max(indices) + 1 if indices else 0):
        name = f"{prefix}{i}"
        if f"{name}.running_mean" in sd:
            if training:
                mean, var = x.mean(0), x.var(0, unbiased=False)
            else:
                mean, var = sd[f"{name}.running_mean"], sd[f"{name}.running_var"]
            x = (x - mean) / (var + 1e-5) ** 0.5 * sd[f"{name}.weight"] + sd[f"{name}.bias"]
        elif f"{name}.weight" in sd and sd[f"{name}.weight"].dim() == 2:
            x = x @ sd[f"{name}.weight"].T
        elif f"{name}.weight" in sd:
            x = F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)
        else:
            x = torch.relu(x)
    return x


def lut_forward_loss(
    student, teacher, x1, x2, noise, *, mask_ratio, norm_pix, heads, w_mae, w_bc, decoder_heads=16
):
    """Spec 3.9: student on the two masked views (separately), MIM on view 1, teacher on the full views,
    cross-view 2 - 2 cos. ``teacher`` keys without the 'ema.' prefix."""
    keep1, keep2 = keep_ids(noise, mask_ratio)
    z1, z2 = encode(student, x1, keep1, heads), encode(student, x2, keep2, heads)
    loss_mim = mae_loss(decode(student, z1, keep1, noise.shape[1], decoder_heads), x1, keep1, norm_pix)
    q1 = mlp(student, "predictor.", mlp(student, "head.", z1[:, 1:].mean(1), training=True), training=True)
    q2 = mlp(student, "predictor.", mlp(student, "head.", z2[:, 1:].mean(1), training=True), training=True)
    k1 = mlp(teacher, "head.", encode(teacher, x1, None, heads)[:, 1:].mean(1), training=False)
    k2 = mlp(teacher, "head.", encode(teacher, x2, None, heads)[:, 1:].mean(1), training=False)

    def dist(a, b):
        return (2 - 2 * (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)).mean()

    return w_mae * loss_mim + w_bc * (dist(q2, k1) + dist(q1, k2)) / 2
