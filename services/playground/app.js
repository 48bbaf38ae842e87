// lmforge playground: tokens, probabilities, sampling and the inside of the model.
// Every number shown comes from the server (/v1/introspect, /v1/sampling/distribution, /generate_stream):
// the page draws, it does not compute the model or the sampler.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("lmforge-key") || "", ids: [], info: null, gen: [] };

async function api(path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers.Authorization = "Bearer " + state.key;
  const r = await fetch(path, body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) });
  if (r.status === 401) { $("key-form").hidden = false; throw new Error("this server needs an API key"); }
  const data = await r.json();
  if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
  return data;
}

function input() {
  const text = $("prompt").value;
  if ($("mode").value === "chat") return { messages: [{ role: "user", content: text }] };
  return { text };
}

function chip(t, extra) {
  const el = document.createElement("span");
  el.className = "chip" + (t.special ? " special" : "") + (extra || "");
  el.tabIndex = 0;
  const tokenText = t.token.replace(/\n/g, "\u21b5").replace(/ /g, "\u00b7");
  el.innerHTML = `<span class="tok"></span><span class="id">${t.id}</span>`;
  el.querySelector(".tok").textContent = tokenText || "\u2205";
  el.dataset.id = t.id;
  if (t.start !== undefined) el.title = `id ${t.id}, bytes ${t.start}-${t.end}${t.special ? ", special token" : ""}`;
  return el;
}

function show(where, message) { where.textContent = message; }

// ---- tokens -------------------------------------------------------------------------------
let tokenTimer = null;
async function refreshTokens() {
  try {
    const out = await api("/v1/introspect", { ...input(), top_k: 5, attention_layers: [Number($("layer").value || 0)] });
    state.ids = out.tokens.map((t) => t.id);
    state.promptCount = state.ids.length;  // the lab's reply (under a grammar) starts after these
    state.introspection = out;
    const chips = $("chips");
    chips.replaceChildren(...out.tokens.map((t) => chip(t)));
    chips.querySelectorAll(".chip").forEach((el) => el.addEventListener("click", () => nearest(Number(el.dataset.id))));
    $("count").classList.remove("over");
    show($("count"), `${out.count} / ${out.context_length} tokens`);
    const pos = $("lab-pos");
    pos.max = String(out.count - 1);
    pos.value = String(out.count - 1);
    drawInside();
    refreshLab();
  } catch (e) {
    $("count").classList.add("over");
    show($("count"), e.message);
  }
}

async function nearest(id) {
  const out = await api(`/v1/tokens/${id}/nearest?k=8`);
  const box = $("nearest");
  box.replaceChildren(document.createTextNode(`Nearest to "${out.token.token}" (${id}): `),
    ...out.nearest.map((t) => { const c = chip(t); c.title = `cosine ${t.cosine.toFixed(3)}`; return c; }));
}

// ---- generation -----------------------------------------------------------------------------
function probColor(p) {
  // low probability: warm; high: cool. Light enough for black text.
  const hue = Math.round(120 * Math.min(1, Math.max(0, p)));
  return `hsl(${hue}, 75%, 80%)`;
}

function entropyOf(top) {
  return -top.reduce((h, a) => (a.p > 0 ? h + a.p * Math.log(a.p) : h), 0);
}

async function generate() {
  const out = $("gen-out");
  out.replaceChildren();
  state.gen = [];
  const seed = $("g-seed").value;
  const body = {
    ...(input().messages ? { messages: input().messages } : { prompt: input().text }),
    temperature: Number($("g-temp").value), top_p: Number($("g-topp").value),
    max_new_tokens: Number($("g-max").value), logprobs: true, top_logprobs: 5,
  };
  if (seed !== "") body.seed = Number(seed);
  try {
    for await (const ev of sseEvents("/generate_stream", body)) {
      if (ev.token_id === null || ev.token_id === undefined || !ev.logprobs) continue;
      const lp = ev.logprobs;
      const step = {
        id: lp.token_id, token: lp.token, p: Math.exp(lp.logprob),
        top: lp.top_logprobs.map((a) => ({ id: a.token_id, token: a.token, p: Math.exp(a.logprob) })),
      };
      state.gen.push(step);
      const el = chip({ id: step.id, token: step.token }, " gen");
      el.style.background = probColor(step.p);
      el.dataset.step = String(state.gen.length - 1);
      el.addEventListener("mouseenter", () => tip(el));
      el.addEventListener("focus", () => tip(el));
      el.addEventListener("mouseleave", hideTip);
      el.addEventListener("blur", hideTip);
      out.appendChild(el);
    }
    await addEntropy();
  } catch (e) {
    show(out, e.message);
  }
}

