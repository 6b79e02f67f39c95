"""CPU cost per image of every stage around inference: ours beside a faithful copy of the seed's approach.

    python -m bench.cpu_postprocess [--repeats 15] [--glibc-malloc]

One core (OpenCV's and torch's thread pools pinned to 1). Input: scikit-image's astronaut photo enlarged to 1024x768 and
JPEG-encoded; a smooth depth map at the network shape 518x686. The seed's approach: Pillow decode,
transformers' image processor, torch bicubic upsampling, matplotlib colormap objects, NumPy float64
gradients, Pillow encoders at their defaults. Both are timed alternately, medians of ``--repeats`` runs.
Prints a table and writes bench/results/cpu_postprocess.json, with encoded sizes and content checks.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import time

import cv2
import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from skimage import data

from bench.common import interleaved, write
from catalogue.models import get_spec
from catalogue.size import Size
from export.random_checkpoint import image_processor
from gateway.inputs.decode import decode_image, decode_scaled
from gateway.inputs.network_input import network_bucket, prepare
from gateway.inputs.schema import DepthRequest
from gateway.outputs import geometry
from gateway.outputs import postprocess as pp
from gateway.outputs.encode import b64, encode_image
from gateway.outputs.render import render, render_3d
from gateway.served_model import ServedModel
from gateway.serving.imagework import keep_freed_memory

WIDTH, HEIGHT = 1024, 768
PHONE = Size(4032, 3024)
NETWORK = Size(686, 518)
GRID = 512
SPEC = get_spec("depth-anything/Depth-Anything-V2-Small-hf")
MODEL = ServedModel(
    name=SPEC.triton_name, hf_id=SPEC.hf_id, metric=False, max_depth=None, precision="fp16", families=SPEC.families,
    resample=SPEC.resample, on_gpu=False, license=SPEC.license,
)  # fmt: skip


def astronaut_jpeg(size: Size) -> bytes:
    """scikit-image's astronaut cut to 4:3 and resized to ``size``, JPEG quality 92."""
    photo = cv2.resize(data.astronaut()[64:448], size, interpolation=cv2.INTER_CUBIC)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def inputs() -> tuple[bytes, np.ndarray]:
    rows, cols = np.mgrid[0 : NETWORK.height, 0 : NETWORK.width].astype(np.float32)
    depth = 1.0 + 0.5 * np.sin(cols / 60.0) * np.cos(rows / 45.0) + rows / NETWORK.height
    return astronaut_jpeg(Size(WIDTH, HEIGHT)), depth.astype(np.float32)


# ----------------------------------------------------------------------------- the seed's approach


def pil_bytes(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], quality=95)
    return buffer.getvalue()


