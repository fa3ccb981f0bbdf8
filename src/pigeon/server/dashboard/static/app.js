// pigeon's dashboard: reads the admin API (/api/), draws with plain DOM calls (text is never
// parsed as HTML), refreshes the page every few seconds.
"use strict";

const REFRESH_MS = 2000;
const lagHistory = new Map(); // "stream/group" -> [[time, lag], ...], sampled by this page
const rateMemory = new Map(); // stream -> [time, messages] of the previous refresh
let timer = null;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (value !== false && value != null) el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child == null) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

async function api(path, options) {
  const reply = await fetch("/api" + path, {
    headers: { "content-type": "application/json" },
    ...options,
  });
  const body = await reply.json();
  if (!reply.ok) throw new Error(body.error ? body.error.message : reply.statusText);
  return body;
}

const post = (path, body) => api(path, { method: "POST", body: JSON.stringify(body || {}) });
const enc = encodeURIComponent;
const badge = (status) => h("span", { class: "badge " + status, "data-status": status }, status);
const table = (headers, rows) =>
  h("table", {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))), h("tbody", {}, rows));
const num = (value) => h("td", { class: "num" }, value == null ? "—" : value);

function payloadText(message) {
  return message.encoding === "json" ? JSON.stringify(message.payload, null, 2) : String(message.payload);
}

// -- pages --------------------------------------------------------------------------------------

async function overview() {
  const { streams } = await api("/streams");
  const health = await api("/health");
  const now = Date.now() / 1000;
  const unhealthy = health.groups.filter((g) => g.status !== "OK");
  let totalLag = 0;
  const groupRows = [];
  for (const stream of streams) {
    for (const name of stream.groups) {
      const group = await api(`/streams/${enc(stream.name)}/groups/${enc(name)}`);
      totalLag += group.lag;
      remember(stream.name, name, group.lag);
      groupRows.push(
        h("tr", {},
          h("td", {}, h("a", { href: `#/group/${enc(stream.name)}/${enc(name)}` }, name)),
          h("td", {}, stream.name),
          h("td", {}, group.kind),
          num(group.members.length),
          num(group.lag),
          h("td", {}, badge(group.health.status)),
          h("td", {}, h("a", { href: `#/dlq/${enc(stream.name)}/${enc(name)}` }, "dead letters")),
        ),
      );
    }
  }
  const streamRows = streams.map((s) => {
    const before = rateMemory.get(s.name);
    rateMemory.set(s.name, [now, s.messages]);
    const rate = before && now > before[0] ? Math.max(0, (s.messages - before[1]) / (now - before[0])).toFixed(1) : null;
    return h("tr", { "data-stream": s.name },
      h("td", {}, h("a", { href: `#/stream/${enc(s.name)}` }, s.name)),
      num(s.config.partitions),
      num(s.messages),
      num(rate),
      h("td", {}, s.groups.join(", ")),
    );
  });
  return [
    h("h1", {}, "Overview"),
    h("div", { class: "cards" },
      card("Streams", streams.length, "streams"),
      card("Groups", health.groups.length, "groups"),
      card("Total lag", totalLag, "total-lag"),
      card("Unhealthy groups", unhealthy.length, "unhealthy"),
    ),
    h("h2", {}, "Streams"),
    table(["stream", "partitions", "messages", "msgs/s", "groups"], streamRows),
    h("h2", {}, "Groups"),
    table(["group", "stream", "kind", "members", "lag", "health", ""], groupRows),
  ];
}

function card(title, value, id) {
  return h("div", { class: "card" }, h("div", { class: "muted" }, title), h("div", { class: "value", id }, value));
}