// Server-sent events of a POST: each `data:` event parsed, until `[DONE]`; an error (the response's
// or an event's) is thrown with the server's message.
async function* sseEvents(path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers.Authorization = "Bearer " + state.key;
  const r = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  if (!r.ok) throw new Error((await r.json()).error.message);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      if (line === "data: [DONE]") return;
      const ev = JSON.parse(line.slice(6));
      if (ev.error) throw new Error(ev.error.message);
      yield ev;
    }
  }
}

async function addEntropy() {
  // The entropy of the model's whole next-token distribution at each generated step (nats), from
  // one introspection of prompt + reply.
  if (!state.gen.length) return;
  const ids = [...state.ids, ...state.gen.map((s) => s.id)].slice(0, state.info ? state.info.context_length : undefined);
  const out = await api("/v1/introspect", { ids, top_k: 1, logit_lens: false });
  state.gen.forEach((step, i) => {
    const row = out.next[state.ids.length - 1 + i];
    if (row) step.entropy = row.entropy;
  });
  document.querySelectorAll("#gen-out .chip").forEach((el) => {
    const step = state.gen[Number(el.dataset.step)];
    if (step.entropy !== undefined) el.title = `p=${(100 * step.p).toFixed(2)}%, entropy ${step.entropy.toFixed(3)} nats`;
  });
}

function tip(el) {
  const step = state.gen[Number(el.dataset.step)];
  const box = $("tip");
  const rows = step.top.map((a) => `<tr><td></td><td>${a.id}</td><td>${(100 * a.p).toFixed(2)}%</td></tr>`).join("");
  box.innerHTML = `<div>chosen: <b class="t"></b> p=${(100 * step.p).toFixed(2)}%</div>` +
    (step.entropy !== undefined
      ? `<div>entropy of the model's distribution: ${step.entropy.toFixed(3)} nats</div>`
      : `<div>entropy of the top ${step.top.length} (nats): ${entropyOf(step.top).toFixed(3)}</div>`) +
    `<table>${rows}</table>`;
  box.querySelector(".t").textContent = JSON.stringify(step.token);
  box.querySelectorAll("tr").forEach((tr, i) => { tr.firstChild.textContent = JSON.stringify(step.top[i].token); });
  const rect = el.getBoundingClientRect();
  box.style.left = `${Math.min(rect.left, window.innerWidth - 260)}px`;
  box.style.top = `${rect.bottom + 6}px`;
  box.hidden = false;
}
function hideTip() { $("tip").hidden = true; }

// ---- sampling lab -----------------------------------------------------------------------------
function labParams() {
  const topk = Number($("lab-topk").value);
  const params = {
    ids: state.ids, position: Number($("lab-pos").value), top: 24,
    temperature: Number($("lab-temp").value), top_k: topk || null, top_p: Number($("lab-topp").value),
    min_p: Number($("lab-minp").value), repetition_penalty: Number($("lab-rep").value),
  };
  if ($("s-lab").checked) {
    params.structured_outputs = structuredSpec();
    params.reply_start = Math.min(state.promptCount || state.ids.length, params.position + 1);
  }
  return params;
}

// ---- structured output ------------------------------------------------------------------------
function structuredSpec() {
  const kind = $("s-kind").value, text = $("s-spec").value;
  if (kind === "json") return { json: JSON.parse(text) };
  if (kind === "regex") return { regex: text.trim() };
  return { choice: text.split("\n").map((s) => s.trim()).filter(Boolean) };
}

