"""Triton Python-backend model: runs the ``model.onnx`` beside it with onnxruntime.

The exporter copies this file to ``<model>/1/model.py`` for Triton builds that have only the Python
backend (such as the ``tritonserver`` in the nvidia-pytriton wheel). It uses the CUDA provider when the
instance is on a GPU and onnxruntime has it (and then fails to load rather than fall back to the CPU), the
CPU provider otherwise. Requests that Triton's dynamic batcher hands over together are concatenated per
shape and run as one batch.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        providers = ["CPUExecutionProvider"]
        on_gpu = args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers()
        if on_gpu:
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels, as no torch import loads them here
            device = {"device_id": int(args.get("model_instance_device_id", 0))}
            providers = [("CUDAExecutionProvider", device), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, providers=providers)
        if on_gpu and "CUDAExecutionProvider" not in self.session.get_providers():
            # onnxruntime falls back to the CPU when the CUDA provider fails to load; a GPU instance that ran
            # there would answer far slower, so it fails to load instead, with onnxruntime's reason logged.
            raise RuntimeError("onnxruntime's CUDA provider did not load for this GPU instance (see the log above)")

    def execute(self, requests: list) -> list:
        images = [pb_utils.get_input_tensor_by_name(request, "image").as_numpy() for request in requests]
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            groups[image.shape[1:]].append(index)
        responses: list = [None] * len(requests)
        for indices in groups.values():
            try:
                batch = np.concatenate([images[i] for i in indices])
                depth = self.session.run(["depth"], {"image": batch})[0]
            except Exception as error:  # one bad batch fails its own requests, not the model
                for i in indices:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"inference failed: {error}"))
                continue
            offset = 0
            for i in indices:
                count = images[i].shape[0]
                output = pb_utils.Tensor("depth", np.ascontiguousarray(depth[offset : offset + count]))
                responses[i] = pb_utils.InferenceResponse(output_tensors=[output])
                offset += count
        return responses
