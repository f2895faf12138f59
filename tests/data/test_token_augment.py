"""Codebook I/O, re-quantization, synonyms and token augmentations (SeiT / SeiT++ spec §2-3)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mimkit.data.token_augment import (
    ColourChoice,
    SwapParams,
    TokenEDA,
    TokenMixup,
    apply_swap_code,
    color_adapt,
    colour_choice,
    emb_noise,
    replace_synonym,
    swap_code,
    swap_code_params,
    token_eda,
    token_mixup,
)
from mimkit.data.token_geometry import (
    CropBoxes,
    TokenRandomResizedCrop,
    center_crop,
    hflip,
    random_crop,
    random_resized_crop,
    resized_crop,
    rrc_params,
)
from mimkit.tokens.codebook import (
    build_synonyms,
    embed,
    load_codebook,
    load_synonyms,
    requantize,
    save_codebook,
    save_synonyms,
    synonym_counts,
    synonym_table,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_codebook(k: int = 40, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, d, generator=gen(seed))


def ring_codebook(degrees: list[float], radius: list[float] | None = None) -> torch.Tensor:
    """2-D codes at the given angles, so cosine similarities are known by hand."""
    radius = radius or [1.0] * len(degrees)
    angles = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return (torch.stack([angles.cos(), angles.sin()], 1) * torch.tensor(radius).unsqueeze(1)).float()


# --------------------------------------------------------------------------------------- codebook I/O


def test_codebook_ckpt_is_a_bare_tensor_and_round_trips(tmp_path):
    codebook = random_codebook(7, 3)
    path = save_codebook(codebook[:4], tmp_path / "codebook.ckpt")  # a view: only its rows are stored
    raw = torch.load(path, weights_only=True)
    assert type(raw) is torch.Tensor and raw.shape == (4, 3) and raw.untyped_storage().nbytes() == 4 * 3 * 4
    assert torch.equal(load_codebook(path), codebook[:4])


def test_codebook_safetensors_round_trip_and_dtype(tmp_path):
    codebook = random_codebook(5, 4).double()
    path = save_codebook(codebook, tmp_path / "cb.safetensors")
    assert list(load_file(str(path))) == ["codebook"]
    loaded = load_codebook(path)
    assert loaded.dtype == torch.float32 and torch.equal(loaded, codebook.float())


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            {"weight": torch.zeros(3, 2)},
            r"bad\.ckpt: expected a codebook tensor \[K, D\], found a dict with keys \['weight'\]",
        ),
        (
            torch.zeros(3, 2, 1),
            r"bad\.ckpt: expected a 2-D codebook tensor \[K, D\], found shape \(3, 2, 1\)",
        ),
        (
            torch.zeros(3, 2, dtype=torch.long),
            r"bad\.ckpt: expected a floating-point codebook, found dtype torch\.int64",
        ),
    ],
)
def test_load_codebook_rejects_non_codebooks(tmp_path, content, match):
    torch.save(content, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=match):
        load_codebook(tmp_path / "bad.ckpt")


class Hostile:
    def __reduce__(self):
        return (print, ("this ran",))


def test_load_codebook_names_unreadable_files_and_refuses_hostile_ones(tmp_path, capsys):
    (tmp_path / "junk.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"junk\.ckpt: truncated or not a checkpoint \(") as err:
        load_codebook(tmp_path / "junk.ckpt")
    assert "weights_only" not in str(err.value)
    torch.save({"codebook": Hostile()}, tmp_path / "evil.ckpt")
    with pytest.raises(
        ValueError, match=r"evil\.ckpt: refused as unsafe: it holds a pickled '.*print'"
    ) as err:
        load_codebook(tmp_path / "evil.ckpt")
    assert "weights_only" not in str(err.value) and "this ran" not in capsys.readouterr().out
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other\.safetensors: no tensor 'codebook' \(found \['weight'\]\)"):
        load_codebook(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"xx")
    with pytest.raises(ValueError, match=r"junk\.safetensors: truncated or not a safetensors file"):
        load_codebook(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match=r"cb\.npy: unknown codebook file type"):
        save_codebook(torch.zeros(2, 2), tmp_path / "cb.npy")


# ------------------------------------------------------------------------------ embed and requantize


def test_embed_uses_rows_untouched():
    codebook = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    ids = torch.tensor([[[0, 2], [1, 1]]])
    emb = embed(ids, codebook)
    assert emb.shape == (1, 2, 2, 2)
    assert torch.equal(emb[0, 0], torch.tensor([[1.0, 5.0], [3.0, 3.0]]))
    assert torch.equal(emb[0, 1], torch.tensor([[2.0, 6.0], [4.0, 4.0]]))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 3\), found values from 0 to 3"):
        embed(torch.tensor([[[0, 3]]]), codebook)


def test_requantize_returns_each_rows_own_id_and_first_of_duplicates():
    codebook = random_codebook(50, 8)
    codebook[17] = codebook[4]  # an exact duplicate resolves to the first id
    codebook[23] = codebook[4]
    ids = torch.arange(50).view(2, 5, 5)
    expected = ids.clone()
    expected[(ids == 17) | (ids == 23)] = 4
    assert torch.equal(requantize(embed(ids, codebook), codebook), expected)
    assert torch.equal(requantize(embed(ids, codebook), codebook, chunk=7), expected)
    # scaling a vector does not change its nearest code by cosine
    assert torch.equal(requantize(0.01 * embed(ids, codebook), codebook, chunk=3), expected)


def test_requantize_picks_the_nearest_direction_on_a_fixed_example():
    codebook = ring_codebook([0, 90, 180], radius=[1.0, 5.0, 0.1])
    vectors = torch.tensor([[0.9, 0.5], [0.1, 2.0], [-3.0, 2.9], [-3.0, 3.1], [0.3, -0.2]])  # [5, 2]
    emb = vectors.T.reshape(1, 2, 1, 5)
    assert requantize(emb, codebook).tolist() == [[[0, 1, 2, 1, 0]]]
    with pytest.raises(ValueError, match="emb map has 2 channels but the codebook rows have 3 dimensions"):
        requantize(emb, torch.zeros(4, 3))


# ------------------------------------------------------------------------------------------- synonyms


def test_build_synonyms_ranks_by_cosine_on_a_fixed_ring():
    codebook = ring_codebook([0, 10, 30, 100, 180], radius=[1, 2, 3, 4, 5])
    syn = build_synonyms(codebook, k=3)
    assert syn == {0: [1, 2, 3], 1: [0, 2, 3], 2: [1, 0, 3], 3: [2, 4, 1], 4: [3, 2, 1]}
    with_self = build_synonyms(codebook, k=3, include_self=True)
    assert with_self[0] == [0, 1, 2] and with_self[4] == [4, 3, 2]
    # asking for more neighbours than exist gives all the others
    assert build_synonyms(codebook, k=32)[2] == [1, 0, 3, 4]


def test_build_synonyms_breaks_ties_by_id_and_sorts_by_similarity():
    codebook = ring_codebook([0, 45, 0, 0, 90])
    assert build_synonyms(codebook, k=4)[0] == [2, 3, 1, 4]
    assert build_synonyms(codebook, k=4)[3] == [0, 2, 1, 4]
    codebook = random_codebook(30, 6)
    rows = F.normalize(codebook.double(), dim=1)
    for code, ranked in build_synonyms(codebook, k=8, chunk=7).items():
        sims = (rows[ranked] @ rows[code]).tolist()
        assert code not in ranked and len(ranked) == 8 and sims == sorted(sims, reverse=True)
        best_other = max(((rows[j] @ rows[code]).item(), -j) for j in range(30) if j != code)
        assert ranked[0] == -best_other[1]


def test_synonym_json_round_trip_keeps_seit_layout(tmp_path):
    syn = {0: [2, 1], 1: [0], 2: []}
    path = save_synonyms(syn, tmp_path / "codebook-synonyms.json")
    assert json.loads(path.read_text()) == {"0": [2, 1], "1": [0], "2": []}
    assert list(json.loads(path.read_text())) == ["0", "1", "2"]
    assert load_synonyms(path) == syn
    assert load_synonyms(path, vocab_size=3) == syn


@pytest.mark.parametrize(
    ("raw", "vocab", "match"),
    [
        (
            {"0": [1], "1": [0], "2": [5]},
            None,
            r"key '2': expected a list of token ids in \[0, 3\), got \[5\]",
        ),
        ({"0": [1], "1": ["0"]}, None, r"key '1': expected a list of token ids in \[0, 2\), got \['0'\]"),
        ({"0": [1], "1": [True]}, None, r"key '1': expected a list of token ids"),
        ({"0": [1], "01": [0]}, None, r"key '01' is not a decimal token id"),
        ({"0": [1], "x": [0]}, None, r"key 'x' is not a decimal token id"),
        ({"0": [1], "2": [0]}, None, r"key '2' is not a token id in 0\.\.1"),
        ({"0": [1], "1": [0]}, 3, r"no entry for token ids \[2\] \(expected keys '0'\.\.'2'\)"),
        ({"0": 1}, None, r"key '0': expected a list of token ids in \[0, 1\), got 1"),
        ([[1], [0]], None, r"expected a JSON object mapping token ids to synonym lists, got list"),
    ],
)
def test_load_synonyms_validates_and_names_file_and_key(tmp_path, raw, vocab, match):
    path = tmp_path / "syn.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"syn\.json: " + match):
        load_synonyms(path, vocab_size=vocab)


def test_load_synonyms_rejects_invalid_json(tmp_path):
    (tmp_path / "syn.json").write_text('{"0": [1,')
    with pytest.raises(ValueError, match=r"syn\.json: not a valid JSON synonym file"):
        load_synonyms(tmp_path / "syn.json")


def test_synonym_table_truncates_repeats_and_maps_empty_lists_to_self():
    syn = {0: [1, 2, 3, 4, 5, 0], 1: [2, 0], 2: [], 3: [0], 4: [0, 1, 2, 3, 5], 5: [4, 4, 4]}
    assert synonym_table(syn, thres=5).tolist() == [
        [1, 2, 3, 4, 5],
        [2, 0, 2, 0, 2],
        [2, 2, 2, 2, 2],
        [0, 0, 0, 0, 0],
        [0, 1, 2, 3, 5],
        [4, 4, 4, 4, 4],
    ]
    assert synonym_counts(syn, thres=5).tolist() == [5, 2, 1, 1, 5, 3]


# ------------------------------------------------------------------------------------- ReplaceSynonym


def shift_table(vocab: int = 10, thres: int = 5) -> torch.Tensor:
    """Code i's synonyms are i+1 .. i+thres (mod K): never itself, each column recognisable."""
    return (torch.arange(vocab).unsqueeze(1) + torch.arange(1, thres + 1)) % vocab