async function streamPage(name) {
  const s = await api(`/streams/${enc(name)}`);
  const recent = [];
  for (const p of s.partitions) {
    const from = Math.max(p.first_offset, p.next_offset - 10);
    const page = await api(`/streams/${enc(name)}/messages?partition=${p.partition}&offset=${from}&limit=10`);
    recent.push(...page.messages);
  }
  recent.sort((a, b) => b.timestamp - a.timestamp);
  const c = s.config;
  return [
    h("h1", {}, "Stream ", name),
    h("p", {}, "Subjects: ", c.subjects.join(", "), " · retention: ",
      `max age ${c.max_age_s ?? "∞"} s, max messages ${c.max_msgs ?? "∞"}, max bytes ${c.max_bytes ?? "∞"}`,
      " · ", h("a", { href: `#/messages/${enc(name)}` }, "browse messages")),
    h("h2", {}, "Partitions"),
    table(["partition", "first offset", "next offset", "messages", "bytes"],
      s.partitions.map((p) => h("tr", {}, num(p.partition), num(p.first_offset), num(p.next_offset), num(p.messages), num(p.bytes)))),
    h("h2", {}, "Groups"),
    h("ul", {}, s.groups.map((g) => h("li", {}, h("a", { href: `#/group/${enc(name)}/${enc(g)}` }, g)))),
    h("h2", {}, "Recent messages"),
    messageTable(recent.slice(0, 20)),
  ];
}

function messageTable(messages) {
  return table(["partition", "offset", "subject", "key", "time", "payload"],
    messages.map((m) => h("tr", { "data-offset": m.offset },
      num(m.partition), num(m.offset), h("td", {}, m.subject), h("td", {}, m.key ?? ""),
      h("td", {}, new Date(m.timestamp * 1000).toISOString()),
      h("td", {}, h("code", {}, payloadText(m).slice(0, 120))))));
}

function remember(stream, group, lag) {
  const key = stream + "/" + group;
  const points = lagHistory.get(key) || [];
  points.push([Date.now() / 1000, lag]);
  while (points.length > 150) points.shift();
  lagHistory.set(key, points);
  return points;
}

