"""Check that every ``<img>`` of an HTML report really loads, in headless Chromium.

A comparison report is a ``report.html`` beside a ``plots/`` folder of PNGs referenced by
relative ``src``. A wrong path, a plot that was never written or a truncated PNG leaves the
HTML valid but shows a broken-image icon, which no HTML parser notices; only a browser that
fetches and decodes each image can. ``check_images`` asks one: it opens a copy of the page in
headless Chromium, waits for the ``load`` event (which waits for every image to load or
fail) and reads back, per image, whether it was decoded (``naturalWidth > 0``).

Command line: ``python -m rlbench.htmlcheck report.html`` prints each image as ``ok`` or
``BROKEN`` and exits 1 if any is broken or the page has no image at all (a report without
plots is itself a failure), 2 if the check could not run, 0 otherwise.

Needs a Chromium (Debian: ``apt-get install chromium``) on PATH, or its path in the
``CHROMIUM`` environment variable. Stdlib only, so it costs nothing to import.
"""

from __future__ import annotations

import argparse
import html as htmllib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "install it (Debian/Ubuntu: `apt-get install chromium`) or set CHROMIUM to its executable"

_MARKER_ID = "rlbench-imgcheck"

# Runs while the page is parsed, i.e. before ``load``; ``load`` then fires only once every
# image has loaded or failed, so the statuses it records are final.
_PROBE = f"""
<script>
(function () {{
  // Lazy images outside the viewport would never be fetched and would read as broken.
  for (const img of document.images) img.loading = "eager";
  window.addEventListener("load", function () {{
    const out = Array.from(document.images, function (img) {{
      return {{src: img.getAttribute("src") || "", complete: img.complete,
               naturalWidth: img.naturalWidth}};
    }});
    const pre = document.createElement("pre");
    pre.id = "{_MARKER_ID}";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }});
}})();
</script>
""".encode()

_RESULT_RE = re.compile(rf'<pre id="{_MARKER_ID}">(.*?)</pre>', re.DOTALL)


@dataclass
class ImageReport:
    """The ``src`` of every ``<img>`` on the page, in document order, and those that did not load."""

    images: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the page has at least one image and none is broken."""
        return bool(self.images) and not self.broken


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable: ``$CHROMIUM`` if it resolves, else the first of
    ``CHROMIUM_NAMES`` on PATH; None when there is none."""
    override = os.environ.get("CHROMIUM")
    if override:
        found = shutil.which(override)
        if found:
            return found
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _inject(page: bytes) -> bytes:
    """``page`` with the probe script just before ``</body>`` (else at the end): after the last
    ``<img>``, so the eager-loading switch sees them all."""
    end = page.lower().rfind(b"</body>")
    if end < 0:
        return page + _PROBE
    return page[:end] + _PROBE + page[end:]


def _run_chromium(cmd: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str, str]:
    """Runs ``cmd``; on timeout kills its whole process group (Chromium's renderer and GPU
    children outlive a killed parent) and raises ``TimeoutError``."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise TimeoutError(f"chromium did not finish within {timeout_s:g}s: {' '.join(cmd)}") from None
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def check_images(html: Path, timeout_s: float = 60) -> ImageReport:
    """Opens ``html`` in headless Chromium and reports which of its images did not load.

    Raises ``RuntimeError`` if Chromium is missing or fails, ``TimeoutError`` after
    ``timeout_s`` seconds, ``FileNotFoundError`` if ``html`` does not exist.
    """
    html = Path(html).resolve()
    page = html.read_bytes()
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}): {INSTALL_HINT}")

    # The copy must sit beside the original so relative srcs (plots/x.png) resolve to the
    # same files; it is hidden and removed again so the report folder is left as it was.
    fd, tmp_name = tempfile.mkstemp(prefix=".rlbench-imgcheck-", suffix=".html", dir=html.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_inject(page))
        # Everything Chromium writes goes to one throwaway folder: --user-data-dir alone still
        # leaves a crash database in ~/.config/chromium, dconf state in ~/.cache and, after a
        # killed run, a singleton socket in /tmp. Its own profile also means no lock shared
        # with a concurrent check or a desktop Chromium.
        with tempfile.TemporaryDirectory(prefix="rlbench-chromium-", ignore_cleanup_errors=True) as home:
            redirect = ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "TMPDIR")
            env = {**os.environ, **dict.fromkeys(redirect, home)}
            profile = os.path.join(home, "profile")
            cmd = [
                chromium,
                "--headless",
                "--no-sandbox",  # the sandbox refuses to start as root (CI containers)
                "--disable-gpu",
                # Docker's default 64 MB /dev/shm crashes renderers; Debian's wrapper only adds
                # this when /dev/shm is small *and* its size check parses, which it does not
                # when /dev/shm is mounted twice.
                "--disable-dev-shm-usage",
                "--allow-file-access-from-files",
                "--no-first-run",
                f"--user-data-dir={profile}",
                # Runs timers and loads in virtual time, then dumps: no guessed sleep.
                "--virtual-time-budget=10000",
                "--dump-dom",
                tmp.as_uri(),
            ]
            rc, out, err = _run_chromium(cmd, env, timeout_s)
    finally:
        tmp.unlink(missing_ok=True)

    match = _RESULT_RE.search(out)
    if rc != 0 or match is None:
        # stderr is mostly D-Bus noise in containers; its end holds the actual failure.
        tail = "\n".join(err.strip().splitlines()[-10:])
        why = f"exited with {rc}" if rc != 0 else "did not report the page's images (load never fired?)"
        raise RuntimeError(f"chromium {why} for {html}:\n{tail}")

    statuses = json.loads(htmllib.unescape(match.group(1)))
    report = ImageReport()
    for s in statuses:
        report.images.append(s["src"])
        # A failed image is "complete" too; only a non-zero natural width proves it decoded.
        if not (s["complete"] and s["naturalWidth"] > 0):
            report.broken.append(s["src"])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlbench.htmlcheck",
        description="Check in headless Chromium that every <img> of HTML reports loads. "
        "Exit 1 if an image is broken or a page has none, 2 if the check cannot run.",
    )
    parser.add_argument("html", nargs="+", type=Path, help="report.html file(s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per page (default 60)")
    args = parser.parse_args(argv)

    failed = False
    for page in args.html:
        try:
            report = check_images(page, timeout_s=args.timeout)
        except (OSError, RuntimeError, TimeoutError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{page}: {len(report.images)} image(s), {len(report.broken)} broken")
        broken = set(report.broken)
        for src in report.images:
            print(f"  {'BROKEN' if src in broken else 'ok':6}  {src}")
        if not report.images:
            print("  no images found")
        failed |= not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
