"""Call the Triton server directly with tritonclient: a uint8 RGB image in, a depth map out.

    python examples/triton_client.py photo.jpg --url localhost:8001 --protocol grpc --out depth.npy
    python examples/triton_client.py photo.jpg --url localhost:8000 --protocol http --model dpt_large

Without ``--model`` it uses a model Triton has loaded (else, with ``--load``, the first of its
repository), so it works against any repository, e.g. the CPU quickstart's (only ``_fp32`` variants).

The model's config carries its shape buckets; the image is resized to the bucket nearest its aspect
ratio (the exported graph does /255, mean/std and the layout change itself). The depth map comes back at
the bucket's size: relative models give inverse depth (larger = nearer), metric ones metres.
"""

from __future__ import annotations

import argparse
import json
import math

import cv2
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def default_model(client, protocol: str) -> str:
    """A model the server has ready, else the first its repository lists."""
    if protocol == "grpc":
        models = client.get_model_repository_index(as_json=True).get("models", [])
    else:
        models = client.get_model_repository_index()  # a list of {"name", "state", ...}
    names = sorted(model["name"] for model in models)
    ready = sorted(model["name"] for model in models if model.get("state") == "READY")
    if not names:
        raise SystemExit("the server's model repository is empty")
    return (ready or names)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--model", help="a Triton model name (default: a loaded one, else the repository's first)")
    parser.add_argument("--load", action="store_true", help="ask Triton to load the model (explicit mode)")
    parser.add_argument("--out", default="depth.npy")
    args = parser.parse_args()

    client_module = grpcclient if args.protocol == "grpc" else httpclient
    client = client_module.InferenceServerClient(args.url)
    args.model = args.model or default_model(client, args.protocol)
    if args.load:
        client.load_model(args.model)
    if args.protocol == "grpc":
        parameters = client.get_model_config(args.model, as_json=True)["config"]["parameters"]
    else:
        parameters = client.get_model_config(args.model)["parameters"]
    buckets = json.loads(parameters["buckets"]["string_value"])

    image = cv2.cvtColor(cv2.imread(args.image, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    aspect = math.log(image.shape[1] / image.shape[0])
    height, width = min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - aspect))
    batch = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)[None]

    request = client_module.InferInput("image", list(batch.shape), "UINT8")
    request.set_data_from_numpy(batch)
    result = client.infer(args.model, [request], outputs=[client_module.InferRequestedOutput("depth")])
    depth = result.as_numpy("depth")[0]
    np.save(args.out, depth)
    print(f"{args.model} via {args.protocol}: depth {depth.shape} {depth.dtype}, {depth.min():.4g}..{depth.max():.4g}")


if __name__ == "__main__":
    main()
