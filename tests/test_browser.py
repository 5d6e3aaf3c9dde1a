"""Real-browser tests: Playwright drives Debian's Chromium against `streamlit run` on 127.0.0.1.

Screenshots land in tests/artifacts/ (ignored by git). Under CI=true a missing browser fails the
run; elsewhere these tests are skipped when Chromium is not installed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.resources import EXAMPLES_DIR

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI=true but Chromium is missing at {CHROMIUM}: browser tests cannot run")
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)

sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    log = open(ARTIFACTS.mkdir(parents=True, exist_ok=True) or ARTIFACTS / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "streamlit_app.py",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--server.headless",
            "true",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.read() == b"ok":
                    break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("streamlit did not start; see tests/artifacts/server.log") from None
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1500, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(120_000)
    pg.goto(server)
    wait_idle(pg)
    yield pg
    ctx.close()


def wait_idle(pg, timeout_s: float = 120) -> None:
    """Wait until the app has rendered and finished its run: tabs on the page and no 'Running'
    status widget for a full second."""
    pg.wait_for_selector("[data-testid='stApp']")
    pg.wait_for_selector("[role='tab']", timeout=timeout_s * 1000)
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        if pg.locator("[data-testid='stStatusWidget']").count() == 0:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 1.0:
                return
        else:
            quiet_since = None
        time.sleep(0.1)
    raise TimeoutError("the app did not finish running")


def png_bytes(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.open(EXAMPLES_DIR / "coffee.jpg").convert("RGB")
    arr = np.asarray(img).copy()
    arr[:40, :40] = rng.integers(0, 255, (40, 40, 3))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def choose_upload(pg) -> None:
    pg.get_by_text("Upload", exact=True).first.click()
    wait_idle(pg)


def upload(pg, name: str, data: bytes, mime: str) -> None:
    pg.locator("section[data-testid='stSidebar'] input[type='file']").last.set_input_files(
        files=[{"name": name, "mimeType": mime, "buffer": data}]
    )
    wait_idle(pg)


def test_upload_shows_overlay(page):
    choose_upload(page)
    upload(page, "coffee.png", png_bytes(), "image/png")
    imgs = page.locator("[data-testid='stImage'] img")
    assert imgs.count() >= 2
    assert page.get_by_text("Attention rollout").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=False)


def heatmap_signature(pg) -> str:
    """The big per-head heat map's rendered pixels, as a fingerprint."""
    chart = pg.locator("[data-testid='stPlotlyChart']").filter(has_text="head").first
    return chart.screenshot().hex()[:4000]


def test_click_patch_changes_head_map(page):
    page.get_by_role("tab", name="Heads").click()
    wait_idle(page)
    before = page.locator(".js-plotly-plot").nth(1).screenshot()
    view = page.locator(".js-plotly-plot").first
    box = view.bounding_box()
    view.click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.4})
    wait_idle(page)
    after = page.locator(".js-plotly-plot").nth(1).screenshot()
    assert before != after
    assert page.get_by_text("attention of patch (").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "heads.png"), full_page=False)


def test_compare_two_models(page, tmp_path_factory):
    from safetensors.torch import save_file

    from model import VisionTransformer, ViTConfig

    folder = tmp_path_factory.mktemp("cmp")
    m = VisionTransformer(ViTConfig(image_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_dim=128))
    m.init_weights(seed=3)
    path = folder / "other.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    page.get_by_role("tab", name="Compare").click()
    wait_idle(page)
    panel = page.locator("[data-testid='stTabPanel']:visible, [role='tabpanel']:visible").first
    panel.get_by_text("Path or hub id").click()
    wait_idle(page)
    panel.get_by_placeholder("hf-hub:timm/... or /path/model.pth").fill(str(path))
    panel.get_by_placeholder("hf-hub:timm/... or /path/model.pth").press("Enter")
    wait_idle(page)
    panel.get_by_role("button", name="Load").click()
    wait_idle(page)
    page.get_by_role("tab", name="Compare").click()
    wait_idle(page)
    assert page.get_by_text("Similarity decay").count() >= 1 or page.locator("text=Similarity decay").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)


