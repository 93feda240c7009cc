"""bench.capacity: argument errors, the summary's ratios, and one tiny end-to-end run (CPU)."""
import json

import pytest

from bench import capacity


def test_summary_medians_best_and_ratios():
  points = [dict(max_len=1024, decode_tokens_per_s=[1.0, 100.0, 80.0, 120.0]),    # round 0 (compile) dropped
            dict(max_len=2048, decode_tokens_per_s=[2.0, 50.0, 40.0, 60.0]),
            dict(max_len=4096, status="OOM")]
  capacity.summarize(points, reference=2048)
  assert points[0]["median_tokens_per_s"] == 100.0 and points[0]["best_tokens_per_s"] == 120.0
  assert points[0]["vs_reference"] == 2.0 and points[0]["best_vs_reference"] == 2.0
  assert points[1]["vs_reference"] == 1.0
  assert points[2]["median_tokens_per_s"] is None and points[2]["vs_reference"] is None


@pytest.mark.parametrize("argv,match", [
    (["--max-lens", "512"], "--max-lens 512 is shorter than --trajectory 1024"),
    (["--trajectory", "32", "--rounds", "4", "--gen", "8"], "leaves no context"),
    (["--rounds", "1"], "--rounds >= 2"),
    (["--max-lens", "1024,x"], "--max-lens"),
])
def test_bad_arguments_are_one_clear_line(argv, match, capsys):
  with pytest.raises(SystemExit):
    capacity.main(argv)
  assert match in capsys.readouterr().err


def test_tiny_run_writes_json_and_png(tmp_path):
  res = capacity.main(["--shape", "tiny", "--max-lens", "256,1024", "--trajectory", "96", "--gen", "4",
                       "--rounds", "2", "--reference", "256", "--out", str(tmp_path)])
  assert [p["max_len"] for p in res["points"]] == [256, 1024]
  for p in res["points"]:
    assert p["status"] == "ok" and len(p["decode_tokens_per_s"]) == 2 and p["median_tokens_per_s"] > 0
  assert res["points"][0]["vs_reference"] == 1.0
  saved = json.loads((tmp_path / "capacity-tiny-auto.json").read_text())
  assert saved["trajectory"] == 96 and saved["context"] == 88
  assert (tmp_path / "capacity-tiny-auto.png").stat().st_size > 0
