"""Importing `runtime` and sampling loads neither torch nor diffusers (nor onnx, nor TensorRT unless present).

Run in a fresh interpreter: the test process itself has torch loaded by other tests.
"""

import json
import subprocess
import sys
from pathlib import Path

from tests.runtime_fixtures import build_package

FORBIDDEN = ("torch", "diffusers", "onnx", "typer", "tqdm")

SCRIPT = """
import json, sys, warnings
import runtime
after_import = sorted(sys.modules)
images = runtime.Sampler(sys.argv[1])([1, 2], steps=3, scheduler="ddpm")
after_cpu = sorted(sys.modules)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # no engine in the fixture: TensorRT falls back to CPU
    runtime.Sampler(sys.argv[1], provider="tensorrt")([3], steps=2, scheduler="ddim")
print(json.dumps({"import": after_import, "cpu": after_cpu, "all": sorted(sys.modules), "shape": list(images.shape)}))
"""


def top_level(modules: list[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_runtime_is_torch_free(tmp_path):
    package, _ = build_package(tmp_path / "package")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(package)], capture_output=True, text=True, cwd=root, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape"] == [2, 16, 16, 3]
    assert top_level(report["all"]).isdisjoint(FORBIDDEN), top_level(report["all"]) & set(FORBIDDEN)
    assert "tensorrt" not in top_level(report["cpu"]) and "dit_ops" not in top_level(report["cpu"])
    # onnxruntime is imported when the first session opens, not by `import runtime` (import time).
    assert "onnxruntime" not in top_level(report["import"])
    assert "onnxruntime" in top_level(report["cpu"])
