"""Real-browser tests of the Faithfulness tab and the Sanity tab's model randomization: the plots
render with their legends, and screenshots at two window sizes land in tests/artifacts/."""

from __future__ import annotations

import pytest
from test_browser import ARTIFACTS, browser, server, wait_idle  # noqa: F401  (fixtures)

pytestmark = pytest.mark.browser

SIZES = ((1400, 900), (1024, 768))


def open_page(browser, server, size: tuple[int, int], query: str):  # noqa: F811
    ctx = browser.new_context(viewport={"width": size[0], "height": size[1]})
    pg = ctx.new_page()
    pg.set_default_timeout(120_000)
    pg.goto(f"{server}/?{query}")
    wait_idle(pg)
    return ctx, pg


def legend_texts(pg) -> list[str]:
    return [(t or "").strip() for t in pg.locator(".js-plotly-plot .legendtext").all_text_contents()]


def test_faithfulness_tab_draws_both_plots_with_auc_legends(browser, server):  # noqa: F811
    for w, h in SIZES:
        ctx, pg = open_page(browser, server, (w, h), "tab=Faithfulness")
        try:
            pg.wait_for_selector(".js-plotly-plot .legendtext")
            wait_idle(pg)
            plots = pg.locator("[data-testid='stPlotlyChart']")
            assert plots.count() >= 2
            texts = legend_texts(pg)
            assert sum("AUC" in t for t in texts) >= 12, texts  # 6 maps x 2 directions
            assert any(t.startswith("gradient rollout (AUC ") for t in texts), texts
            # both plots lie inside the window's width (nothing pushed off to the right)
            for i in range(2):
                box = plots.nth(i).bounding_box()
                assert box["x"] >= 0 and box["x"] + box["width"] <= w + 1, (w, box)
            pg.screenshot(path=str(ARTIFACTS / f"faithfulness_{w}.png"))
            pg.set_viewport_size({"width": w, "height": 2600})  # the main area scrolls: see the whole tab
            wait_idle(pg)
            pg.screenshot(path=str(ARTIFACTS / f"faithfulness_{w}_full.png"))
        finally:
            ctx.close()


def test_sanity_tab_randomization_draws_strip_and_curves(browser, server):  # noqa: F811
    ctx, pg = open_page(browser, server, (1400, 900), "tab=Sanity")
    try:
        pg.get_by_role("button", name="Run randomization").click()
        pg.mouse.move(1, 1)  # the button's help would cover the caption in the screenshot
        wait_idle(pg)
        pg.wait_for_selector(".js-plotly-plot .legendtext")
        texts = legend_texts(pg)
        assert "rollout" in texts and "gradient rollout" in texts, texts
        assert pg.get_by_text("Spearman with the original map").count() >= 1
        pg.set_viewport_size({"width": 1400, "height": 2600})
        wait_idle(pg)
        pg.screenshot(path=str(ARTIFACTS / "sanity_randomization_1400_full.png"))
        pg.set_viewport_size({"width": 1024, "height": 2600})
        wait_idle(pg)
        pg.screenshot(path=str(ARTIFACTS / "sanity_randomization_1024_full.png"))
    finally:
        ctx.close()
