"""The benchmark harness: `python -m benchmarks --quick` writes valid JSON, Markdown and PNG files.

The numbers are not asserted (CI machines differ, and quick mode uses tiny models); what is checked is
that every section runs end to end, that a missing piece becomes an "unavailable: reason" row instead of
a crash, and that the harness's own arithmetic (medians, exponent fit, target checks) is right.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import harness, report
from benchmarks.harness import (Settings, fit_exponent, run_process, run_worker, steal_share, time_call,
                                timed_ort_run)

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results, markdown = out / "results", out / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--results-dir", str(results), "--markdown", str(markdown),
         "--workdir", str(out / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results, markdown, proc.stdout


def test_quick_run_writes_every_section(quick_run):
    results, _, _ = quick_run
    for name in report.SECTIONS:
        data = json.loads((results / f"{name}.json").read_text())
        assert data["section"] == name
        assert data["meta"]["quick"] is True and data["meta"]["threads"] >= 1
        rows = data.get("rows") or data.get("train") or [data["export"]]
        for row in rows:
            status = row["status"]
            assert status == "ok" or status.split(":")[0] in ("unavailable", "skipped", "n/a"), status
            if status == "ok" and "median_ms" in row:
                assert row["median_ms"] > 0 and len(row["runs_ms"]) == row["repeats"]


def test_quick_run_measures_every_row(quick_run):
    """Every part exists now, so nothing may be 'unavailable': only torch.compile (skipped in quick mode) and
    the U-DiT peer (diffusers has none) are allowed to be missing."""
    results, _, _ = quick_run
    for name in report.SECTIONS:
        data = json.loads((results / f"{name}.json").read_text())
        rows = data.get("rows") or [*data.get("train", []), data["export"]]
        for row in rows:
            assert row["status"] == "ok" or row["status"].split(":")[0] in ("skipped", "n/a"), (name, row)


def test_quick_run_measures_what_needs_no_other_package(quick_run):
    """GEMM, torch eager, the peer export and the attention ops depend only on finished parts."""
    results, _, _ = quick_run
    gemm = json.loads((results / "gemm.json").read_text())
    assert gemm["ceiling_gflops"] > 0
    denoiser = json.loads((results / "denoiser.json").read_text())
    eager = [r for r in denoiser["rows"] if r["backend"] == "torch_eager"]
    assert eager and all(r["status"] == "ok" and r["gflops"] > 0 for r in eager)
    attention = json.loads((results / "attention.json").read_text())
    exported = attention["exports"]
    assert exported["local_r8_16"]["ops"] == ["LocalWindowAttention"]
    assert exported["downsampled_16"]["ops"] == ["DownsampledAttention"]
    assert "ort_local_r8" in attention["summary"]["exponent"]


def test_quick_run_times_the_ratio_pairs_side_by_side(quick_run):
    """fp32, int8 and the peer run interleaved in one process; the ratio targets use those medians."""
    results, markdown, _ = quick_run
    paired = json.loads((results / "denoiser.json").read_text())["paired"]
    assert paired["status"] == "ok" and paired["process"]["peak_rss_mb"] > 0
    assert set(paired["rows"]) == {"dit_tiny_2/ort_fp32", "dit_tiny_2/ort_int8", "dit_tiny_2/peer_diffusers_ort"}
    for row in paired["rows"].values():
        assert len(row["runs_ms"]) == paired["rounds"] * (paired["turn_steps"] - 1)
        assert row["min_ms"] <= row["median_ms"]
    targets = {t["target"]: t for t in json.loads((results / "targets.json").read_text())}
    assert targets["ORT int8 dit_tiny_2 speed-up over ORT fp32"]["measured"].endswith("(interleaved)")
    assert f"taking turns of {paired['turn_steps']} steps" in markdown.read_text()


def test_quick_run_writes_markdown_plots_and_targets(quick_run):
    results, markdown, stdout = quick_run
    text = markdown.read_text()
    assert text.startswith("# Benchmarks") and "## Targets" in text and "Quick mode" in text
    plots = sorted(results.glob("*.png"))
    assert {p.name for p in plots} >= {"attention_scaling.png", "step_latency.png"}
    for plot in plots:
        assert plot.read_bytes()[:8] == PNG_MAGIC
        assert f"]({plot.relative_to(markdown.parent).as_posix()})" in text
    targets = json.loads((results / "targets.json").read_text())
    assert len(targets) == 13
    for target in targets:
        assert target["status"] in ("pass", "fail") or target["status"].startswith("unavailable"), target
    assert "| target | required | measured | result |" in stdout


def test_unknown_section_is_refused_with_the_valid_choices():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "gemm,warp"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "warp" in proc.stderr and "export_train" in proc.stderr


def test_time_call_and_exponent_fit():
    calls = []
    timing = time_call(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and len(timing["runs_ms"]) == 5
    assert timing["min_ms"] <= timing["median_ms"]
    sizes = [1024, 4096, 16384]
    assert fit_exponent(sizes, [3e-6 * n**1.5 for n in sizes]) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, 0, 0)


def test_worker_failures_become_unavailable_rows(tmp_path):
    settings = Settings(quick=True, threads=1, workdir=tmp_path)
    missing = run_worker(settings, "benchmarks.no_such_module:f", {}, label="missing")
    assert missing["status"].startswith("unavailable: ModuleNotFoundError")
    slow = run_process([sys.executable, "-c", "import time; time.sleep(30)"], settings, label="slow", timeout=1)
    assert slow["status"] == "timeout after 1 s" and slow["wall_s"] < 20
    probe = run_worker(settings, "benchmarks.gemm:numpy_gemm", {"n": 64, "threads": 1, "warmup": 0, "repeats": 2},
                       label="probe")
    assert probe["status"] == "ok" and probe["process"]["peak_rss_mb"] > 1


def test_steal_share_and_disturbed_measurements_are_taken_again(tmp_path, monkeypatch):
    assert steal_share((10, 1000), (60, 2000)) == pytest.approx(0.05)
    assert steal_share((0, 0), (0, 0)) == 0.0
    stolen, total = harness.cpu_jiffies()
    assert 0 <= stolen <= total
    readings = iter([(0, 0), (50, 100), (50, 100), (60, 200), (60, 200), (61, 300)])  # 50%, 10%, 1% stolen
    monkeypatch.setattr(harness, "cpu_jiffies", lambda: next(readings))
    settings = Settings(quick=True, threads=1, workdir=tmp_path, steal_retries=2)
    row = run_worker(settings, "benchmarks.gemm:numpy_gemm", {"n": 32, "threads": 1, "warmup": 0, "repeats": 1},
                     label="stolen")
    assert row["status"] == "ok" and row["process"]["attempts"] == 3
    assert row["process"]["steal"] == pytest.approx(0.01)


def test_ort_profile_summary_counts_runs_and_op_types(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "a"], ["b"]), helper.make_node("Relu", ["b"], ["c"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [64, 64])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    summary_path = tmp_path / "profile.txt"
    timing = timed_ort_run(str(path), 1, {"a": np.ones((64, 64), np.float32)}, 1, 2, str(summary_path))
    assert len(timing["runs_ms"]) == 2 and not list(tmp_path.glob("*.json"))  # the raw trace is summarised, removed
    text = summary_path.read_text()
    assert "over 3 run(s)" in text and "MatMul" in text and "Relu" in text  # 1 warm-up + 2 timed


def _section(name: str, **data) -> dict:
    return {"section": name, "meta": {"quick": False}, **data}


def test_targets_pass_fail_and_unavailable():
    ok = lambda ms, **extra: {"status": "ok", "median_ms": ms, **extra}  # noqa: E731
    sections = {
        "gemm": _section("gemm", ceiling_gflops=100.0),
        "denoiser": _section("denoiser", models=["dit_s_2", "udit_s"], rows=[
            {"model": "dit_s_2", "backend": "torch_eager", **ok(150.0)},
            {"model": "dit_s_2", "backend": "ort_fp32", **ok(100.0, gflops=90.0)},
            {"model": "dit_s_2", "backend": "peer_diffusers_ort", **ok(95.0)},
            {"model": "dit_s_2", "backend": "ort_int8", **ok(40.0)},
            {"model": "udit_s", "backend": "ort_fp32", **ok(120.0)},
            {"model": "udit_s", "backend": "ort_int8", "status": "unavailable: no calibration"},
        ]),
    }
    # the interleaved measurement, where present, decides the ratios between ORT denoisers
    with_pairs = {**sections, "denoiser": {**sections["denoiser"], "paired": {"status": "ok", "rows": {
        "dit_s_2/ort_fp32": ok(100.0), "dit_s_2/peer_diffusers_ort": ok(105.0), "dit_s_2/ort_int8": ok(60.0)}}}}
    paired = {t["target"]: t for t in report.evaluate_targets(with_pairs)}
    peer = paired["ORT fp32 dit_s_2 speed vs diffusers peer export (peer time / ours)"]
    assert peer["status"] == "pass" and peer["measured"] == "1.05x (interleaved)"
    assert paired["ORT int8 dit_s_2 speed-up over ORT fp32"]["measured"] == "1.67x (interleaved)"
    assert paired["ORT fp32 udit_s step / dit_s_2 step"]["measured"] == "1.20x"  # udit_s not paired: both own rows
    by_name = {t["target"]: t for t in report.evaluate_targets(sections)}
    assert by_name["ORT fp32 dit_s_2 step vs fp32 GEMM ceiling"]["status"] == "pass"  # 90%
    assert by_name["ORT fp32 dit_s_2 speed-up over torch eager"]["status"] == "pass"  # 1.5x
    assert by_name["ORT fp32 dit_s_2 speed vs diffusers peer export (peer time / ours)"]["status"] == "fail"  # 0.95x
    assert by_name["ORT int8 dit_s_2 speed-up over ORT fp32"]["status"] == "pass"  # 2.5x
    assert by_name["ORT int8 udit_s speed-up over ORT fp32"]["status"] == "unavailable: no calibration"
    assert by_name["ORT fp32 udit_s step / dit_s_2 step"]["status"] == "pass"  # 1.2x
    assert by_name["`import runtime` time (torch-free)"]["status"].startswith("unavailable")


def test_int8_breakdown_bounds_the_speedup_by_what_stays_float():
    ok = lambda ms, op_ms: {"status": "ok", "median_ms": ms, "op_ms": op_ms}  # noqa: E731
    section = _section("denoiser", models=["dit_s_2", "udit_s"], rows=[
        {"model": "dit_s_2", "backend": "ort_fp32", **ok(200.0, {"MatMul": 140.0, "Softmax": 10.0, "Add": 50.0})},
        {"model": "dit_s_2", "backend": "ort_int8",
         **ok(120.0, {"MatMulIntegerToFloat": 50.0, "MatMul": 10.0, "QuantizeLinear": 5.0, "Add": 55.0})},
        {"model": "udit_s", "backend": "ort_fp32", "status": "ok", "median_ms": 100.0},  # not profiled: skipped
    ])
    (row,) = report.int8_breakdown(section)
    assert row["model"] == "dit_s_2" and row["fp32_gemm_ms"] == 140.0 and row["int8_gemm_ms"] == 50.0
    assert row["int8_rest_ms"] == 70.0 and row["quantize_ms"] == 5.0
    assert row["speedup"] == pytest.approx(200 / 120) and row["bound"] == pytest.approx(200 / 70)
    assert "2.86x" in report._int8_md([row])


def test_training_runs_are_pooled_over_alternating_rounds():
    from benchmarks.export_train import TRAIN_BATCH, pooled

    first = {"status": "ok", "loop": "plain PyTorch", "median_ms": 2.0, "runs_ms": [1.0, 2.0, 9.0], "repeats": 3}
    second = first | {"runs_ms": [3.0, 4.0, 5.0]}
    row = pooled([first, second])
    assert row["runs_ms"] == [1.0, 2.0, 9.0, 3.0, 4.0, 5.0] and row["repeats"] == 6 and row["rounds"] == 2
    assert row["median_ms"] == 3.5 and row["samples_per_s"] == pytest.approx(TRAIN_BATCH / 3.5e-3)
    failed = {"status": "unavailable: python -m train exit 1"}
    assert pooled([first, failed]) is failed
