"""Tests of pipeline.data.retry: the error rows to label again, and the journal that takes them
out of the data files, on a local disk and on the loopback S3, killed before each step."""
from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, StorageConfig
from pipeline.data import retry
from pipeline.data.output import IdSet, Output, id_digests
from pipeline.data.rows import SCHEMA, error_table
from pipeline.storage import filesystem


def ok_table(ids: list[str], run_id: str) -> pa.Table:
    """Labelled rows (status ok, label 'cat') with the output schema."""
    columns = {name: pa.nulls(len(ids), SCHEMA.field(name).type) for name in SCHEMA.names}
    columns.update(id=pa.array(ids), uri=pa.array(ids), status=pa.array(["ok"] * len(ids)),
                   label=pa.array(["cat"] * len(ids)), run_id=pa.array([run_id] * len(ids)))
    return pa.table(columns, schema=SCHEMA)


def errors(ids: list[str], messages: list[str], run_id: str) -> pa.Table:
    return error_table(ids, ids, messages, [0] * len(ids), [0] * len(ids), run_id)


# file name -> rows; e1, e2 and e4 failed to be read, e3 to be decoded
FILES = {
    "20250101T000000Z-aaaaaa_u1_000000-0.parquet": lambda: pa.concat_tables([
        ok_table(["a1", "a2"], "20250101T000000Z-aaaaaa"),
        errors(["e1"], ["read: OSError: [Errno 5] Input/output error"], "20250101T000000Z-aaaaaa")]),
    "20250101T000000Z-aaaaaa_u1_000001-0.parquet": lambda: errors(
        ["e2", "e3"], ["read: ConnectionResetError: reset by peer", "decode: cannot identify image file"],
        "20250101T000000Z-aaaaaa"),
    "20250102T000000Z-bbbbbb_u2_000000-0.parquet": lambda: pa.concat_tables([
        ok_table(["b1"], "20250102T000000Z-bbbbbb"), errors(["e4"], ["read: TimeoutError: timed out"],
                                                             "20250102T000000Z-bbbbbb")]),
}
EVERY_ID = ["a1", "a2", "b1", "e1", "e2", "e3", "e4"]
AFTER_READ_RETRY = ["a1", "a2", "b1", "e3"]  # the read errors taken out, to be labelled again


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> Output:
    """An output folder holding FILES, on a local disk or on the loopback S3."""
    if request.param == "local":
        where = Output(str(tmp_path / "out"))
    else:
        endpoint, bucket = request.getfixturevalue("moto_endpoint"), request.getfixturevalue("bucket")
        where = Output(f"s3://{bucket}/out", StorageConfig(endpoint_url=endpoint))
    fs, data = filesystem(where.data, where.storage)
    fs.makedirs(data, exist_ok=True)
    for name, make in FILES.items():
        with fs.open(f"{data}/{name}", "wb") as handle:
            pq.write_table(make(), handle)
    return where


def ids_in(output: Output, paths: list[str]) -> list[str]:
    """The ids of ``paths``, sorted, repeats kept: what a reader of these files sees."""
    fs, _ = filesystem(output.data, output.storage)
    found = []
    for path in paths:
        with fs.open(path, "rb") as handle:
            found += pq.read_table(handle, columns=["id"]).column("id").to_pylist()
    return sorted(found)


def test_parse_stages():
    assert retry.parse_stages("read") == ("read",)
    assert retry.parse_stages(" read, score,read ,too large") == ("read", "score", "too large")
    with pytest.raises(ConfigError, match=r"retry_errors: 'raed' is no stage of an error row; the stages are read, "):
        retry.parse_stages("raed,decode")
    with pytest.raises(ConfigError, match="name one or more stages"):
        retry.parse_stages(" , ")


def test_id_set_without():
    ids = IdSet.joined([id_digests(["a", "b", "c"])])
    smaller = ids.without(["b", "x"])
    assert smaller.contains(["a", "b", "c", "x"]).tolist() == [True, False, True, False]
    assert ids.without([]) is ids and len(IdSet.empty().without(["a"])) == 0


def test_find_error_rows_of_the_given_stages(output):
    found = retry.find_error_rows(output, ("read",))
    assert sorted(found.ids) == ["e1", "e2", "e4"] and sorted(found.uris) == ["e1", "e2", "e4"]
    assert {f.rsplit("/", 1)[-1] for f in found.files} == set(FILES)
    assert sorted(retry.find_error_rows(output, ("read", "decode")).ids) == ["e1", "e2", "e3", "e4"]
    assert retry.find_error_rows(output, ("score",)).ids == ()
    assert sorted(found.of_inputs({"e2", "e4", "zz"}).ids) == ["e2", "e4"]