async function generateStructured() {
  const out = $("s-out"), check = $("s-check");
  out.textContent = "";
  let spec;
  try { spec = structuredSpec(); } catch (e) { show(check, `The schema is not JSON: ${e.message}`); return; }
  show(check, "Generating…");
  const chat = $("mode").value === "chat";
  const body = {
    ...(chat ? { messages: input().messages } : { prompt: input().text }),
    temperature: Number($("g-temp").value), max_tokens: Number($("g-max").value) * 4, stream: true,
    structured_outputs: spec,
  };
  if ($("g-seed").value !== "") body.seed = Number($("g-seed").value);
  let finish = null;
  try {
    for await (const ev of sseEvents(chat ? "/v1/chat/completions" : "/v1/completions", body)) {
      const choice = ev.choices && ev.choices[0];
      if (!choice) continue;
      out.textContent += chat ? (choice.delta.content || "") : (choice.text || "");
      finish = choice.finish_reason || finish;
    }
  } catch (e) {
    show(check, e.message);
    return;
  }
  let verdict = `finished: ${finish}`;
  if ($("s-kind").value === "json") {
    try { JSON.parse(out.textContent); verdict += "; the reply parses as JSON"; } catch (e) { verdict += `; not JSON (${e.message})`; }
  }
  show(check, verdict);
}

let labSeq = 0;
async function refreshLab() {
  if (!state.ids.length) return;
  for (const [id, fmt] of [["lab-temp", (v) => Number(v).toFixed(2)], ["lab-topk", (v) => (Number(v) ? v : "off")],
    ["lab-topp", (v) => Number(v).toFixed(2)], ["lab-minp", (v) => Number(v).toFixed(2)], ["lab-rep", (v) => Number(v).toFixed(2)]]) {
    $(id + "-out").textContent = fmt($(id).value);
  }
  $("lab-pos-out").textContent = `after token ${$("lab-pos").value}`;
  const seq = ++labSeq;
  let out;
  try {
    out = await api("/v1/sampling/distribution", labParams());
  } catch (e) {
    if (seq === labSeq) show($("lab-msg"), e.message);
    return;
  }
  if (seq !== labSeq) return; // a newer request is on its way
  show($("lab-msg"), out.stages.includes("grammar") ? `the grammar allows ${out.kept} of ${out.vocab_size} tokens after the filters` : "");
  state.lab = out;
  drawChart(out);
}

function drawChart(out) {
  const svg = $("lab-chart");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const width = svg.clientWidth || 600, rowH = 12, left = 110;
  svg.setAttribute("height", String(out.tokens.length * rowH + 10));
  const top = Math.max(1e-9, ...out.tokens.map((t) => Math.max(t.p_raw, t.p, t.p_penalties_and_temperature)));
  const scale = (p) => (width - left - 90) * (p / top);  // the longest bar spans the chart
  out.tokens.forEach((t, i) => {
    const y = 4 + i * rowH;
    const g = document.createElementNS(ns, "g");
    g.dataset.id = String(t.id);
    g.setAttribute("class", "bar");
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", String(left - 4)); label.setAttribute("y", String(y + 9));
    label.setAttribute("text-anchor", "end"); label.setAttribute("font-size", "10");
    label.textContent = JSON.stringify(t.token).slice(0, 14);
    if (t.removed_by) label.setAttribute("text-decoration", "line-through");
    const raw = document.createElementNS(ns, "rect");
    raw.setAttribute("x", String(left)); raw.setAttribute("y", String(y));
    raw.setAttribute("width", String(scale(t.p_raw))); raw.setAttribute("height", "5"); raw.setAttribute("fill", "#9e9e9e");
    raw.setAttribute("class", "p-raw"); raw.dataset.p = String(t.p_raw);
    const temp = document.createElementNS(ns, "rect");
    temp.setAttribute("x", String(left)); temp.setAttribute("y", String(y + 5));
    temp.setAttribute("width", String(scale(t.p_penalties_and_temperature))); temp.setAttribute("height", "2"); temp.setAttribute("fill", "#f29900");
    temp.setAttribute("class", "p-temperature"); temp.dataset.p = String(t.p_penalties_and_temperature);
    const after = document.createElementNS(ns, "rect");
    after.setAttribute("x", String(left)); after.setAttribute("y", String(y + 7));
    after.setAttribute("width", String(scale(t.p))); after.setAttribute("height", "4"); after.setAttribute("fill", "#0b57d0");
    after.setAttribute("class", "p-after"); after.dataset.p = String(t.p);
    const note = document.createElementNS(ns, "text");
    note.setAttribute("x", String(left + scale(Math.max(t.p_raw, t.p)) + 4)); note.setAttribute("y", String(y + 9));
    note.setAttribute("font-size", "9");
    note.textContent = t.removed_by ? `removed by ${t.removed_by}` : `${(100 * t.p).toFixed(1)}%`;
    const title = document.createElementNS(ns, "title");
    title.textContent = `${JSON.stringify(t.token)} (${t.id}): model ${(100 * t.p_raw).toFixed(2)}%, after temperature ${(100 * t.p_penalties_and_temperature).toFixed(2)}%, sampled from ${(100 * t.p).toFixed(2)}%`;
    g.append(title, label, raw, temp, after, note);
    g.setAttribute("tabindex", "0");
    g.setAttribute("role", "button");
    g.setAttribute("aria-label", `append ${JSON.stringify(t.token)}, ${(100 * t.p).toFixed(1)}% after the filters`);
    g.addEventListener("click", () => append(t.id));
    g.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); append(t.id); } });
    svg.appendChild(g);
  });
}

