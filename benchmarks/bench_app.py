"""App latencies: upload-to-overlay in a real browser, and server-side reruns without a forward.

python -m benchmarks.bench_app [--repeats 3]

1. Browser (Playwright + Debian Chromium, `streamlit run` on 127.0.0.1): time from handing a new
   image to the file input until the rollout overlay of that image is on screen, for the demo
   model and a ViT-B/16-sized checkpoint (random weights). Each upload is a new image, so the
   model runs every time.
2. Server side (AppTest, the same script the server runs): the time of a rerun after a layer or
   head change on the Heads tab, with a ViT-B/16-sized model; no forward pass happens.
3. Server side: the first render of the Faithfulness tab (curves not cached; the image's forward
   pass already is), demo and ViT-B/16, in each removal mode.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import machine, write_random_checkpoint
from model.resources import EXAMPLES_DIR

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def new_image(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.asarray(Image.open(EXAMPLES_DIR / "chelsea.jpg").convert("RGB")).copy()
    h, w = img.shape[:2]
    # a new digest and a new view every time: the block sits in the centre, inside any crop
    img[h // 2 - 20 : h // 2 + 20, w // 2 - 20 : w // 2 + 20] = rng.integers(0, 255, (40, 40, 3))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def serve(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not start")


def idle(pg) -> None:
    pg.wait_for_selector("[role='tab']")
    quiet = None
    while True:
        if pg.locator("[data-testid='stStatusWidget']").count() == 0:
            quiet = quiet or time.monotonic()
            if time.monotonic() - quiet > 0.5:
                return
        else:
            quiet = None
        time.sleep(0.02)


def browser_upload_times(checkpoint: Path | None, repeats: int, port: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    proc = serve(port)
    times = []
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            pg = b.new_page(viewport={"width": 1400, "height": 900})
            pg.set_default_timeout(300_000)
            pg.goto(f"http://127.0.0.1:{port}")
            idle(pg)
            if checkpoint is not None:
                pg.get_by_text("Path or hub id").first.click()
                idle(pg)
                box = pg.get_by_placeholder("hf-hub:timm/... or /path/model.pth")
                box.fill(str(checkpoint))
                box.press("Enter")
                idle(pg)
                pg.get_by_role("button", name="Load", exact=True).first.click()
                idle(pg)
            pg.get_by_text("Upload", exact=True).first.click()
            idle(pg)
            for i in range(repeats + 1):  # the first upload warms caches and is not counted
                data = new_image(1000 + i)
                js_srcs = "[...document.querySelectorAll(\"[data-testid='stImage'] img\")].map(i => i.src).join('|')"
                before = pg.evaluate(f"() => {js_srcs}")
                start = time.perf_counter()
                pg.locator("section[data-testid='stSidebar'] input[type='file']").last.set_input_files(
                    files=[{"name": f"img{i}.png", "mimeType": "image/png", "buffer": data}]
                )
                # done when the images on the page are new ones and the run is over
                deadline = start + 120
                while True:
                    now_srcs = pg.evaluate(f"() => {js_srcs}")
                    running = pg.locator("[data-testid='stStatusWidget']").count() > 0
                    if now_srcs != before and now_srcs.count("|") >= 1 and not running:
                        break
                    if time.perf_counter() > deadline:
                        pg.screenshot(path=str(ROOT / "tests" / "artifacts" / "bench_timeout.png"))
                        raise TimeoutError(f"no new overlay after 120 s (images: {now_srcs[:200]})")
                    time.sleep(0.01)
                elapsed = time.perf_counter() - start
                if i:
                    times.append(elapsed)
            b.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return times


def rerun_times(checkpoint: Path, repeats: int) -> list[float]:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=600).run()
    at.radio(key="main_kind").set_value("Path or hub id").run()
    at.text_input(key="main_path").set_value(str(checkpoint)).run()
    at.button(key="main_load").click().run()
    at.session_state["tab"] = "Heads"
    at.run()
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        at.slider(key="hd_layer").set_value(1 + (i % 12)).run()
        at.selectbox(key="hd_head").set_value(1 + (i % 12)).run()
        times.append((time.perf_counter() - start) / 2)
        assert not at.exception, at.exception
    return times


def faithfulness_times(checkpoint: Path | None, repeats: int) -> dict[str, list[float]]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    times: dict[str, list[float]] = {"drop": [], "pixels": []}
    for _ in range(repeats):
        for mode in times:
            st.cache_resource.clear()  # the curves are cached per image and settings
            st.cache_data.clear()
            at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=600).run()
            if checkpoint is not None:
                at.radio(key="main_kind").set_value("Path or hub id").run()
                at.text_input(key="main_path").set_value(str(checkpoint)).run()
                at.button(key="main_load").click().run()
            at.session_state["fa_mode"] = mode
            start = time.perf_counter()
            at.session_state["tab"] = "Faithfulness"
            at.run()
            times[mode].append(time.perf_counter() - start)
            assert not at.exception, at.exception
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    parts_all = ["demo", "b16", "rerun", "faithfulness"]
    ap.add_argument("--only", choices=parts_all, action="append", help="run only these parts")
    a = ap.parse_args()
    parts = set(a.only or parts_all)
    print(machine())
    with tempfile.TemporaryDirectory() as d:
        ckpt = write_random_checkpoint(Path(d))
        if "demo" in parts:
            t = browser_upload_times(None, a.repeats, 8611)
            print(
                f"upload -> overlay, default (demo) model: median {statistics.median(t):.2f} s  {[round(x, 2) for x in t]}"
            )
        if "b16" in parts:
            t = browser_upload_times(ckpt, a.repeats, 8612)
            print(
                f"upload -> overlay, ViT-B/16 (random): median {statistics.median(t):.2f} s  {[round(x, 2) for x in t]}"
            )
        if "rerun" in parts:
            t = rerun_times(ckpt, 10)
            ms = [round(x * 1000) for x in t]
            print(f"server rerun, layer/head change, ViT-B/16: median {statistics.median(t) * 1000:.0f} ms {ms}")
        if "faithfulness" in parts:
            for name, path in (("demo", None), ("ViT-B/16 (random)", ckpt)):
                for mode, t in faithfulness_times(path, max(1, a.repeats - 1)).items():
                    print(
                        f"Faithfulness tab, first render, {name}, {mode}: median {statistics.median(t):.2f} s "
                        f"{[round(x, 2) for x in t]}"
                    )


if __name__ == "__main__":
    main()
