"""Drives mesh-control's /ui page in a real Chromium (Debian's, through
Playwright's executable_path) for tests/ui_browser.rs, and prints one JSON
line of what it saw; the Rust test asserts on it.

Environment: ORIGIN (https://127.0.0.1:PORT), TOKEN_FILE, CA (the control
server's CA bundle), CHROMIUM, SHOTS (a directory for screenshots),
MIN_CALLS (answered frontend -> catalog calls to wait for).
"""
import json
import os
import socket
import ssl
import time
import urllib.parse
import urllib.request

from playwright.sync_api import sync_playwright, TimeoutError as PlaywrightTimeout

origin = os.environ["ORIGIN"]
token = open(os.environ["TOKEN_FILE"]).read().strip()
ca = os.environ["CA"]
shots = os.environ["SHOTS"]
host, port = urllib.parse.urlsplit(origin).hostname, urllib.parse.urlsplit(origin).port

# The browser is told to accept the server's certificate (it does not know
# the mesh's private CA); this checks first that it chains to that CA and
# names localhost, so the page is the control server's.
tls = ssl.create_default_context(cafile=ca)
with socket.create_connection((host, port), timeout=10) as raw:
    with tls.wrap_socket(raw, server_hostname="localhost"):
        pass

# The truth to compare the table with: /status read with the operator token.
def status_with_token():
    request = urllib.request.Request(origin + "/status", headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(request, context=tls_ip, timeout=10) as answer:
        return json.load(answer)

def graph_with_token():
    request = urllib.request.Request(origin + "/v1/graph", headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(request, context=tls_ip, timeout=10) as answer:
        return json.load(answer)

tls_ip = ssl.create_default_context(cafile=ca)
tls_ip.check_hostname = False  # the URL names 127.0.0.1; the name was checked above

result = {"shots": [], "requests": [], "errors": []}


def shot(page, name):
    path = os.path.join(shots, name + ".png")
    page.screenshot(path=path, full_page=True)
    result["shots"].append(path)


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=os.environ["CHROMIUM"], headless=True,
                                args=["--no-sandbox"])
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.on("request", lambda r: result["requests"].append(r.url))
    navigations = []
    page.on("framenavigated", lambda f: navigations.append(f.url) if f == page.main_frame else None)
    console = []
    page.on("console", lambda m: console.append(m.type + ": " + m.text))
    page.on("pageerror", lambda e: console.append("pageerror: " + str(e)))

    # Without credentials: the login form, and the JSON is refused.
    first = page.goto(origin + "/ui")
    result["unauthenticated_status"] = first.status
    result["login_form"] = page.locator("input#token[type=password]").count() == 1
    result["unauthenticated_api"] = page.evaluate(
        "Promise.all(['/status', '/v1/graph', '/ui/app.js'].map(u => fetch(u).then(r => r.status)))")
    shot(page, "1-login")

    # A wrong token: refused, still the form, no cookie.
    page.fill("#token", "not-the-token")
    page.click("#login")
    page.wait_for_load_state()
    result["wrong_token_form"] = page.locator("input#token").count() == 1
    result["cookies_after_wrong_token"] = len(context.cookies())

    # The operator token through the form.
    page.fill("#token", token)
    with page.expect_navigation():
        page.click("#login")
    page.wait_for_selector("#sync tbody tr", timeout=20000)
    page_response = page.request.get(origin + "/ui")
    result["ui_headers"] = page_response.headers
    result["cookies"] = [
        {k: c[k] for k in ("name", "value", "httpOnly", "secure", "sameSite", "path")}
        for c in context.cookies()
    ]
    result["token_in_cookie"] = any(token in c["value"] for c in context.cookies())
    navigations_after_login = len(navigations)

    # Every workload ACKed: wait for the table to say so (up to 30 s).
    expected = sorted(c["node_id"] for c in status_with_token()["clients"])
    result["status_node_ids"] = expected
    try:
        page.wait_for_function(
            """n => { const rows = [...document.querySelectorAll('#sync tbody tr')];
                     return rows.length >= n && rows.every(r => r.dataset.acked === 'true'); }""",
            arg=len(expected), timeout=30000)
    except PlaywrightTimeout:
        result["errors"].append("the table did not show every client ACKed within 30 s")
    result["rows"] = page.eval_on_selector_all(
        "#sync tbody tr",
        """rows => rows.map(r => ({node: r.dataset.node, acked: r.dataset.acked === 'true',
              kind: r.querySelector('.kind').textContent,
              types: [...r.querySelectorAll('.types div')].map(d => d.textContent),
              nack: r.querySelector('.nack').textContent}))""")
    shot(page, "2-config-sync")

    # The graph: frontend -> catalog v1 and v2 (traffic reported every 5 s),
    # with MIN_CALLS answered calls in the window for the split to be
    # measured (tests/ui_browser.rs derives its tolerance from them). The
    # page sums an edge over the identities that pushed it: when several
    # pushed the same edge (`senders`, read from /v1/graph with the token),
    # its count is that many times the calls.
    min_calls = int(os.environ.get("MIN_CALLS", "1000"))
    senders = set()
    deadline = time.time() + 60
    while not senders and time.time() < deadline:
        for e in graph_with_token()["edges"]:
            if e["source_workload"].startswith("frontend") and e["destination_service"].startswith("catalog."):
                senders.add(e["source_service_account"])
        if not senders:
            time.sleep(1)
    result["frontend_catalog_senders"] = sorted(senders)
    wanted = min_calls * max(1, len(senders))
    try:
        page.wait_for_function(
            """n => { const e = [...document.querySelectorAll('#graph g.edge')]
                         .filter(g => g.dataset.source.startsWith('shop/frontend')
                                   && g.dataset.service.startsWith('catalog.')
                                   && (g.dataset.version === 'v1' || g.dataset.version === 'v2'));
                       return new Set(e.map(g => g.dataset.version)).size == 2
                         && e.reduce((n, g) => n + Number(g.dataset.requests), 0) >= n; }""",
            arg=wanted, timeout=180000)
    except PlaywrightTimeout:
        result["errors"].append(
            "the graph did not show %d calls from frontend to catalog v1 and v2 within 180 s" % wanted)
    result["graph_nodes"] = page.eval_on_selector_all(
        "#graph g.service, #graph g.workload",
        "gs => gs.map(g => ({cls: g.getAttribute('class'), id: g.dataset.id, "
        "versions: [...g.querySelectorAll('g.version')].map(v => v.dataset.version)}))")
    result["graph_edges"] = page.eval_on_selector_all(
        "#graph g.edge",
        "gs => gs.map(g => ({source: g.dataset.source, source_version: g.dataset.sourceVersion, "
        "service: g.dataset.service, version: g.dataset.version, share: parseFloat(g.dataset.share), "
        "answered_share: g.dataset.answeredShare === '' ? null : parseFloat(g.dataset.answeredShare), "
        "configured_share: g.dataset.configuredShare === '' ? null : parseFloat(g.dataset.configuredShare), "
        "mtls: g.dataset.mtls, requests: Number(g.dataset.requests), label: g.dataset.label, "
        "title: g.querySelector('title').textContent}))")
    result["graph_locks"] = page.locator("#graph g.lock").count()
    shot(page, "3-graph")

    catalog = page.locator("#graph g.service[data-id^='catalog.']")
    if catalog.count() > 0:
        catalog.first.click()
        try:
            page.wait_for_selector("#routes li.route", timeout=10000)
        except PlaywrightTimeout:
            result["errors"].append("clicking catalog showed no routes within 10 s")
        result["routes_text"] = page.locator("#routes").inner_text()
        result["routes"] = page.eval_on_selector_all(
            "#routes li.route",
            """rs => rs.map(r => ({name: r.dataset.route,
                  match: r.querySelector('.match').textContent,
                  destinations: [...r.querySelectorAll('li.dest')].map(d => ({
                    cluster: d.dataset.cluster, version: d.dataset.version,
                    percent: parseFloat(d.dataset.percent),
                    live_rps: d.dataset.liveRps === '' ? null : parseFloat(d.dataset.liveRps),
                    text: d.textContent}))}))""")
        shot(page, "4-catalog-routes")

    # The denials table: the intruder's calls are denied every second and
    # reported with the next summaries (up to 30 s).
    try:
        page.wait_for_selector("#denials tbody tr[data-policy]", timeout=30000)
    except PlaywrightTimeout:
        pass  # tests/ui_browser.rs says what is missing
    result["denials"] = page.eval_on_selector_all(
        "#denials tbody tr",
        """rs => rs.map(r => ({policy: r.dataset.policy ?? null,
              count: Number(r.dataset.count || 0),
              text: r.textContent}))""")
    result["denials_policy_cells"] = page.eval_on_selector_all(
        "#denials td.policy", "cs => cs.map(c => c.textContent)")
    shot(page, "5-denials")

    # Refreshes in place: the data changes, the page is not reloaded.
    before = page.evaluate("document.body.dataset.refreshed")
    time.sleep(4.5)
    after = page.evaluate("document.body.dataset.refreshed")
    result["refreshed_in_place"] = before != after and len(navigations) == navigations_after_login
    result["error_banner"] = page.locator("#error").inner_text()

    # Logging out ends the session on the server.
    old_cookie = context.cookies()[0]["value"] if context.cookies() else ""
    with page.expect_navigation():
        page.click("#logout")
    result["after_logout_api"] = page.evaluate("fetch('/status').then(r => r.status)")
    replay = urllib.request.Request(origin + "/status", headers={"Cookie": "mesh_ui_session=" + old_cookie})
    try:
        with urllib.request.urlopen(replay, context=tls_ip, timeout=10) as answer:
            result["old_cookie_replayed"] = answer.status
    except urllib.error.HTTPError as e:
        result["old_cookie_replayed"] = e.code
    result["console"] = console
    browser.close()

print("UI-RESULT " + json.dumps(result))