def test_replace_synonym_uses_only_listed_synonyms_at_the_given_rate():
    table = shift_table()
    ids = torch.randint(0, 10, (8, 64, 64), generator=gen(1))
    out = replace_synonym(ids, table, 0.25, generator=gen(2))
    assert out.shape == ids.shape and out.dtype == torch.long
    changed = out != ids
    column = (out - ids) % 10 - 1  # which synonym was picked where changed
    assert bool(((column >= 0) & (column < 5))[changed].all())
    assert abs(changed.float().mean().item() - 0.25) < 0.02  # 32768 draws: 8 standard deviations
    shares = torch.bincount(column[changed], minlength=5).float() / changed.sum()
    assert torch.allclose(shares, torch.full((5,), 0.2), atol=0.02)
    assert torch.equal(out, replace_synonym(ids, table, 0.25, generator=gen(2)))
    assert torch.equal(replace_synonym(ids, table, 0.0, generator=gen(2)), ids)
    assert bool((replace_synonym(ids, table, 1.0, generator=gen(2)) != ids).all())


def test_replace_synonym_counts_keep_short_lists_uniform():
    syn = {i: [(i + 1) % 4, (i + 2) % 4] for i in range(4)}
    ids = torch.zeros(4, 50, 50, dtype=torch.long)
    out = replace_synonym(ids, synonym_table(syn), 1.0, generator=gen(3), counts=synonym_counts(syn))
    assert set(out.unique().tolist()) == {1, 2}
    assert abs((out == 1).float().mean().item() - 0.5) < 0.03
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 4\)"):
        replace_synonym(ids + 4, synonym_table(syn), 0.5)


