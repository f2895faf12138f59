"""Codebook I/O, re-quantization and synonyms (mimkit.tokens.codebook; SeiT / SeiT++ spec §2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

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
