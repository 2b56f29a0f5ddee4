"""Camera RAW files (the photo-library issue, point 1): DNGs written here with tifffile, one with
sensor data only (demosaiced by LibRaw) and one that also carries a JPEG preview (used when it
is large enough), both with an orientation that turns them upright."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from clipsearch.errors import ImageError, TooLargeError
from clipsearch.imaging import decode_image

CFA_TAGS = [
    (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
    (33422, "B", 4, (0, 1, 1, 2), True),  # CFAPattern: RGGB
    (50721, "2i", 9, (1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1), True),  # ColorMatrix1
    (50717, "I", 1, 4095, True),  # WhiteLevel
]
DNG_TAGS = [
    (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
    (50708, "s", 0, "clipsearch test", True),  # UniqueCameraModel
    (271, "s", 0, "TestCam", True),  # Make
    (274, "H", 1, 6, True),  # Orientation: the camera was turned 90 degrees clockwise
]


def sensor(h: int = 64, w: int = 96) -> np.ndarray:
    """RGGB sensor data of a picture whose left half is red and right half blue."""
    cfa = np.full((h, w), 800, np.uint16)
    cfa[0::2, 0::2] = 4000
    cfa[1::2, 1::2] = 500
    right = cfa[:, w // 2 :]
    right[0::2, 0::2] = 300
    right[1::2, 1::2] = 4000
    return cfa


def sensor_only_dng(path) -> bytes:
    tifffile.imwrite(
        path, sensor(), photometric=32803, subfiletype=0, extratags=[*DNG_TAGS[:2], *DNG_TAGS[3:], *CFA_TAGS]
    )
    return path.read_bytes()


def dng_with_preview(path) -> bytes:
    """A DNG as cameras write them: a JPEG preview first (yellow left, green right), the sensor
    data in a sub-IFD."""
    preview = np.zeros((128, 192, 3), np.uint8)
    preview[:, :96] = (255, 255, 0)
    preview[:, 96:] = (0, 128, 0)
    with tifffile.TiffWriter(path) as tw:
        tw.write(preview, photometric="rgb", compression="jpeg", subfiletype=1, subifds=1, extratags=DNG_TAGS)
        tw.write(sensor(), photometric=32803, subfiletype=0, extratags=CFA_TAGS)
    return path.read_bytes()


def halves(image) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(image).astype(float)
    return a[: a.shape[0] // 2].mean((0, 1)), a[a.shape[0] // 2 :].mean((0, 1))


def test_sensor_data_is_demosaiced_upright(tmp_path):
    data = sensor_only_dng(tmp_path / "a.dng")
    exact = decode_image(data)  # --decode exact: full size
    assert (exact.width, exact.height, exact.image.size, exact.format) == (64, 96, (64, 96), "RAW")
    top, bottom = halves(exact.image)
    assert top[0] > 200 and top[2] < 120  # the left (red) half is on top once turned upright
    assert bottom[2] > 200 and bottom[0] < 60
    fast = decode_image(data, draft_size=16)  # half size is still large enough
    assert fast.image.size == (32, 48) and (fast.width, fast.height) == (64, 96)
    assert decode_image(data, draft_size=40).image.size == (64, 96)  # half would be too small


def test_the_embedded_preview_is_used_when_large_enough(tmp_path):
    data = dng_with_preview(tmp_path / "p.dng")
    fast = decode_image(data, draft_size=64)
    assert fast.image.size == (128, 192) and (fast.width, fast.height) == (64, 96)
    top, bottom = halves(fast.image)
    assert top[0] > 200 and top[1] > 200 and top[2] < 60  # yellow, turned upright
    assert bottom[0] < 60 and 90 < bottom[1] < 170
    assert fast.photo == {"camera_make": "TestCam"}  # the container's EXIF, read by Pillow
    assert decode_image(data, draft_size=200).image.size == (64, 96)  # too small: the sensor data
    assert decode_image(data).image.size == (64, 96)  # exact: always the sensor data


def test_the_megapixel_limit_reads_the_sensor_size_and_broken_raw_files_fail(tmp_path):
    data = sensor_only_dng(tmp_path / "a.dng")
    with pytest.raises(TooLargeError, match="64x96"):
        decode_image(data, max_megapixels=0.005)
    for broken in (data[: len(data) // 2], data[:200], b"FUJIFILMCCD-RAW 0201" + bytes(300)):
        with pytest.raises(ImageError):
            decode_image(broken, draft_size=16)


def test_a_folder_of_raw_and_jpeg_files_is_ingested(cli, tmp_path):
    from ..conftest import write_photos

    folder = tmp_path / "shoot"
    write_photos(folder, ["rocket"])
    sensor_only_dng(folder / "IMG_0001.DNG")
    dng_with_preview(folder / "IMG_0002.dng")
    (folder / "IMG_0003.NEF").write_bytes(b"II*\x00" + bytes(100))  # a RAW name, no RAW inside
    code, out, err = cli("ingest", str(folder), "--json")
    assert code == 1  # the broken one failed, with its reason
    report = json.loads(out)
    assert (report["embedded"], report["failed"]) == (3, 1)
    assert "IMG_0003.NEF" in report["failures"][0]["source"]
    code, out, _ = cli("search", "a photo", "--json", "--filter", "extension=dng")
    found = {json.loads(line)["metadata"]["filename"]: json.loads(line)["metadata"] for line in out.splitlines()}
    assert set(found) == {"IMG_0001.DNG", "IMG_0002.dng"}
    assert (found["IMG_0002.dng"]["width"], found["IMG_0002.dng"]["height"]) == (64, 96)
