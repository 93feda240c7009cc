"""bench.profile_step summarize: an ncu CSV grouped by kernel, per decode step."""
import json

import pytest

from bench import profile_step

CSV = '''==PROF== Connected to process 1
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1","python3","h","gemv_a","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","3,000,000"
"0","1","python3","h","gemv_a","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","1,000"
"1","1","python3","h","fusion_b","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","0"
"1","1","python3","h","fusion_b","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","500"
"2","1","python3","h","gemv_a","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","1,000,000"
"2","1","python3","h","gemv_a","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","3,000"
'''


def test_summarize_groups_by_kernel(tmp_path, capsys):
  src, out = tmp_path / "step.csv", tmp_path / "step.json"
  src.write_text(CSV)
  profile_step.main(["summarize", str(src), "--steps", "2", "--json", str(out)])
  text = capsys.readouterr().out
  assert "3 kernels, 0.002 ms of kernel time per step" in text
  data = json.loads(out.read_text())
  assert data["kernels"]["gemv_a"] == {"ns": 4000.0, "bytes": 4_000_000.0, "n": 2}
  assert data["kernels"]["fusion_b"]["n"] == 1
  assert data["total_ns_per_step"] == 2250.0
  # the largest first; bandwidth = bytes / ns = GB/s
  first = [ln for ln in text.splitlines() if "gemv_a" in ln][0]
  assert first.split()[:2] == ["2.0", "88.9%"] and first.split()[3] == "1000"


def test_summarize_units_and_bad_csv(tmp_path, capsys):
  src = tmp_path / "step.csv"
  src.write_text(CSV.replace('"nsecond","1,000"', '"usecond","1"').replace('"byte","3,000,000"', '"Mbyte","3"'))
  profile_step.main(["summarize", str(src), "--steps", "2"])
  assert "3 kernels, 0.002 ms of kernel time per step" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="No such file"):
    profile_step.main(["summarize", str(tmp_path / "missing.csv")])
  src.write_text("==PROF== nothing profiled\n")
  with pytest.raises(SystemExit, match="no ncu CSV header"):
    profile_step.main(["summarize", str(src)])
  src.write_text(CSV.replace('"nsecond","500"', '"fortnight","500"'))
  with pytest.raises(SystemExit, match="unknown unit"):
    profile_step.main(["summarize", str(src)])


@pytest.mark.parametrize("argv", [["run", "--new-tokens", "1"], ["summarize", "x.csv", "--steps", "0"]])
def test_bad_flags_exit_2(argv):
  with pytest.raises(SystemExit) as e:
    profile_step.main(argv)
  assert e.value.code == 2


def test_products_runs_on_tiny(capsys):
  profile_step.main(["products", "--shape", "tiny"])
  assert "weight products of one step (batch 1" in capsys.readouterr().out
