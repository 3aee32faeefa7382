"""Reading a source output's rows back for relabel: every row once, with its states or the reason
it cannot be scored."""
from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ScoringParams
from pipeline.data.output import IdSet, id_digests
from pipeline.data.rows import error_table, parquet_options, scored_table
from pipeline.data.states import StateSpec, decode_column
from pipeline.data.stored import NO_STATES, SOURCE_SCHEMA, SourceRead, read_source_file
from pipeline.method.engine import ImageStates, Scorer
from pipeline.method.textbank import TextBank

NAMES = ("cat", "dog", "owl")
D, T, K = 6, 2, 3
SPEC = StateSpec("float16", D, T + 1)
LOCAL = fsspec.filesystem("file")


def states(count: int, seed: int = 0) -> ImageStates:
    gen = torch.Generator().manual_seed(seed)
    grown = torch.rand(T, count, K, 4, generator=gen, dtype=torch.float64) * 100
    return ImageStates(full=F.normalize(torch.randn(count, D, generator=gen), dim=-1),
                       pooled=F.normalize(torch.randn(T + 1, count, D, generator=gen), dim=-1), grown=grown)


def source_rows(ids: list[str], dtype: str = "float16", seed: int = 0) -> pa.Table:
    """lgca rows of ``ids`` with their states, as lgca label writes them."""
    vectors = F.normalize(torch.randn(3, D, generator=torch.Generator().manual_seed(9)), dim=-1)
    bank = TextBank(NAMES, vectors, vectors, vectors, torch.zeros(0), torch.zeros(0))
    scores = Scorer(bank, ScoringParams(crops=8, steps=T, expand_top=K)).score(states(len(ids), seed))
    return scored_table(ids, ids, [64] * len(ids), [48] * len(ids), scores, NAMES, "lgca", 2, "r1", dtype)


def write(path, *tables: pa.Table) -> str:
    with pq.ParquetWriter(path, tables[0].schema, **parquet_options()) as writer:
        for table in tables:
            writer.write_table(table)  # one row group each
    return str(path)


def read_all(path, read: SourceRead, done: IdSet | None = None) -> pa.Table:
    return pa.concat_tables(list(read_source_file(LOCAL, str(path), read, done)))


LGCA = SourceRead(SPEC, pooled=T + 1, steps=T, expand_top=K)


def test_ok_rows_come_with_their_states_and_expanded_boxes_error_rows_with_their_error(tmp_path):
    rows = source_rows(["a", "b"])
    errors = error_table(["x"], ["x"], ["decode: broken"], [0], [0], "r1")
    got = read_all(write(tmp_path / "f.parquet", rows, errors), LGCA)
    assert got.schema == SOURCE_SCHEMA
    assert got.column("id").to_pylist() == ["a", "b", "x"]
    assert got.column("error").to_pylist() == [None, None, "decode: broken"]
    assert got.column("state_full").to_pylist()[:2] == rows.column("state_full").to_pylist()
    assert got.column("state_full")[2].as_py() is None
    grown = decode_column(got.column("grown"), T * K * 4, "float32")
    assert grown.rows.tolist() == [0, 1]
    expected = states(2).grown.permute(1, 0, 2, 3).reshape(2, -1).numpy().astype(np.float32)
    np.testing.assert_array_equal(grown.values, expected)  # steps 1..T, K boxes each, in order


def test_fewer_steps_take_the_first_steps_boxes_and_clip_needs_only_k0(tmp_path):
    path = write(tmp_path / "f.parquet", source_rows(["a", "b", "c"]))
    one = read_all(path, SourceRead(SPEC, pooled=2, steps=1, expand_top=K))
    grown = decode_column(one.column("grown"), K * 4, "float32").values
    np.testing.assert_array_equal(grown, states(3).grown[0].reshape(3, -1).numpy().astype(np.float32))
    clip = read_all(path, SourceRead(SPEC, pooled=0))
    assert clip.column("state_steps").null_count == 3 and clip.column("grown").null_count == 3
    assert clip.column("error").null_count == 3


def test_rows_without_states_or_with_states_of_another_length_are_error_rows(tmp_path):
    rows = source_rows(["a", "b", "c"])
    full = rows.column("state_full").to_pylist()
    full[1] = None  # labelled without states
    full[2] = full[2][:-2]  # one value short
    rows = rows.set_column(rows.schema.get_field_index("state_full"), "state_full", pa.array(full, pa.binary()))
    got = read_all(write(tmp_path / "f.parquet", rows), LGCA)
    errors = got.column("error").to_pylist()
    assert errors[0] is None and errors[1] == NO_STATES
    assert errors[2].startswith("states: state_full does not hold the 6 float16 values")
    assert got.column("state_full").to_pylist()[1:] == [None, None]


def test_an_output_written_before_states_were_kept_gives_error_rows_saying_so(tmp_path):
    older = source_rows(["a", "b"]).drop_columns(["state_full", "state_steps"])
    got = read_all(write(tmp_path / "f.parquet", older), LGCA)
    assert got.column("error").to_pylist() == [NO_STATES, NO_STATES]


def test_ids_already_relabelled_are_left_out(tmp_path):
    path = write(tmp_path / "f.parquet", source_rows(["a", "b"]), source_rows(["c", "d"], seed=1))
    done = IdSet.joined([id_digests(["b", "c", "d"])])
    got = read_all(path, LGCA, done)
    assert got.column("id").to_pylist() == ["a"]
    assert got.column("state_full").to_pylist() == source_rows(["a", "b"]).column("state_full").to_pylist()[:1]


def test_a_row_group_whose_states_cannot_be_read_gives_error_rows_for_its_ids_only(tmp_path):
    path = tmp_path / "f.parquet"
    write(path, source_rows(["a", "b"]), source_rows(["c"], seed=1))
    group = pq.read_metadata(path).row_group(0)
    (chunk,) = [group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == "state_full"]
    raw = bytearray(path.read_bytes())
    raw[chunk.data_page_offset:chunk.data_page_offset + 24] = b"\xff" * 24
    path.write_bytes(bytes(raw))
    got = read_all(path, LGCA)
    assert got.column("id").to_pylist() == ["a", "b", "c"]
    errors = got.column("error").to_pylist()
    assert all(e.startswith(f"states: cannot read them from {path}") for e in errors[:2]) and errors[2] is None


def test_a_file_that_is_not_parquet_or_not_of_lgca_label_raises(tmp_path):
    (tmp_path / "cut.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(pa.ArrowInvalid):
        read_all(tmp_path / "cut.parquet", LGCA)
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "other.parquet")
    with pytest.raises(pa.ArrowInvalid, match="no column.*uri, status, error, width, height: not a data file of lgca"):
        read_all(tmp_path / "other.parquet", LGCA)
