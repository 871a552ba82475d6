// The swarmcache status page: the node's own client WebSocket, `nodes` and `stats`
// every second. Node ids are operators' text: they only ever go in through
// textContent and setAttribute, never as markup.
"use strict";
(function () {
  const POLL_MS = 1000;        // one refresh a second
  const TIMEOUT_MS = 3000;     // a reply later than this counts as none ("—")
  const BACKOFF_MIN_MS = 500;  // reconnect after 0.5 s, doubling up to 10 s
  const BACKOFF_MAX_MS = 10000;
  const MAX_STATS = 100;       // the nearest nodes asked for their stats each round
  const SVG = "http://www.w3.org/2000/svg";
  const DASH = "—";

  const token = new URLSearchParams(location.search).get("token");
  const query = token ? "?token=" + encodeURIComponent(token) : "";
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const wsURL = scheme + location.host + "/" + query;
  const $ = (id) => document.getElementById(id);

  let socket = null;
  let nextId = 1;
  const pending = new Map();   // request id -> function(reply or null)
  let backoff = BACKOFF_MIN_MS;
  let timer = null;
  let view = { self: null, nodes: [] };
  const samples = new Map();   // node id -> {stats, rate, prev: {total, at}}

  function setState(state, text) {
    const el = $("state");
    el.className = state;
    el.textContent = text;
    document.body.dataset.state = state;
  }

  function request(op, args) {
    return new Promise((resolve) => {
      const ws = socket;
      if (!ws || ws.readyState !== WebSocket.OPEN) { resolve(null); return; }
      const id = nextId++;
      const timeout = setTimeout(() => { pending.delete(id); resolve(null); }, TIMEOUT_MS);
      pending.set(id, (reply) => { clearTimeout(timeout); resolve(reply); });
      ws.send(JSON.stringify(Object.assign({ id: id, op: op }, args || {})));
    });
  }

  function connect() {
    setState("connecting", "connecting…");
    let opened = false;
    const ws = socket = new WebSocket(wsURL);
    ws.onopen = () => {
      opened = true;
      backoff = BACKOFF_MIN_MS;
      $("error").textContent = "";
      setState("connected", "connected");
      poll(ws);
    };
    ws.onmessage = (event) => {
      let reply;
      try { reply = JSON.parse(event.data); } catch (e) { return; }
      if (!reply || typeof reply !== "object") return;
      const done = pending.get(reply.id);
      if (done) { pending.delete(reply.id); done(reply); }
    };
    ws.onclose = () => {
      if (socket !== ws) return;
      socket = null;
      for (const done of pending.values()) done(null);
      pending.clear();
      clearTimeout(timer);
      if (!opened) explain();
      const wait = backoff;
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
      setState("disconnected", "disconnected, retrying in " + (wait / 1000).toFixed(1) + " s");
      timer = setTimeout(connect, wait);
    };
  }

  // A browser tells a script nothing about a refused upgrade: ask the node why.
  async function explain() {
    let text;
    try {
      const response = await fetch("/status/admission" + query, { cache: "no-store" });
      const answer = await response.json();
      if (answer.admitted) {
        text = "the node refused the connection (a page opened under a host name needs " +
          "--allowed-origin for it, or ?token=)";
      } else if (answer.code === 401) {
        text = "not admitted: " + answer.reason +
          " (HTTP 401): open this page with ?token=YOUR_TOKEN";
      } else {
        text = "not admitted: " + answer.reason + " (HTTP " + answer.code + ")";
      }
    } catch (e) {
      text = "cannot reach the node";
    }
    if (!socket || socket.readyState !== WebSocket.OPEN) $("error").textContent = text;
  }

  function cleanNodes(list) {
    const nodes = [];
    for (const n of list) {
      if (!n || typeof n.id !== "string") continue;
      nodes.push({
        id: n.id,
        hops: Number.isInteger(n.hops) && n.hops >= 0 ? n.hops : null,
        neighbors: Array.isArray(n.neighbors) ?
          n.neighbors.filter((x) => typeof x === "string") : [],
      });
    }
    nodes.sort((a, b) => (a.hops === null) - (b.hops === null) || a.hops - b.hops ||
      (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    return nodes;
  }

  async function poll(ws) {
    const started = Date.now();
    const reply = await request("nodes");
    if (socket !== ws) return;
    if (reply && reply.ok && Array.isArray(reply.nodes)) {
      const own = typeof reply.self === "string" ? reply.self : null;
      view = { self: own, nodes: cleanNodes(reply.nodes) };
    }
    const ids = view.nodes.map((n) => n.id);
    for (const id of samples.keys()) if (!ids.includes(id)) samples.delete(id);
    await Promise.all(ids.slice(0, MAX_STATS).map(sample));
    if (socket !== ws) return;
    render();
    timer = setTimeout(() => poll(ws), Math.max(0, POLL_MS - (Date.now() - started)));
  }

  function requestTotal(stats) {
    if (Number.isFinite(stats.requests)) return stats.requests;
    let total = null;
    for (const field of ["hits", "misses", "sets"]) {
      if (Number.isFinite(stats[field])) total = (total || 0) + stats[field];
    }
    return total;
  }

  // One node's stats: its own without `node`, another's with it. A refusal
  // (bad_request), no answer, or an answer from another node (a node that ignores
  // the argument answers for itself) leaves the row at "—".
  async function sample(id) {
    const reply = await request("stats", id === view.self ? {} : { node: id });
    const stats = reply && reply.ok && reply.stats && typeof reply.stats === "object" &&
      reply.stats.node === id ? reply.stats : null;
    const entry = samples.get(id) || { stats: null, rate: null, prev: null };
    samples.set(id, entry);
    entry.stats = stats;
    const total = stats ? requestTotal(stats) : null;
    const now = performance.now();
    if (total === null) {
      entry.rate = null;
      entry.prev = null;
      return;
    }
    if (entry.prev && now > entry.prev.at) {
      entry.rate = Math.max(0, total - entry.prev.total) * 1000 / (now - entry.prev.at);
    }
    entry.prev = { total: total, at: now };
  }

  function bytes(n) {
    if (!Number.isFinite(n)) return DASH;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function svg(name, attributes) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attributes)) el.setAttribute(k, String(v));
    return el;
  }

  function short(id) {
    return id.length > 20 ? id.slice(0, 19) + "…" : id;
  }

  function drawGraph() {
    const COL = 160, ROW = 70, PAD = 50;
    const columns = new Map();  // hops -> ids
    for (const n of view.nodes) {
      const key = n.hops === null ? Infinity : n.hops;
      if (!columns.has(key)) columns.set(key, []);
      columns.get(key).push(n.id);
    }
    const order = [...columns.keys()].sort((a, b) => a - b);
    const tallest = Math.max(1, ...[...columns.values()].map((c) => c.length));
    const width = PAD * 2 + COL * Math.max(0, order.length - 1);
    const height = PAD * 2 + ROW * (tallest - 1);
    const at = new Map();
    order.forEach((key, col) => {
      const ids = columns.get(key);
      const top = (height - ROW * (ids.length - 1)) / 2;
      ids.forEach((id, row) => at.set(id, { x: PAD + COL * col, y: top + ROW * row }));
    });
    const graph = $("graph");
    graph.setAttribute("viewBox", "0 0 " + width + " " + height);
    graph.style.maxHeight = Math.max(height, 120) + "px";
    const links = document.createDocumentFragment();
    const seen = new Set();
    for (const n of view.nodes) {
      for (const other of n.neighbors) {
        if (!at.has(other) || other === n.id) continue;
        const pair = JSON.stringify(n.id < other ? [n.id, other] : [other, n.id]);
        if (seen.has(pair)) continue;
        seen.add(pair);
        const [a, b] = JSON.parse(pair);
        const line = svg("line", { class: "link", x1: at.get(a).x, y1: at.get(a).y,
          x2: at.get(b).x, y2: at.get(b).y });
        line.dataset.a = a;
        line.dataset.b = b;
        links.appendChild(line);
      }
    }
    const nodes = document.createDocumentFragment();
    for (const n of view.nodes) {
      const p = at.get(n.id);
      const g = svg("g", { class: n.id === view.self ? "node self" : "node" });
      g.dataset.node = n.id;
      const title = svg("title", {});
      title.textContent = n.id + (n.hops === null ? "" : " (" + n.hops + " hops)");
      const hops = svg("text", { class: "hops", x: p.x, y: p.y });
      hops.textContent = n.hops === null ? "?" : String(n.hops);
      const label = svg("text", { class: "label", x: p.x, y: p.y + 30 });
      label.textContent = short(n.id);
      g.append(title, svg("circle", { cx: p.x, cy: p.y, r: 15 }), hops, label);
      nodes.appendChild(g);
    }
    graph.replaceChildren(links, nodes);
  }

  function cell(row, name, text) {
    const td = document.createElement("td");
    td.className = name;
    td.textContent = text;
    row.appendChild(td);
  }

  function drawTable() {
    const rows = document.createDocumentFragment();
    for (const n of view.nodes) {
      const entry = samples.get(n.id);
      const s = entry && entry.stats;
      const tr = document.createElement("tr");
      tr.dataset.node = n.id;
      if (n.id === view.self) tr.className = "self";
      cell(tr, "node", n.id + (n.id === view.self ? " (this node)" : ""));
      cell(tr, "hops", n.hops === null ? DASH : String(n.hops));
      cell(tr, "keys", s && Number.isFinite(s.keys) ? String(s.keys) : DASH);
      cell(tr, "memory", s ? bytes(s.memory_bytes) +
        (Number.isFinite(s.max_memory_bytes) ? " / " + bytes(s.max_memory_bytes) : "") : DASH);
      cell(tr, "rate", entry && s && entry.rate !== null ? entry.rate.toFixed(1) : DASH);
      rows.appendChild(tr);
    }
    $("nodes").tBodies[0].replaceChildren(rows);
  }

  function render() {
    $("self").textContent = view.self || "";
    document.title = "swarmcache " + (view.self || "") + " status";
    drawGraph();
    drawTable();
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  connect();
})();