# ------------------------------------------------------------------------------------------- SwapCode


def swap_by_slicing(ids: torch.Tensor, side: int, first: tuple[int, int], second: tuple[int, int]):
    """SeiT's per-sample write order, on a plain 2-D grid."""
    (r0, c0), (r1, c1), s = first, second, side
    out = ids.clone()
    out[r0 : r0 + s, c0 : c0 + s] = ids[r1 : r1 + s, c1 : c1 + s]
    out[r1 : r1 + s, c1 : c1 + s] = ids[r0 : r0 + s, c0 : c0 + s]
    return out


def test_apply_swap_code_moves_blocks_exactly_including_overlap():
    ids = torch.arange(3 * 8 * 8).view(3, 8, 8)
    params = SwapParams(
        torch.tensor([3, 3, 0]),
        torch.tensor([[0, 0], [1, 1], [2, 2]]),
        torch.tensor([[4, 5], [3, 3], [5, 5]]),  # sample 1 overlaps, sample 2 is a no-op
    )
    out = apply_swap_code(ids, params)
    for b in range(3):
        side, first, second = params.side[b].item(), params.first[b].tolist(), params.second[b].tolist()
        assert torch.equal(out[b], swap_by_slicing(ids[b], side, first, second))
    assert out[0, 4, 5].item() == ids[0, 0, 0].item() and out[0, 0, 0].item() == ids[0, 4, 5].item()
    assert out[1, 3, 3].item() == ids[1, 1, 1].item()  # the second write wins on the overlap
    assert torch.equal(out[2], ids[2])


