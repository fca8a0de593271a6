"""The media workers' failures: whether the input caused them, which decides whether a failed
thumbnail is kept for its content (mediad/thumbnails.py) or tried again later."""

from __future__ import annotations

from pathlib import Path

import media_samples as samples
import pytest

from mediad.mediapool import MediaPool, WorkerFailed

pytestmark = pytest.mark.timeout(60)


def _thumbnail_job(source: Path, out: Path) -> dict[str, object]:
    return {"op": "thumbnail", "path": str(source), "kind": "image", "size": 32, "format": "webp",
            "out": str(out), "max_pixels": 100_000_000}


async def test_a_failure_says_whether_the_input_caused_it(tmp_path: Path) -> None:
    pool = MediaPool(1, 30)
    try:
        liar = tmp_path / "liar.png"
        liar.write_bytes(bytes(range(256)) * 20)
        with pytest.raises(WorkerFailed) as caught:
            await pool.run(_thumbnail_job(liar, tmp_path / "a.webp"), wait=None)
        assert str(caught.value) == "the file is not an image this server can read (or it is damaged)"
        assert caught.value.lasting

        fine = tmp_path / "fine.png"
        fine.write_bytes(samples.png_alpha(64, 48))
        with pytest.raises(WorkerFailed) as caught:  # where the picture goes is gone: ours, not the file's
            await pool.run(_thumbnail_job(fine, tmp_path / "gone" / "b.webp"), wait=None)
        assert str(caught.value) == "the server could not write the result to its disk"
        assert not caught.value.lasting

        assert await pool.run(_thumbnail_job(fine, tmp_path / "c.webp"), wait=None) is None  # the worker lives on
        assert samples.decode((tmp_path / "c.webp").read_bytes()).width == 32
    finally:
        await pool.close()
