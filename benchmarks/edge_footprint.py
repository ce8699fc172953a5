"""What an edge-only generation costs a device: import time, peak memory, modules loaded.

    make lean-check          # a fresh venv with `pip install .` (no extras), then this script in it

Run from a venv made by a plain ``pip install pipesd``, this also proves the edge needs none of the
verifier's or the lab's libraries. (Python puts this script's folder, not the repository, on the
path, so what it imports is what the venv installed.)
"""

from __future__ import annotations

import resource
import sys
import time

HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "starlette", "onnxruntime", "scipy", "sklearn", "skopt",
         "matplotlib", "cloud_verifier", "energy", "pipesd_lab")

t0 = time.perf_counter()
import edge_sdk  # noqa: E402

imported_s = time.perf_counter() - t0
from edge_sdk import EdgeClient  # noqa: E402

t1 = time.perf_counter()
with EdgeClient(local_only=True, threads=1) as client:
    loaded_s = time.perf_counter() - t1
    result = client.generate("def fibonacci(n):\n", max_new_tokens=64)
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
heavy = [m for m in HEAVY if m in sys.modules]
print(f"edge_sdk from {edge_sdk.__file__}")
print(f"import edge_sdk: {imported_s:.3f} s; draft load: {loaded_s:.3f} s; 64 tokens edge-only: "
      f"{result.stats.total_s:.3f} s; peak RSS {rss_mb:.0f} MB; modules loaded of {HEAVY}: {heavy or 'none'}")
sys.exit(1 if heavy else 0)
