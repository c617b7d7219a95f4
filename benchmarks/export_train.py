"""Export time of udit_b at fp16 (`dit-export`), and training throughput: the train package vs a plain loop."""
from __future__ import annotations

from benchmarks.harness import Settings
from benchmarks.packages import export_package

EXPORT_MODEL = {False: "udit_b", True: "udit_tiny"}


def run(settings: Settings) -> dict:
    model = EXPORT_MODEL[settings.quick]
    export = export_package(settings, model, fp16=True) | {"model": model}
    return {"export": export, "train": []}
