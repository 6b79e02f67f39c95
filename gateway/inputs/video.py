"""Video input: a clip's header checked against the limits, then its frames sampled and streamed. Pure: PyAV.

``open_clip`` reads the container's header and refuses, before any frame is decoded, what the header
already shows to be over a limit (frame size, no video stream, an unreadable container, ``start`` past
the end). ``Clip.frames`` then decodes one frame at a time and yields the sampled ones at their display
orientation (rotation metadata honoured, as EXIF is for photos), resized by FFmpeg straight to the size
the caller asks for. What a header may hide is enforced while decoding: FFmpeg refuses frames over the
pixel limit (its ``max_pixels``), sampling stops at ``max_frames`` and at the end of the window.

Sampling: the first frame at or after each point of a grid of ``fps`` points per second from ``start``
(the source's own frames: never interpolated, never repeated), so a variable-rate source keeps its
timing in the recorded timestamps. A stream corrupt in the middle ends the clip there: the frames before
it are served and ``Clip.stopped`` says where and why; a clip with no frame at all is an error.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from catalogue.size import Size
from gateway.errors import ImageError

DEFAULT_FPS_CAP = 30.0
PROBED_STREAMS = 16
DECODE_THREADS = 2  # frame threads hold that many frames each: bounded, and a 1080p decode keeps up


class VideoError(ImageError):
    """The video cannot be served; the message says why and is shown to the client."""


@dataclass(frozen=True)
class VideoLimits:
    max_seconds: float  # of the clip processed (from ``start``): longer clips are cut, and say so
    max_frames: int  # sampled frames: more are cut, and say so
    max_pixels: int  # of one decoded frame


@dataclass(frozen=True)
class Sampling:
    start: float = 0.0
    duration: float | None = None
    fps: float | None = None  # None: the source's rate, capped at DEFAULT_FPS_CAP
    max_frames: int | None = None


@dataclass(frozen=True)
class Frame:
    index: int  # among the sampled frames
    time: float  # seconds, the source's timestamp
    image: np.ndarray  # RGB uint8 at the size asked for, display orientation


def rotate(image: np.ndarray, degrees: int) -> np.ndarray:
    """``image`` turned counterclockwise by ``degrees`` (a multiple of 90), as FFmpeg's display matrix says."""
    return np.ascontiguousarray(np.rot90(image, (degrees // 90) % 4))


class Clip:
    """One opened video; ``frames`` streams its sampled frames once. Close it (or use ``with``)."""

    def __init__(self, data: bytes, limits: VideoLimits, sampling: Sampling) -> None:
        try:
            probing = [{"max_pixels": str(limits.max_pixels)}] * PROBED_STREAMS  # av.open may decode to probe
            self._container = av.open(io.BytesIO(data), metadata_errors="ignore", stream_options=probing)
        except av.error.FFmpegError:
            raise VideoError("not a video this worker can read (the container was not recognised)") from None
        except (ValueError, OSError):
            raise VideoError("not a video this worker can read") from None
        try:
            self._check(limits, sampling)
        except BaseException:
            self.close()
            raise

    def _check(self, limits: VideoLimits, sampling: Sampling) -> None:
        if not self._container.streams.video:
            raise VideoError("the file has no video stream (audio only, or not a video)")
        stream = self._container.streams.video[0]
        self._stream = stream
        context = stream.codec_context
        if context is None or not context.name:
            raise VideoError("the video's codec is not supported")
        width, height = context.width, context.height
        if width <= 0 or height <= 0:
            raise VideoError(  # FFmpeg's probe found none, or refused frames over the limit
                f"the video gives no usable frame size (none, or frames over {limits.max_pixels} pixels)"
            )
        if width * height > limits.max_pixels:
            raise VideoError(
                f"video frames of {width}x{height} are too large: at most {limits.max_pixels} pixels per frame"
            )
        context.options = {"max_pixels": str(limits.max_pixels)}  # a header that lies is caught while decoding
        context.thread_type = "AUTO"
        context.thread_count = DECODE_THREADS
        self.codec = context.name
        audio = self._container.streams.audio
        self.audio_codec = audio[0].codec_context.name if audio and audio[0].codec_context else None
        self.source_size = Size(width, height)
        rate = stream.average_rate or stream.guessed_rate
        self.source_fps = float(rate) if rate and 0 < float(rate) < 1000 else None
        self.duration = self._header_duration()
        self.rotation = 0
        self.start = sampling.start
        if self.duration is not None and sampling.start >= self.duration:
            raise VideoError(f"start {sampling.start:g} s is at or past the end of the video ({self.duration:.3f} s)")
        wanted = sampling.fps if sampling.fps is not None else DEFAULT_FPS_CAP
        self.fps = min(wanted, self.source_fps) if self.source_fps else wanted
        self.cut: list[str] = []
        window = sampling.duration if sampling.duration is not None else math.inf
        self._end_reason = None  # set when a limit, not the request, ends the window
        if window > limits.max_seconds:
            window, self._end_reason = limits.max_seconds, f"{limits.max_seconds:g} s (MAX_VIDEO_SECONDS)"
        self.end = self.start + window
        self.max_frames = limits.max_frames
        self._frames_reason = "MAX_VIDEO_FRAMES"
        if sampling.max_frames is not None:
            self.limit_frames(sampling.max_frames, "max_frames")
        self.stopped: str | None = None  # why decoding ended early (a corrupt stream), when it did

    def limit_frames(self, count: int, reason: str) -> None:
        """Sample at most ``count`` frames; ``reason`` names the limit in the result when it cuts the clip."""
        if count < self.max_frames:
            self.max_frames, self._frames_reason = count, reason

    def _header_duration(self) -> float | None:
        """Seconds the header claims (stream, else container); None when it says nothing usable."""
        stream = self._stream
        if stream.duration is not None and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif self._container.duration is not None:
            seconds = self._container.duration / av.time_base
        else:
            return None
        return seconds if math.isfinite(seconds) and seconds > 0 else None

    def expected_frames(self) -> int:
        """Frames the sampling should give, from the header (an estimate: a header may lie)."""
        end = self.end if self.duration is None else min(self.end, self.duration)
        if not math.isfinite(end):
            return self.max_frames
        return max(1, min(self.max_frames, math.ceil((end - self.start) * self.fps - 1e-6)))

    def display_size(self) -> Size:
        """The size after the rotation the header asks for (known once the first frame is read)."""
        return self.source_size.turned() if self.rotation % 180 else self.source_size

    def frames(self, size_for: Callable[[Size], Size], enlarge: str = "bicubic") -> Iterator[Frame]:
        """The sampled frames, each resized by FFmpeg to ``size_for(displayed size)``: by pixel
        area when shrinking, else by ``enlarge`` ("bicubic" or "bilinear")."""
        step = 1.0 / self.fps
        tolerance = 0.01 * step
        next_time = self.start
        taken = 0
        stream = self._stream
        if self.start > 0:
            with contextlib.suppress(av.error.FFmpegError, OverflowError, ValueError):  # else: from the beginning
                self._container.seek(int(self.start / stream.time_base), stream=stream, backward=True)
        decoded = self._container.decode(stream)
        while True:
            try:
                frame = next(decoded)
            except StopIteration:
                break
            except av.error.FFmpegError as error:
                self.stopped = f"decoding stopped after {taken} frames: {str(error)[:120]}"
                break
            if frame.time is None:
                continue
            if frame.time >= self.end:
                if self._end_reason:
                    self.cut.append(f"the clip is cut to {self._end_reason}")
                break
            if frame.time + tolerance < next_time:
                continue
            if taken >= self.max_frames:
                self.cut.append(f"the clip is cut to {self.max_frames} frames ({self._frames_reason})")
                break
            self.rotation = round(frame.rotation or 0) // 90 * 90 % 360  # counterclockwise, 0 to 270
            wanted = size_for(self.display_size())
            decoded_size = wanted.turned() if self.rotation % 180 else wanted  # before the rotation
            method = "AREA" if decoded_size.pixels < frame.width * frame.height else enlarge.upper()
            image = frame.to_ndarray(
                format="rgb24", width=decoded_size.width, height=decoded_size.height, interpolation=method
            )
            yield Frame(taken, float(frame.time), rotate(image, self.rotation) if self.rotation else image)
            taken += 1
            while next_time <= frame.time + tolerance:
                next_time += step
        if taken == 0:
            if self.stopped:
                raise VideoError(f"the video could not be decoded: {self.stopped}")
            raise VideoError(f"no video frames from {self.start:g} s on")

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> Clip:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def output_rate(fps: float) -> Fraction:
    """The written videos' frame rate as a fraction (29.97 -> 30000/1001)."""
    return Fraction(fps).limit_denominator(1001)
