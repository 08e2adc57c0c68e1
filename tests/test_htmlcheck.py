"""rlbench.htmlcheck: images of an HTML report checked in headless Chromium (skipped without one)."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from rlbench.htmlcheck import ImageReport, check_images, find_chromium

needs_chromium = pytest.mark.skipif(
    find_chromium() is None, reason="no Chromium on PATH (apt-get install chromium)"
)


def _png(width: int, height: int) -> bytes:
    """A valid grey RGB PNG, written by hand so the test needs no imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\x80" * (3 * width) for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _report(tmp_path: Path, srcs: list[str]) -> Path:
    """A report.html like the comparison reports: <img>s with srcs relative to its folder."""
    plots = tmp_path / "plots"
    plots.mkdir(exist_ok=True)
    (plots / "reward.png").write_bytes(_png(40, 30))
    (plots / "accuracy.png").write_bytes(_png(20, 10))
    imgs = "\n".join(f'<figure><img src="{s}" alt="{s}"></figure>' for s in srcs)
    html = tmp_path / "report.html"
    html.write_text(f"<!doctype html><html><head><title>r</title></head><body>\n{imgs}\n</body></html>\n")
    return html


@needs_chromium
def test_only_the_missing_image_is_broken(tmp_path: Path) -> None:
    srcs = ["plots/reward.png", "plots/accuracy.png", "plots/missing.png"]
    html = _report(tmp_path, srcs)
    report = check_images(html)
    assert report.images == srcs
    assert report.broken == ["plots/missing.png"]
    assert not report.ok
    # The probe copy is written beside the report; it must not be left there.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "report.html"]


@needs_chromium
def test_undecodable_png_is_broken_and_no_images_is_not_ok(tmp_path: Path) -> None:
    # A file that exists but does not decode (truncated write) must count as broken too.
    html = _report(tmp_path, ["plots/reward.png", "plots/truncated.png"])
    (tmp_path / "plots" / "truncated.png").write_bytes(_png(40, 30)[:40])
    assert check_images(html).broken == ["plots/truncated.png"]

    html.write_text("<html><body><p>no plots</p></body></html>")
    report = check_images(html)
    assert report.images == [] and report.broken == []
    assert not report.ok


@needs_chromium
def test_cli_exit_code(tmp_path: Path) -> None:
    def cli(html: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rlbench.htmlcheck", str(html)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    bad = cli(_report(tmp_path, ["plots/reward.png", "plots/missing.png"]))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "BROKEN  plots/missing.png" in bad.stdout

    good = cli(_report(tmp_path, ["plots/reward.png", "plots/accuracy.png"]))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "BROKEN" not in good.stdout


def test_missing_chromium_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CHROMIUM", raising=False)
    html = _report(tmp_path, ["plots/reward.png"])
    with pytest.raises(RuntimeError, match="apt-get install chromium"):
        check_images(html)


def test_ok_needs_images_and_none_broken() -> None:
    assert ImageReport(images=["a.png"]).ok
    assert not ImageReport(images=["a.png"], broken=["a.png"]).ok
    assert not ImageReport().ok
