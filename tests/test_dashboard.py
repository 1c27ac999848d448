"""The gateway's dashboard in a real headless Chromium (Debian's ``chromium``, driven by
playwright with that executable): a real gateway, fusion agent, nats-server and two real SmolLM2
experts, e1 with a LoRA adapter so that the experts' distributions differ. It asserts what a user
sees, and leaves a screenshot in the test's tmp_path (its path is printed)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest

from moe2.agents.expert.backends import load_backend
from moe2.agents.expert.backends.transformers_backend import TransformersBackend
from moe2.agents.expert.models import resolve_model
from tests.test_gateway import Stack, stack

async_api = pytest.importorskip(
    "playwright.async_api", reason="playwright is not installed: pip install '.[test]'"
)

pytestmark = [pytest.mark.anyio, pytest.mark.model]
ADAPTER = Path(__file__).resolve().parent.parent / "deploy" / "experts" / "adapters" / "cluster-1"
QUESTION = "Name three colours of the rainbow."
MAX_TOKENS = 16
WAIT_MS = 60_000


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    return path


@pytest.fixture
async def two_experts(nats_url: str, smollm2: TransformersBackend) -> Any:
    """e0: SmolLM2; e1: SmolLM2 with the shipped cluster-1 adapter (its own backend)."""
    tuned = load_backend("transformers", resolve_model(adapter=ADAPTER))
    async with stack(nats_url, smollm2, more=(tuned,)) as s:
        yield s


async def cells(page: Any, table: str) -> list[list[str]]:
    """The text of each body row of a table on the page."""
    rows: list[list[str]] = await page.eval_on_selector_all(
        f"#{table} tr", "rows => rows.slice(1).map(r => [...r.cells].map(c => c.textContent))"
    )
    return rows


async def test_the_dashboard_shows_the_pool_and_streams_an_answer_coloured_by_expert(
    chromium: str, two_experts: Stack, tmp_path: Path
) -> None:
    s = two_experts
    with anyio.fail_after(120):
        reference = await s.chat(QUESTION, temperature=0.0, max_tokens=MAX_TOKENS)
    root = str(s.openai.base_url).removesuffix("v1/")
    shot = tmp_path / "dashboard.png"
    async with async_api.async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 540})
            await page.goto(root)
            # the status tables fill in from GET /status: both experts, and the fusion agent
            # once it has answered $SRV.INFO (asked on the first poll, shown on the next)
            await page.wait_for_function(
                "document.querySelectorAll('#experts tr').length === 3 && "
                "document.querySelector('#fusion tr + tr td').textContent.startsWith('fusion-')",
                timeout=WAIT_MS,
            )
            experts = await cells(page, "experts")
            fusion = await cells(page, "fusion")
            summary = await page.text_content("#summary")
            updated = await page.text_content("#updated") or ""
            await page.fill("#prompt", QUESTION)
            await page.fill("#max-tokens", str(MAX_TOKENS))
            await page.click("#send")
            await page.wait_for_function(
                "document.getElementById('answer-experts').textContent !== '' || "
                "document.getElementById('error').textContent !== ''",
                timeout=WAIT_MS,
            )
            error = await page.text_content("#error")
            spans = await page.eval_on_selector_all(
                "#answer span.token",
                "spans => spans.map(s => [s.textContent, s.dataset.expert, "
                "getComputedStyle(s).color])",
            )
            legend = await page.eval_on_selector_all(
                "#legend > span",
                "items => items.map(i => [i.dataset.expert, "
                "getComputedStyle(i.querySelector('.swatch')).backgroundColor])",
            )
            answered_by = await page.text_content("#answer-experts")
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            await browser.close()
    print(f"dashboard screenshot: {shot}")
    assert error == ""
    by_id = {row[0]: row for row in experts}
    assert set(by_id) == {"e0", "e1"}
    assert by_id["e0"][1:3] == ["SmolLM2-135M-Instruct", "-"]
    assert by_id["e1"][1:3] == ["SmolLM2-135M-Instruct", "cluster-1"]
    assert all(row[4] == "transformers" and row[7].endswith("s ago") for row in experts)
    assert fusion[0][1:4] == ["all-live", "-", "all live"]  # no SMO: every live expert serves
    assert fusion[0][7] == "none"  # no budgets configured
    assert summary is not None and summary.startswith("2 of 2 experts live")
    password = urlsplit(s.nats_url).password
    assert "from nats://" in updated and (password is None or password not in updated)
    # the answer, streamed into the page piece by piece, is the gateway's greedy answer
    assert "".join(text for text, _, _ in spans) == reference.choices[0].message.content
    assert len(spans) > 3
    colours = dict(legend)
    assert set(colours) == {"e0", "e1"}  # the adapter's expert leads some tokens, the base others
    assert colours["e0"] != colours["e1"]
    for text, expert, colour in spans:
        assert expert in colours, (text, expert)
        assert colour == colours[expert]  # each piece in the colour of its expert's swatch
    assert answered_by is not None and answered_by.startswith("experts: e0 0.50, e1 0.50")
    assert shot.stat().st_size > 10_000