def test_swap_code_draws_valid_params_per_sample():
    ids = torch.randint(0, 391, (64, 32, 32), generator=gen(4))
    out, (side, first, second) = swap_code(ids, 0.25, generator=gen(5), return_params=True)
    assert out.shape == ids.shape and out.dtype == ids.dtype
    assert int(side.min()) >= 0 and int(side.max()) <= 7 and len(side.unique()) > 3
    assert bool(((first >= 0) & (first <= 31 - side.unsqueeze(1))).all())
    assert bool(((second >= 0) & (second <= 31 - side.unsqueeze(1))).all())
    assert bool(((first - second).double().norm(dim=1) > side).all())
    for b in range(64):
        expected = swap_by_slicing(ids[b], side[b].item(), first[b].tolist(), second[b].tolist())
        assert torch.equal(out[b], expected)
    assert torch.equal(swap_code(ids, 0.0, generator=gen(5)), ids)


def test_swap_code_rejects_corners_exactly_s_apart():
    side, first, second = swap_code_params(300, 3, 3, 0.6, generator=gen(36))
    assert set(side.tolist()) == {0, 1}
    # on a 3x3 grid, blocks of side 1 have corners in [0, 1]^2: only diagonal pairs are more than 1 apart
    assert set((first - second)[side == 1].square().sum(1).tolist()) == {2}


def test_swap_code_refuses_a_scale_with_no_valid_corners():
    with pytest.raises(ValueError, match=r"swap scale 0\.9 allows blocks of side 3 on a 4x4 grid"):
        swap_code_params(2, 4, 4, 0.9)


# ------------------------------------------------------------------------------------------ Token-EDA


def test_token_eda_applies_one_op_per_sample():
    table = shift_table()
    ids = torch.randint(0, 10, (400, 8, 8), generator=gen(6))
    out, choice = token_eda(ids, table, 0.25, 0.25, generator=gen(7), return_choice=True)
    counts = torch.bincount(choice, minlength=3).tolist()
    assert all(abs(c - e) < 45 for c, e in zip(counts, [100, 100, 200], strict=True))
    same = (out == ids).flatten(1).all(1)
    assert bool(same[choice == 2].all())
    replaced = choice == 0
    delta = ((out - ids) % 10)[replaced]
    assert bool(((delta == 0) | ((delta >= 1) & (delta <= 5))).all())
    swapped = choice == 1
    assert torch.equal(out[swapped].flatten(1).sort(1).values, ids[swapped].flatten(1).sort(1).values)
    assert torch.equal(out, TokenEDA(table, 0.25, 0.25)(ids, generator=gen(7)))
    with pytest.raises(ValueError, match=r"sum to at most 1, got rc_prob=0\.75, sc_prob=0\.5"):
        token_eda(ids, table, 0.75, 0.5)


# ---------------------------------------------------------------------------------- geometric crops


