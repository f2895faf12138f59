"""An independent implementation of the reference MAE, LUT and Latent MIM computations, written from the
specs (mae_lut.md sections 1-3, latent_mim.md sections 2-7) with plain tensor operations on state dicts in
the official layout. It shares no code with mimkit, so agreement with it checks mimkit's models, masks,
heads, teacher and losses."""

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
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


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


# ---- Latent MIM (latent_mim.md sections 2-7), on the official layout: encoder.*, target_encoder.*, decoder.*


def lmim_gap_patches(imgs, patch, gap, rows, cols):
    """Spec 2: the cell (r, c) of (patch + gap) px gives the patch at (r * cell + rows[r, c], c * cell +
    cols[r, c]), flattened (row, col, channel)."""
    n, channels, h, w = imgs.shape
    cell = patch + gap
    gh, gw = h // cell, w // cell
    out = torch.zeros(n, gh * gw, patch * patch * channels)
    for i in range(n):
        for r in range(gh):
            for c in range(gw):
                y, x = r * cell + int(rows[i, r, c]), c * cell + int(cols[i, r, c])
                out[i, r * gw + c] = imgs[i, :, y : y + patch, x : x + patch].permute(1, 2, 0).reshape(-1)
    return out


def lmim_pos_table(dim, grid):
    """Spec 4: row 0 zeros; row 1 + r * grid + c is [sin(x w), cos(x w), sin(y w), cos(y w)], x the column
    and y the row, each on linspace(0, 1, grid) * grid, w_k = 10000^(-4k/D)."""
    coords = [i / (grid - 1) * grid for i in range(grid)]
    omega = torch.tensor([10000 ** (-4 * k / dim) for k in range(dim // 4)], dtype=torch.float64)
    table = torch.zeros(1 + grid * grid, dim, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            x, y = coords[c] * omega, coords[r] * omega
            table[1 + r * grid + c] = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()])
    return table.float()


def attention(q_in, kv_in, wq, bq, wk, bk, wv, bv, wo, bo, heads):
    n, lq, d = q_in.shape
    q = (q_in @ wq.T + bq).reshape(n, lq, heads, d // heads).transpose(1, 2)
    k = (kv_in @ wk.T + bk).reshape(n, -1, heads, d // heads).transpose(1, 2)
    v = (kv_in @ wv.T + bv).reshape(n, -1, heads, d // heads).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(n, lq, d) @ wo.T + bo


def lmim_encode(sd, prefix, patches, ids, heads):
    """Spec 3: Linear embedding of the chosen pixel patches, cls, position rows (0 for the cls), blocks,
    norm, projector (Linear, LayerNorm eps 1e-5, GELU; a last LayerNorm)."""
    n = patches.shape[0]
    chosen = torch.stack([patches[i, ids[i]] for i in range(n)])
    tokens = chosen @ sd[f"{prefix}embed.proj.weight"].T + sd[f"{prefix}embed.proj.bias"]
    table = sd[f"{prefix}pos_embed.pos_embeds"]
    rows = torch.cat([torch.zeros(n, 1, dtype=torch.long), ids + 1], dim=1)
    x = torch.cat([sd[f"{prefix}cls_token"].expand(n, -1, -1), tokens], dim=1) + table[rows]
    for b in range(depth(sd, f"{prefix}blocks.")):
        x = block(x, sd, f"{prefix}blocks.{b}", heads)
    x = layer_norm(x, sd, f"{prefix}norm")
    layers = sum(1 for k in sd if k.startswith(f"{prefix}head.linear"))
    for i in range(layers):
        x = x @ sd[f"{prefix}head.linear{i}.weight"].T
        x = F.layer_norm(
            x, x.shape[-1:], sd[f"{prefix}head.norm{i}.weight"], sd[f"{prefix}head.norm{i}.bias"]
        )
        if i < layers - 1:
            x = F.gelu(x)
    return x


def lmim_decode(sd, latent, vis_ids, mask_ids, heads):
    """Spec 3 (decoder): queries = mask token + softmax(<pe_q, pe_v> / sqrt(D)) @ embedded visible tokens,
    a cls query; positions on both; blocks of self-attention, cross-attention to the fixed latents, MLP."""
    x = latent @ sd["decoder.embed.weight"].T + sd["decoder.embed.bias"]
    n, _, d = x.shape
    table = sd["decoder.pos_embed.pos_embeds"]
    pe_q, pe_v = table[mask_ids + 1], table[vis_ids + 1]
    cue = torch.softmax(pe_q @ pe_v.transpose(1, 2) / d**0.5, dim=-1) @ x[:, 1:]
    zero = torch.zeros(n, 1, dtype=torch.long)
    queries = torch.cat([sd["decoder.cls_token"].expand(n, -1, -1), sd["decoder.mask_token"] + cue], dim=1)
    queries = queries + table[torch.cat([zero, mask_ids + 1], dim=1)]
    x = x + table[torch.cat([zero, vis_ids + 1], dim=1)]
    for b in range(depth(sd, "decoder.blocks.")):
        name = f"decoder.blocks.{b}"
        h = layer_norm(queries, sd, f"{name}.norm1")
        wq, wk, wv = sd[f"{name}.self_attn.qkv.weight"].split(d)
        bq, bk, bv = sd[f"{name}.self_attn.qkv.bias"].split(d)
        out = attention(
            h,
            h,
            wq,
            bq,
            wk,
            bk,
            wv,
            bv,
            sd[f"{name}.self_attn.proj.weight"],
            sd[f"{name}.self_attn.proj.bias"],
            heads,
        )
        queries = queries + out
        kv = layer_norm(x, sd, f"{name}.norm2kv")
        wk, wv = sd[f"{name}.cross_attn.kv_proj.weight"].split(d)
        bk, bv = sd[f"{name}.cross_attn.kv_proj.bias"].split(d)
        out = attention(
            layer_norm(queries, sd, f"{name}.norm2q"),
            kv,
            sd[f"{name}.cross_attn.q_proj.weight"],
            sd[f"{name}.cross_attn.q_proj.bias"],
            wk,
            bk,
            wv,
            bv,
            sd[f"{name}.cross_attn.proj.weight"],
            sd[f"{name}.cross_attn.proj.bias"],
            heads,
        )
        queries = queries + out
        h = F.gelu(
            layer_norm(queries, sd, f"{name}.norm3") @ sd[f"{name}.mlp.fc1.weight"].T
            + sd[f"{name}.mlp.fc1.bias"]
        )
        queries = queries + h @ sd[f"{name}.mlp.fc2.weight"].T + sd[f"{name}.mlp.fc2.bias"]
    queries = layer_norm(queries, sd, "decoder.norm")
    return queries @ sd["decoder.head.weight"].T + sd["decoder.head.bias"]


def lmim_avg_sim(z):
    """Spec 6.3: mean over b, i, j of cos(z_bi, z_bj), the diagonal included."""
    u = F.normalize(z, dim=-1)
    return torch.einsum("bid,bjd->bij", u, u).mean()


def lmim_infonce(pred, target, tau):
    """Spec 6.1, row by row."""
    pred = (pred - pred.mean(1, keepdim=True)) / (pred.std(1, keepdim=True, unbiased=True) + 1e-4)
    p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    n, m, _ = p.shape
    total = 0.0
    for b in range(n):
        logits = p[b] @ t[b].T / tau
        total = total + sum(-torch.log_softmax(logits[i], dim=0)[i] for i in range(m))
    return total / (n * m) * 2 * tau


def lmim_forward_loss(
    sd, patches, noise, *, num_vis, heads, decoder_heads, tau, coeff, sim_target, mask_target=True
):
    """Spec 5: split, targets from the target encoder on the masked patches (all patches without
    mask_target, keeping the last ones), online encoder on the visible ones, decoder, loss + regulariser."""
    order = torch.argsort(noise, dim=1)
    vis, masked = order[:, :num_vis], order[:, num_vis:]
    target_ids = masked if mask_target else order
    targets = lmim_encode(sd, "target_encoder.", patches, target_ids, heads)[:, -masked.shape[1] :]
    latent = lmim_encode(sd, "encoder.", patches, vis, heads)
    pred = lmim_decode(sd, latent, vis, masked, decoder_heads)[:, 1:]
    loss = lmim_infonce(pred, targets, tau)
    loss = loss + coeff * (lmim_avg_sim(pred) - sim_target) ** 2
    return loss + coeff * (lmim_avg_sim(latent[:, 1:]) - sim_target) ** 2


def enhancing_transformer_shapes(
    prefix: str, width: int, layers: int, hidden: int, project_out: bool = True
) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of an enhancing-transformers ``Transformer`` (pre-norm attention without qkv
    bias, an output projection unless a single head, Tanh MLP, final norm) under ``prefix``: the layout of
    ViT-VQGAN's and TokenAdapt's official state dicts, written from their module definitions."""
    keys: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        layer = f"{prefix}.transformer.layers.{i}"
        keys[f"{layer}.0.norm.weight"] = keys[f"{layer}.0.norm.bias"] = (width,)
        keys[f"{layer}.0.fn.to_qkv.weight"] = (3 * width, width)
        if project_out:
            keys[f"{layer}.0.fn.to_out.weight"] = (width, width)
            keys[f"{layer}.0.fn.to_out.bias"] = (width,)
        keys[f"{layer}.1.norm.weight"] = keys[f"{layer}.1.norm.bias"] = (width,)
        keys[f"{layer}.1.fn.net.0.weight"] = (hidden, width)
        keys[f"{layer}.1.fn.net.0.bias"] = (hidden,)
        keys[f"{layer}.1.fn.net.2.weight"] = (width, hidden)
        keys[f"{layer}.1.fn.net.2.bias"] = (width,)
    keys[f"{prefix}.transformer.norm.weight"] = keys[f"{prefix}.transformer.norm.bias"] = (width,)
    return keys