function append(id) {
  // The prompt continues as ids: switch to raw text of the decoded ids is lossy, so keep ids.
  state.ids = [...state.ids.slice(0, Number($("lab-pos").value) + 1), id];
  api("/v1/introspect", { ids: state.ids, top_k: 5, attention_layers: [Number($("layer").value || 0)] }).then((out) => {
    state.introspection = out;
    $("chips").replaceChildren(...out.tokens.map((t) => chip(t)));
    show($("count"), `${out.count} / ${out.context_length} tokens`);
    $("lab-pos").max = String(out.count - 1);
    $("lab-pos").value = String(out.count - 1);
    drawInside();
    refreshLab();
  }).catch((e) => show($("count"), e.message));
}

async function labStep() {
  const out = await api("/v1/sampling/distribution", { ...labParams(), sample: true, seed: Number($("lab-seed").value || 0) });
  append(out.sampled.id);
}

// ---- inside the model ------------------------------------------------------------------------
async function drawInside() {
  const out = state.introspection;
  if (!out) return;
  const layer = Number($("layer").value || 0), head = Number($("head").value || 0);
  let maps = out.attention[String(layer)];
  if (!maps) {
    const fresh = await api("/v1/introspect", { ids: state.ids, top_k: 1, attention_layers: [layer], logit_lens: false });
    maps = fresh.attention[String(layer)];
    out.attention[String(layer)] = maps;
  }
  const m = maps[head];
  const canvas = $("heatmap");
  const ctx = canvas.getContext("2d");
  const n = m.length, cell = Math.max(1, Math.floor(canvas.width / n));
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let q = 0; q < n; q++) {
    for (let k = 0; k < n; k++) {
      const w = m[q][k];
      ctx.fillStyle = `rgba(11, 87, 208, ${Math.min(1, w)})`;
      ctx.fillRect(k * cell, q * cell, cell, cell);
    }
  }
  canvas.dataset.layer = String(layer); canvas.dataset.head = String(head); canvas.dataset.size = String(n);
  drawLens(out);
}

function drawLens(out) {
  const table = document.createElement("table");
  const head = document.createElement("tr");
  head.innerHTML = "<th>layer</th>" + out.tokens.map(() => "<th></th>").join("");
  head.querySelectorAll("th").forEach((th, i) => { if (i) th.textContent = out.tokens[i - 1].token; });
  table.appendChild(head);
  out.logit_lens.forEach((row, layer) => {
    const tr = document.createElement("tr");
    tr.dataset.layer = String(layer);
    const th = document.createElement("th");
    th.textContent = layer === 0 ? "embed" : String(layer);
    tr.appendChild(th);
    row.forEach((t) => {
      const td = document.createElement("td");
      td.textContent = t.token;
      td.dataset.id = String(t.id);
      td.title = `${(100 * t.p).toFixed(1)}%`;
      td.style.background = probColor(t.p);
      tr.appendChild(td);
    });
    table.appendChild(tr);
  });
  $("lens").replaceChildren(table);
}

