"""A screenshot of the web playground with generated images, for the README (docs/img/playground.png).

    python -m tools.playground_screenshot                      # writes docs/img/playground.png
    python -m tools.playground_screenshot --out /tmp/pg.png

Starts `diffserve serve` on the embedded image model (CPU, with an API key) and warms it with one request,
opens the page in headless Chromium (Debian's chromium, as the tests do), generates a few pictures through the
form so the history has thumbnails, and saves the whole page reduced to a 256-colour palette (the page is flat
colours: a small file). Run it on a quiet machine: the status line shows the generation's wall time.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import httpx
from PIL import Image

from diffserve.server.testing import launch_chromium, start_server

KEY = "sk-screenshot"
# (prompt, seed): the last one stays on show; the others fill the history.
SHOTS = (("a small blue triangle in the bottom right on a white background", 3),
         ("a large green square in the center on a black background", 5),
         ("a large red circle in the top left on a white background", 1))


def take(out: Path, width: int = 1100, height: int = 800) -> None:
    """Generate SHOTS in the playground and save the page as a palette PNG at `out`."""
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        server = start_server("embedded:image", Path(tmp), api_key=KEY, args=("--device", "cpu", "--log-level",
                                                                              "warning"))
        try:
            # One request first: the worker's first batch is slower (one-time set-up), not what the page shows.
            httpx.post(f"{server.url}/v1/images/generations", headers=server.headers, timeout=120,
                       json={"prompt": SHOTS[0][0], "seed": 0}).raise_for_status()
            with sync_playwright() as playwright:
                browser = launch_chromium(playwright)
                page = browser.new_page(viewport={"width": width, "height": height})
                page.goto(server.url)
                page.get_by_label("API key").fill(KEY)
                page.get_by_role("button", name="Connect").click()
                expect(page.locator("#model-info")).to_contain_text("image model", timeout=30_000)
                for prompt, seed in SHOTS:
                    page.get_by_label("Prompt", exact=True).fill(prompt)
                    page.get_by_label("Seed").fill(str(seed))
                    page.get_by_role("button", name="Generate").click()
                    expect(page.get_by_role("status")).to_contain_text("Done", timeout=60_000)
                    expect(page.get_by_role("img", name=f"generated image: {prompt}")).to_be_visible()
                page.get_by_label("API key").blur()
                raw = Path(tmp) / "raw.png"
                page.screenshot(path=str(raw), full_page=True)
                browser.close()
        finally:
            server.stop()
        image = Image.open(raw).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/playground.png"))
    args = parser.parse_args()
    take(args.out)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