def test_take_out_replaces_each_file_holding_a_row(output):
    found = retry.find_error_rows(output, ("read",))
    retry.take_out(output, found, "20250103T000000Z-cccccc")
    files = output.data_files()
    assert ids_in(output, files) == AFTER_READ_RETRY
    assert sorted(f.rsplit("/", 1)[-1] for f in files) == [  # the old run ids start the rewrites' names
        "20250101T000000Z-aaaaaa_retry-20250103T000000Z-cccccc-000000.parquet",
        "20250101T000000Z-aaaaaa_retry-20250103T000000Z-cccccc-000001.parquet",
        "20250102T000000Z-bbbbbb_retry-20250103T000000Z-cccccc-000002.parquet"]
    assert retry.journals(output) == [] and retry.readable_files(output) == files
    fs, _ = filesystem(output.data, output.storage)
    with fs.open(files[0], "rb") as handle:  # rows and their columns are kept as they were
        kept = pq.read_table(handle)
    assert kept.schema == SCHEMA and kept.column("label").to_pylist() == ["cat", "cat"]
    retry.take_out(output, retry.find_error_rows(output, ("decode",)), "20250104T000000Z-dddddd")
    assert ids_in(output, output.data_files()) == ["a1", "a2", "b1"]  # a file left without rows is not rewritten


class Killed(BaseException):
    """The process dies here (nothing catches a BaseException of ours)."""


def kill_before(monkeypatch, step: int) -> list[str]:
    """Make the ``step``-th store operation of retry (journal writes, rewrites, removals) kill it;
    returns the operations done, by name."""
    done: list[str] = []

    def counted(name, real):
        def operation(*args, **kwargs):
            if len(done) == step:
                raise Killed(name)
            done.append(name)
            return real(*args, **kwargs)
        return operation

    for name in ("write_json", "write_whole", "_remove"):
        monkeypatch.setattr(retry, name, counted(name, getattr(retry, name)))
    return done


STEPS = 9  # journal, 3 rewrites, journal again, 3 removals, journal removal


@pytest.mark.parametrize("step", range(STEPS + 1))
def test_a_kill_at_any_step_is_never_seen_twice_and_the_next_run_repairs_it(output, monkeypatch, step):
    done = kill_before(monkeypatch, step)
    found = retry.find_error_rows(output, ("read",))
    if step < STEPS:
        with pytest.raises(Killed):
            retry.take_out(output, found, "20250103T000000Z-cccccc")
    else:
        retry.take_out(output, found, "20250103T000000Z-cccccc")
    assert done == ["write_json", "write_whole", "write_whole", "write_whole", "write_json",
                    "_remove", "_remove", "_remove", "_remove"][:step]
    monkeypatch.undo()
    swapped = step > 4  # the journal said 'swapping' before this kill
    expected = AFTER_READ_RETRY if swapped else EVERY_ID
    # lgca query and summary read these: each id once, the rows of before or of after, never a mix
    assert ids_in(output, retry.readable_files(output)) == expected
    plain = ids_in(output, output.data_files())  # pyarrow or DuckDB over data/: may see rewritten rows twice
    if 1 < step < 8:
        assert Counter(plain) != Counter(expected)
    retry.finish_replacement(output)  # the next run, first of all
    assert ids_in(output, output.data_files()) == expected
    assert retry.journals(output) == [] and retry.readable_files(output) == output.data_files()


def test_shard_records_of_retried_rows_are_dropped(tmp_path):
    output = Output(str(tmp_path / "out"))
    output.record_shards("r1", [("s3://in/a.tar", "1:x"), ("s3://in/b.tar", "2:y")])
    output.record_shards("r2", [("s3://in/c.tar", "3:z")])
    output.forget_shards_of({"s3://in/a.tar", "s3://in/c.tar"})
    assert sorted(p.name for p in (tmp_path / "out" / "_lgca" / "shards").iterdir()) == ["r1.parquet"]
    whole = output.shards_read_whole()
    assert len(whole) == 1 and whole.contains(["s3://in/b.tar\n2:y"]).tolist() == [True]