def test_non_image_then_good_image(page):
    choose_upload(page)
    upload(page, "notes.png", b"this is a text file, not a picture", "image/png")
    assert page.get_by_text("not an image we can read").count() >= 1
    upload(page, "good.png", png_bytes(1), "image/png")
    assert page.get_by_text("not an image we can read").count() == 0
    assert page.locator("[data-testid='stImage'] img").count() >= 2


def test_gallery_scene_screenshots(page):
    """The screenshots shown in the README: a demo scene's overview and its heads."""
    box = page.locator("section[data-testid='stSidebar'] [data-testid='stSelectbox']").filter(has_text="Example").last
    box.click()
    page.keyboard.type("scene: 3_star")
    page.keyboard.press("Enter")
    wait_idle(page)
    page.screenshot(path=str(ARTIFACTS / "readme_overview.png"))
    page.get_by_role("tab", name="Heads").click()
    wait_idle(page)
    view = page.locator(".js-plotly-plot").first
    b = view.bounding_box()
    view.click(position={"x": b["width"] * 0.5, "y": b["height"] * 0.5})
    wait_idle(page)
    assert big_map_title(page).endswith(")")  # plotly has drawn the new charts
    time.sleep(1.0)  # and their axes
    page.screenshot(path=str(ARTIFACTS / "readme_heads.png"))
    assert page.get_by_text("attention of patch (").count() >= 1


def test_eight_sessions_at_once_each_see_their_own_results(browser, server):
    """8 sessions upload different images and change layer/head at the same time; each downloaded
    analysis equals what viz_app computes for that image alone; the server stays up."""
    from model import load_checkpoint, load_image, prepare_image
    from viz_app.results import analyze_image

    n = 8
    images = [png_bytes(100 + i) for i in range(n)]
    contexts = [browser.new_context(viewport={"width": 1300, "height": 900}, accept_downloads=True) for _ in range(n)]
    pages = [c.new_page() for c in contexts]
    try:
        for pg in pages:
            pg.set_default_timeout(240_000)
            pg.goto(server)
        for pg in pages:
            wait_idle(pg, 240)
            pg.get_by_text("Upload", exact=True).first.click()
        for pg in pages:
            wait_idle(pg, 240)
        for i, pg in enumerate(pages):  # all uploads in flight together
            pg.locator("section[data-testid='stSidebar'] input[type='file']").last.set_input_files(
                files=[{"name": f"user{i}.png", "mimeType": "image/png", "buffer": images[i]}]
            )
        for pg in pages:
            wait_idle(pg, 240)
            pg.get_by_role("tab", name="Heads").click()
        for i, pg in enumerate(pages):  # each user picks another layer ...
            wait_idle(pg, 240)
            slider = pg.locator("[data-testid='stSlider']").first
            box = slider.bounding_box()
            slider.click(position={"x": box["width"] * 0.1, "y": box["height"] - 6})  # focus the track
            pg.keyboard.press("Home")
            for _ in range(i % 6):
                pg.keyboard.press("ArrowRight")
        for i, pg in enumerate(pages):  # ... and another head
            wait_idle(pg, 240)
            pg.locator("[data-testid='stSelectbox']").filter(has_text="Head").last.click()
            pg.keyboard.type(str(6 - i % 6))
            pg.keyboard.press("Enter")
        for i, pg in enumerate(pages):
            wait_idle(pg, 240)
            assert pg.get_by_text(f"Layer {1 + i % 6}, head {6 - i % 6}:").count() == 1, i
        for pg in pages:
            wait_idle(pg, 240)
            pg.get_by_role("tab", name="Download").click()
        downloads = []
        for pg in pages:
            wait_idle(pg, 240)
            with pg.expect_download() as d:
                pg.get_by_role("button", name="Report (NPZ)").click()
            downloads.append(np.load(d.value.path()))
        lm = load_checkpoint("demo")
        for i, npz in enumerate(downloads):
            alone = analyze_image(lm, prepare_image(load_image(images[i], name=f"user{i}.png"), lm.preprocessing))
            meta = json.loads(str(npz["report_json"]))
            assert meta["model"]["source"] == "demo" and meta["image"]["name"] == f"user{i}.png", i
            np.testing.assert_allclose(npz["attentions"], alone.attentions.numpy(), atol=1e-5, err_msg=f"session {i}")
            np.testing.assert_allclose(npz["rollout"], alone.rollout, atol=1e-5, err_msg=f"session {i}")
            np.testing.assert_allclose(npz["probabilities"], alone.probs, atol=1e-5, err_msg=f"session {i}")
        for pg in pages:
            assert pg.locator("[data-testid='stException']").count() == 0
    finally:
        for c in contexts:
            c.close()
    with urllib.request.urlopen(server + "/_stcore/health", timeout=5) as r:
        assert r.read() == b"ok"


