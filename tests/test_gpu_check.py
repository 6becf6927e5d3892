"""scripts/gpu_check.sh --smoke: every section runs on the CPU with tiny shapes and lands in the JSON."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

from echocxr.bench import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_smoke_writes_every_section(tmp_path):
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["mode"] == "smoke" and rep["torch"] and rep["date"] and rep["new_tokens"] == 16
    sec = rep["sections"]
    assert list(sec) == list(gpu_check.SECTIONS)
    assert all(s["status"] == "ok" for s in sec.values()), {k: s["status"] for k, s in sec.items()}
    assert sec["hf_generate"]["tokens"] == 16 and sec["hf_generate"]["tokens_per_s_e2e"] > 0
    ar = sec["engine_ar"]
    assert ar["tokens"] == 16 and ar["forwards"] == 15 and ar["kv_allocations"] == 1
    one = sec["engine_onestep"]
    assert [one[f"batch_{b}"]["tokens"] for b in (1, 2)] == [16, 32]
    assert one["batch_1"]["forwards"] == 2 and one["batch_2"]["kv_allocations"] == 2
    rad = sec["rad_vs_symmetric"]
    assert (rad["V"], rad["R"]) == (64, 32) and rad["time_ratio"] > 0 and rad["flop_ratio_dense"] > 1
    fsdp = sec["fsdp_smoke"]
    assert fsdp["finite"] and len(fsdp["losses"]) == 1 and "apply_fsdp" in fsdp["what"]


def test_a_failing_section_leaves_the_others_and_says_why(tmp_path, monkeypatch):
    def broken(self):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(gpu_check.Check, "hf_generate", broken)
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--sections", "decode_model,hf_generate"]) == 0
    sec = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sec["decode_model"]["status"] == "ok"
    assert sec["hf_generate"]["status"] == "failed: RuntimeError: simulated failure"


def test_time_guard_stops_a_slow_section(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(gpu_check.Check, "decode_model", lambda self: time.sleep(5) or {})
    monkeypatch.setattr(gpu_check, "SMOKE", replace(gpu_check.SMOKE, limits={"decode_model": 1}))
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--sections", "decode_model,engine_ar"]) == 0
    sec = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sec["decode_model"]["status"].startswith("timeout") and sec["decode_model"]["seconds"] < 4
    assert sec["engine_ar"]["status"].startswith("skipped")


def test_the_script_is_valid_bash_and_runs_the_module():
    script = REPO / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "-m echocxr.bench.gpu_check" in script.read_text()