def crop_then_interpolate(x: torch.Tensor, boxes: CropBoxes, size: int) -> torch.Tensor:
    crops = []
    for b in range(x.shape[0]):
        t, left, h, w = (int(v[b]) for v in boxes)
        crop = x[b : b + 1, :, t : t + h, left : left + w]
        crops.append(F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False))
    return torch.cat(crops)


def test_resized_crop_equals_crop_then_interpolate():
    x = torch.randn(6, 3, 32, 32, generator=gen(8))
    boxes = CropBoxes(  # up- and downscaling, thin, full, corner and edge boxes
        torch.tensor([0, 3, 10, 0, 20, 5]),
        torch.tensor([0, 7, 0, 31, 2, 0]),
        torch.tensor([32, 10, 22, 32, 12, 27]),
        torch.tensor([32, 25, 32, 1, 30, 29]),
    )
    assert torch.allclose(resized_crop(x, boxes, 28), crop_then_interpolate(x, boxes, 28), atol=2e-5)
    assert torch.allclose(resized_crop(x, boxes, 40), crop_then_interpolate(x, boxes, 40), atol=2e-5)
    out, drawn = random_resized_crop(x, 28, (0.08, 1.0), generator=gen(9), return_params=True)
    assert out.shape == (6, 3, 28, 28)
    assert torch.allclose(out, crop_then_interpolate(x, drawn, 28), atol=2e-5)
    with pytest.raises(ValueError, match="crop boxes must lie inside the 32x32 maps"):
        resized_crop(x, CropBoxes(*(torch.full((6,), v) for v in (20, 0, 13, 5))), 28)


def test_rrc_params_follow_torchvision_bounds_and_fallback():
    boxes = rrc_params(2000, 32, 32, (0.2, 1.0), generator=gen(10))
    top, left, h, w = boxes
    assert bool(((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0)).all())
    assert bool(((top + h <= 32) & (left + w <= 32)).all())
    aspect = w.double() / h.double()
    area = (w * h).double() / 1024
    # rounding to whole tokens blurs the bounds by at most half a token per side
    assert bool((area >= ((32 * math.sqrt(0.2) - 1) / 32) ** 2).all())
    assert bool(((aspect > 0.6) & (aspect < 1.7)).all())
    assert len(top.unique()) > 10 and len(h.unique()) > 10
    # no ratio in [10, 20] fits a square grid: centre crop of width 32, height round(32 / 10)
    fallback = rrc_params(3, 32, 32, (0.08, 1.0), (10.0, 20.0), generator=gen(11))
    assert [v.tolist() for v in fallback] == [[14] * 3, [0] * 3, [3] * 3, [32] * 3]
    # a fixed 16x16 box: offsets are uniform over 0..16 inclusive, as torch.randint(0, 32 - 16 + 1)
    top, left, h, w = rrc_params(2000, 32, 32, (0.25, 0.25), (1.0, 1.0), generator=gen(37))
    assert set(h.tolist()) == set(w.tolist()) == {16}
    assert set(top.tolist()) == set(left.tolist()) == set(range(17))
    full = rrc_params(4, 32, 32, (1.0, 1.0), (1.0, 1.0), generator=gen(12))
    assert [v.tolist() for v in full] == [[0] * 4, [0] * 4, [32] * 4, [32] * 4]


def test_full_box_rrc_requantizes_to_the_same_ids():
    codebook = random_codebook(20, 8)
    ids = torch.randint(0, 20, (3, 32, 32), generator=gen(13))
    out = TokenRandomResizedCrop(32, (1.0, 1.0), (1.0, 1.0))(embed(ids, codebook), generator=gen(14))
    assert torch.equal(requantize(out, codebook), ids)