class Seed:
    def __init__(self) -> None:
        self.processor = image_processor(SPEC)

    def decode(self, jpeg: bytes) -> Image.Image:
        return Image.open(io.BytesIO(jpeg)).convert("RGB")

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"]

    def upsample(self, depth: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(depth)[None, None]
        return torch.nn.functional.interpolate(tensor, size=(HEIGHT, WIDTH), mode="bicubic", align_corners=False)[
            0, 0
        ].numpy()

    def normalized(self, depth: np.ndarray) -> np.ndarray:
        return (depth - depth.min()) / (depth.max() - depth.min())

    def depth_png(self, depth: np.ndarray) -> str:
        return base64.b64encode(pil_bytes((self.normalized(depth) * 65535).astype(np.uint16), "png")).decode()

    def colorized(self, depth: np.ndarray, fmt: str = "png") -> str:
        rgba = colormaps.get_cmap("viridis")(self.normalized(depth))
        return base64.b64encode(pil_bytes((rgba[..., :3] * 255).astype(np.uint8), fmt)).decode()

    def normals(self, depth: np.ndarray, fmt: str = "png") -> str:
        grad_y, grad_x = np.gradient(self.normalized(depth) * min(depth.shape))
        normal = np.dstack([-grad_x, -grad_y, np.ones_like(depth, dtype=np.float64)])
        normal /= np.linalg.norm(normal, axis=2, keepdims=True)
        return base64.b64encode(pil_bytes(((normal + 1) / 2 * 255).astype(np.uint8), fmt)).decode()

    def disparity(self, depth: np.ndarray, fmt: str = "png") -> str:
        inverse = 1.0 / (np.maximum(depth, 0) + 1e-3 * (depth.max() - depth.min()))
        return base64.b64encode(pil_bytes((self.normalized(inverse) * 255).astype(np.uint8), fmt)).decode()

    def point_cloud(self, image: np.ndarray, depth: np.ndarray) -> str:
        distance = 1.0 - self.normalized(depth)
        rows = ((1.0 - distance) * (GRID - 1)).round().astype(int)
        cols = np.broadcast_to((np.arange(WIDTH) * (GRID - 1) / (WIDTH - 1)).round().astype(int), depth.shape)
        canvas = np.zeros((GRID, GRID, 3), np.uint8)
        canvas[rows, cols] = image
        return base64.b64encode(pil_bytes(canvas, "png")).decode()


# ----------------------------------------------------------------------------- ours


class Ours:
    def decode(self, jpeg: bytes) -> np.ndarray:
        return decode_image(jpeg, 50_000_000)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return prepare(image, 1024, MODEL).network_input

    def upsample(self, depth: np.ndarray) -> np.ndarray:
        return pp.upsample(depth, WIDTH, HEIGHT)

    def unit(self, depth: np.ndarray) -> np.ndarray:
        return pp.normalized(depth, normalize=True, max_depth=None)

    def depth_png(self, depth: np.ndarray) -> str:
        return b64(encode_image(pp.depth_uint16(depth), "png"))

    def colorized(self, depth: np.ndarray, fmt: str = "png") -> str:
        return b64(encode_image(pp.colorize(self.unit(depth), "viridis"), fmt, 95))

    def normals(self, depth: np.ndarray, fmt: str = "png") -> str:
        camera = geometry.from_fov(WIDTH, HEIGHT, geometry.DEFAULT_FOV_X, "default")
        normals = geometry.surface_normal_planes(geometry.planar_depth(depth, metric=False), camera)
        return b64(encode_image(pp.normals_rgb(normals), fmt, 95))

    def disparity(self, depth: np.ndarray, fmt: str = "png") -> str:
        return b64(encode_image(pp.disparity(depth, metric=False), fmt, 95))

    def point_cloud(self, image: np.ndarray, depth: np.ndarray) -> str:
        return b64(encode_image(pp.point_cloud(image, pp.distance_from_camera(depth, False), GRID), "png"))


def check_content(ours: Ours, seed: Seed, image: np.ndarray, depth: np.ndarray) -> dict:
    """Both decode to the same sizes; ours is within quantization / one colormap level of the float map."""
    ours_depth, seed_depth = ours.upsample(depth), seed.upsample(depth)

    def decoded(text: str) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)

    png = decoded(ours.depth_png(ours_depth)).astype(np.float64)
    low, high = float(ours_depth.min()), float(ours_depth.max())
    quantization = np.abs(png / 65535 * (high - low) + low - ours_depth).max() / ((high - low) / 65535)
    colour = cv2.cvtColor(decoded(ours.colorized(ours_depth)), cv2.COLOR_BGR2RGB).astype(int)
    reference = np.round(colormaps["viridis"](np.round(ours.unit(ours_depth) * 255) / 255)[..., :3] * 255)
    shapes_equal = all(
        decoded(getattr(ours, task)(ours_depth)).shape[:2] == decoded(getattr(seed, task)(seed_depth)).shape[:2]
        for task in ("depth_png", "colorized", "normals", "disparity")
    )
    return {
        "same_output_sizes": bool(shapes_equal),
        "depth_png_error_in_quantization_steps": float(quantization),
        "colormap_max_level_difference_vs_matplotlib": int(np.abs(colour - reference).max()),
        "upsampled_depth_correlation_ours_vs_seed": float(np.corrcoef(ours_depth.ravel(), seed_depth.ravel())[0, 1]),
    }


def three_d_request(tasks: list[str]) -> DepthRequest:
    return DepthRequest(image_b64="", tasks=tasks)


