"""Synthetic video clips made with PyAV, for tests and benchmarks: a textured scene that moves (or stands
still), and broken ones."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator
from fractions import Fraction

import av
import cv2
import numpy as np
from skimage import data


def scene(width: int, height: int) -> np.ndarray:
    """A textured RGB picture (scikit-image's astronaut, wider than the frame so that it can pan)."""
    return cv2.resize(data.astronaut(), (width * 2, height), interpolation=cv2.INTER_AREA)


def frames_of(width: int, height: int, count: int, pan: int = 4) -> list[np.ndarray]:
    """``count`` frames panning ``pan`` pixels per frame across the scene (0: a still scene)."""
    picture = scene(width, height)
    return [np.ascontiguousarray(picture[:, k * pan : k * pan + width]) for k in range(count)]


def panning(width: int, height: int, count: int, pan: int = 4) -> Iterator[np.ndarray]:
    """``frames_of``, one frame at a time (long clips)."""
    picture = scene(width, height)
    span = picture.shape[1] - width
    for k in range(count):
        offset = (k * pan) % (2 * span)
        offset = offset if offset <= span else 2 * span - offset  # back and forth
        yield np.ascontiguousarray(picture[:, offset : offset + width])


def encode(
    frames: Iterable[np.ndarray],
    fps: float = 10,
    container: str = "mp4",
    codec: str = "libx264",
    rotation: int = 0,
    times: list[float] | None = None,
    audio: bool = False,
    x264: dict[str, str] | None = None,
) -> bytes:
    """The frames as a video file; ``times`` (seconds) gives a variable frame rate."""
    buffer = io.BytesIO()
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    rate = Fraction(fps).limit_denominator(1000)
    count = 0
    with av.open(buffer, "w", format=container) as out:
        options = (x264 or {"crf": "12"}) if codec == "libx264" else {}
        stream = out.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        sound = out.add_stream("aac", rate=16000) if audio else None
        for index, image in enumerate(itertools.chain([first], frames)):
            count += 1
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if times is not None:
                frame.pts = round(times[index] * 1000)
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if sound is not None:
            _add_silence(out, sound, count / fps)
    return buffer.getvalue()


def _add_silence(out: av.container.OutputContainer, stream: av.audio.stream.AudioStream, seconds: float) -> None:
    samples = int(seconds * 16000)
    for start in range(0, samples, 1024):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        frame.pts = start
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def audio_only(seconds: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        _add_silence(out, out.add_stream("aac", rate=16000), seconds)
    return buffer.getvalue()


def read_frames(data: bytes) -> tuple[list[np.ndarray], av.video.stream.VideoStream, list[float]]:
    """Every frame of a video file as stored (gray16 as uint16, else RGB), its stream and frame times."""
    frames, times = [], []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            fmt = "gray16le" if frame.format.name.startswith("gray16") else "rgb24"
            frames.append(frame.to_ndarray(format=fmt))
            times.append(float(frame.time))
        info = stream
    return frames, info, times


def corrupt_packet(data: bytes, index: int) -> bytes:
    """``data`` with the payload of its ``index``-th video packet overwritten by noise (its framing kept)."""
    with av.open(io.BytesIO(data)) as container:
        packets = [(packet.pos, packet.size) for packet in container.demux(video=0) if packet.size]
    position, size = packets[index]
    assert size > 64, "too small a packet to corrupt"
    broken = bytearray(data)
    broken[position + 20 : position + size - 5] = (
        np.random.default_rng(1).integers(0, 256, size - 25, np.uint8).tobytes()
    )
    return bytes(broken)
