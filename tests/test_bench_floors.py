"""bench.floors: the floors of a bench.trace row, checked by hand on a tiny shape."""
import json

import pytest

from lragent_jax.config import preset
from bench import floors as trace_floor


def _row(steps, scheme="base_lr_shared", batch=1):
  return dict(scheme=scheme, label=scheme, lctx=8, batch=batch, status="ok", ttft_s=1.0,
              end_to_end_s=2.0, steps=steps)


def test_one_turn_by_hand():
  cfg = preset("tiny")
  L, d, f, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  mult = L * (d * qd + 2 * d * kvd + qd * d + 3 * d * f)
  wbytes = 2 * (L * (d * qd + 2 * d * kvd + qd * d + 3 * d * f + 2 * d) + d + d * V)
  per_tok = 2 * L * kvd * 2 + 8 * L * 2          # K + V_base, and LR of rank 8, bf16
  n, gen = 100, 3
  row = _row([dict(new_tokens=n, gen=gen)])
  # matmul rate so high that the byte term bounds the prefill; bandwidth 1e9 B/s
  pf, df = trace_floor.row_floors(row, cfg, 1e9, 1e30)
  assert pf == pytest.approx((wbytes + per_tok * n) / 1e9)
  # two decode passes reading the cache at 101 and 102 tokens
  assert df == pytest.approx((2 * wbytes + per_tok * (101 + 102)) / 1e9)
  # bandwidth so high that FLOPs bound it
  pf, _ = trace_floor.row_floors(row, cfg, 1e30, 1e12)
  attn = 4 * L * cfg.num_heads * cfg.head_dim * n * (n / 2)
  assert pf == pytest.approx((2 * mult * n + attn + 2 * d * V) / 1e12)


def test_two_turns_by_hand():
  """The second turn's prefill reads the first turn's cache; its decode passes read all."""
  cfg = preset("tiny")
  L, d, f, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  wbytes = 2 * (L * (d * qd + 2 * d * kvd + qd * d + 3 * d * f + 2 * d) + d + d * V)
  per_tok = 2 * L * kvd * 2                      # full_shared: K + V, no LR
  row = _row([dict(new_tokens=50, gen=3), dict(new_tokens=9, gen=2)], scheme="full_shared", batch=2)
  # per row: turn 1 prefills 25 tokens (cache 0 -> 25) and decodes at 26 and 27 tokens; its
  # last sampled token is one of turn 2's 9 / 2 = 4 new tokens (27 read, 4 written -> 31),
  # then one decode pass at 32
  pf, df = trace_floor.row_floors(row, cfg, 1e9, 1e30)
  assert pf == pytest.approx((wbytes + 2 * per_tok * 25) / 1e9 + (wbytes + 2 * per_tok * (27 + 4)) / 1e9)
  assert df == pytest.approx((3 * wbytes + 2 * per_tok * (26 + 27 + 32)) / 1e9)


def test_batch_and_scheme():
  cfg = preset("tiny")
  one = trace_floor.row_floors(_row([dict(new_tokens=64, gen=4)]), cfg, 1e9, 1e30)
  four = trace_floor.row_floors(_row([dict(new_tokens=256, gen=4)], batch=4), cfg, 1e9, 1e30)
  assert four[0] > one[0] and four[1] > one[1]          # more cache bytes, same weights
  assert four[1] < 4 * one[1]                           # the weights are read once per pass
  fs = trace_floor.row_floors(_row([dict(new_tokens=64, gen=4)], scheme="full_shared"), cfg, 1e9, 1e30)
  assert fs[1] < one[1]                                 # no LR to read


def test_cli_table(tmp_path, capsys):
  path = tmp_path / "results.json"
  path.write_text(json.dumps(dict(card="cpu", jax_version="0", date="2026-11-28T00:00", model="tiny",
                                  random_weights=True, args=dict(shape="tiny"),
                                  results=[_row([dict(new_tokens=64, gen=4)])])))
  out = trace_floor.main([str(path), "--copy-gbps", "1", "--tflops", "1"])
  assert len(out) == 1 and out[0]["e2e_vs_floor"] == pytest.approx(2.0 / out[0]["e2e_floor_s"])
  with pytest.raises(SystemExit):
    trace_floor.main([str(path), "--copy-gbps", "0", "--tflops", "1"])
  for bad in (tmp_path / "missing.json", tmp_path / "notjson.json"):
    if bad.name == "notjson.json":
      bad.write_text("not json")
    with pytest.raises(SystemExit) as e:
      trace_floor.main([str(bad), "--copy-gbps", "1", "--tflops", "1"])
    assert e.value.code == 2 and "not a readable bench.trace results.json" in capsys.readouterr().err
  # a checkpoint run: the config comes from --shape (here the path does not exist)
  data = json.loads(path.read_text())
  data.update(random_weights=False, model=str(tmp_path / "missing"), args=dict(shape=None), dtype="float32")
  path.write_text(json.dumps(data))
  with pytest.raises(SystemExit):
    trace_floor.main([str(path), "--copy-gbps", "1", "--tflops", "1"])
  assert "pass --shape" in capsys.readouterr().err
  f32 = trace_floor.main([str(path), "--copy-gbps", "1", "--tflops", "1", "--shape", "tiny"])
  assert f32[0]["e2e_floor_s"] > out[0]["e2e_floor_s"]    # float32 weights: twice the bytes
