"""What a newcomer and a platform engineer touch: the quickstart, Dockerfiles, Runpod files, Triton clients."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from devstack.local import post
from gateway.inputs.schema import parse_request
from gateway.settings import ENVIRONMENT, Settings
from tests.conftest import RELATIVE_ID, ROOT
from tests.helpers import decode_image

DOCKERFILES = ["Dockerfile.triton", "Dockerfile"]


def quickstart(command: list[str], out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command, "--out", str(out)], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True
    )


def test_quickstart_without_weights_says_how_to_pass_them(tmp_path: Path) -> None:
    result = quickstart([sys.executable, "scripts/quickstart.py"], tmp_path, HF_HUB_OFFLINE="1", CHECKPOINT="")
    assert result.returncode == 2
    assert "No model weights" in result.stderr
    assert "--checkpoint /path/to/checkpoint" in result.stderr


def test_quickstart_as_the_readme_runs_it(tmp_path: Path) -> None:
    """No weights at all, one command."""
    result = quickstart(["scripts/quickstart.sh", "--random-weights"], tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    results = tmp_path / "results"
    for task in ("depth", "colorized", "normals", "disparity", "point_cloud"):
        assert (results / f"sample_{task}.png").stat().st_size > 1000
    assert (results / "sample_points.ply").read_bytes().startswith(b"ply\n")
    assert (results / "sample_mesh.glb").read_bytes()[:4] == b"glTF"
    assert "Timings:" in result.stdout
    assert f"Outputs: {results}" in result.stdout
    assert re.search(r"\d+\.\d\d s  export", result.stdout)
    assert "no GPU: exporting and serving FP32" in result.stdout  # CPU-only machine
    assert sorted(p.name for p in (tmp_path / "model_repository").iterdir()) == ["depth_anything_v2_small_fp32"]
    log = (tmp_path / "gateway.log").read_text()  # where people wait, the log says what happens
    assert "starting tritonserver over" in log
    ready = re.search(r"tritonserver ready in [\d.]+ s on loopback: gRPC (127\.0\.0\.1:\d+), HTTP", log)
    assert ready, log[-2000:]
    assert f"examples/triton_client.py --url {ready.group(1)}" in log
    assert re.search(r"loading depth-anything/Depth-Anything-V2-Small-hf and starting \d+ image workers", log)
    assert re.search(r"\d ready in [\d.]+ s$", log, re.MULTILINE)  # the last step: the worker is up

    checkpoint = tmp_path / "checkpoints" / "random"  # what a second run would find: no second export
    assert quickstart_module().already_exported(tmp_path / "model_repository", RELATIVE_ID, "fp32", checkpoint)


def quickstart_module():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "scripts" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quickstart_exports_again_only_for_another_checkpoint_or_precision(repository: Path) -> None:
    quick = quickstart_module()
    report = json.loads((repository / "depth_anything_v2_small" / "export_report.json").read_text())
    checkpoint = Path(report["checkpoint"])
    assert quick.already_exported(repository, RELATIVE_ID, "fp16", checkpoint)
    assert not quick.already_exported(repository, RELATIVE_ID, "fp16", checkpoint.parent / "other")
    assert not quick.already_exported(repository, RELATIVE_ID, "fp16", None)  # the hub's weights
    assert not quick.already_exported(repository, "depth-anything/Depth-Anything-V2-Base-hf", "fp16", checkpoint)


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", *DOCKERFILES], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_references_exist(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    copies = re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", text, flags=re.MULTILINE)
    assert copies
    for sources in copies:
        for source in sources.split():
            assert (ROOT / source).exists(), f"{dockerfile} copies {source}, which does not exist"
    for module in re.findall(r"python3? -m (\w+)", text):
        assert importlib.util.find_spec(module) is not None, f"{dockerfile} runs python -m {module}"
    for extra in re.findall(r'"\.\[(\w+)\]"', text):
        assert f"\n{extra} = [" in (ROOT / "pyproject.toml").read_text()
    assert re.search(r"^USER (?!root)", text, flags=re.MULTILINE)
    assert re.search(r"^ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3$", text, flags=re.MULTILINE)


def test_gateway_image_uses_the_tritonserver_path_the_launcher_knows() -> None:
    from gateway.serving.triton_process import NVIDIA_IMAGE_BINARY

    assert str(NVIDIA_IMAGE_BINARY) == "/opt/tritonserver/bin/tritonserver"
    assert 'CMD ["python3", "-m", "gateway"]' in (ROOT / "Dockerfile").read_text()


def test_runpod_files_are_valid() -> None:
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    assert hub["type"] == "serverless"
    assert hub["config"]["runsOn"] == "GPU"
    assert {env["key"] for env in hub["config"]["env"]} <= {
        "DEPTH_MODEL",
        "CONCURRENCY",
        "MAX_IMAGES",
        "MAX_LOADED_MODELS",
    }
    defaults = Settings()
    variables = {variable: name for name, (variable, _parse) in ENVIRONMENT.items()}
    for env in hub["config"]["env"]:  # the hub offers the worker's own defaults
        assert env["input"]["default"] == getattr(defaults, variables[env["key"]]), env["key"]
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())
    assert tests["tests"]
    inputs = [test["input"] for test in tests["tests"]]
    inputs.append(json.loads((ROOT / "test_input.json").read_text())["input"])
    for payload in inputs:
        parse_request(payload, max_images=16)  # raises on an invalid request
    assert (ROOT / ".runpod" / "handler.py").exists()


def test_runpod_test_inputs_run_on_the_local_stack(gateway_url: str) -> None:
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())["tests"]
    test_input = json.loads((ROOT / "test_input.json").read_text())["input"]
    for payload in [test["input"] for test in tests] + [test_input]:
        reply = post(gateway_url, payload)
        assert reply["status"] == "COMPLETED", reply
        first = reply["output"]["results"][0]
        assert decode_image(first["depth_png_b64"]).shape == (64, 96)


@pytest.mark.parametrize(("protocol", "model"), [("grpc", "depth_anything_v2_small"), ("http", None)])
def test_direct_triton_client_example(protocol: str, model: str | None, triton, tmp_path: Path, photos: dict) -> None:
    """As README's "Calling Triton directly" says, against the local (embedded) Triton; without --model
    the example picks a model the repository has."""
    import cv2

    photo = tmp_path / "photo.jpg"
    cv2.imwrite(str(photo), cv2.cvtColor(photos["chelsea_4x3"], cv2.COLOR_RGB2BGR))
    url = triton.grpc_url if protocol == "grpc" else triton.http_url.removeprefix("http://")
    out = tmp_path / "depth.npy"
    command = [sys.executable, "examples/triton_client.py", str(photo), "--url", url, "--protocol", protocol, "--load"]
    command += ["--model", model] if model else []
    result = subprocess.run([*command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    served = {m["name"] for m in json.loads(urllib.request.urlopen(f"{triton.http_url}/v2/repository/index",
                                                                   data=b"{}").read())}  # fmt: skip
    assert result.stdout.split(" via ")[0] in served
    depth = np.load(out)
    assert depth.shape == (518, 686)
    assert depth.dtype == np.float32
    assert depth.std() > 0


def test_api_docs_match_the_schema() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/api_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "```bash\nscripts/test.sh\n```" in readme
    assert "exec scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_documents_every_setting() -> None:
    from gateway import settings

    source = Path(settings.__file__).read_text()
    readme = (ROOT / "README.md").read_text()
    for variable in set(re.findall(r'"([A-Z][A-Z0-9_]+)"', source)):
        assert f"| `{variable}` |" in readme, f"{variable} is not in the README's configuration table"
