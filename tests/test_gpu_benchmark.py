"""benchmarks/gpu.py: refuses to measure without CUDA; its CPU check mode runs every piece and writes its table."""

import json

import torch

from benchmarks import gpu


def test_refuses_without_cuda_and_checks_on_the_cpu(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert gpu.main(["--out", str(tmp_path / "no.json")]) == 2
        assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "no.json").exists()
    out = tmp_path / "gpu.json"
    assert gpu.main(["--device", "cpu", "--preset", "smoke", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["preset"] == "smoke"
    assert {(r["work"], r["precision"]) for r in result["rows"]} == {
        ("train step", "fp32"),
        ("train step", "bf16"),
        ("replay (one sampler)", "fp32"),
        ("replay (one sampler)", "bf16"),
        ("evaluation samples", "fp32"),
    }
    assert all(r["items_per_s"] > 0 for r in result["rows"])
    assert not torch.backends.cudnn.allow_tf32  # the process's numerics are set back to fp32
