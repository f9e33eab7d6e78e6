"""``hpcgraft.launch --wait`` follows a job: its state changes and its log as it grows
(hpcgraft/storage/follow.py), with a real file standing in for the job's log and states handed in as a
scheduler would report them. The real SLURM path: tests/cluster/test_slurm.py (launch.wait on a submitit job)."""

from __future__ import annotations

from hpcgraft.storage.follow import JobFollower


def test_states_once_each_and_only_complete_lines(tmp_path):
    log = tmp_path / "123_0_log.out"
    seen: list[str] = []
    f = JobFollower("123", log, seen.append)
    f.poll("PENDING")  # no log yet
    f.poll("PENDING")
    log.write_text("  epoch peer\n   1/2    0  0.05\nprogress: epoch 2/2, step 3")
    f.poll("RUNNING")
    assert seen == ["job 123: PENDING", "  epoch peer", "   1/2    0  0.05", "job 123: RUNNING"]
    with log.open("a") as out:
        out.write("/22\nsummary: 2 epochs")
    f.poll("RUNNING")
    f.poll(None)  # SLURM no longer lists the job
    f.finish("COMPLETED")
    assert seen[4:] == ["progress: epoch 2/2, step 3/22", "summary: 2 epochs", "job 123: COMPLETED"]


def test_a_rewritten_log_is_followed_from_its_start(tmp_path):
    log = tmp_path / "job.out"
    log.write_text("first start, line 1\nfirst start, line 2\n")
    seen: list[str] = []
    f = JobFollower("7", log, seen.append)
    f.poll("RUNNING")
    log.write_text("requeued\n")  # shorter than what was read: the file was opened anew
    f.poll("RUNNING")
    assert seen == ["first start, line 1", "first start, line 2", "job 7: RUNNING", "requeued"]


def test_redraws_become_their_last_state(tmp_path):
    log = tmp_path / "job.out"
    log.write_bytes(b"epoch 1:  10%\repoch 1:  50%\repoch 1: 100%\r\nnot utf-8: \xff\n")
    seen: list[str] = []
    JobFollower("7", log, seen.append).finish("FAILED")
    assert seen == ["epoch 1: 100%", "not utf-8: \ufffd", "job 7: FAILED"]
