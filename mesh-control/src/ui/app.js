// mesh-control's page: the service graph, the routing of a clicked
// service with live traffic, the recent authorization denials (all from
// /v1/graph and /v1/routes) and the config-sync table (/status), refreshed
// every 2 s. Vanilla JS, hand-written SVG; every value goes into the DOM as
// text, never as markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 2000;
let selectedService = null;

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

async function getJson(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) {
    window.location.assign("/ui");
    throw new Error("logged out");
  }
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

function describe(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

function renderSync(status) {
  const body = document.querySelector("#sync tbody");
  const rows = [];
  const clients = (status.clients || []).slice().sort((a, b) => a.node_id.localeCompare(b.node_id));
  for (const c of clients) {
    const tr = el("tr", { "data-node": c.node_id });
    const types = Object.entries(c.types || {}).sort();
    const allAcked = types.length > 0 && types.every(([, t]) => t.acked);
    tr.dataset.acked = String(allAcked);
    if (c.stale) tr.classList.add("stale");
    tr.append(el("td", { class: "node" }, c.node_id));
    tr.append(el("td", {}, c.namespace || ""));
    tr.append(el("td", { class: "kind" }, c.kind));
    const typeCell = el("td", { class: "types" });
    const nackCell = el("td", { class: "nack" });
    for (const [name, t] of types) {
      const state = t.acked ? "acked" : t.last_nack ? "nacked" : "pending";
      const line = el("div", { class: state, "data-type": name },
        name + ": " + (t.sent_version ?? "-") + " / " + (t.acked_version ?? "-") +
        (t.acked ? " ✓ ACKed" : state === "nacked" ? " ✗ NACKed" : " … pending"));
      typeCell.append(line);
      if (t.last_nack) {
        nackCell.append(el("div", { class: "nacked" },
          name + " v" + t.last_nack.version + " (" + t.last_nack.seconds_ago + " s ago): " + t.last_nack.message));
      }
    }
    tr.append(typeCell, nackCell);
    tr.append(el("td", { class: "stale" }, c.stale ? "stale" : "no"));
    const ignored = el("td", { class: "ignored" });
    for (const item of c.ignored || []) ignored.append(el("div", {}, describe(item)));
    tr.append(ignored);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  const acked = clients.filter((c) => Object.values(c.types || {}).every((t) => t.acked)).length;
  document.getElementById("summary").textContent =
    "config v" + status.version + " · " + clients.length + " clients, " + acked + " in sync";
}

// Edges summed over protocol and service account per (source workload and
// version, service, version). `mtls`: "true" when every request of the
// merged edges was mutual TLS, "partial" when some were, else "false".
function mergeEdges(graph) {
  const merged = new Map();
  for (const e of graph.edges || []) {
    const source = e.source_namespace + "/" + e.source_workload;
    const sourceVersion = e.source_version || "unknown";
    const key = [source, sourceVersion, e.destination_service, e.destination_version].join("|");
    let m = merged.get(key);
    if (!m) {
      m = { source, sourceVersion, service: e.destination_service, version: e.destination_version,
        rps: 0, requests: 0, errors: 0, share: 0, configured: null, p50: null, p99: null,
        retries: 0, mtlsRequests: 0 };
      merged.set(key, m);
    }
    m.rps += e.rps;
    m.requests += e.requests;
    m.errors += e.error_rate * e.requests;
    m.share += e.observed_share;
    m.retries += e.retries_per_second;
    if (e.mtls) m.mtlsRequests += e.requests;
    // The same for every edge to this service version (from the routes).
    if (e.configured_share != null) m.configured = e.configured_share;
    if (e.p50_ms != null) m.p50 = Math.max(m.p50 ?? 0, e.p50_ms);
    if (e.p99_ms != null) m.p99 = Math.max(m.p99 ?? 0, e.p99_ms);
  }
  // The observed split among answered calls: a call no endpoint answered
  // (a fault abort, a breaker overflow) has no version, and the
  // configured weights only apply to calls that reached one.
  const answered = new Map();
  const answeredKey = (m) => m.source + "|" + m.service;
  for (const m of merged.values()) {
    if (m.version !== "unknown" && m.version !== "") {
      answered.set(answeredKey(m), (answered.get(answeredKey(m)) || 0) + m.requests);
    }
  }
  for (const m of merged.values()) {
    m.mtls = m.requests > 0 && m.mtlsRequests === m.requests ? "true"
      : m.mtlsRequests > 0 ? "partial" : "false";
    const total = answered.get(answeredKey(m)) || 0;
    m.answered = m.version !== "unknown" && m.version !== "";
    m.answeredShare = m.answered && total > 0 ? m.requests / total : null;
  }
  return [...merged.values()];
}

function fmt(ms) {
  return ms == null ? "-" : ms < 10 ? ms.toFixed(1) : ms.toFixed(0);
}

function percent(share) {
  return +(share * 100).toFixed(share < 0.1 ? 1 : 0) + "%";
}

// A node box with its versions as sub-nodes; `anchor` is where edges meet
// a version ("right" for sources, "left" for services). Returns the group
// and its height.
function nodeBox(kind, node, x, y, W, ROW, anchor, pos) {
  const versions = node.versions.length ? node.versions : ["unknown"];
  const h = ROW + versions.length * (ROW + 4) + 4;
  const g = svg("g", { class: kind, "data-id": node.id });
  g.append(svg("rect", { class: kind + "-box", x, y, width: W + 40, height: h, rx: 6 }),
    svg("text", { x: x + 8, y: y + 17 }, node.id));
  versions.forEach((v, i) => {
    const vy = y + ROW + i * (ROW + 4);
    const vg = svg("g", { class: "version", "data-version": v });
    vg.append(svg("rect", { x: x + 20, y: vy, width: W, height: ROW, rx: 4 }),
      svg("text", { x: x + 28, y: vy + 17 }, v));
    g.append(vg);
    pos.set(kind + ":" + node.id + "|" + v,
      { x: anchor === "right" ? x + 20 + W : x + 20, y: vy + ROW / 2 });
  });
  pos.set(kind + ":" + node.id, { x: anchor === "right" ? x + W + 40 : x, y: y + ROW / 2 });
  return [g, h];
}

// A padlock (SVG shapes: no emoji font needed), its top left at x, y.
function padlock(x, y) {
  const g = svg("g", { class: "lock", transform: `translate(${x},${y})` });
  g.append(svg("title", {}, "mutual TLS"),
    svg("path", { class: "shackle", d: "M2.5,6 V3.5 a3,3 0 0 1 6,0 V6" }),
    svg("rect", { class: "body", x: 0.5, y: 6, width: 10, height: 8, rx: 1.5 }));
  return g;
}

// An edge's label. The share: of the calls its endpoints answered, for a
// version (what the configured weights split); of all the source's calls
// to the service, for the calls no endpoint answered.
function edgeLabel(e, errorRate) {
  const configured = e.configured == null ? "" : " (configured " + percent(e.configured) + ")";
  const share = e.answered
    ? percent(e.answeredShare ?? 0) + " of answered calls" + configured
    : percent(e.share) + " of calls, no endpoint answered";
  return e.rps.toFixed(1) + " rps · " + (errorRate * 100).toFixed(1) + "% err · p50 " +
    fmt(e.p50) + " / p99 " + fmt(e.p99) + " ms · " + share +
    (e.retries > 0 ? " · " + e.retries.toFixed(1) + " retries/s" : "");
}

let lastGraph = null;

function renderGraph(graph) {
  lastGraph = graph;
  const root = document.getElementById("graph");
  if (!graph) {
    root.replaceChildren(svg("text", { x: 10, y: 20 }, "this control server has no /v1/graph"));
    root.setAttribute("height", 40);
    return;
  }
  document.getElementById("window").textContent = "(last " + Math.round(graph.window_seconds) + " s)";
  const workloads = graph.nodes.filter((n) => n.kind === "workload");
  const services = graph.nodes.filter((n) => n.kind === "service");
  const edges = mergeEdges(graph);
  const W = 200, ROW = 26, GAP = 24, LEFT = 20, RIGHT = 960, LOCK = 16;
  const pos = new Map();
  const layer = svg("g");
  let y = 20;
  for (const w of workloads) {
    const [g, h] = nodeBox("workload", w, LEFT, y, W, ROW, "right", pos);
    layer.append(g);
    y += h + GAP;
  }
  let height = y;
  y = 20;
  for (const s of services) {
    const [g, h] = nodeBox("service", s, RIGHT, y, W, ROW, "left", pos);
    if (s.id === selectedService) g.classList.add("selected");
    g.addEventListener("click", () => showRoutes(s.id));
    layer.append(g);
    y += h + GAP;
  }
  height = Math.max(height, y, 60);
  const edgeLayer = svg("g");
  const labelLayer = svg("g");
  // Labels of several edges into one version are stacked upwards.
  const stacked = new Map();
  for (const e of edges) {
    const from = pos.get("workload:" + e.source + "|" + e.sourceVersion) || pos.get("workload:" + e.source);
    const toKey = "service:" + e.service + "|" + e.version;
    const to = pos.get(toKey) || pos.get("service:" + e.service);
    if (!from || !to) continue;
    const errorRate = e.requests ? e.errors / e.requests : 0;
    const k = stacked.get(toKey) || 0;
    stacked.set(toKey, k + 1);
    const ly = to.y - 4 - k * 13;
    // A curve to the label column, then straight under its own label.
    const bend = RIGHT - 580;
    const mid = (from.x + bend) / 2;
    const g = svg("g", { class: "edge", "data-source": e.source, "data-source-version": e.sourceVersion,
      "data-service": e.service, "data-version": e.version, "data-share": e.share.toFixed(4),
      "data-answered-share": e.answeredShare == null ? "" : e.answeredShare.toFixed(4),
      "data-configured-share": e.configured == null ? "" : e.configured.toFixed(4),
      "data-requests": e.requests, "data-rps": e.rps.toFixed(3), "data-mtls": e.mtls });
    g.append(svg("path", { class: "edge" + (errorRate > 0 ? " errors" : "") + (e.mtls === "true" ? " mtls" : ""),
      d: `M${from.x},${from.y} C${mid},${from.y} ${mid},${ly + 4} ${bend},${ly + 4} L${to.x},${to.y}` }));
    const label = edgeLabel(e, errorRate);
    const mtlsText = e.mtls === "true" ? " · mutual TLS" : e.mtls === "partial" ? " · partly mutual TLS" : " · not mutual TLS";
    // The label (and whether it is mTLS) as the edge's tooltip; the label
    // is drawn above every edge line, in the edge's group so the edge's
    // text holds it.
    g.append(svg("title", {}, label + mtlsText));
    const text = svg("text", { class: "label", x: RIGHT - 8 - LOCK, y: ly, "text-anchor": "end" }, label);
    labelLayer.append(text);
    if (e.mtls !== "false") {
      const lock = padlock(RIGHT - 8 - LOCK + 3, ly - 11);
      if (e.mtls === "partial") lock.classList.add("partial");
      labelLayer.append(lock);
    }
    g.dataset.label = label;
    edgeLayer.append(g);
  }
  root.setAttribute("height", height);
  root.setAttribute("viewBox", `0 0 ${RIGHT + W + 60} ${height}`);
  if (!edges.length) {
    edgeLayer.append(svg("text", { x: 10, y: height - 10, class: "label" },
      "no traffic reported in the window"));
  }
  root.replaceChildren(edgeLayer, labelLayer, layer);
}

// Live traffic to `service` per destination version, over every source:
// { version: rps }, and the total of the answered calls (with a version).
function liveByVersion(service) {
  const rps = new Map();
  let total = 0;
  for (const e of lastGraph?.edges || []) {
    if (e.destination_service !== service) continue;
    rps.set(e.destination_version, (rps.get(e.destination_version) || 0) + e.rps);
    if (e.destination_version && e.destination_version !== "unknown") total += e.rps;
  }
  return [rps, total];
}

let routesAnswer = null;

function renderRoutes() {
  const body = document.getElementById("routes-body");
  if (!routesAnswer) return;
  const [live, total] = liveByVersion(routesAnswer.service);
  const parts = [el("p", { class: "note" },
    "Live traffic is per destination version (the graph's edges into that version, from every " +
    "source, over its window), not per rule: workload metrics carry no route name, so a version " +
    "that several rules send to shows the same live figure under each.")];
  for (const vh of routesAnswer.virtual_hosts) {
    parts.push(el("h4", {}, vh.virtual_host + " (" + vh.route_config + ")"));
    const list = el("ol", { class: "rules" });
    for (const r of vh.routes) {
      const m = r.match;
      const conditions = ["path " + m.path]
        .concat(m.headers.map((h) => "header " + h), m.query_params.map((q) => "query " + q));
      if (m.ignore_case) conditions.push("ignoring case");
      const item = el("li", { class: "route", "data-route": r.name || "" });
      item.append(el("div", { class: "match" }, (r.name || "(unnamed)") + ": " + conditions.join(" and ")));
      const dests = el("ul", { class: "destinations" });
      for (const d of r.destinations) {
        const version = d.version ?? null;
        const rps = version == null ? null : (live.get(version) || 0);
        const li = el("li", { class: "dest", "data-cluster": d.cluster, "data-version": version ?? "",
          "data-percent": String(d.percent), "data-live-rps": rps == null ? "" : rps.toFixed(3) });
        const liveText = rps == null
          ? "live: - (its endpoints are of several versions)"
          : "live " + version + ": " + rps.toFixed(1) + " rps" +
            (total > 0 ? " (" + percent(rps / total) + " of answered calls)" : "");
        li.textContent = "→ " + d.cluster + " " + +d.percent.toFixed(1) + "% configured · " + liveText;
        dests.append(li);
      }
      item.append(dests);
      list.append(item);
    }
    parts.push(list);
  }
  if (!routesAnswer.virtual_hosts.length) parts.push(el("p", {}, "no routes served for this service"));
  body.replaceChildren(...parts);
}

async function loadRoutes(service) {
  const answer = await getJson("/v1/routes?service=" + encodeURIComponent(service));
  if (service !== selectedService) return;
  routesAnswer = answer;
  renderRoutes();
}

async function showRoutes(service) {
  selectedService = service;
  routesAnswer = null;
  for (const g of document.querySelectorAll("#graph g.service")) {
    g.classList.toggle("selected", g.dataset.id === service);
  }
  document.getElementById("routes-service").textContent = service;
  document.getElementById("routes").hidden = false;
  const body = document.getElementById("routes-body");
  body.replaceChildren(el("p", {}, "loading…"));
  try {
    await loadRoutes(service);
  } catch (e) {
    body.replaceChildren(el("p", { class: "error" }, String(e)));
  }
}

// Denials grouped by policy (the policy's cell spans its rows), the
// policies with the most denials first.
function renderDenials(graph) {
  const body = document.querySelector("#denials tbody");
  const denials = graph?.denials || [];
  if (!denials.length) {
    const tr = el("tr", { class: "empty" });
    tr.append(el("td", { colspan: "5" }, "no requests denied in the window"));
    body.replaceChildren(tr);
    return;
  }
  const byPolicy = new Map();
  for (const d of denials) {
    if (!byPolicy.has(d.policy)) byPolicy.set(d.policy, []);
    byPolicy.get(d.policy).push(d);
  }
  const total = (list) => list.reduce((n, d) => n + d.count, 0);
  const groups = [...byPolicy.entries()].sort((a, b) => total(b[1]) - total(a[1]) || a[0].localeCompare(b[0]));
  const rows = [];
  for (const [policy, list] of groups) {
    list.sort((a, b) => b.count - a.count);
    list.forEach((d, i) => {
      const tr = el("tr", { "data-policy": policy, "data-count": String(d.count) });
      if (i === 0) {
        tr.append(el("td", { class: "policy", rowspan: String(list.length) },
          (policy === "" ? "(default deny: no ALLOW policy matched)" : policy) +
          " — " + total(list) + " denied"));
      }
      tr.append(el("td", { class: "principal" }, d.source_principal || "(plaintext caller)"),
        el("td", { class: "destination" }, d.destination_namespace + "/" + d.destination_workload),
        el("td", { class: "count" }, String(d.count)),
        el("td", { class: "seen" }, Math.round(d.last_seen_seconds_ago) + " s ago"));
      rows.push(tr);
    });
  }
  body.replaceChildren(...rows);
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const [status, graph] = await Promise.all([getJson("/status"), getJson("/v1/graph")]);
    renderSync(status);
    renderGraph(graph);
    renderDenials(graph);
    // The chosen service's rules again (config may change), with the new
    // live traffic.
    if (selectedService) await loadRoutes(selectedService);
    error.textContent = "";
    document.body.dataset.refreshed = String(Date.now());
  } catch (e) {
    error.textContent = String(e);
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