def open_tab(pg, name: str) -> None:
    pg.get_by_role("tab", name=name).click()
    wait_idle(pg)


def set_slider(pg, label: str, steps_from_start: int) -> None:
    """Keyboard: Home, then ArrowRight `steps_from_start` times, on the slider with this label."""
    slider = pg.locator("[data-testid='stSlider']").filter(has_text=label).first
    slider.get_by_role("slider").first.focus()
    pg.keyboard.press("Home")
    for _ in range(steps_from_start):
        pg.keyboard.press("ArrowRight")
    wait_idle(pg)


def big_map_title(pg, timeout_s: float = 30) -> str:
    """The title of the Heads tab's large map, once plotly has drawn it."""
    deadline = time.monotonic() + timeout_s
    while True:
        title = _big_map_title(pg)
        if title or time.monotonic() > deadline:
            return title
        time.sleep(0.2)


def _big_map_title(pg) -> str:
    return pg.evaluate(
        """() => [...document.querySelectorAll('.js-plotly-plot')]
            .map(g => g.layout && g.layout.title && String(g.layout.title.text || g.layout.title))
            .map(t => (t || '').replace(/<[^>]+>/g, ''))  // Streamlit wraps titles in <b>
            .find(t => t.startsWith('Layer ')) || ''"""
    )


def test_settings_survive_tabs_and_a_copied_url(browser, server):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(120_000)
    pg.goto(server)
    wait_idle(pg)
    open_tab(pg, "Heads")
    set_slider(pg, "Layer", 2)  # layer 3
    pg.locator("[data-testid='stSelectbox']").filter(has_text="Head").last.click()
    pg.keyboard.type("4")
    pg.keyboard.press("Enter")
    wait_idle(pg)
    view = pg.locator(".js-plotly-plot").first  # the patch picker: click patch (row 2, col 5) of 12x12
    box = view.bounding_box()
    view.click(position={"x": box["width"] * 5.5 / 12, "y": box["height"] * 2.5 / 12})
    wait_idle(pg)
    want = big_map_title(pg)
    assert want.startswith("Layer 3, head 4: attention of patch ("), want
    open_tab(pg, "Rollout")
    set_slider(pg, "Discard ratio", 18)  # 0.90
    for name in ("Overview", "Embeddings", "Distance", "Compare", "Download", "Sanity", "Heads"):
        open_tab(pg, name)
    assert big_map_title(pg) == want
    open_tab(pg, "Rollout")
    assert pg.locator("[data-testid='stSlider']").filter(has_text="Discard ratio").first.inner_text().count("0.90") >= 1
    open_tab(pg, "Heads")
    url = pg.url
    assert "hd_layer=3" in url and "ro_discard=0.9" in url and "tab=Heads" in url, url
    fresh = browser.new_context(viewport={"width": 1024, "height": 768})
    other = fresh.new_page()
    other.set_default_timeout(120_000)
    other.goto(url)
    wait_idle(other)
    assert big_map_title(other) == want
    open_tab(other, "Rollout")
    assert other.locator("[data-testid='stSlider']").filter(has_text="Discard ratio").first.inner_text().count("0.90")
    other.screenshot(path=str(ARTIFACTS / "rollout_1024.png"))
    fresh.close()
    ctx.close()


