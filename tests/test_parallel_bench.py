"""`megasae bench parallel` runs its three configurations and counts their collective traffic."""

import json

from megasae.cli import main as cli_main


def test_bench_parallel_on_a_tiny_host(tmp_path, capsys):
    out = tmp_path / "bench.json"
    cli_main(["bench", "parallel", "--hidden-size", "64", "--layers", "2", "--batch", "4", "--ctx-len", "16",
              "--k", "4", "--steps", "2", "--warmup", "1", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert results["1 process"]["collective_calls"] == 0
    assert 0 < results["DP = 2"]["collective_mib"]
    # TP pays two all-reduces per decoder layer plus the SAE's gathers and sums, every step.
    assert results["TP = 2"]["collective_calls"] > results["DP = 2"]["collective_calls"]
    assert "TP = 2" in capsys.readouterr().out
