"""Where the module boundaries are, checked: the ingress loads no ML library."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "peft", "faiss", "vllm", "transformers", "sentence_transformers")


def test_the_ingress_imports_no_ml_library():
    """The Ray ingress replica imports ttserve.serving.app and builds the API in its own process, on a fraction
    of a CPU: building a request and writing an answer must not pull in torch, PEFT, Faiss or vLLM."""
    program = (
        "import json, sys\n"
        "import ttserve.serving.app\n"
        "from ttserve.config import Settings\n"
        "from ttserve.serving.api import build_api\n"
        "from ttserve.serving.app import HandleBackend\n"
        "build_api(HandleBackend.__new__(HandleBackend), Settings())\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []
