"""The Probes tab in Chromium: a click on the layer x head grid removes the head (crossed out, the
prediction of the ablated model appears), a click on the ranking removes another, a click on the
picture drops a patch; screenshots at 1400x900 and 1024x768 in tests/artifacts/."""

from __future__ import annotations

import time

import pytest
from test_browser import ARTIFACTS, browser, open_tab, server, wait_idle  # noqa: F401  (fixtures)

pytestmark = pytest.mark.browser

# the demo model: 6 layers x 6 heads, a 12 x 12 grid of 8 px patches
HEADS, PATCH = 6, 8

FIND_GRID = """(which) => [...document.querySelectorAll('.js-plotly-plot')].filter(
    g => g._fullData && g._fullData.length === 2 && g._fullData[0].type === 'heatmap')[which]"""


def new_page(browser, server, width: int, height: int):  # noqa: F811
    ctx = browser.new_context(viewport={"width": width, "height": height})
    pg = ctx.new_page()
    pg.set_default_timeout(120_000)
    pg.goto(server + "/?tab=Probes")
    wait_idle(pg)
    pg.wait_for_function(f"() => !!({FIND_GRID})(0)")
    return ctx, pg


def click_tile(pg, which: int, layer: int, head: int) -> None:
    """Click tile (layer, head) (from 1) of the page's `which`-th layer x head grid (0: the heads,
    1: the ranking) where plotly drew it."""
    xy = pg.evaluate(
        f"""([which, i]) => {{
          const gd = ({FIND_GRID})(which);
          gd.scrollIntoView({{block: 'center'}});
          const t = gd._fullData[1], fl = gd._fullLayout, r = gd.getBoundingClientRect();
          return [r.left + fl.xaxis._offset + fl.xaxis.d2p(t.x[i]), r.top + fl.yaxis._offset + fl.yaxis.d2p(t.y[i])];
        }}""",
        [which, (layer - 1) * HEADS + (head - 1)],
    )
    pg.mouse.click(*xy)
    wait_idle(pg)


def click_patch(pg, row: int, col: int) -> None:
    xy = pg.evaluate(
        """([row, col, p]) => {
          const gd = [...document.querySelectorAll('.js-plotly-plot')].find(
              g => g._fullData && g._fullData[0].type === 'image');
          gd.scrollIntoView({block: 'center'});
          const fl = gd._fullLayout, r = gd.getBoundingClientRect();
          return [r.left + fl.xaxis._offset + fl.xaxis.d2p((col + 0.5) * p),
                  r.top + fl.yaxis._offset + fl.yaxis.d2p((row + 0.5) * p)];
        }""",
        [row, col, PATCH],
    )
    pg.mouse.click(*xy)
    wait_idle(pg)


def crossed_out(pg, which: int = 0) -> int:
    """How many heads the grid marks as removed (an X is six shapes: outline and two lines, twice)."""
    return pg.evaluate(f"() => (({FIND_GRID})({which}).layout.shapes || []).length") // 6


def text(pg) -> str:
    return pg.locator("[data-testid='stMain'], section.main").first.inner_text()


def shoot(pg, name: str, anchor: str | None = None) -> None:
    if anchor:
        pg.get_by_text(anchor).first.scroll_into_view_if_needed()
    time.sleep(1.0)  # plotly's axes
    pg.screenshot(path=str(ARTIFACTS / name))


@pytest.mark.parametrize("size", [(1400, 900), (1024, 768)], ids=["1400", "1024"])
def test_clicks_remove_heads_and_drop_patches(browser, server, size):  # noqa: F811
    width, height = size
    ctx, pg = new_page(browser, server, width, height)
    try:
        assert "Removed: 0 of 36 heads" in text(pg)
        # the grid keeps a usable size in its column (autorange once shrank it to a thumbnail)
        plotted = pg.evaluate(f"() => ({FIND_GRID})(0)._fullLayout.xaxis._length")
        assert plotted >= 150, plotted
        shoot(pg, f"probes_{width}.png")
        click_tile(pg, 0, 2, 4)
        assert crossed_out(pg) == 1
        page = text(pg)
        assert "Removed: 1 of 36 heads: L2H4" in page
        assert "Without 1 head" in page, page
        assert pg.locator("[data-testid='stDataFrame']").count() == 3  # its logit drop, the two predictions
        shoot(pg, f"probes_ablated_{width}.png")
        click_patch(pg, 3, 7)
        assert "1 dropped by clicking" in text(pg) and "Kept 143 of 144 patches" in text(pg)
        assert "Remaining 143 patch tokens" in text(pg)
        click_patch(pg, 4, 7)
        assert "2 dropped by clicking" in text(pg)
        shoot(pg, f"probes_dropped_{width}.png", "Remaining 142 patch tokens")
        if width == 1400:
            pg.get_by_role("button", name="Rank heads").click()
            wait_idle(pg)
            pg.wait_for_function(f"() => !!({FIND_GRID})(1)")
            click_tile(pg, 1, 5, 1)  # a cell of the ranking removes that head too
            assert crossed_out(pg) == 2 and crossed_out(pg, 1) == 2
            assert "Removed: 2 of 36 heads: L2H4; L5H1" in text(pg)
            shoot(pg, "probes_ranked_1400.png", "Rank heads")
            click_tile(pg, 0, 2, 4)  # the same tile again restores the head
            assert "Removed: 1 of 36 heads: L5H1\n" in text(pg)
        assert pg.locator("[data-testid='stException']").count() == 0
    finally:
        ctx.close()