def median_cpu_ms(function, args: argparse.Namespace) -> float:
    samples = []
    for _ in range(args.repeats):
        started = time.process_time()
        function()
        samples.append((time.process_time() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--glibc-malloc",
        action="store_true",
        help="leave glibc's allocator at its defaults (the image workers keep freed memory: keep_freed_memory)",
    )
    args = parser.parse_args()
    if not args.glibc_malloc:
        keep_freed_memory()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    jpeg, network_depth = inputs()
    ours, seed = Ours(), Seed()
    image = ours.decode(jpeg)
    ours_depth, seed_depth = ours.upsample(network_depth), seed.upsample(network_depth)
    seed_image = seed.decode(jpeg)

    pairs = {
        "decode": (lambda: ours.decode(jpeg), lambda: seed.decode(jpeg)),
        "resize to the network": (lambda: ours.preprocess(image), lambda: seed.preprocess(seed_image)),
        "upsample depth": (lambda: ours.upsample(network_depth), lambda: seed.upsample(network_depth)),
        "depth (16-bit PNG)": (lambda: ours.depth_png(ours_depth), lambda: seed.depth_png(seed_depth)),
        "colorized": (lambda: ours.colorized(ours_depth), lambda: seed.colorized(seed_depth)),
        "normals": (lambda: ours.normals(ours_depth), lambda: seed.normals(seed_depth)),
        "disparity": (lambda: ours.disparity(ours_depth), lambda: seed.disparity(seed_depth)),
        "point_cloud": (lambda: ours.point_cloud(image, ours_depth), lambda: seed.point_cloud(image, seed_depth)),
    }
    for fmt in ("png", "jpg", "webp"):
        pairs[f"colorized as {fmt}"] = (
            lambda fmt=fmt: ours.colorized(ours_depth, fmt),
            lambda fmt=fmt: seed.colorized(seed_depth, fmt),
        )

    request = DepthRequest(image_b64="", tasks=["depth", "colorized", "normals", "disparity", "point_cloud"])

    def whole_ours() -> None:  # the gateway's own code path: decode, prepare, render
        decoded = ours.decode(jpeg)
        prepare(decoded, request.max_size, MODEL)
        render(Size.of(decoded), decoded, network_depth, request, MODEL)

    def whole_seed() -> None:
        decoded = seed.decode(jpeg)
        seed.preprocess(decoded)
        depth = seed.upsample(network_depth)
        seed.depth_png(depth), seed.colorized(depth), seed.normals(depth), seed.disparity(depth)
        seed.point_cloud(np.asarray(decoded), depth)

    pairs["ALL: decode + resize + upsample + five tasks"] = (whole_ours, whole_seed)
    phone = astronaut_jpeg(PHONE)  # 12 megapixels, as phones take them

    def phone_ours() -> None:  # as the image workers do it: no photo in the outputs, decoded smaller
        photo, size = decode_scaled(phone, 50_000_000, lambda size: network_bucket(size, 1024, MODEL))
        prepare(photo, 1024, MODEL, None, size)

    pairs[f"{PHONE[0]}x{PHONE[1]} JPEG: decode + resize to the network"] = (
        phone_ours,
        lambda: seed.preprocess(seed.decode(phone)),
    )
    stages = interleaved(pairs, args.repeats)
    full_scale = median_cpu_ms(lambda: prepare(ours.decode(phone), 1024, MODEL), args)
    camera = geometry.intrinsics_for(image.shape[1], image.shape[0], None, None)  # the default 60 degrees
    three_d = {  # the seed had no 3D output: timed alone, median CPU time
        name: median_cpu_ms(
            lambda tasks=tasks: render_3d(ours_depth, image, three_d_request(tasks), MODEL, camera), args
        )
        for name, tasks in (
            ("points (PLY)", ["points"]),
            ("mesh (GLB)", ["mesh"]),
            ("points + mesh", ["points", "mesh"]),
        )
    }
    sizes = {}
    for task in ("depth_png", "colorized", "normals", "disparity"):
        sizes[task] = {
            "ours_bytes": len(getattr(ours, task)(ours_depth)) * 3 // 4,
            "seed_bytes": len(getattr(seed, task)(seed_depth)) * 3 // 4,
        }
    sizes["point_cloud"] = {
        "ours_bytes": len(ours.point_cloud(image, ours_depth)) * 3 // 4,
        "seed_bytes": len(seed.point_cloud(image, seed_depth)) * 3 // 4,
    }
    checks = check_content(ours, seed, image, network_depth)

    print(f"CPU ms per {WIDTH}x{HEIGHT} image, one core, median of {args.repeats} (interleaved)")
    print(f"{'stage':46} {'ours':>9} {'seed':>9} {'seed/ours':>10}")
    for name, row in stages.items():
        print(f"{name:46} {row['ours_ms']:9.2f} {row['seed_ms']:9.2f} {row['ratio']:9.1f}x")
    for name, ms in three_d.items():
        print(f"{name:46} {ms:9.2f} {'-':>9} {'-':>10}")
    print(f"{'same, the phone JPEG decoded at full scale':46} {full_scale:9.2f} {'-':>9} {'-':>10}")
    print("\nencoded sizes (bytes):")
    for name, row in sizes.items():
        print(f"  {name:14} ours {row['ours_bytes']:>9}   seed {row['seed_bytes']:>9}")
    print("\ncontent checks:", checks)
    path = write(
        "cpu_postprocess_glibc_malloc" if args.glibc_malloc else "cpu_postprocess",
        {
            "allocator": "glibc defaults" if args.glibc_malloc else "keep_freed_memory, as the image workers",
            "image": [WIDTH, HEIGHT],
            "network": list(NETWORK),
            "repeats": args.repeats,
            "stages": stages,
            "three_d_ms": three_d,
            "phone_jpeg_full_scale_decode_ms": full_scale,
            "encoded_sizes": sizes,
            "checks": checks,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
