"""The decision benchmark (tandem.router.bench_decision) runs end to end at a toy size."""

from tandem.router import bench_decision


def test_bench_decision_smoke(capsys):
    assert bench_decision.main(["--replicas", "4", "--decode", "2", "--blocks", "1200", "--groups", "16",
                                "--prefix-blocks", "16", "--prompt-tokens", "64,512", "--iters", "50"]) == 0
    try:                                   # more cached blocks than the prefixes hold: refused
        bench_decision.main(["--replicas", "4", "--decode", "2", "--blocks", "3000", "--groups", "16",
                             "--prefix-blocks", "16"])
        raise AssertionError("expected SystemExit")
    except SystemExit:
        pass
    out = capsys.readouterr().out
    assert "p50 us" in out and len([l for l in out.splitlines() if l.strip().startswith(("64", "512"))]) == 4