function lagChart(points) {
  const width = 640, height = 160, pad = 24;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  if (points.length < 2) {
    const text = document.createElementNS(svg.namespaceURI, "text");
    text.setAttribute("x", pad); text.setAttribute("y", height / 2);
    text.textContent = "collecting lag samples…";
    svg.append(text);
    return svg;
  }
  const t0 = points[0][0], t1 = points[points.length - 1][0];
  const top = Math.max(1, ...points.map((p) => p[1]));
  const x = (t) => pad + ((t - t0) / Math.max(1e-9, t1 - t0)) * (width - 2 * pad);
  const y = (v) => height - pad - (v / top) * (height - 2 * pad);
  const line = document.createElementNS(svg.namespaceURI, "polyline");
  line.setAttribute("points", points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2456d3");
  line.setAttribute("stroke-width", "2");
  const label = document.createElementNS(svg.namespaceURI, "text");
  label.setAttribute("x", pad); label.setAttribute("y", 14);
  label.textContent = `lag (max ${top})`;
  svg.append(line, label);
  return svg;
}

async function groupPage(stream, name) {
  const g = await api(`/streams/${enc(stream)}/groups/${enc(name)}`);
  const points = remember(stream, name, g.lag);
  const healthOf = new Map(g.health.partitions.map((p) => [p.partition, p]));
  const owners = new Map();
  for (const m of g.members) for (const p of m.partitions || []) owners.set(p, m.name);
  return [
    h("h1", {}, "Group ", name, " on ", h("a", { href: `#/stream/${enc(stream)}` }, stream), " ", badge(g.health.status)),
    h("p", {}, `${g.kind} group · lag `, h("strong", { id: "group-lag" }, g.lag), " · ",
      h("a", { href: `#/dlq/${enc(stream)}/${enc(name)}` }, "dead letters")),
    lagChart(points),
    h("h2", {}, "Partitions"),
    table(["partition", "head", "committed", "lag", "in flight", "waiting", "owner", "health"],
      g.partitions.map((p) => {
        const health = healthOf.get(p.partition);
        return h("tr", {}, num(p.partition), num(p.head), num(p.committed), num(p.lag), num(p.in_flight),
          num(p.waiting), h("td", {}, owners.get(p.partition) || p.owner || ""),
          h("td", { title: health ? health.reason : "" }, health ? badge(health.status) : ""));
      })),
    h("h2", {}, "Members"),
    table(["member", "partitions"], g.members.map((m) => h("tr", {}, h("td", {}, m.name), h("td", {}, (m.partitions || []).join(", "))))),
  ];
}

async function deadLetterPage(stream, name) {
  const base = `/streams/${enc(stream)}/groups/${enc(name)}/dead-letters`;
  const { dead_letters: letters, total } = await api(base + "?limit=500");
  const selected = new Set();
  const detail = h("pre", { id: "letter-detail", class: "muted" }, "Select a letter to see it whole.");
  const reprocess = async (ids) => {
    const report = await post(base + "/redrive", { ids });
    flash(`${report.redriven} message(s) sent back to ${stream}`);
    render();
  };
  const rows = letters.map((letter) => h("tr", { "data-id": letter.id },
    h("td", {}, h("input", { type: "checkbox", "aria-label": "select " + letter.id,
      onchange: (e) => (e.target.checked ? selected.add(letter.id) : selected.delete(letter.id)) })),
    h("td", {}, h("a", { href: "javascript:void 0", onclick: () => { detail.textContent = JSON.stringify(letter, null, 2); } }, letter.original_subject)),
    h("td", {}, letter.error_type),
    h("td", {}, letter.error_message),
    num(letter.message.headers["Pigeon-Delivery-Count"]),
    num(letter.redrive_count),
    h("td", {}, h("button", { class: "primary reprocess", onclick: () => reprocess([letter.id]) }, "Reprocess")),
  ));
  return [
    h("h1", {}, "Dead letters of ", name, " on ", stream),
    h("p", { id: "letter-count" }, `${total} pending`),
    h("div", { class: "toolbar" },
      h("button", { id: "reprocess-selected", onclick: () => selected.size && reprocess([...selected]) }, "Reprocess selected"),
      h("button", { class: "danger", id: "purge", onclick: async () => {
        if (!confirm(`Drop all ${total} dead letters of ${name}? This cannot be undone.`)) return;
        const report = await post(base + "/purge", { all: true, confirm: true });
        flash(`${report.purged} dead letter(s) purged`);
        render();
      } }, "Purge all…"),
    ),
    table(["", "subject", "error", "reason", "deliveries", "redrives", ""], rows),
    h("h2", {}, "Detail"),
    detail,
  ];
}

async function messagesPage(stream) {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const partition = params.get("partition") || "0";
  const query = new URLSearchParams({ partition, limit: "50" });
  if (params.get("since")) query.set("since", String(Date.parse(params.get("since")) / 1000));
  else query.set("offset", params.get("offset") || "0");
  const page = await api(`/streams/${enc(stream)}/messages?${query}`);
  const form = h("form", { class: "toolbar", onsubmit: (e) => {
    e.preventDefault();
    const data = new FormData(e.target);
    const next = new URLSearchParams();
    for (const [k, v] of data) if (v) next.set(k, v);
    location.hash = `#/messages/${enc(stream)}?${next}`;
  } },
    "partition", h("input", { name: "partition", value: partition, size: 3 }),
    "from offset", h("input", { name: "offset", value: params.get("offset") || "", size: 8 }),
    "or from time", h("input", { name: "since", type: "datetime-local", value: params.get("since") || "" }),
    h("button", { type: "submit" }, "Show"));
  return [
    h("h1", {}, "Messages of ", h("a", { href: `#/stream/${enc(stream)}` }, stream)),
    form,
    messageTable(page.messages),
    page.next_offset != null
      ? h("p", {}, h("a", { href: `#/messages/${enc(stream)}?partition=${partition}&offset=${page.next_offset}` }, "next page"))
      : null,
  ];
}

// -- routing -------------------------------------------------------------------------------------

function flash(text) {
  document.getElementById("status").textContent = text;
}

async function render() {
  clearTimeout(timer);
  const parts = location.hash.replace(/^#\/?/, "").split("?")[0].split("/").map(decodeURIComponent);
  const page = document.getElementById("page");
  try {
    let content;
    if (parts[0] === "stream") content = await streamPage(parts[1]);
    else if (parts[0] === "group") content = await groupPage(parts[1], parts[2]);
    else if (parts[0] === "dlq") content = await deadLetterPage(parts[1], parts[2]);
    else if (parts[0] === "messages") content = await messagesPage(parts[1]);
    else content = await overview();
    page.replaceChildren(...content);
    page.dataset.page = parts[0] || "overview";
  } catch (error) {
    page.replaceChildren(h("p", { class: "badge ERR" }, String(error.message || error)));
  }
  // Dead letters and messages stay still while someone reads or selects them.
  if (!["dlq", "messages"].includes(parts[0])) timer = setTimeout(render, REFRESH_MS);
}

window.addEventListener("hashchange", render);
render();
