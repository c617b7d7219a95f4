"""The machine's fp32 GEMM ceiling: the best of numpy, torch and ONNX Runtime on one n x n x n product.

Achieved GFLOP/s of the denoisers are judged against this number, measured in the same run with the
same thread count, so a loaded or throttled machine moves both sides together.
"""
from __future__ import annotations

from benchmarks.harness import Settings, ok, ort_session, run_worker, time_call

LIBRARIES = ("numpy", "torch", "onnxruntime")


def _operands(n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)


def numpy_gemm(n: int, threads: int, warmup: int, repeats: int) -> dict:
    import numpy as np

    a, b = _operands(n)
    out = np.empty_like(a)
    return time_call(lambda: np.matmul(a, b, out=out), warmup, repeats)


def torch_gemm(n: int, threads: int, warmup: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    a, b = (torch.from_numpy(x) for x in _operands(n))
    out = torch.empty_like(a)
    with torch.inference_mode():
        return time_call(lambda: torch.mm(a, b, out=out), warmup, repeats)


def onnxruntime_gemm(n: int, threads: int, warmup: int, repeats: int) -> dict:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    session = ort_session(model.SerializeToString(), threads)
    a, b = _operands(n)
    return time_call(lambda: session.run(None, {"a": a, "b": b}), warmup, repeats)


def run(settings: Settings) -> dict:
    n = 512 if settings.quick else 2048
    rows = []
    for library in LIBRARIES:
        row = run_worker(settings, f"benchmarks.gemm:{library}_gemm",
                         {"n": n, "threads": settings.threads, **settings.timing()}, label=f"gemm_{library}")
        row["library"] = library
        if ok(row):
            row["gflops"] = 2 * n**3 / (row["median_ms"] * 1e-3) / 1e9
        rows.append(row)
    measured = [row for row in rows if ok(row)]
    best = max(measured, key=lambda row: row["gflops"]) if measured else None
    return {"n": n, "rows": rows, "ceiling_gflops": best["gflops"] if best else None,
            "ceiling_library": best["library"] if best else None}
