"""Attention scaling: full vs U-DiT downsampled vs CLEAR local window (radius 8, 16) over token grids.

Each op is a single-op ONNX model exported the way the denoisers are (torch.onnx.export with the
dit_ops translation table, then the dit_ops function bodies attached; full attention is plain SDPA,
standard ONNX), run in ONNX Runtime, and the same op runs in torch eager (SDPA, and the dit_ops eager
paths). The fitted exponent is the slope of log time over log tokens: 2 for full attention, 1 for a
linear-cost one. One sequence (batch 1, 1 head, head_dim 64): full attention at 128^2 tokens already
materialises a 16384^2 fp32 score matrix (1 GiB) in ONNX Runtime.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.harness import Settings, fit_exponent, ok, run_worker, time_call, timed_ort_run

KINDS = {"full": {}, "downsampled": {}, "local_r8": {"radius": 8}, "local_r16": {"radius": 16}}
FULL_GRIDS = (16, 32, 64, 128)
QUICK_GRIDS = (8, 16)
FIT_FROM = 32  # the exponent is fitted over grids >= this (32^2..128^2), where fixed costs no longer dominate
BATCH, HEADS, HEAD_DIM = 1, 1, 64


def _module(kind: str, grid: int):
    """torch module running one attention op on (B, heads, grid^2, D) q, k, v."""
    import math

    import torch
    import torch.nn.functional as F

    from dit_ops.downsampled_attention.reference import downsampled_attention
    from dit_ops.local_window_attention.reference import local_window_attention

    class OneOp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # U-DiT's cosine logits with the initial log-temperature; DiT's D^-0.5 for the local window
            self.register_buffer("logit_scale", torch.full((HEADS,), math.log(10.0)))
            self.register_buffer("scale", torch.full((HEADS,), HEAD_DIM**-0.5))

        def forward(self, q, k, v):
            if kind == "full":
                return F.scaled_dot_product_attention(q, k, v)
            if kind == "downsampled":
                return downsampled_attention(q, k, v, self.logit_scale, grid_h=grid, grid_w=grid, rope=True, cosine=True)
            return local_window_attention(q, k, v, self.scale, grid_h=grid, grid_w=grid, radius=KINDS[kind]["radius"])

    return OneOp().eval()


def _qkv(grid: int, library: str):
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((BATCH, HEADS, grid * grid, HEAD_DIM), dtype=np.float32) for _ in range(3)]
    if library == "torch":
        import torch

        return [torch.from_numpy(a) for a in arrays]
    return dict(zip(("q", "k", "v"), arrays))


def _runs(case: str, slow_case: str, warmup: int, repeats: int) -> tuple[int, int]:
    """(warm-up, timed runs): full attention at the largest grid takes seconds per call, so it runs 1 + 3."""
    return (1, min(repeats, 3)) if case == slow_case else (warmup, repeats)


def torch_ops(cases: list[list], out_dir: str, threads: int, warmup: int, repeats: int, slow_case: str) -> dict:
    """Worker: time each (kind, grid) op in torch eager, then export it to out_dir/<kind>_<grid>.onnx.

    Per case: the timing (or why it failed) and the exported path (or why the export failed).
    """
    import onnx
    import torch

    import dit_ops

    torch.set_num_threads(threads)
    table = dit_ops.translation_table()
    timed, exported = {}, {}
    for kind, grid in cases:
        case = f"{kind}_{grid}"
        module, (q, k, v) = _module(kind, grid), _qkv(grid, "torch")
        runs = _runs(case, slow_case, warmup, repeats)
        try:
            with torch.inference_mode():
                timed[case] = time_call(lambda: module(q, k, v), *runs) | {"status": "ok"}
        except Exception as error:  # one failing case must not hide the others
            timed[case] = {"status": f"unavailable: {type(error).__name__}: {str(error)[:200]}"}
        try:
            with torch.inference_mode():
                program = torch.onnx.export(module, (q, k, v), dynamo=True, opset_version=20,
                                            input_names=["q", "k", "v"], output_names=["out"],
                                            custom_translation_table=table, verbose=False)
            model = dit_ops.attach_functions(program.model_proto)
            path = Path(out_dir) / f"{case}.onnx"
            onnx.save(model, path)
            exported[case] = {"status": "ok", "path": str(path), "ops": sorted({n.op_type for n in model.graph.node})}
        except Exception as error:
            exported[case] = {"status": f"unavailable: export failed: {type(error).__name__}: {str(error)[:200]}"}
    return {"timed": timed, "exported": exported}


def ort_ops(paths: dict, threads: int, warmup: int, repeats: int, slow_case: str,
            profile_dir: str | None = None) -> dict:
    """Worker (torch-free): median run of each exported single-op model; `slow_case` gets fewer repeats."""
    timed = {}
    for case, path in paths.items():
        grid = int(case.rsplit("_", 1)[1])
        profile = str(Path(profile_dir) / f"attention_ort_{case}.txt") if profile_dir else None
        runs = _runs(case, slow_case, warmup, repeats)
        try:
            timed[case] = timed_ort_run(path, threads, _qkv(grid, "onnxruntime"), *runs, profile) | {"status": "ok"}
        except Exception as error:
            timed[case] = {"status": f"unavailable: {type(error).__name__}: {str(error)[:200]}"}
    return {"timed": timed}


def _summary(rows: list[dict], grids: tuple[int, ...]) -> dict:
    """Fitted exponents per (backend, kind) and the full / local_r8 ratio at the largest grid."""
    fit_grids = [g for g in grids if g >= FIT_FROM] or list(grids)  # quick grids are all below FIT_FROM
    summary: dict = {"fit_grids": fit_grids, "exponent": {}, "full_over_local_r8": {}}
    for backend in ("ort", "torch"):
        timed = {(row["kind"], row["grid"]): row["median_ms"] for row in rows if row["backend"] == backend and ok(row)}
        for kind in KINDS:
            points = [(g * g, timed[(kind, g)]) for g in fit_grids if (kind, g) in timed]
            if len(points) == len(fit_grids) and len(points) >= 2:
                summary["exponent"][f"{backend}_{kind}"] = fit_exponent(*zip(*points))
        largest = grids[-1]
        if ("full", largest) in timed and ("local_r8", largest) in timed:
            summary["full_over_local_r8"][backend] = timed[("full", largest)] / timed[("local_r8", largest)]
    summary["largest_grid"] = grids[-1]
    return summary


def run(settings: Settings) -> dict:
    grids = QUICK_GRIDS if settings.quick else FULL_GRIDS
    slow_case = f"full_{grids[-1]}"
    out_dir = settings.workdir / "attention"
    out_dir.mkdir(exist_ok=True)
    cases = [[kind, grid] for kind in KINDS for grid in grids]
    timing = {"threads": settings.threads, **settings.timing(), "slow_case": slow_case}
    in_torch = run_worker(settings, "benchmarks.attention:torch_ops", {"cases": cases, "out_dir": str(out_dir), **timing},
                          label="attention_torch")
    exports = in_torch.get("exported", {})
    paths = {case: entry["path"] for case, entry in exports.items() if ok(entry)}
    in_ort = run_worker(settings, "benchmarks.attention:ort_ops",
                        {"paths": paths, **timing, "profile_dir": str(settings.profile_dir) if settings.profile_dir else None},
                        label="attention_ort") if paths else {"status": "unavailable: no single-op model exported"}
    rows = []
    for backend, result in (("ort", in_ort), ("torch", in_torch)):
        for kind, grid in cases:
            case = f"{kind}_{grid}"
            if not ok(result):
                row = {"status": result["status"]}
            elif case in result["timed"]:
                row = result["timed"][case]
            else:  # ORT cases without a model: say why the export failed
                row = {"status": exports.get(case, {}).get("status", "not measured")}
            rows.append(row | {"kind": kind, "backend": backend, "grid": grid, "tokens": grid * grid})
    workers = {backend: result.get("process") for backend, result in (("ort", in_ort), ("torch", in_torch))}
    return {"batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM, "grids": list(grids), "rows": rows,
            "exports": exports, "workers": workers, "summary": _summary(rows, grids)}