function showCard(card) {
  const body = $("card-body");
  const table = document.createElement("table");
  const metrics = card.metrics || {};
  const num = (v) => (typeof v === "number" ? v.toPrecision(4) : String(v).slice(0, 80));
  // A figure and its 95% interval (`x_ci_low`, `x_ci_high`) make one row: "x: value [low, high]".
  const figures = Object.entries(metrics)
    .filter(([k]) => !/_ci_(low|high)$/.test(k))
    .map(([k, v]) => {
      const low = metrics[`${k}_ci_low`], high = metrics[`${k}_ci_high`];
      return [k, low === undefined || high === undefined ? num(v) : `${num(v)} [${num(low)}, ${num(high)}]`];
    });
  const rows = [...figures.sort(), ...Object.entries(card.tags || {}).sort().map(([k, v]) => [k, num(v)])];
  for (const [k, v] of rows) {
    const tr = document.createElement("tr");
    const a = document.createElement("td"); a.textContent = k;
    const b = document.createElement("td"); b.textContent = v;
    tr.append(a, b); table.appendChild(tr);
  }
  const parts = [table];
  if (card.mlflow_url) {
    const link = document.createElement("a");
    link.href = card.mlflow_url; link.textContent = "its MLflow run (needs `mlflow ui`)";
    parts.unshift(link);
  }
  body.replaceChildren(...parts);
}

// ---- compare --------------------------------------------------------------------------------------
async function compare() {
  show($("compare-msg"), "");
  try {
    const out = await api("/v1/compare", { ...input(), other: $("other").value, max_new_tokens: 32 });
    for (const [side, where, head] of [[out.served, "served-out", "served-h"], [out.other, "other-out", "other-h"]]) {
      $(head).textContent = `version ${side.version}`;
      $(where).replaceChildren(...side.tokens.map((t) => {
        const el = chip(t, " gen"); el.style.background = probColor(t.p); el.title = `p=${(100 * t.p).toFixed(2)}%`; return el;
      }));
    }
  } catch (e) {
    show($("compare-msg"), e.message);
  }
}

// ---- start ----------------------------------------------------------------------------------------
// What is served: the version, its shape and its card. A replica that follows its alias
// (LMFORGE_FOLLOW_ALIAS_S) may swap versions while the page is open, so this is asked again every few seconds.
async function showServed(info, before) {
  state.info = info;
  const moved = before && before !== info.version ? ` Now serving version ${info.version} (was ${before}).` : "";
  show($("model-line"), `Serving ${info.model} version ${info.version} (alias ${info.alias}), run ${info.run_id}, ` +
    `${info.n_layer} layers, context ${info.context_length}, on ${info.device} in ${info.dtype}.${moved}`);
  $("layer").replaceChildren(...Array.from({ length: info.n_layer }, (_, i) => new Option(String(i), String(i))));
  const heads = info.n_head || 1;
  $("head").replaceChildren(...Array.from({ length: heads }, (_, i) => new Option(String(i), String(i))));
  showCard(await api("/v1/model_card"));
}

async function watchVersion() {
  try {
    const info = await api("/info");
    if (state.info && info.version !== state.info.version) await showServed(info, state.info.version);
  } catch (e) { /* a restart or a lost connection: the next poll tries again */ }
}

async function start() {
  try {
    await showServed(await api("/info"), null);
    await refreshTokens();
  } catch (e) {
    show($("model-line"), e.message);
  }
  setInterval(watchVersion, 3000);
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("api-key").value;
  sessionStorage.setItem("lmforge-key", state.key);  // this tab only; never in a URL
  $("key-form").hidden = true;
  start();
});
$("prompt").addEventListener("input", () => { clearTimeout(tokenTimer); tokenTimer = setTimeout(refreshTokens, 250); });
$("mode").addEventListener("change", refreshTokens);
$("generate").addEventListener("click", generate);
$("compare").addEventListener("click", compare);
for (const id of ["lab-temp", "lab-topk", "lab-topp", "lab-minp", "lab-rep", "lab-pos"]) $(id).addEventListener("input", refreshLab);
$("lab-step").addEventListener("click", labStep);
$("s-generate").addEventListener("click", generateStructured);
for (const id of ["s-lab", "s-kind", "s-spec"]) $(id).addEventListener("change", refreshLab);
$("layer").addEventListener("change", drawInside);
$("head").addEventListener("change", drawInside);
start();
