import json

import numpy as np
import pytest

from retrieval.index import IndexMismatch, VectorIndex


def _unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_search_matches_numpy_brute_force(tmp_path, index_type):
    rng = np.random.default_rng(0)
    vecs, queries = _unit(rng, 500, 32), _unit(rng, 20, 32)
    ids = np.arange(1000, 1500)
    index = VectorIndex(tmp_path, embedder="e", dim=32, index_type=index_type)
    index.add(ids.tolist(), vecs)
    scores, got = index.search(queries, 5)
    expected = ids[np.argsort(-(queries @ vecs.T), axis=1)[:, :5]]
    recall = np.mean([len(set(g) & set(e)) / 5 for g, e in zip(got, expected, strict=True)])
    assert recall >= (1.0 if index_type == "flat" else 0.8)
    if index_type == "flat":
        np.testing.assert_allclose(scores[:, 0], np.max(queries @ vecs.T, axis=1), rtol=1e-5)


def test_remove_and_replace_by_chunk_id(tmp_path):
    rng = np.random.default_rng(1)
    vecs = _unit(rng, 3, 8)
    index = VectorIndex(tmp_path, embedder="e", dim=8)
    index.add([1, 2, 3], vecs)
    index.add([2], vecs[0:1])  # replacing keeps one vector per id
    assert sorted(index.ids().tolist()) == [1, 2, 3]
    assert index.remove([1, 3]) == 2
    _, ids = index.search(vecs[0:1], 3)
    assert ids[0].tolist()[0] == 2


def test_save_is_atomic_and_reload_sees_new_version(tmp_path):
    rng = np.random.default_rng(2)
    a = VectorIndex(tmp_path, embedder="e", dim=8)
    with a.writing() as idx:
        idx.add([7], _unit(rng, 1, 8))
    assert not list(tmp_path.glob("*.tmp"))
    b = VectorIndex(tmp_path, embedder="e", dim=8)
    assert b.ids().tolist() == [7] and b.version == a.version
    with a.writing() as idx:
        idx.add([8], _unit(rng, 1, 8))
    assert b.refresh() is True
    assert sorted(b.ids().tolist()) == [7, 8]
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["count"] == 2 and meta["embedder"] == "e"


def test_loading_an_index_from_another_embedder_says_run_reindex(tmp_path):
    a = VectorIndex(tmp_path, embedder="all-minilm-l6-v2", dim=8)
    a.save()
    with pytest.raises(IndexMismatch, match="run 'ragqa reindex'"):
        VectorIndex(tmp_path, embedder="bge-small", dim=16)


def test_wrong_vector_shape_names_expected_shape(tmp_path):
    index = VectorIndex(tmp_path, embedder="e", dim=8)
    with pytest.raises(ValueError, match=r"shape \(2, 8\)"):
        index.add([1, 2], np.zeros((2, 4), np.float32))


def _writer_with_pending_add(tmp_path, rng):
    """Two writers on one folder: `a` saved id 1 and holds id 2 unsaved; `b` is current."""
    a = VectorIndex(tmp_path, embedder="e", dim=8, save_interval_s=3600)
    b = VectorIndex(tmp_path, embedder="e", dim=8)
    with a.writing(force_save=True) as idx:
        idx.add([1], _unit(rng, 1, 8))
    with a.writing() as idx:  # not due: kept in the journal
        idx.add([2], _unit(rng, 1, 8))
    b.refresh()
    return a, b


def test_deferred_saves_replay_pending_changes_over_another_writers_save(tmp_path):
    rng = np.random.default_rng(3)
    a, b = _writer_with_pending_add(tmp_path, rng)
    assert a.dirty
    with b.writing() as idx:  # another process saves meanwhile
        idx.add([3], _unit(rng, 1, 8))
    with a.writing() as idx:  # reloads b's file, replays its own pending add
        idx.add([4], _unit(rng, 1, 8))
    assert sorted(a.ids().tolist()) == [1, 2, 3, 4]
    a.flush()
    assert not a.dirty
    b.refresh()
    assert sorted(b.ids().tolist()) == [1, 2, 3, 4]


def test_search_reloading_another_writers_save_keeps_unsaved_changes(tmp_path):
    rng = np.random.default_rng(4)
    a, b = _writer_with_pending_add(tmp_path, rng)
    with b.writing() as idx:
        idx.add([3], _unit(rng, 1, 8))
    a.search(_unit(rng, 1, 8), 3)  # reloads b's file
    assert sorted(a.ids().tolist()) == [1, 2, 3]


def test_search_within_ids_matches_brute_force_over_those_ids(tmp_path):
    rng = np.random.default_rng(5)
    vecs, query = _unit(rng, 300, 16), _unit(rng, 1, 16)
    index = VectorIndex(tmp_path, embedder="e", dim=16)
    index.add(list(range(300)), vecs)
    allowed = list(range(0, 300, 7))
    scores, ids = index.search(query, 5, within=allowed)
    sims = vecs[allowed] @ query[0]
    expected = [allowed[i] for i in np.argsort(-sims)[:5]]
    assert ids[0].tolist() == expected
    np.testing.assert_allclose(scores[0], np.sort(sims)[::-1][:5], rtol=1e-5)
