"""``lgca search``: the exact top N over the kept states (against a brute-force ranking), its
output formats, and what it refuses."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import replace

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from skimage import data as photos

from pipeline.cli import main
from pipeline.commands.search import search_source
from pipeline.config import ConfigError, StatesConfig, StorageConfig
from pipeline.data.rows import error_table
from pipeline.data.states import StateSpec
from pipeline.data.stored import ranked_rows, search_files
from tests.data.test_stored import D, SPEC, T, source_rows, write
from tests.distributed.test_relabel import SCORING, write_source
from tests.support import encode

LOCAL = fsspec.filesystem("file")


@pytest.fixture
def files(tmp_path):
    """Three data files: several row groups, error rows, and a file of an earlier version without states."""
    paths = [write(tmp_path / "a.parquet", source_rows([f"a{i}" for i in range(5)], seed=1),
                   error_table(["bad"], ["bad"], ["decode: x"], [0], [0], "r1"),
                   source_rows([f"b{i}" for i in range(7)], seed=2)),
             write(tmp_path / "b.parquet", source_rows([f"c{i}" for i in range(9)], seed=3)),
             write(tmp_path / "c.parquet", source_rows(["old"], seed=4).drop_columns(["state_full", "state_steps"]))]
    return paths


def brute_force(paths, query, vector):
    """Every row's score, computed from the decoded float16 values row by row in float64."""
    scores = {}
    for path in paths:
        for row in pq.read_table(path).to_pylist():
            if row.get("state_full") is None:
                continue
            full = np.frombuffer(row["state_full"], "<f2").astype(np.float64)
            steps = np.frombuffer(row["state_steps"], "<f2").astype(np.float64).reshape(T + 1, D)
            scores[row["id"]] = {"full": full @ query, "wca": steps[0] @ query,
                                 "lgca": (steps @ query).mean()}[vector]
    return sorted(scores.items(), key=lambda item: -item[1])


@pytest.mark.parametrize("vector, weights", [("full", None), ("wca", [1.0]), ("lgca", [1 / 3] * 3)])
def test_the_top_n_is_the_exact_top_n_of_every_stored_state(files, vector, weights):
    query = F.normalize(torch.randn(D, generator=torch.Generator().manual_seed(5)), dim=0).numpy()
    expected = brute_force(files, query.astype(np.float64), vector)
    assert len(expected) == 21
    weights = None if weights is None else np.array(weights, np.float32)
    for top in (1, 4, 30):
        ranked = search_files(LOCAL, files, query, SPEC, weights, top)
        assert (ranked.searched, ranked.skipped) == (21, 2)  # the error row and the older file's row
        table = ranked_rows(LOCAL, files, ranked, ["id", "label"])
        assert table.column("id").to_pylist() == [image_id for image_id, _ in expected[:top]]
        np.testing.assert_allclose(table.column("score").to_numpy(), [s for _, s in expected[:top]], atol=1e-6)
        labels = {r["id"]: r["label"] for f in files for r in pq.read_table(f, columns=["id", "label"]).to_pylist()}
        assert table.column("label").to_pylist() == [labels[i] for i, _ in expected[:top]]


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("search") / "labels"
    write_source(root, tiny_checkpoint)
    return root


def test_an_image_query_finds_the_image_itself_first(source, tmp_path, capsys):
    query = tmp_path / "query.jpg"
    query.write_bytes(encode(photos.coffee()))  # the bytes write_source labelled as /photos/coffee.jpg
    for vector in ("full", "lgca"):
        assert main(["search", str(source), "--image", str(query), "--vector", vector, "--format", "json",
                     "--device", "cpu"]) == 0
        out, err = capsys.readouterr()
        rows = [json.loads(line) for line in out.splitlines()]
        assert [r["rank"] for r in rows] == [1, 2, 3] and rows[0]["id"] == "/photos/coffee.jpg"
        assert rows[0]["score"] > rows[1]["score"] >= rows[2]["score"]
        if vector == "full":
            assert rows[0]["score"] == pytest.approx(1.0, abs=2e-3)  # k_0 against itself, stored in float16
        assert "1 of 4 rows hold no usable states" in err  # the broken file's error row


def test_a_text_query_prints_a_table_or_csv_with_ids_uris_scores_and_labels(source, capsys):
    assert main(["search", str(source), "a photo of a cat", "--top", "2", "--format", "csv", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [list(r) for r in rows] == [["rank", "id", "uri", "label", "score"]] * 2
    assert all(r["id"].startswith("/photos/") and r["label"] in ("cat", "astronaut", "coffee", "rocket") for r in rows)
    assert float(rows[0]["score"]) >= float(rows[1]["score"])
    assert main(["search", str(source), "a photo of a cat", "--top", "1", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "label", "id", "uri"] and lines[1].split()[0] == "1"
    assert lines[1].split()[3] == rows[0]["id"]


def test_what_a_search_cannot_use_is_refused(tmp_path, tiny_checkpoint, source, capsys):
    write_source(tmp_path / "wca", tiny_checkpoint, scoring=replace(SCORING, method="wca"))
    write_source(tmp_path / "none", tiny_checkpoint, states=StatesConfig(keep="none"))
    cases = [([str(tmp_path / "wca"), "cat", "--vector", "lgca"], "keeps k_0 and p_0 only (a wca run); search it "
                                                                    "with --vector full or --vector wca"),
             ([str(tmp_path / "none"), "cat"], "keeps no image states"),
             ([str(source)], "give a query: a TEXT or --image FILE"),
             ([str(source), "cat", "--image", "x.jpg"], "give a query: a TEXT or --image FILE"),
             ([str(source), "cat", "--top", "0"], "top: must be at least 1"),
             ([str(tmp_path / "absent"), "cat"], "has no _lgca/manifest.json")]
    for argv, message in cases:
        assert main(["search", *argv, "--device", "cpu"]) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(ConfigError, match="search it with --vector full or --vector wca"):
        search_source(str(tmp_path / "wca"), "lgca", StorageConfig())
    assert search_source(str(tmp_path / "wca"), "wca", StorageConfig()).weights.tolist() == [1.0]


def test_search_reads_states_of_both_dtypes(tmp_path):
    rows = source_rows(["x", "y"], dtype="float32")
    path = write(tmp_path / "f.parquet", rows)
    query = np.frombuffer(rows.column("state_full")[1].as_py(), "<f4").copy()
    ranked = search_files(LOCAL, [path], query, StateSpec("float32", D, T + 1), None, 1)
    assert ranked_rows(LOCAL, [path], ranked, ["id"]).column("id").to_pylist() == ["y"]
    assert ranked.scores[0] == pytest.approx(1.0, abs=1e-6)


def test_random_weights_are_noted_once_on_stderr_and_the_csv_stays_clean(tmp_path, capsys):
    import warnings

    from pipeline.model.loading import RandomWeightsWarning

    with pytest.warns(RandomWeightsWarning):  # the source's own label run, with random weights
        write_source(tmp_path / "labels", "none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["search", str(tmp_path / "labels"), "a cat", "--top", "3", "--format", "csv",
                     "--device", "cpu"]) == 0
    assert not [w for w in caught if issubclass(w.category, RandomWeightsWarning)]
    out, err = capsys.readouterr()
    assert err.count("has random weights") == 1 and err.startswith("note: pretrained none: lgca-tiny")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3 and {r["id"] for r in rows} == {"/photos/chelsea.jpg", "/photos/coffee.jpg",
                                                          "/photos/rocket.jpg"}