def test_center_and_random_crop_and_hflip():
    x = torch.arange(2 * 35 * 35).view(2, 1, 35, 35)
    assert torch.equal(center_crop(x, 28), x[..., 3:31, 3:31])
    assert torch.equal(center_crop(x[:, 0, :32, :32], 28), x[:, 0, 2:30, 2:30])
    ids = torch.arange(5 * 32 * 32).view(5, 32, 32)
    out, (top, left, h, w) = random_crop(ids, 28, generator=gen(15), return_params=True)
    assert out.shape == (5, 28, 28) and h.tolist() == [28] * 5 and w.tolist() == [28] * 5
    for b in range(5):
        assert torch.equal(out[b], ids[b, top[b] : top[b] + 28, left[b] : left[b] + 28])
    _, (top, left, _, _) = random_crop(ids[:1].expand(300, -1, -1), 28, generator=gen(38), return_params=True)
    assert set(top.tolist()) == set(left.tolist()) == set(range(5))
    emb = torch.randn(16, 3, 4, 4, generator=gen(16))
    flipped, which = hflip(emb, 0.5, generator=gen(17), return_selected=True)
    assert 0 < int(which.sum()) < 16
    assert torch.equal(flipped[which], emb[which].flip(-1)) and torch.equal(flipped[~which], emb[~which])


# ------------------------------------------------------------------------------------ Noise, ColorAdapt


def test_emb_noise_changes_exactly_half_and_leaves_the_rest_bit_identical():
    x = torch.randn(7, 4, 5, 5, generator=gen(18))
    before = x.clone()
    out, selected = emb_noise(x, generator=gen(19), return_selected=True)
    assert torch.equal(x, before)  # not in place
    assert int(selected.sum()) == 3
    assert torch.equal(out[~selected], x[~selected])
    assert bool((out[selected] != x[selected]).all())
    # std = 0 leaves only the per-channel offset: constant over positions
    offset_only, chosen = emb_noise(x, scale=2.0, std=0.0, generator=gen(20), return_selected=True)
    delta = offset_only[chosen] - x[chosen]
    assert torch.allclose(delta, delta[..., :1, :1].expand_as(delta), atol=1e-6)
    big = emb_noise(torch.zeros(64, 8, 16, 16), scale=0.0, std=1.0, generator=gen(21))
    assert int((big.flatten(1).abs().sum(1) > 0).sum()) == 32
    assert abs(big[big != 0].std().item() - 1.0) < 0.02


def test_color_adapt_is_adain_with_the_reversed_batch():
    x = torch.randn(4, 3, 3, 5, generator=gen(22)) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 1.0
    before = x.clone()
    out, selected = color_adapt(x, eps=0.0, generator=gen(23), return_selected=True)
    assert torch.equal(x, before) and int(selected.sum()) == 2
    assert torch.equal(out[~selected], x[~selected])
    for i in selected.nonzero().flatten().tolist():
        j = 3 - i
        for c in range(3):
            mine, style = x[i, c].flatten().tolist(), x[j, c].flatten().tolist()
            mu_i, mu_j = sum(mine) / 15, sum(style) / 15
            sd_i = math.sqrt(sum((v - mu_i) ** 2 for v in mine) / 14)
            sd_j = math.sqrt(sum((v - mu_j) ** 2 for v in style) / 14)
            expected = torch.tensor([(v - mu_i) / sd_i * sd_j + mu_j for v in mine]).view(3, 5)
            assert torch.allclose(out[i, c], expected, atol=1e-5)
    # eps adds to the unbiased std of the content sample only
    out, selected = color_adapt(x, eps=0.5, generator=gen(23), return_selected=True)
    i = int(selected.nonzero()[0])
    mine, style = x[i].flatten(1), x[3 - i].flatten(1)
    expected = (mine - mine.mean(1, keepdim=True)) / (mine.std(1, keepdim=True) + 0.5) * style.std(
        1, keepdim=True
    ) + style.mean(1, keepdim=True)
    assert torch.allclose(out[i].flatten(1), expected, atol=1e-6)
    assert mine.std(1).tolist() != mine.std(1, correction=0).tolist()
    constant = torch.ones(2, 1, 4, 4)
    constant[1] = torch.arange(16.0).view(4, 4)
    restyled = color_adapt(constant, fraction=1.0, generator=gen(24))
    assert bool(restyled.isfinite().all()) and torch.allclose(restyled[0], torch.full((1, 4, 4), 7.5))