def test_zero_attention_is_drawn_in_the_scales_minimum_colour(page):
    """Read the page's pixels: the cell of the Heads map with the least attention has the first
    colour of the map's scale (and not a colour the theme swapped in)."""
    from viz_app import colormaps

    open_tab(page, "Heads")
    where = page.evaluate(
        """() => {
          const gd = [...document.querySelectorAll('.js-plotly-plot')].find(g => g.layout && g.layout.title &&
              String(g.layout.title.text || g.layout.title).replace(/<[^>]+>/g, '').startsWith('Layer '));
          const z = gd._fullData[0].z, fl = gd._fullLayout;
          let best = [0, 0];
          for (let r = 0; r < z.length; r++) for (let c = 0; c < z[r].length; c++)
            if (z[r][c] < z[best[0]][best[1]]) best = [r, c];
          const rect = gd.getBoundingClientRect();
          return {x: rect.left + fl.xaxis._offset + fl.xaxis.d2p(best[1]), y: rect.top + fl.yaxis._offset + fl.yaxis.d2p(best[0]),
                  value: z[best[0]][best[1]], zmin: gd._fullData[0].zmin, zmax: gd._fullData[0].zmax};
        }"""
    )
    assert where["zmin"] == 0
    u = where["value"] / where["zmax"]  # where the least attention sits on the scale (0 = its minimum)
    assert u < 0.02, u
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
    pixel = shot[int(round(where["y"])), int(round(where["x"]))].astype(int)
    lut = colormaps.get("inferno").lut.astype(float)
    want = np.array([np.interp(u * 255, np.arange(256), lut[:, ch]) for ch in range(3)])  # ~ the first colour
    assert np.abs(pixel - want).max() <= 3, (pixel, want, u)
    assert np.abs(pixel - lut[0]).max() <= 12  # dark, as the scale's stated minimum (not the theme's pink)


def test_clicking_the_same_patch_again_is_seen(page):
    """Click a patch, type another row, click the same patch again: the click wins again."""
    open_tab(page, "Heads")

    def click_patch(row: int, col: int) -> None:
        """Click the centre of patch (row, col) of the patch picker (the demo: 8 px patches)."""
        xy = page.evaluate(
            """([row, col]) => {
              const gd = document.querySelector('.js-plotly-plot'), fl = gd._fullLayout;
              const r = gd.getBoundingClientRect(), p = 8;
              return [r.left + fl.xaxis._offset + fl.xaxis.d2p((col + 0.5) * p),
                      r.top + fl.yaxis._offset + fl.yaxis.d2p((row + 0.5) * p)];
            }""",
            [row, col],
        )
        page.mouse.click(*xy)
        wait_idle(page)

    click_patch(3, 7)
    assert big_map_title(page).endswith("attention of patch (3, 7)")
    row = page.locator("[data-testid='stNumberInput']").filter(has_text="Patch row").first.locator("input")
    row.fill("9")
    row.press("Enter")
    wait_idle(page)
    assert big_map_title(page).endswith("attention of patch (9, 7)")
    click_patch(3, 7)
    assert big_map_title(page).endswith("attention of patch (3, 7)")


def test_layout_at_1024_px(browser, server):
    """At 1024 x 768: every tab label is inside the tab bar (none behind its scroll arrow), the
    large map's title is whole, and the 'Similarity to patch' map keeps a usable size."""
    ctx = browser.new_context(viewport={"width": 1024, "height": 768})
    pg = ctx.new_page()
    pg.set_default_timeout(120_000)
    pg.goto(server)
    wait_idle(pg)
    bar = pg.locator("[role='tablist']").first.bounding_box()
    for tab in pg.get_by_role("tab").all():
        box = tab.bounding_box()
        assert bar["x"] <= box["x"] and box["x"] + box["width"] <= bar["x"] + bar["width"] + 1, tab.inner_text()
    open_tab(pg, "Heads")
    title = big_map_title(pg)
    shown = pg.locator(".gtitle").filter(has_text="Layer ").first  # an SVG text element
    assert title and shown.text_content() == title  # the title on screen is the whole title
    tbox, cbox = shown.bounding_box(), pg.locator(".js-plotly-plot").nth(1).bounding_box()
    assert tbox["x"] + tbox["width"] <= cbox["x"] + cbox["width"]  # and it fits its chart
    open_tab(pg, "Embeddings")
    chart = pg.locator("[data-testid='stPlotlyChart']").filter(has_text="Similarity to patch").first
    assert chart.bounding_box()["width"] >= 250
    pg.screenshot(path=str(ARTIFACTS / "embeddings_1024.png"))
    ctx.close()


