"""The TensorBoard sink in process: which numbers become which tags, and how segments of a run's event files
are started (the kill-and-resume case on a real run is in tests/e2e/test_tracking.py)."""

from __future__ import annotations

import time

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hpcgraft.storage.runlog import GRAFTS, METRICS, STATUS, RunLog
from hpcgraft.storage.tbevents import PREFIX, SUFFIX, TensorBoardSink, graft_scalars, metric_scalars


def steps(folder, tag):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_every_number_of_a_row_is_a_scalar_and_the_ensemble_shares_the_peers_tags():
    row = {"epoch": 1, "peer": 1, "step": 22, "train_loss": 0.5, "test_acc": 90.0, "alpha_mean": None,
           "invalid_0.1": 3, "dgconv_groups": [2, 4], "flag": True, "test_acc5": 99.0}
    assert metric_scalars(row) == ("peer1", {"metrics/train_loss": 0.5, "metrics/test_acc": 90.0,
                                             "metrics/invalid_0.1": 3.0, "metrics/test_acc5": 99.0})
    ens = {"epoch": 1, "peer": None, "step": 22, "ensemble_acc": 91.0, "ensemble_acc5": 99.5}
    assert metric_scalars(ens) == ("ensemble", {"metrics/test_acc": 91.0, "metrics/test_acc5": 99.5})
    graft = {"epoch": 1, "step": 10, "peer": 0, "seconds": 0.02, "alpha_mean": 0.45,
             "layers": [{"name": "conv1.weight", "alpha": 0.4, "h_self": 2.1}]}
    assert graft_scalars(graft) == ("peer0", {"graft/seconds": 0.02, "graft/alpha_mean": 0.45,
                                              "alpha/conv1": 0.4, "entropy/conv1": 2.1})
    skipped = {"epoch": 1, "step": 10, "peer": 0, "seconds": 0.01, "skipped": "peer 1 is NaN"}
    assert graft_scalars(skipped) == ("peer0", {"graft/seconds": 0.01})


def test_a_start_from_scratch_removes_old_files_and_a_resume_appends(tmp_path):
    def log() -> RunLog:
        return RunLog(tmp_path, [TensorBoardSink(tmp_path / "tb")])

    first = log()
    first.truncate_after(0, 0)
    first.append(METRICS, [{"epoch": 1, "peer": 0, "step": 5, "test_acc": 50.0}])
    first.append(METRICS, [{"epoch": 2, "peer": 0, "step": 10, "test_acc": 60.0}])
    first.append(GRAFTS, [{"epoch": 2, "step": 10, "peer": 0, "seconds": 0.1, "layers": []}])
    first.status(state="running")  # not a log of rows: nothing for the sink
    assert not (tmp_path / "tb" / STATUS).exists()
    assert steps(tmp_path / "tb" / "peer0", "metrics/test_acc") == [(5, 50.0), (10, 60.0)]

    resumed = log()  # from the checkpoint at step 5: step 10 is logged again, with another value
    resumed.truncate_after(1, 5)
    resumed.append(METRICS, [{"epoch": 2, "peer": 0, "step": 10, "test_acc": 61.0}])
    assert steps(tmp_path / "tb" / "peer0", "metrics/test_acc") == [(5, 50.0), (10, 61.0)]
    assert steps(tmp_path / "tb" / "peer0", "graft/seconds") == []  # the START dropped it; not logged again
    assert len(list((tmp_path / "tb" / "peer0").glob(PREFIX + "*"))) == 2

    again = log()
    again.truncate_after(0, 0)  # no checkpoint: the JSON-lines logs start empty, and so do the event files
    assert not (tmp_path / "tb").exists()
    again.append(METRICS, [{"epoch": 1, "peer": 0, "step": 5, "test_acc": 52.0}])
    assert steps(tmp_path / "tb" / "peer0", "metrics/test_acc") == [(5, 52.0)]


def test_a_new_segment_sorts_after_the_old_one_when_the_clock_is_behind(tmp_path):
    folder = tmp_path / "tb" / "peer0"
    first = TensorBoardSink(tmp_path / "tb")
    first.truncate_after(0, 0)
    first.record(METRICS, [{"epoch": 1, "peer": 0, "step": 5, "test_acc": 50.0},
                           {"epoch": 2, "peer": 0, "step": 10, "test_acc": 60.0}])
    first.close()
    (old,) = folder.iterdir()
    ahead = int(time.time()) + 3600  # written on a node whose clock was an hour ahead
    old.rename(folder / f"{PREFIX}{ahead:010d}.{old.name[len(PREFIX):].partition('.')[2]}")
    foreign = folder / f"{PREFIX}{ahead + 1:010d}.other.1"  # not hpcgraft's: left as it is
    foreign.write_bytes(b"")
    resumed = TensorBoardSink(tmp_path / "tb")
    resumed.truncate_after(1, 5)
    resumed.record(METRICS, [{"epoch": 2, "peer": 0, "step": 10, "test_acc": 61.0}])
    resumed.close()
    ours = sorted(p.name for p in folder.iterdir() if p.name.endswith(SUFFIX))
    assert len(ours) == 2 and int(ours[0][len(PREFIX):].split(".")[0]) < int(ours[1][len(PREFIX):].split(".")[0])
    assert foreign.exists()
    foreign.unlink()
    assert steps(folder, "metrics/test_acc") == [(5, 50.0), (10, 61.0)]  # the resume's START dropped step 10


def test_a_resumed_segment_never_doubles_back(tmp_path):
    """Killed after step 30 with its checkpoint at step 20, resumed twice: TensorBoard's reader sees every tag's
    steps rising, each once, with the values of the segment that logged them last."""
    sink = TensorBoardSink(tmp_path)
    sink.truncate_after(0, 0)
    for step in (10, 20, 30):
        sink.record(METRICS, [{"epoch": step // 10, "peer": 0, "step": step, "train_loss": 1.0 / step}])
    for checkpoint in (20, 30):
        sink = TensorBoardSink(tmp_path)
        sink.truncate_after(checkpoint // 10, checkpoint)
        for step in range(checkpoint + 10, 60, 10):
            sink.record(METRICS, [{"epoch": step // 10, "peer": 0, "step": step, "train_loss": 2.0 / step}])
        sink.close()
    got = steps(tmp_path / "peer0", "metrics/train_loss")
    assert [s for s, _ in got] == [10, 20, 30, 40, 50]
    assert [round(v * s, 4) for s, v in got] == [1.0, 1.0, 2.0, 2.0, 2.0]


def test_a_start_from_scratch_removes_only_the_files_the_writer_made(tmp_path):
    """The files SummaryWriter writes for hpcgraft carry its suffix, so a run started again removes them and
    leaves another tool's event file (same prefix, in the same folder) where it was."""
    sink = TensorBoardSink(tmp_path / "tb")
    sink.truncate_after(0, 0)
    sink.record(METRICS, [{"epoch": 1, "peer": 0, "step": 5, "test_acc": 50.0}])
    sink.close()
    ours = list((tmp_path / "tb" / "peer0").iterdir())
    assert len(ours) == 1 and ours[0].name.startswith(PREFIX) and ours[0].name.endswith(SUFFIX)
    foreign = tmp_path / "tb" / "peer0" / f"{PREFIX}1700000000.host.1.v2"
    foreign.write_bytes(b"another tool's")
    TensorBoardSink(tmp_path / "tb").truncate_after(0, 0)
    assert [p.name for p in (tmp_path / "tb" / "peer0").iterdir()] == [foreign.name]
    assert foreign.read_bytes() == b"another tool's"
