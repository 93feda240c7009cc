"""bench.headroom: the largest batch from a budget, a run at it, and the one-line refusal of one more row."""

import pytest

from bench import headroom
from bench.common import UsageError


def test_largest_batch_counts_caches_and_work():
    # 10 bytes a row, 3 bytes of work a row: 100 bytes hold 7 rows (91), not 8 (104) nor 10 (caches alone)
    assert headroom.largest_batch(10, lambda b: 3 * b, 100) == 7
    assert headroom.largest_batch(10, lambda b: 50, 55) == 0
    assert headroom.largest_batch(10, lambda b: 0, 100) == 10


def test_parse_bytes():
    assert headroom.parse_bytes("8MiB") == 8 * 2**20
    assert headroom.parse_bytes("1.5GiB") == 3 * 2**29
    assert headroom.parse_bytes("120GB") == 120 * 10**9
    for bad in ("lots", "-1MiB", "8 parsecs", "0"):
        with pytest.raises(UsageError, match="--free-bytes"):
            headroom.parse_bytes(bad)


def test_worker_runs_the_predicted_batch_and_refuses_one_more(tmp_path):
    """Tiny shape, a 16 MiB budget: the predicted batch runs, B + 1 is refused in one line without
    compiling anything, and the table and plot are written from the row."""
    args = headroom.parse_args(["--shape", "tiny", "--tokens", "40", "--gen", "3", "--free-bytes", "16MiB",
                                "--prefill-buckets", "16,64", "--worker", "base_lr_shared"])
    row = headroom.worker(args)
    B = row["predicted_batch"]
    per_row, free = row["cache_bytes_per_row"], row["free_bytes"]
    assert 0 < B < row["predicted_batch_caches_only"] == free // per_row
    assert B * per_row + row["work_bytes_predicted"] <= free
    assert row["status"] == "ran" and row["batch"] == B and row["cache_bytes"] == B * per_row
    assert row["throughput_tok_s"] > 0
    msg = row["next_batch"]
    assert "\n" not in msg and f"batch={B + 1}" in msg and "base_lr_shared" in msg and "16.0 MiB" in msg
    assert row["next_batch_compiles"] == 0
    headroom.print_table([row])
    headroom.plot([row], str(tmp_path / "p.png"), "test")
    assert (tmp_path / "p.png").stat().st_size > 0
