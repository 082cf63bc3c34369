"""Screenshot of a playground run, for the README: one question on a running proxy.

    nudging-proxy demo &     # or: nudging-proxy sim-stack
    python scripts/playground_screenshot.py --url http://127.0.0.1:8080 --out docs/playground-demo.png

Drives Debian's chromium (apt-get install chromium) through Playwright, as the browser test does.
"""

from __future__ import annotations

import argparse
import time

from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--out", default="docs/playground-demo.png")
    parser.add_argument("--model", help="the nudged model (default: the page's first)")
    parser.add_argument("--question", default="Why is the sky blue?")
    parser.add_argument("--system", default="")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--size", default="1440x900", help="the window, WIDTHxHEIGHT")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the three answers")
    args = parser.parse_args()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        width, height = (int(n) for n in args.size.split("x"))
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(args.url.rstrip("/") + "/playground")
        page.locator("#model option").first.wait_for(state="attached")
        if args.model:
            page.select_option("#model", args.model)
        page.fill("#max-tokens", str(args.max_tokens))
        page.fill("#system", args.system)
        page.fill("#user", args.question)
        started = time.monotonic()
        page.click("#run")
        settled = ("['base', 'aligned', 'nudged'].every(n => !['running', 'idle'].includes("
                   "document.querySelector('#pane-' + n).dataset.state))")
        while not page.evaluate(settled):
            if time.monotonic() - started > args.timeout:
                raise SystemExit(f"the answers did not finish within {args.timeout} s")
            time.sleep(0.2)
        # Point at the last words the aligned model wrote, so their tooltip is in the picture
        # (below the text, where it hides nothing).
        marked = page.locator("#pane-nudged .seg[data-source=nudging] .piece")
        if marked.count():
            marked.last.hover()
        page.screenshot(path=args.out)
        states = page.evaluate("['base', 'aligned', 'nudged'].map(n => "
                               "document.querySelector('#pane-' + n).dataset.state)")
        print(f"{args.out}: panes {states}, {time.monotonic() - started:.1f} s")
        browser.close()


if __name__ == "__main__":
    main()
