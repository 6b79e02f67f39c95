"""A clip's outputs written frame by frame from its spooled depth: the lossless 16-bit depth video, the
colorized H.264 video and the float16 stack. Pure: PyAV, NumPy, OpenCV; runs in an image-worker process.

The spool holds the clip's aligned depth at the network's size, float16, frame after frame (a plain file:
its pages are the page cache's, not this process's memory). Each frame is read back, upsampled to the
output size and rounded to float16 once; the npz stores those values and the 16-bit video maps the clip's
exact range of them onto 0..65535, so ``depth = depth_min + v / 65535 * (depth_max - depth_min)`` gives the
npz back within half a 16-bit step. The colorized video maps the clip's robust range onto the colormap.

Formats: depth is FFV1 ``gray16le`` in Matroska (lossless); colorized is H.264 ``yuv420p`` in MP4 with
the index up front (browsers play it while it downloads), cropped by a pixel to even dimensions when the
frame has odd ones, with the source's audio over the served window copied as it is when MP4 can carry
its codec; libx264 ``veryfast`` at CRF 20 was chosen by ``bench.video`` (cheaper than
``superfast`` and a tenth of ``ultrafast``'s size on moving content). Frames keep their source timing:
the written timestamps are the sampled frames' own, in units of the output rate.
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from numpy.lib import format as npy_format

from catalogue.size import Size
from gateway.errors import ImageError
from gateway.outputs import postprocess as pp

DEPTH_VIDEO_MIME = "video/x-matroska"
COLOR_VIDEO_MIME = "video/mp4"
X264_PRESET = "veryfast"
X264_CRF = "20"
ENCODER_THREADS = "2"
FILES = {"depth": "depth.mkv", "colorized": "colorized.mp4", "raw": "depth.npz"}


MP4_AUDIO = {"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"}  # what MP4 (FFmpeg's mov muxer) carries


@dataclass(frozen=True)
class AudioCopy:
    """The source file and the window of it whose audio goes into the colorized video, unchanged."""

    source: Path
    start: float  # seconds: the first served frame's source time (the output's zero)
    end: float


@dataclass(frozen=True)
class EncodedClip:
    files: dict[str, str]  # task -> path
    audio: str | None  # what became of the source's audio, when the colorized video was asked for


@dataclass(frozen=True)
class ClipEncoding:
    """Everything the encoding pass needs; plain values, sent to a worker process."""

    spool: Path
    folder: Path  # where the output files are written
    frames: int
    network_size: Size  # of each spooled frame
    size: Size  # of the outputs
    pts: tuple[int, ...]  # each frame's timestamp in units of 1 / rate
    rate: Fraction
    tasks: tuple[str, ...]
    include_raw: bool
    depth_range: tuple[float, float]  # exact, of the float16 values
    color_range: tuple[float, float]
    colormap: str
    invert: bool
    deadline: float  # wall-clock time (time.time()) after which the pass gives up
    audio: AudioCopy | None = None


def _stream(container: Any, codec: str, rate: Fraction, size: Size, pix: str, options: dict) -> Any:
    stream = container.add_stream(codec, rate=rate, options=options)
    stream.width, stream.height = size
    stream.pix_fmt = pix
    stream.codec_context.time_base = 1 / rate
    return stream


class NpyStackWriter:
    """``depth`` float16 ``[frames, h, w]`` in a compressed npz, written one frame at a time."""

    def __init__(self, path: Path, frames: int, size: Size) -> None:
        self._zip = zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1)
        self._entry = self._zip.open("depth.npy", "w", force_zip64=True)
        header = {"descr": npy_format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False}
        npy_format.write_array_header_2_0(self._entry, {**header, "shape": (frames, *size.shape)})

    def add(self, frame: np.ndarray) -> None:
        self._entry.write(np.ascontiguousarray(frame, np.float16).tobytes())

    def close(self) -> None:
        self._entry.close()
        self._zip.close()


def to_uint16(depth: np.ndarray, low: float, high: float) -> np.ndarray:
    """``depth`` in [low, high] -> 0..65535, rounded (0 everywhere for a flat clip)."""
    if high <= low:
        return np.zeros(depth.shape, np.uint16)
    scaled = (depth.astype(np.float32) - np.float32(low)) * np.float32(65535.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 65535).astype(np.uint16)


def to_unit(depth: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(depth.shape, np.float32)
    return np.clip((depth.astype(np.float32) - np.float32(low)) * np.float32(1.0 / (high - low)), 0.0, 1.0)


def encode_clip(job: ClipEncoding) -> EncodedClip:
    """The output files (task -> path) of a spooled clip; ImageError past the deadline. The source's
    audio, when ``job.audio`` says where, is copied into the colorized video as it is (no re-encoding)."""
    width, height = job.size
    even = (width // 2 * 2, height // 2 * 2)
    files: dict[str, str] = {}
    containers: list = []
    depth_stream = color_stream = None
    raw = None
    audio = None
    unread = None
    try:
        if "depth" in job.tasks:
            files["depth"] = str(job.folder / FILES["depth"])
            depth_out = av.open(files["depth"], "w", format="matroska")
            containers.append(depth_out)
            options = {"level": "3", "slices": "4", "threads": ENCODER_THREADS}
            depth_stream = (depth_out, _stream(depth_out, "ffv1", job.rate, job.size, "gray16le", options))
        if "colorized" in job.tasks:
            if min(even) < 2:
                raise ImageError("the video is too small for a colorized H.264 output (2x2 pixels at least)")
            files["colorized"] = str(job.folder / FILES["colorized"])
            color_out = av.open(files["colorized"], "w", format="mp4", options={"movflags": "+faststart"})
            containers.append(color_out)
            options = {"preset": X264_PRESET, "crf": X264_CRF, "threads": ENCODER_THREADS}
            color_stream = (color_out, _stream(color_out, "libx264", job.rate, even, "yuv420p", options))
            if job.audio is not None:
                try:
                    audio = AudioTrack.open(job.audio, color_out)
                    containers.append(audio.source)
                except (av.error.FFmpegError, IndexError, ValueError):
                    unread = "not copied: the audio could not be read"
        if job.include_raw:
            files["raw"] = str(job.folder / FILES["raw"])
            raw = NpyStackWriter(Path(files["raw"]), job.frames, job.size)
        frame_bytes = job.network_size.pixels * 2
        with open(job.spool, "rb") as spool:
            for index in range(job.frames):
                if time.time() > job.deadline:
                    raise ImageError("the video's outputs could not be written before the job's deadline")
                network = np.frombuffer(spool.read(frame_bytes), np.float16).reshape(job.network_size.shape)
                depth = pp.upsample(network.astype(np.float32), width, height).astype(np.float16)
                if raw is not None:
                    raw.add(depth)
                if depth_stream is not None:
                    _write(*depth_stream, to_uint16(depth, *job.depth_range), "gray16le", job.pts[index])
                if color_stream is not None:
                    unit = to_unit(depth[: even[1], : even[0]], *job.color_range)
                    rgb = pp.colorize(1.0 - unit if job.invert else unit, job.colormap)
                    _write(*color_stream, rgb, "rgb24", job.pts[index])
        for container, stream in (s for s in (depth_stream, color_stream) if s is not None):
            for packet in stream.encode():
                container.mux(packet)
        if audio is not None:
            audio.copy_into(color_stream[0])
    finally:
        if raw is not None:
            raw.close()
        for container in containers:
            container.close()
    return EncodedClip(files, audio.outcome if audio is not None else unread)


class AudioTrack:
    """The source's first audio stream, copied packet by packet into an output over a window."""

    def __init__(self, source: Any, stream: Any, target: Any, window: AudioCopy) -> None:
        self.source, self.stream, self.target, self.window = source, stream, target, window
        self.outcome = f"copied ({stream.codec_context.name})"

    @classmethod
    def open(cls, window: AudioCopy, output: Any) -> AudioTrack:
        source = av.open(str(window.source))
        try:
            stream = source.streams.audio[0]
            return cls(source, stream, output.add_stream_from_template(stream), window)
        except BaseException:
            source.close()  # the caller closes it only once it is opened as a track
            raise

    def copy_into(self, output: Any) -> None:
        """Every packet of the window, its timestamps moved so that the window starts at zero; a stream
        that cannot be read to the end keeps what was copied and says so."""
        base = self.stream.time_base
        offset = round(self.window.start / base)
        try:
            for packet in self.source.demux(self.stream):
                if packet.pts is None or packet.size == 0:
                    continue
                moment = float(packet.pts * base)
                if moment < self.window.start or moment >= self.window.end:
                    continue
                packet.pts -= offset
                packet.dts = packet.pts if packet.dts is None else packet.dts - offset
                packet.stream = self.target
                output.mux(packet)
        except av.error.FFmpegError as error:
            self.outcome = f"copied in part: the audio could not be read to the end ({str(error)[:80]})"


def _write(container, stream, image: np.ndarray, pix: str, pts: int) -> None:
    frame = av.VideoFrame.from_ndarray(image, format=pix)
    frame.pts = pts
    frame.time_base = stream.codec_context.time_base
    for packet in stream.encode(frame):
        container.mux(packet)