def test_colour_choice_picks_one_branch_per_batch():
    x = torch.randn(4, 2, 3, 3, generator=gen(25))
    g, reference = gen(26), gen(26)
    out, choice = colour_choice(x, 0.0, 1.0, generator=g, return_choice=True)
    torch.rand(1, generator=reference)  # the branch draw
    assert choice == "coloradapt" and torch.equal(out, color_adapt(x, generator=reference))
    out, choice = colour_choice(x, 1.0, 0.0, generator=gen(27), return_choice=True)
    assert choice == "noise" and int((out != x).flatten(1).any(1).sum()) == 2
    out, choice = colour_choice(x, 0.0, 0.0, return_choice=True)
    assert choice == "identity" and out is x
    g = gen(28)
    picks = [colour_choice(x, 0.5, 0.25, generator=g, return_choice=True)[1] for _ in range(800)]
    assert abs(picks.count("noise") - 400) < 60 and abs(picks.count("coloradapt") - 200) < 50
    assert torch.equal(
        ColourChoice(0.0, 1.0)(x, generator=gen(29)), colour_choice(x, 0.0, 1.0, generator=gen(29))
    )


# --------------------------------------------------------------------------------------- Mixup / CutMix


def test_token_mixup_blends_with_the_reversed_batch():
    x = torch.randn(4, 3, 6, 6, generator=gen(30))
    target = torch.tensor([0, 1, 2, 3])
    before = x.clone()
    np.random.seed(0)
    mixed, soft = token_mixup(x, target, num_classes=5, mixup_alpha=0.8, cutmix_alpha=0.0)
    assert torch.equal(x, before) and soft.shape == (4, 5)
    off, on = 0.1 / 5, 1 - 0.1 + 0.1 / 5
    lam = (soft[0, 0].item() - off) / (on - off)
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.allclose(
        soft[0], torch.tensor([on * lam + off * (1 - lam), off, off, lam * off + (1 - lam) * on, off])
    )


def test_token_cutmix_pastes_one_box_from_the_reversed_batch():
    x = torch.randn(4, 2, 8, 8, generator=gen(31))
    np.random.seed(0)  # a 5x5 box
    mixed, soft = TokenMixup(num_classes=4)(x, torch.tensor([0, 1, 2, 3]))
    pasted = (mixed != x).any(1)  # [B, H, W]
    assert torch.equal(mixed[:, :, pasted[0]], x.flip(0)[:, :, pasted[0]])
    assert torch.equal(mixed[:, :, ~pasted[0]], x[:, :, ~pasted[0]])
    rows, cols = pasted[0].nonzero().unbind(1)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert int(box) == int(pasted[0].sum()) > 0  # a rectangle
    lam = 1 - box.item() / 64  # timm corrects lambda to the clipped box area
    off, on = 0.1 / 4, 1 - 0.1 + 0.1 / 4
    assert soft[0, 0].item() == pytest.approx(on * lam + off * (1 - lam), abs=1e-6)
    with pytest.raises(ValueError, match="needs an even batch, got 3"):
        token_mixup(x[:3], torch.tensor([0, 1, 2]), num_classes=4)


# -------------------------------------------------------------------------------------- end to end


def test_continuous_augmentations_requantize_to_valid_ids():
    codebook = random_codebook(391, 32)
    ids = torch.randint(0, 391, (8, 32, 32), generator=gen(32))
    g = gen(33)
    ids = token_eda(ids, synonym_table(build_synonyms(codebook, k=5)), 0.25, 0.25, generator=g)
    emb = colour_choice(embed(ids, codebook), 0.5, 0.25, generator=g)
    emb = random_resized_crop(emb, 28, (0.08, 1.0), generator=g)
    np.random.seed(2)
    emb, _ = token_mixup(emb, torch.arange(8), num_classes=10)
    out = requantize(emb, codebook)
    assert out.shape == (8, 28, 28) and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < 391


def test_a_given_generator_leaves_the_global_rng_alone():
    codebook = random_codebook(12, 4)
    ids = torch.randint(0, 12, (4, 8, 8), generator=gen(34))
    emb = embed(ids, codebook)
    table = synonym_table(build_synonyms(codebook, k=3))
    state = torch.get_rng_state()
    g = gen(35)
    token_eda(ids, table, 0.5, 0.5, generator=g)
    random_crop(ids, 6, generator=g)
    hflip(emb, generator=g)
    random_resized_crop(emb, 6, generator=g)
    emb_noise(emb, generator=g)
    color_adapt(emb, generator=g)
    colour_choice(emb, 0.5, 0.5, generator=g)
    assert torch.equal(torch.get_rng_state(), state)
