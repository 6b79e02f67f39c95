"""The layout's rules, as README's "How it fits together" states them: imports run downhill.

- ``gateway/inputs`` and ``gateway/outputs`` (pure stages of a request) never import ``gateway/serving``
  (processes, Triton, the job loop);
- nothing in ``gateway/`` imports the exporter (``export/``): both read the model table in ``catalogue/``;
- an image-worker process (``gateway.serving.imagework``) loads neither gRPC, the Triton client nor the
  exporter (measured before the split: 95 MB RSS and ~60 ms more start-up per process);
- the worker image does not carry the exporter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

GATEWAY = ROOT / "gateway"


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def violations(folder: Path, forbidden: str) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for name in imports_of(path):
            if name == forbidden or name.startswith(forbidden + "."):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def test_the_stages_of_a_request_never_import_serving() -> None:
    assert violations(GATEWAY / "inputs", "gateway.serving") == []
    assert violations(GATEWAY / "outputs", "gateway.serving") == []


def test_the_gateway_never_imports_the_exporter_nor_the_local_stand_ins() -> None:
    assert violations(GATEWAY, "export") == []
    assert violations(GATEWAY, "devstack") == []  # not in the worker's image
    assert violations(GATEWAY, "bench") == []
    assert violations(GATEWAY, "tests") == []
    assert violations(ROOT / "catalogue", "export") == []
    assert violations(ROOT / "catalogue", "gateway") == []


def test_the_rule_checker_sees_an_uphill_import(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("from gateway.serving.triton import TritonModels\nimport export.cli\n")
    assert imports_of(tmp_path / "bad.py") == {"gateway.serving.triton", "export.cli"}


def test_an_image_worker_loads_no_grpc_triton_client_or_exporter() -> None:
    probe = (
        "import sys, gateway.serving.imagework\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'grpc', 'tritonclient', 'export', 'torch'}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_worker_image_does_not_carry_the_exporter() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    worker_stage = dockerfile.rsplit("FROM ", 1)[1]
    assert "COPY catalogue ./catalogue" in worker_stage
    assert "COPY gateway ./gateway" in worker_stage
    assert "COPY export" not in worker_stage