def test_clicking_a_tile_of_the_layer_head_grid_shows_it_large(page):
    open_tab(page, "Heads")
    xy = page.evaluate(
        """() => {
          const gd = [...document.querySelectorAll('.js-plotly-plot')].find(
              g => g._fullData && g._fullData.length === 2 && g._fullData[0].type === 'heatmap'
                   && g._fullLayout.xaxis.side === 'top');
          gd.scrollIntoView({block: 'center'});  // below the fold at first
          const t = gd._fullData[1], fl = gd._fullLayout, i = 1 * 6 + 3;  // layer 2, head 4 (demo: 6 heads)
          const r = gd.getBoundingClientRect();
          return [r.left + fl.xaxis._offset + fl.xaxis.d2p(t.x[i]), r.top + fl.yaxis._offset + fl.yaxis.d2p(t.y[i])];
        }"""
    )
    page.mouse.click(*xy)
    wait_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0
    assert big_map_title(page).startswith("Layer 2, head 4: ")


def test_clicking_a_head_of_the_per_head_overlays_selects_it(page):
    """The per-head overlays render as one picture with a click target per head; a click on the
    third tile makes head 3 the selected head (the large map and the Head select follow)."""
    open_tab(page, "Heads")
    assert big_map_title(page).startswith("Layer 6, head 1: ")
    xy = page.evaluate(
        """() => {
          const gd = [...document.querySelectorAll('.js-plotly-plot')].find(
              g => g._fullData && g._fullData.length === 2 && g._fullData[0].type === 'image'
                   && g._fullData[0].source);  // the patch picker draws its pixels (z), not a PNG
          gd.scrollIntoView({block: 'center'});
          const t = gd._fullData[1], fl = gd._fullLayout, i = 2;  // the third head
          const r = gd.getBoundingClientRect();
          return [t.x.length, r.left + fl.xaxis._offset + fl.xaxis.d2p(t.x[i]),
                  r.top + fl.yaxis._offset + fl.yaxis.d2p(t.y[i])];
        }"""
    )
    assert xy[0] == 6  # the demo model's six heads, one tile each
    tiles = page.locator("[data-testid='stPlotlyChart']").filter(has=page.locator(".imagelayer image")).first
    assert tiles.bounding_box()["height"] > 200  # drawn, not an empty frame
    page.mouse.click(xy[1], xy[2])
    wait_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0
    assert big_map_title(page).startswith("Layer 6, head 3: ")
    assert "hd_head=3" in page.url  # the kept setting (and a copied link) follow
    page.screenshot(path=str(ARTIFACTS / "per_head_overlays.png"), full_page=False)


def test_layers_in_motion_plays(page):
    """Play moves the animation's slider through the layers on its own."""
    open_tab(page, "Rollout")
    page.get_by_text("Layers in motion").first.scroll_into_view_if_needed()
    active = """() => {
      const gd = [...document.querySelectorAll('.js-plotly-plot')].find(g => g._fullLayout && g._fullLayout.sliders
          && g._fullLayout.sliders.length);
      return gd._fullLayout.sliders[0].active;
    }"""
    assert page.evaluate(active) == 0
    page.get_by_text("Play", exact=True).last.click()
    deadline = time.monotonic() + 15
    while page.evaluate(active) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert page.evaluate(active) > 0
