"""The video path's pure parts: the request rules, reading clips (sampling, rotation, limits, broken
files) and the temporal alignment, each against clips made with PyAV here."""

from __future__ import annotations

import io
import struct
import zipfile

import av
import numpy as np
import pytest

from bench import clips
from catalogue.size import Size
from gateway.inputs.schema import RequestError, parse_request
from gateway.inputs.video import Clip, Sampling, VideoError, VideoLimits
from gateway.outputs.temporal import Aligner, ClipRange, fit_affine
from gateway.outputs.video import NpyStackWriter, to_uint16

LIMITS = VideoLimits(max_seconds=120, max_frames=1800, max_pixels=50_000_000)


def read(data: bytes, sampling: Sampling | None = None, limits: VideoLimits = LIMITS, size=None) -> tuple[Clip, list]:
    with Clip(data, limits, sampling or Sampling()) as clip:
        return clip, list(clip.frames(size or (lambda displayed: displayed)))


@pytest.fixture(scope="module")
def panning() -> bytes:
    """2 s at 10 frames/s, 320x240, Matroska."""
    return clips.encode(clips.frames_of(320, 240, 20, pan=3), fps=10, container="matroska")


# --------------------------------------------------------------------------- the request


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"video_url": "https://x/a.mp4", "image_url": "https://x/a.jpg"}, "either one video"),
        ({"video_url": "https://x/a.mp4", "video_b64": "AAAA"}, "one video per job"),
        ({"video_b64": "AAAA", "tasks": ["depth", "normals", "mesh"]}, "tasks normals, mesh do not apply to a video"),
        ({"image_url": "https://x/a.jpg", "fps": 5}, "fps apply to videos only"),
        ({"image_url": "https://x/a.jpg", "temporal": "none", "start": 1}, "start, temporal apply to videos only"),
        ({"video_b64": "AAAA", "temporal": "smooth"}, "invalid value 'smooth' for temporal"),
        ({"video_b64": "AAAA", "fps": 0}, "invalid fps"),
        ({"video_b64": "AAAA", "start": -1}, "invalid start"),
    ],
)
def test_video_requests_that_are_wrong_as_a_whole_are_refused(job: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_request(job, 16)


def test_a_video_request_carries_its_video_and_no_images() -> None:
    parsed = parse_request({"video_url": "https://x/a.mp4", "tasks": ["colorized"], "fps": 2.5}, 16)
    assert parsed.sources == []
    assert (parsed.video.type, parsed.video.data, parsed.request.fps) == ("url", "https://x/a.mp4", 2.5)


# --------------------------------------------------------------------------- sampling and orientation


def test_sampling_takes_the_first_frame_at_or_after_each_point_of_the_grid(panning: bytes) -> None:
    clip, frames = read(panning)
    assert (clip.codec, clip.source_size, clip.source_fps, clip.duration) == ("h264", (320, 240), 10.0, 2.0)
    assert [f.time for f in frames] == pytest.approx([k / 10 for k in range(20)])
    _, frames = read(panning, Sampling(fps=4))  # grid 0, 0.25, 0.5, ...: the first frame at or after each
    assert [f.time for f in frames] == pytest.approx([0.0, 0.3, 0.5, 0.8, 1.0, 1.3, 1.5, 1.8])
    _, frames = read(panning, Sampling(start=1.05, duration=0.5))
    assert [f.time for f in frames] == pytest.approx([1.1, 1.2, 1.3, 1.4, 1.5])
    clip, frames = read(panning, Sampling(max_frames=4))
    assert len(frames) == 4
    assert clip.cut == ["the clip is cut to 4 frames (max_frames)"]
    clip, frames = read(panning, Sampling(fps=60))  # never more frames than the source has
    assert (clip.fps, len(frames)) == (10.0, 20)


def test_frames_are_the_clips_own_pixels_resized_by_ffmpeg(panning: bytes) -> None:
    original = clips.read_frames(panning)[0]
    _, frames = read(panning, size=lambda displayed: Size(160, 120))
    assert frames[7].image.shape == (120, 160, 3)
    expected = original[7].reshape(120, 2, 160, 2, 3).mean(axis=(1, 3))
    assert np.abs(frames[7].image.astype(float) - expected).mean() < 3


def test_variable_frame_rate_keeps_the_source_timestamps() -> None:
    times = [0.0, 0.1, 0.15, 0.5, 0.55, 0.9, 1.3, 1.31]
    data = clips.encode(clips.frames_of(64, 48, 8), fps=10, times=times)
    _, frames = read(data)
    assert [f.time for f in frames] == pytest.approx([0.0, 0.15, 0.5, 0.9, 1.3])  # grid of 10/s: one per slot
    _, frames = read(data, Sampling(fps=2))
    assert [f.time for f in frames] == pytest.approx([0.0, 0.5, 1.3])


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_metadata_is_honoured(rotation: int) -> None:
    pictures = clips.frames_of(64, 48, 2)
    plain = clips.read_frames(clips.encode(pictures, fps=10))[0][0]
    clip, frames = read(clips.encode(pictures, fps=10, rotation=rotation))
    assert clip.rotation == rotation % 360
    expected = np.rot90(plain, rotation // 90)  # counterclockwise, as FFmpeg's display matrix says
    assert frames[0].image.shape == expected.shape
    assert np.abs(frames[0].image.astype(int) - expected).mean() < 1


# --------------------------------------------------------------------------- limits and broken files


def test_frames_over_the_pixel_limit_are_refused_before_decoding(panning: bytes) -> None:
    with pytest.raises(VideoError, match="video frames of 320x240 are too large: at most 76799 pixels"):
        Clip(panning, VideoLimits(120, 1800, 320 * 240 - 1), Sampling())


def mjpeg_avi(claimed: tuple[int, int] | None, coded: tuple[int, int] | None) -> bytes:
    """A 320x240 MJPEG AVI whose container header (``claimed``) or JPEG headers (``coded``) say otherwise."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="avi") as out:
        stream = out.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuvj420p"
        for image in clips.frames_of(320, 240, 3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
    data = buffer.getvalue()
    if claimed:
        header = data[:2000].replace(struct.pack("<II", 320, 240), struct.pack("<II", *claimed))
        data = header + data[2000:]
    if coded:
        sof = b"\xff\xc0\x00\x11\x08"
        data = data.replace(sof + struct.pack(">HH", 240, 320), sof + struct.pack(">HH", coded[1], coded[0]))
    return data


def test_a_header_claiming_30000x30000_frames_is_refused_and_one_that_lies_fails_cleanly() -> None:
    clip, frames = read(mjpeg_avi((30000, 30000), None))  # FFmpeg's probe reads the frames' own size
    assert (clip.source_size, len(frames)) == ((320, 240), 3)
    # Both say 30000x30000: FFmpeg's probe (which decodes a frame here) refuses it at the pixel limit.
    with pytest.raises(VideoError, match=r"no usable frame size \(none, or frames over 50000000 pixels"):
        Clip(mjpeg_avi((30000, 30000), (30000, 30000)), LIMITS, Sampling())
    # The header says 320x240, every frame says 30000x30000: FFmpeg refuses each frame (max_pixels).
    with pytest.raises(VideoError, match="could not be decoded: decoding stopped after 0 frames"):
        read(mjpeg_avi(None, (30000, 30000)))


def test_a_header_claiming_an_endless_clip_costs_nothing_and_is_not_reported_as_cut(panning: bytes) -> None:
    duration = panning.find(b"\x44\x89\x88")  # Matroska Segment Duration, an 8-byte float (ms)
    assert duration > 0
    endless = panning[: duration + 3] + struct.pack(">d", 1e15) + panning[duration + 11 :]
    clip, frames = read(endless)
    assert clip.duration == pytest.approx(1e12)
    assert (len(frames), clip.cut) == (20, [])
    # the header's claim, bounded by the limits (used for progress only)
    assert clip.expected_frames() == min(LIMITS.max_frames, LIMITS.max_seconds * clip.fps)


def test_a_clip_longer_than_max_video_seconds_is_cut_and_says_so(panning: bytes) -> None:
    clip, frames = read(panning, limits=VideoLimits(1.0, 1800, 50_000_000))
    assert [f.time for f in frames] == pytest.approx([k / 10 for k in range(10)])
    assert clip.cut == ["the clip is cut to 1 s (MAX_VIDEO_SECONDS)"]
    clip, frames = read(panning, Sampling(duration=1.0), VideoLimits(1.0, 1800, 50_000_000))
    assert (len(frames), clip.cut) == (10, [])  # the request's own duration: nothing cut


def test_a_stream_corrupt_in_the_middle_serves_the_frames_before_it_and_says_where_it_stopped(panning: bytes) -> None:
    broken = clips.corrupt_packet(panning, 8)
    clip, frames = read(broken)
    assert 0 < len(frames) <= 8
    assert [f.time for f in frames] == pytest.approx([k / 10 for k in range(len(frames))])
    assert clip.stopped.startswith(f"decoding stopped after {len(frames)} frames: ")


def test_a_truncated_file_serves_the_frames_it_holds(panning: bytes) -> None:
    clip, frames = read(panning[: int(len(panning) * 0.9)])
    assert 0 < len(frames) < 20
    assert clip.stopped is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00not a video" * 100, "not a video this worker can read"),
        (clips.audio_only(), "the file has no video stream"),
        (b"", "not a video this worker can read"),
    ],
)
def test_files_that_are_not_videos_are_refused_clearly(data: bytes, message: str) -> None:
    with pytest.raises(VideoError, match=message):
        Clip(data, LIMITS, Sampling())


def test_a_video_stream_without_frames_is_refused() -> None:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    with pytest.raises(VideoError, match="not a video this worker can read"):
        read(buffer.getvalue())


def test_an_unsupported_codec_and_a_start_past_the_end_are_refused(panning: bytes) -> None:
    assert panning.count(b"V_MPEG4/ISO/AVC") == 1
    with pytest.raises(VideoError, match="the video's codec is not supported"):
        Clip(panning.replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/QQQ"), LIMITS, Sampling())
    with pytest.raises(VideoError, match=r"start 5 s is at or past the end of the video \(2.000 s\)"):
        Clip(panning, LIMITS, Sampling(start=5))


def test_a_video_with_audio_is_read_for_its_video() -> None:
    _, frames = read(clips.encode(clips.frames_of(64, 48, 5), fps=10, audio=True))
    assert len(frames) == 5


# --------------------------------------------------------------------------- temporal consistency


def test_the_trimmed_fit_ignores_a_third_of_pixels_that_moved() -> None:
    rng = np.random.default_rng(0)
    scene = rng.uniform(1, 2, (60, 80)).astype(np.float32)
    frame = (scene - 0.4) / 2.5  # target = 2.5 * frame + 0.4
    moved = scene.copy()
    moved[:20] = rng.uniform(5, 9, (20, 80))  # a third of the target is something else
    fit = fit_affine(frame, moved)
    assert (fit.scale, fit.shift) == pytest.approx((2.5, 0.4), rel=1e-4)
    plain = np.polyfit(frame.ravel(), moved.ravel(), 1)
    assert abs(plain[0] - 2.5) > 0.2  # an untrimmed fit is dragged away
    assert fit_affine(np.ones((10, 10)), scene[:10, :10]) is None  # a flat frame has no scale


def test_alignment_chains_a_long_clip_back_to_its_first_frame_without_drift() -> None:
    rng = np.random.default_rng(1)
    scene = np.add.outer(np.linspace(1, 2, 48), np.linspace(0, 1, 64)).astype(np.float32)
    aligner = Aligner("align", metric=False)
    first = None
    for k in range(300):
        noisy = scene + rng.normal(0, 0.002, scene.shape).astype(np.float32)
        a, b = rng.uniform(0.3, 3.0), rng.uniform(-1, 1)
        aligned, alignment = aligner.align(np.float32(a) * noisy + np.float32(b))
        if k == 0:
            first = (a, b)
        assert (alignment.scale, alignment.shift) != (1.0, 0.0) or k == 0
    expected = first[0] * scene + first[1]  # every frame mapped onto the first one's scale and shift
    assert np.abs(aligned - expected).max() < 0.02 * np.ptp(expected)


def test_metric_models_and_temporal_none_are_never_rescaled() -> None:
    depth = np.arange(12, dtype=np.float32).reshape(3, 4)
    for aligner in (Aligner("align", metric=True), Aligner("none", metric=False)):
        for factor in (1, 3):
            out, alignment = aligner.align(depth * factor)
            assert (alignment.scale, alignment.shift) == (1.0, 0.0)
            assert np.array_equal(out, depth * factor)


def test_the_clip_range_is_exact_for_the_16_bit_video_and_robust_for_colour() -> None:
    clip_range = ClipRange()
    rng = np.random.default_rng(2)
    for _ in range(10):
        frame = rng.uniform(1, 2, (64, 64)).astype(np.float32)
        frame[0, 0] = 50.0  # one hot pixel per frame
        clip_range.add(frame)
    assert clip_range.exact() == (pytest.approx(1.0, abs=1e-3), 50.0)
    low, high = clip_range.robust()
    assert 1.0 <= low < 1.05
    assert 1.95 < high <= 2.0


def test_the_float16_stack_is_a_plain_npz_and_the_16_bit_mapping_round_trips(tmp_path) -> None:
    rng = np.random.default_rng(3)
    frames = [rng.uniform(0.5, 4.0, (9, 11)).astype(np.float16) for _ in range(5)]
    writer = NpyStackWriter(tmp_path / "d.npz", 5, Size(11, 9))
    for frame in frames:
        writer.add(frame)
    writer.close()
    assert zipfile.ZipFile(tmp_path / "d.npz").namelist() == ["depth.npy"]
    stack = np.load(tmp_path / "d.npz")["depth"]
    assert stack.dtype == np.float16
    assert np.array_equal(stack, np.stack(frames))
    low, high = float(stack.min()), float(stack.max())
    decoded = low + to_uint16(stack, low, high) / 65535 * (high - low)
    assert np.abs(decoded - stack).max() <= 0.5 * (high - low) / 65535 + 1e-9
