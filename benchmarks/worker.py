"""One measurement in a fresh interpreter: `python -m benchmarks.worker MODULE:FUNCTION ARGS.json RESULT.json`.

The function gets the JSON arguments as keywords and returns a JSON-able dict; `Unavailable` becomes a
row saying why. Started by `harness.run_worker`, which has already fixed the thread environment.
"""
from __future__ import annotations

import importlib
import json
import resource
import sys
import traceback
from pathlib import Path

from benchmarks.harness import Unavailable


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m benchmarks.worker MODULE:FUNCTION ARGS.json RESULT.json", file=sys.stderr)
        return 2
    target, args_path, out_path = argv
    module_name, _, function_name = target.partition(":")
    kwargs = json.loads(Path(args_path).read_text())
    code = 0
    try:
        result = dict(getattr(importlib.import_module(module_name), function_name)(**kwargs))
        result.setdefault("status", "ok")
    except Unavailable as error:
        result = {"status": f"unavailable: {error}"}
    except Exception as error:  # any failure of the benchmarked code is a finding, not a harness crash
        traceback.print_exc()
        result = {"status": f"unavailable: {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
        code = 1
    result["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out_path).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
