// mesh-control's page: the config-sync table (/status) and the service
// graph (/v1/graph), refreshed every 2 s. Vanilla JS, hand-written SVG;
// every value goes into the DOM as text, never as markup.
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

// Edges summed over protocol / mTLS per (source workload, service, version).
function mergeEdges(graph) {
  const merged = new Map();
  for (const e of graph.edges || []) {
    const source = e.source_namespace + "/" + e.source_workload;
    const key = source + "|" + e.destination_service + "|" + e.destination_version;
    let m = merged.get(key);
    if (!m) {
      m = { source, service: e.destination_service, version: e.destination_version,
        rps: 0, requests: 0, errors: 0, share: 0, p50: null, p99: null, retries: 0 };
      merged.set(key, m);
    }
    m.rps += e.rps;
    m.requests += e.requests;
    m.errors += e.error_rate * e.requests;
    m.share += e.observed_share;
    m.retries += e.retries_per_second;
    if (e.p50_ms != null) m.p50 = Math.max(m.p50 ?? 0, e.p50_ms);
    if (e.p99_ms != null) m.p99 = Math.max(m.p99 ?? 0, e.p99_ms);
  }
  return [...merged.values()];
}

function fmt(ms) {
  return ms == null ? "-" : ms < 10 ? ms.toFixed(1) : ms.toFixed(0);
}

function renderGraph(graph) {
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
  const W = 200, ROW = 26, GAP = 24, LEFT = 20, RIGHT = 820;
  const pos = new Map();
  const layer = svg("g");
  let y = 20;
  for (const w of workloads) {
    const g = svg("g", { class: "workload", "data-id": w.id });
    g.append(svg("rect", { x: LEFT, y, width: W, height: ROW, rx: 4 }),
      svg("text", { x: LEFT + 8, y: y + 17 }, w.id));
    layer.append(g);
    pos.set("w:" + w.id, { x: LEFT + W, y: y + ROW / 2 });
    y += ROW + GAP;
  }
  let height = y;
  y = 20;
  for (const s of services) {
    const versions = s.versions.length ? s.versions : ["unknown"];
    const h = ROW + versions.length * (ROW + 4) + 4;
    const g = svg("g", { class: "service" + (s.id === selectedService ? " selected" : ""), "data-id": s.id });
    g.append(svg("rect", { class: "service-box", x: RIGHT, y, width: W + 40, height: h, rx: 6 }),
      svg("text", { x: RIGHT + 8, y: y + 17 }, s.id));
    versions.forEach((v, i) => {
      const vy = y + ROW + i * (ROW + 4);
      const vg = svg("g", { class: "version", "data-version": v });
      vg.append(svg("rect", { x: RIGHT + 20, y: vy, width: W, height: ROW, rx: 4 }),
        svg("text", { x: RIGHT + 28, y: vy + 17 }, v));
      g.append(vg);
      pos.set("s:" + s.id + "|" + v, { x: RIGHT + 20, y: vy + ROW / 2 });
    });
    pos.set("s:" + s.id, { x: RIGHT, y: y + ROW / 2 });
    g.addEventListener("click", () => showRoutes(s.id));
    layer.append(g);
    y += h + GAP;
  }
  height = Math.max(height, y, 60);
  const edgeLayer = svg("g");
  const labelLayer = svg("g");
  for (const e of edges) {
    const from = pos.get("w:" + e.source);
    const to = pos.get("s:" + e.service + "|" + e.version) || pos.get("s:" + e.service);
    if (!from || !to) continue;
    const errorRate = e.requests ? e.errors / e.requests : 0;
    // A curve to the label column, then straight under its own label.
    const bend = RIGHT - 440;
    const mid = (from.x + bend) / 2;
    const g = svg("g", { class: "edge", "data-source": e.source, "data-service": e.service,
      "data-version": e.version, "data-share": e.share.toFixed(4), "data-requests": e.requests });
    g.append(svg("path", { class: "edge" + (errorRate > 0 ? " errors" : ""),
      d: `M${from.x},${from.y} C${mid},${from.y} ${mid},${to.y} ${bend},${to.y} L${to.x},${to.y}` }));
    const label = e.rps.toFixed(1) + " rps · " + (errorRate * 100).toFixed(1) + "% err · p50 " +
      fmt(e.p50) + " / p99 " + fmt(e.p99) + " ms · " + (e.share * 100).toFixed(0) + "% of calls" +
      (e.retries > 0 ? " · " + e.retries.toFixed(1) + " retries/s" : "");
    // The label as the edge's tooltip, and drawn above every edge line.
    g.append(svg("title", {}, label));
    labelLayer.append(svg("text", { class: "label", x: RIGHT - 8, y: to.y - 4, "text-anchor": "end" }, label));
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

async function showRoutes(service) {
  selectedService = service;
  for (const g of document.querySelectorAll("#graph g.service")) {
    g.classList.toggle("selected", g.dataset.id === service);
  }
  const box = document.getElementById("routes");
  const body = document.getElementById("routes-body");
  document.getElementById("routes-service").textContent = service;
  box.hidden = false;
  try {
    const answer = await getJson("/v1/routes?service=" + encodeURIComponent(service));
    const parts = [];
    for (const vh of answer.virtual_hosts) {
      parts.push(el("h4", {}, vh.virtual_host + " (" + vh.route_config + ")"));
      for (const r of vh.routes) {
        const m = r.match;
        const conditions = ["path " + m.path]
          .concat(m.headers.map((h) => "header " + h), m.query_params.map((q) => "query " + q));
        if (m.ignore_case) conditions.push("ignoring case");
        const dests = r.destinations.map((d) => "→ " + d.cluster + " " + +d.percent.toFixed(1) + "%");
        parts.push(el("pre", { class: "route" },
          [(r.name || "(unnamed)") + ": " + conditions.join(" and ")].concat(dests).join("\n  ")));
      }
    }
    if (!parts.length) parts.push(el("p", {}, "no routes served for this service"));
    body.replaceChildren(...parts);
  } catch (e) {
    body.replaceChildren(el("p", { class: "error" }, String(e)));
  }
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const [status, graph] = await Promise.all([getJson("/status"), getJson("/v1/graph")]);
    renderSync(status);
    renderGraph(graph);
    error.textContent = "";
    document.body.dataset.refreshed = String(Date.now());
  } catch (e) {
    error.textContent = String(e);
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
