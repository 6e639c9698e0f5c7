"""Drives mesh-control's /ui page in a real Chromium (Debian's, through
Playwright's executable_path) for tests/ui_prometheus.rs, where mesh-control
reads the graph from Prometheus (`--prometheus`): logs in with the operator
token, waits for the edge frontend -> catalog v2 and prints one JSON line of
what it saw (the Rust test decides).

Environment: ORIGIN (https://127.0.0.1:PORT), TOKEN_FILE, CHROMIUM, SHOTS
(a directory for screenshots).
"""
import json
import os

from playwright.sync_api import sync_playwright, TimeoutError as PlaywrightTimeout

origin = os.environ["ORIGIN"]
token = open(os.environ["TOKEN_FILE"]).read().strip()
shots = os.environ["SHOTS"]

result = {"errors": [], "graph_sources": [], "graph_statuses": [], "console": []}

with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=os.environ["CHROMIUM"], headless=True,
                                args=["--no-sandbox"])
    # The browser does not know the mesh's private CA; tests/ui_browser.rs
    # checks the certificate chain, this test the graph's source.
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.on("console", lambda m: result["console"].append(m.type + ": " + m.text))
    page.on("pageerror", lambda e: result["console"].append("pageerror: " + str(e)))

    def graph_response(r):
        if "/v1/graph" in r.url:
            result["graph_statuses"].append(r.status)
            result["graph_sources"].append(r.headers.get("x-graph-source", ""))

    page.on("response", graph_response)

    page.goto(origin + "/ui")
    page.fill("#token", token)
    with page.expect_navigation():
        page.click("#login")

    edge = ("[...document.querySelectorAll('#graph g.edge')].filter(g => "
            "g.dataset.source.startsWith('shop/frontend') && g.dataset.service.startsWith('catalog.')"
            " && g.dataset.version === 'v2')")
    try:
        page.wait_for_function("() => " + edge + ".length > 0", timeout=60000)
    except PlaywrightTimeout:
        result["errors"].append("no svg edge frontend -> catalog v2 within 60 s")
    result["v2_edges"] = page.evaluate(
        "() => " + edge + ".map(g => ({share: parseFloat(g.dataset.share), "
        "requests: Number(g.dataset.requests), label: g.textContent}))")
    result["edges"] = page.eval_on_selector_all(
        "#graph g.edge",
        "gs => gs.map(g => ({source: g.dataset.source, service: g.dataset.service, "
        "version: g.dataset.version, share: parseFloat(g.dataset.share)}))")
    result["error_banner"] = page.locator("#error").inner_text() if page.locator("#error").count() else ""
    path = os.path.join(shots, "prometheus-graph.png")
    page.screenshot(path=path, full_page=True)
    result["shot"] = path
    browser.close()

print("PROM-RESULT " + json.dumps(result))
