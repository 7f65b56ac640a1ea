"""What minids writes into a user's directories is written whole (minids/fileio.py), and what a crashed run left
behind still reads: a run directory's metrics with a line cut short plot, a corrupt record is one clear line."""

import json
import os

import pytest

from minids.fileio import atomic_write_text, written_whole
from minids.plots import plot_run, read_metrics


def test_written_whole_replaces_and_leaves_no_temporary(tmp_path):
    dst = tmp_path / "a.json"
    dst.write_text("old")
    atomic_write_text("new", dst)
    assert dst.read_text() == "new"
    atomic_write_text("fresh", tmp_path / "b.txt")  # no file before
    assert (tmp_path / "b.txt").read_text() == "fresh"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt"]


def test_a_write_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    dst = tmp_path / "metrics.jsonl"
    dst.write_text('{"step": 1}\n')
    with pytest.raises(OSError, match="disk full"), written_whole(dst) as tmp:  # the writer fails half-way
        tmp.write_text('{"step": 1}\n{"st')
        raise OSError(28, "disk full")
    assert dst.read_text() == '{"step": 1}\n'

    def refuse(src, target):
        raise PermissionError(13, "rename refused")

    monkeypatch.setattr(os, "replace", refuse)  # the write completes, its rename fails
    with pytest.raises(PermissionError):
        atomic_write_text("new", dst)
    assert dst.read_text() == '{"step": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def _run_dir(tmp_path, text: str):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(text)
    return run


def test_metrics_cut_short_by_a_crash_still_read(tmp_path):
    lines = [{"step": 1, "tokens": 100, "loss": 5.0}, {"step": 2, "tokens": 200, "loss": 4.5}]
    full = "".join(json.dumps(r) + "\n" for r in lines)
    run = _run_dir(tmp_path, full + '{"step": 3, "tokens": 300, "lo')  # killed while writing step 3
    assert read_metrics(run) == lines
    (run / "metrics.jsonl").write_text(full.rstrip("\n"))  # killed just before the last newline: the record is whole
    assert read_metrics(run) == lines
    pytest.importorskip("matplotlib")
    assert [p.name for p in plot_run(run)] == ["loss.png"]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".*tmp*"))


@pytest.mark.parametrize("bad, what", [('{"step": 2, "tok', "line 2: not a JSON record"), ("[1, 2]", "line 2: a list")])
def test_a_corrupt_metrics_line_is_named(tmp_path, bad, what):
    run = _run_dir(tmp_path, '{"step": 1, "tokens": 100, "loss": 5.0}\n' + bad + '\n{"step": 3, "tokens": 300}\n')
    with pytest.raises(ValueError, match=rf"metrics.jsonl, {what}.*mend or delete that line"):
        read_metrics(run)


def test_a_corrupt_expert_load_is_named(tmp_path):
    pytest.importorskip("matplotlib")
    run = _run_dir(tmp_path, '{"step": 1, "tokens": 100, "loss": 5.0}\n')
    (run / "expert_load.json").write_text('{"step": 1, "load": [[1, 2], [3')
    with pytest.raises(ValueError, match="expert_load.json: not an expert-load record.*delete it"):
        plot_run(run)
