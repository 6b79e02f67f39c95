"""Render the README's picture of a ``points`` output: photo -> depth -> PLY -> matplotlib 3D scatter.

    python scripts/point_cloud_picture.py [--out docs/images/points.png]

Like the README's other pictures, the depth comes from a random-weight checkpoint of the real
Depth-Anything-V2-Small architecture (no weights can be downloaded here), run through the exported
graph's torch twin; the PLY is made by the gateway's own ``render`` and read back with trimesh.
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import matplotlib
import numpy as np
import torch
import trimesh
from skimage import data

from catalogue.models import get_spec
from export.graph import ServingGraph
from export.random_checkpoint import build_model
from gateway.inputs.network_input import prepare
from gateway.inputs.schema import DepthRequest
from gateway.outputs.render import render
from gateway.served_model import ServedModel

matplotlib.use("Agg")
from matplotlib import pyplot as plt

MODEL_ID = "depth-anything/Depth-Anything-V2-Small-hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/points.png"))
    args = parser.parse_args()
    spec = get_spec(MODEL_ID)
    model = ServedModel(
        name=spec.triton_name, hf_id=spec.hf_id, metric=False, max_depth=None, precision="fp32",
        families=spec.families, resample=spec.resample, on_gpu=False, license=spec.license,
    )  # fmt: skip
    photo = data.coffee()
    network_input = prepare(photo, 1024, model).network_input
    with torch.no_grad():
        depth = ServingGraph(build_model(spec, "full"), spec)(torch.from_numpy(network_input[None]))[0].numpy()
    # random weights give noisy depth, most of which the flying-pixel filter would drop: it is off here
    request = DepthRequest(
        image_b64="x", tasks=["points"], max_points=40_000, camera={"fov_x": 60}, depth_edge_threshold=0
    )
    out = render((photo.shape[1], photo.shape[0]), photo, depth, request, model)
    cloud = trimesh.load(io.BytesIO(base64.b64decode(out["points_b64"])), file_type="ply")
    xyz, rgb = np.asarray(cloud.vertices), np.asarray(cloud.colors)[:, :3] / 255.0
    figure = plt.figure(figsize=(6, 4.5), dpi=120)
    axes = figure.add_subplot(projection="3d")
    axes.scatter(xyz[:, 0], xyz[:, 2], -xyz[:, 1], c=rgb, s=0.6, depthshade=False)  # z away, y up
    axes.view_init(elev=18, azim=-62)
    axes.set_xlabel("x")
    axes.set_ylabel("z (relative)")
    axes.set_zlabel("-y")
    axes.set_title(f"points: {out['points_count']} points, 60 degree camera, random weights")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
