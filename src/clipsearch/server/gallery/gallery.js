// The clipsearch gallery: plain JavaScript over the JSON API, no build step.
//
// One view says what the page shows (browse, a text, an image or "similar to" an item, in a
// namespace, with a filter); it lives in the URL, so Back, Forward, reloads and shared links
// show the same results. Every change of view clears the page and runs again; a response to an
// earlier view is dropped.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 40;
const MAX_RESULTS = 5000; // how deep the API pages (offset + limit)
const MODES = ["vector", "keyword", "hybrid"];
const ORDERS = { newest: "newest first", oldest: "oldest first", taken: "by date taken" };

const app = {
  key: localStorage.getItem("clipsearch-api-key") || "",
  namespaces: [],
  defaultNs: "",
  view: null,
  results: [], // what the grid shows, in order
  total: null, // browse: how many items pass in all
  nextOffset: null,
  loading: false,
  run: 0, // the view the page shows; responses of earlier runs are dropped
  blobUrls: [],
  keys: new Map(), // namespace -> {key: {items, kinds}}
  values: new Map(), // "namespace\0key" -> [values]
  images: new Map(), // token -> the File picked in this tab
  contextUrl: null,
  viewerIndex: -1,
};

class ApiError extends Error {
  constructor(message, status, body = {}) {
    super(message);
    this.status = status;
    this.param = body.param || null;
    this.code = body.code || null;
  }
}

// -- the API -------------------------------------------------------------------------------
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (app.key) headers.set("Authorization", "Bearer " + app.key);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let body = {};
    let message = response.status + " " + response.statusText;
    try {
      body = (await response.json()).error || {};
      message = body.message || message;
    } catch (e) { /* not JSON */ }
    if (response.status === 401) {
      message = app.key ? "the API key was rejected: enter the right one above" : "this server needs an API key: enter it above";
    }
    throw new ApiError(message, response.status, body);
  }
  return response;
}

async function apiJson(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  return (await api(path, options)).json();
}

const enc = encodeURIComponent;

// Thumbnails need the API key too, so they are fetched and shown as blob URLs.
async function loadImage(img, url) {
  try {
    const blob = await (await api(url)).blob();
    const objectUrl = URL.createObjectURL(blob);
    if (!img.isConnected) { URL.revokeObjectURL(objectUrl); return; } // the page moved on
    app.blobUrls.push(objectUrl);
    img.src = objectUrl;
  } catch (e) {
    // the item's file vanished (or cannot be read): a placeholder that says so, not a broken image
    img.src = MISSING_IMAGE;
    img.alt = "image file missing";
    img.title = e.message;
    img.classList.add("missing");
  }
}

const MISSING_IMAGE = "data:image/svg+xml," + encodeURIComponent(
  '<svg xmlns="http://www.w3.org/2000/svg" width="200" height="200" viewBox="0 0 200 200">' +
  '<rect width="200" height="200" fill="#eee"/>' +
  '<path d="M70 80h60v45H70z" fill="none" stroke="#999" stroke-width="4"/>' +
  '<path d="M70 80l60 45M130 80l-60 45" stroke="#c66" stroke-width="4"/>' +
  '<text x="100" y="155" font-family="sans-serif" font-size="16" text-anchor="middle" fill="#777">file missing</text>' +
  "</svg>"
);

// -- items ---------------------------------------------------------------------------------
function itemName(item) {
  const m = item.metadata || {};
  return String(m.title || m.label || m.filename || item.id);
}

function itemFolder(item) {
  const path = (item.metadata || {}).path;
  if (typeof path !== "string") return "";
  const cut = Math.max(path.lastIndexOf("/"), path.lastIndexOf("\\"));
  return cut > 0 ? path.slice(0, cut) : "";
}

function lastName(folder) {
  return folder.split(/[\\/]/).filter(Boolean).pop() || folder;
}

// Scores are cosines in a vector search; keyword (BM25) and hybrid (fused ranks) scores only order.
function showsScores(view) {
  return view.kind === "image" || view.kind === "similar" || (view.kind === "text" && view.mode === "vector");
}

// -- the view and the URL --------------------------------------------------------------------
function readView() {
  const p = new URLSearchParams(location.search);
  const view = { ns: p.get("ns") || app.defaultNs, filter: p.get("filter") || "" };
  if (p.has("q")) {
    const mode = p.get("mode");
    return { ...view, kind: "text", q: p.get("q"), mode: MODES.includes(mode) ? mode : "vector" };
  }
  if (p.has("similar")) return { ...view, kind: "similar", similar: p.get("similar"), name: p.get("name") || p.get("similar") };
  if (p.has("image")) return { ...view, kind: "image", image: p.get("image"), name: p.get("name") || "image" };
  const order = p.get("order");
  return { ...view, kind: "browse", order: order in ORDERS ? order : "newest", folder: p.get("folder") || "" };
}

function viewUrl(view) {
  const p = new URLSearchParams();
  if (view.kind === "text") {
    p.set("q", view.q);
    if (view.mode !== "vector") p.set("mode", view.mode);
  } else if (view.kind === "similar") {
    p.set("similar", view.similar);
    p.set("name", view.name);
  } else if (view.kind === "image") {
    p.set("image", view.image);
    p.set("name", view.name);
  } else {
    if (view.order !== "newest") p.set("order", view.order);
    if (view.folder) p.set("folder", view.folder);
  }
  if (view.ns && view.ns !== app.defaultNs) p.set("ns", view.ns);
  if (view.filter) p.set("filter", view.filter);
  const query = p.toString();
  return location.pathname + (query ? "?" + query : "");
}

function browseView(from = app.view || {}) {
  return { kind: "browse", ns: from.ns || app.defaultNs, filter: from.filter || "", order: "newest", folder: "" };
}

// Show a new view and add it to the history (or replace the current entry).
function go(view, replace = false) {
  if (!replace) rememberScroll();
  const url = viewUrl(view);
  if (replace) history.replaceState({ pages: 1, scroll: 0 }, "", url);
  else history.pushState({ pages: 1, scroll: 0 }, "", url);
  show(view);
}

let scrollTimer = null;
function rememberScroll() {
  clearTimeout(scrollTimer);
  if (history.state) history.replaceState({ ...history.state, scroll: window.scrollY }, "");
}
window.addEventListener("scroll", () => {
  clearTimeout(scrollTimer);
  scrollTimer = setTimeout(rememberScroll, 200);
}, { passive: true });

window.addEventListener("popstate", () => {
  if (app.namespaces.length || app.view) show(readView());
});

// -- showing a view ------------------------------------------------------------------------
function nsInfo(name) {
  return app.namespaces.find((ns) => ns.name === name);
}

function needsModel(view) {
  return view.kind === "image" || (view.kind === "text" && view.mode !== "keyword");
}

async function show(view) {
  const run = ++app.run;
  closeViewer(false);
  app.view = view;
  app.results = [];
  app.total = null;
  app.nextOffset = null;
  app.loading = false;
  clearGrid();
  hideFilterError();
  syncControls(view);
  updateMore();

  if (!app.namespaces.length) return setStatus("nothing is stored yet: ingest some images first (clipsearch ingest PHOTOS)");
  const ns = nsInfo(view.ns);
  if (!ns) return setStatus(`there is no namespace “${view.ns}” on this server`, true);
  if (ns.items === 0) {
    return setStatus(`namespace “${ns.name}” is empty: add images with clipsearch ingest PHOTOS --namespace ${ns.name}, or upload them through the API`);
  }
  loadKeys(ns.name);
  try {
    parseFilter(view.filter);
  } catch (e) {
    showFilterError(e.message);
    return setStatus("fix the filter to see results", true);
  }
  if (needsModel(view) && !ns.searchable_by_text) {
    return setStatus(
      `namespace “${ns.name}” holds vectors of another model than the server's, so it can't be searched by ` +
        (view.kind === "image" ? "image" : "text") + ": browse it, open an item's “Similar”, or search it in keyword mode",
      true,
      `its model: ${ns.model} (${ns.backend}, ${ns.dimensions} dimensions)`,
    );
  }
  setStatus(view.kind === "browse" ? "loading…" : "searching…");
  const pages = Math.min(Math.max(1, (history.state && history.state.pages) || 1), MAX_RESULTS / PAGE);
  await loadPage(run, 0, PAGE * pages);
  const scroll = history.state && history.state.scroll;
  if (run === app.run && scroll) window.scrollTo(0, scroll);
}

async function fetchPage(view, offset, limit) {
  const filter = parseFilter(view.filter);
  const ns = view.ns;
  if (view.kind === "text") {
    return apiJson("/api/v1/search", { text: view.q, namespace: ns, limit, offset, mode: view.mode, filter });
  }
  if (view.kind === "image") {
    const file = app.images.get(view.image) || storedImage(view.image);
    if (!file) throw new Error(`the image ${view.name} is not kept once the page is reloaded: pick it again`);
    const form = new FormData();
    form.append("file", file, view.name);
    form.append("limit", String(limit));
    form.append("offset", String(offset));
    form.append("namespace", ns);
    if (filter) form.append("filter", JSON.stringify(filter));
    return (await api("/api/v1/images/search", { method: "POST", body: form })).json();
  }
  const params = new URLSearchParams({ namespace: ns, limit: String(limit), offset: String(offset) });
  if (filter) params.set("filter", JSON.stringify(filter));
  if (view.kind === "similar") return apiJson(`/api/v1/items/${enc(view.similar)}/similar?${params}`);
  params.set("order", view.order);
  if (view.folder) params.set("folder", view.folder);
  return apiJson(`/api/v1/items?${params}`);
}

async function loadPage(run, offset, limit) {
  app.loading = true;
  updateMore();
  try {
    const data = await fetchPage(app.view, offset, limit);
    if (run !== app.run) return;
    // a deeper search of an approximate (HNSW) index may reorder the boundary of pages: an item
    // already shown is not shown twice
    const shown = new Set(app.results.map((it) => it.id));
    const items = (data.results || data.items || []).filter((it) => !shown.has(it.id));
    appendCards(items, app.results.length);
    app.results.push(...items);
    app.nextOffset = data.next_offset ?? null;
    if (data.total !== undefined) app.total = data.total;
    setStatus(resultText());
    if (history.state) history.replaceState({ ...history.state, pages: Math.max(1, Math.ceil(app.results.length / PAGE)) }, "");
  } catch (e) {
    if (run !== app.run) return;
    showProblem(e);
  } finally {
    if (run === app.run) {
      app.loading = false;
      updateMore();
    }
  }
}

function loadMore() {
  if (app.loading || app.nextOffset === null || !app.view) return;
  loadPage(app.run, app.nextOffset, Math.min(PAGE, MAX_RESULTS - app.nextOffset));
}

function updateMore() {
  $("load-more").hidden = app.nextOffset === null;
  $("load-more").disabled = app.loading;
  $("load-more").textContent = app.loading && app.results.length ? "loading…" : "Show more";
}

// Infinite scroll: the next page loads as the end of the grid comes near.
new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting)) loadMore();
}, { rootMargin: "600px" }).observe($("sentinel"));
$("load-more").addEventListener("click", loadMore);

function resultText() {
  const view = app.view;
  const n = app.results.length;
  const more = app.nextOffset !== null;
  if (view.kind === "browse") {
    if (!app.total) return view.filter || view.folder ? "no items pass the filter" + (view.folder ? " in this folder" : "") : "no items";
    return `${app.total} item${app.total === 1 ? "" : "s"}` + (n < app.total ? ` (${n} shown)` : "");
  }
  if (!n) {
    if (view.filter) {
      return "no results with this filter: a filter matches whole values (path=/photos/a.jpg, not path=photos); " +
        "for words of names and folders use keyword mode";
    }
    return "no results";
  }
  return `${n}${more ? "+" : ""} result${n === 1 ? "" : "s"}`;
}

function showProblem(e) {
  if (e.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
    return setStatus(e.message, true);
  }
  if (e.param === "filter") {
    showFilterError(e.message);
    return setStatus("fix the filter to see results", true);
  }
  if (app.view.kind === "image" && e.code === "invalid_image") return setStatus(`${app.view.name}: ${e.message}`, true);
  if (e.code === "model_mismatch") {
    return setStatus(`namespace “${app.view.ns}” holds vectors of another model than the server's: browse it, ` +
      "open an item's “Similar”, or search it in keyword mode", true, e.message);
  }
  if (e.message.length > 160) return setStatus(e.message.slice(0, 120).replace(/\s+\S*$/, "") + " …", true, e.message);
  setStatus(e.message, true);
}

function setStatus(text, isError = false, details = "") {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
  $("status-details").hidden = !details;
  $("status-detail-text").textContent = details;
}

function showFilterError(text) {
  $("filter-error").textContent = text.replace(/ \(filter\)$/, ""); // it is said beside the field
  $("filter-error").hidden = false;
  $("filter").setAttribute("aria-invalid", "true");
  showOptions(true);
}

function hideFilterError() {
  $("filter-error").hidden = true;
  $("filter").removeAttribute("aria-invalid");
}

// The controls and the caption say what the page shows.
function syncControls(view) {
  $("query").value = view.kind === "text" ? view.q : "";
  if (view.kind === "text") $("mode").value = view.mode;
  if (nsInfo(view.ns)) $("namespace").value = view.ns;
  $("filter").value = view.filter;
  renderChips(view);
  if (app.contextUrl) URL.revokeObjectURL(app.contextUrl);
  app.contextUrl = null;
  const image = $("context-image");
  image.hidden = true;
  image.removeAttribute("src");
  let caption;
  if (view.kind === "text") {
    caption = `Results for “${view.q}”` + (view.mode === "vector" ? "" : ` · ${view.mode}`);
  } else if (view.kind === "image") {
    caption = `Image: ${view.name}`;
    const file = app.images.get(view.image) || storedImage(view.image);
    if (file) {
      app.contextUrl = URL.createObjectURL(file);
      image.src = app.contextUrl;
      image.alt = `The image searched by, ${view.name}`;
      image.hidden = false;
    }
  } else if (view.kind === "similar") {
    caption = `Similar to ${view.name}`;
  } else {
    caption = "All items, " + ORDERS[view.order] + (view.folder ? ` · in ${lastName(view.folder)}` : "");
    $("order").value = view.order;
    loadFolders(view.ns, view.folder);
  }
  $("context-text").textContent = caption;
  $("context-clear").hidden = view.kind === "browse" && !view.folder;
  $("context-clear").setAttribute("aria-label", view.kind === "browse" ? "Clear the folder" : `Clear: ${caption}`);
  $("browse-controls").hidden = view.kind !== "browse";
}

// a picked file the browser cannot draw either: no broken image above the message
$("context-image").addEventListener("error", () => { $("context-image").hidden = true; });

// -- the grid --------------------------------------------------------------------------------
function clearGrid() {
  app.blobUrls.forEach((u) => URL.revokeObjectURL(u));
  app.blobUrls = [];
  $("results").replaceChildren();
}

function appendCards(items, start) {
  const grid = $("results");
  const scores = showsScores(app.view);
  items.forEach((item, i) => {
    const index = start + i;
    const card = document.createElement("button");
    card.type = "button";
    card.className = "card";
    card.dataset.id = item.id;
    card.dataset.index = String(index);
    // one tab stop for the grid: the arrow keys move within it
    card.tabIndex = index === 0 ? 0 : -1;
    const name = itemName(item);
    const folder = itemFolder(item);
    const img = document.createElement("img");
    img.alt = "";
    const caption = document.createElement("span");
    caption.className = "caption";
    const nameEl = document.createElement("span");
    nameEl.className = "name";
    nameEl.textContent = name;
    nameEl.title = name;
    caption.append(nameEl);
    let label = name;
    if (folder) {
      const folderEl = document.createElement("span");
      folderEl.className = "folder";
      folderEl.textContent = lastName(folder);
      folderEl.title = folder;
      caption.append(folderEl);
      label += `, in ${lastName(folder)}`;
    }
    if (scores && typeof item.score === "number") {
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = item.score.toFixed(3);
      caption.append(score);
      label += `, score ${item.score.toFixed(2)}`;
    }
    card.setAttribute("aria-label", label);
    card.append(img, caption);
    card.addEventListener("click", () => openViewer(index));
    grid.append(card);
    loadImage(img, item.thumbnail_url);
  });
}

function cards() {
  return [...$("results").querySelectorAll(".card")];
}

function focusCard(index) {
  const all = cards();
  if (!all.length) return;
  index = Math.max(0, Math.min(index, all.length - 1));
  all.forEach((c, i) => { c.tabIndex = i === index ? 0 : -1; });
  all[index].focus();
  if (index >= all.length - 4) loadMore();
}

function columns() {
  const all = cards();
  if (!all.length) return 1;
  const top = all[0].offsetTop;
  const n = all.findIndex((c) => c.offsetTop !== top);
  return n === -1 ? all.length : n;
}

$("results").addEventListener("keydown", (e) => {
  const card = e.target.closest(".card");
  if (!card) return;
  const index = Number(card.dataset.index);
  const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns(), ArrowUp: -columns() }[e.key];
  if (step !== undefined) {
    e.preventDefault();
    focusCard(index + step);
  } else if (e.key === "Home" || e.key === "End") {
    e.preventDefault();
    focusCard(e.key === "Home" ? 0 : cards().length - 1);
  }
});

// -- the viewer ----------------------------------------------------------------------------
function fact(list, term, value) {
  if (value === undefined || value === null || value === "") return;
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  if (value instanceof Node) dd.append(value);
  else dd.textContent = String(value);
  list.append(dt, dd);
}

function readableDate(text) {
  const date = new Date(text);
  if (Number.isNaN(date.getTime())) return String(text);
  const timed = /T\d\d:\d\d/.test(String(text));
  return date.toLocaleString(undefined, timed ? { dateStyle: "long", timeStyle: "short" } : { dateStyle: "long" });
}

function readableBytes(n) {
  if (typeof n !== "number") return "";
  return n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${Math.max(1, Math.round(n / 1e3))} kB`;
}

function openViewer(index) {
  const item = app.results[index];
  if (!item) return;
  app.viewerIndex = index;
  const m = item.metadata || {};
  const name = itemName(item);
  const folder = itemFolder(item);
  $("viewer-title").textContent = name;
  const total = app.view.kind === "browse" && app.total ? app.total : app.results.length;
  $("viewer-position").textContent = `${index + 1} of ${total}${app.nextOffset !== null && app.view.kind !== "browse" ? "+" : ""}`;
  const facts = $("viewer-facts");
  facts.replaceChildren();
  if (m.taken_at) fact(facts, "Taken", readableDate(m.taken_at));
  const camera = [m.camera_make, m.camera_model].filter(Boolean).join(" ");
  fact(facts, "Camera", camera);
  if (typeof m.gps_lat === "number" && typeof m.gps_lon === "number") {
    fact(facts, "Place", `${m.gps_lat.toFixed(5)}, ${m.gps_lon.toFixed(5)}`);
  }
  if (folder) {
    const link = document.createElement("a");
    link.href = viewUrl({ kind: "browse", ns: app.view.ns, filter: "", order: "newest", folder });
    link.textContent = folder;
    link.title = "Browse this folder";
    link.addEventListener("click", (e) => {
      e.preventDefault();
      go({ kind: "browse", ns: app.view.ns, filter: "", order: "newest", folder });
    });
    fact(facts, "Folder", link);
  }
  if (m.filename && m.filename !== name) fact(facts, "File", m.filename);
  if (m.width && m.height) fact(facts, "Size", `${m.width} × ${m.height} px` + (m.bytes ? `, ${readableBytes(m.bytes)}` : ""));
  if (showsScores(app.view) && typeof item.score === "number") fact(facts, "Score", item.score.toFixed(3));
  const table = $("viewer-meta");
  table.replaceChildren();
  for (const [key, value] of Object.entries({ id: item.id, ...m })) {
    const tr = table.insertRow();
    tr.insertCell().textContent = key;
    tr.insertCell().textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
  }
  const img = $("viewer-image");
  img.removeAttribute("src");
  img.classList.remove("missing");
  img.alt = folder ? `${name}, in ${lastName(folder)}` : name;
  loadImage(img, item.thumbnail_url.replace("/thumbnail?", "/thumbnail?size=1024&"));
  const hasFile = typeof m.path === "string" && m.path !== "";
  $("viewer-open").disabled = $("viewer-download").disabled = !hasFile;
  $("viewer-prev").disabled = index === 0;
  $("viewer-next").disabled = index === app.results.length - 1 && app.nextOffset === null;
  const dialog = $("viewer");
  if (!dialog.open) {
    dialog.showModal();
    $("viewer-close").focus();
  }
}

function closeViewer(restoreFocus = true) {
  const dialog = $("viewer");
  if (!dialog.open) return;
  dialog.dataset.restore = restoreFocus ? "1" : "";
  dialog.close();
}

$("viewer").addEventListener("close", () => {
  const dialog = $("viewer");
  if (dialog.dataset.restore !== "") focusCard(app.viewerIndex);
  dialog.dataset.restore = "1";
});

async function step(delta) {
  let index = app.viewerIndex + delta;
  if (index < 0) return;
  if (index >= app.results.length) {
    if (app.nextOffset === null) return;
    const run = app.run;
    await loadPage(run, app.nextOffset, PAGE);
    if (run !== app.run || index >= app.results.length) return;
  }
  openViewer(index);
}

$("viewer-prev").addEventListener("click", () => step(-1));
$("viewer-next").addEventListener("click", () => step(1));
$("viewer-close").addEventListener("click", () => closeViewer());
$("viewer").addEventListener("keydown", (e) => {
  if (e.target.closest("summary, a, input")) return;
  if (e.key === "ArrowLeft") { e.preventDefault(); step(-1); }
  if (e.key === "ArrowRight") { e.preventDefault(); step(1); }
});
// a click on the backdrop (outside the dialog's box) closes it
$("viewer").addEventListener("click", (e) => {
  if (e.target === $("viewer")) closeViewer();
});

$("viewer-similar").addEventListener("click", () => {
  const item = app.results[app.viewerIndex];
  if (!item) return;
  closeViewer(false);
  go({ kind: "similar", ns: app.view.ns, filter: app.view.filter, similar: item.id, name: itemName(item) });
  $("context-text").focus(); // the caption says what the results now are
});

async function original(download) {
  const item = app.results[app.viewerIndex];
  if (!item) return;
  const params = new URLSearchParams({ namespace: app.view.ns });
  if (download) params.set("download", "true");
  try {
    const blob = await (await api(`/api/v1/items/${enc(item.id)}/original?${params}`)).blob();
    const url = URL.createObjectURL(blob);
    if (download) {
      const a = document.createElement("a");
      a.href = url;
      a.download = (item.metadata || {}).filename || itemName(item);
      document.body.append(a);
      a.click();
      a.remove();
    } else {
      window.open(url, "_blank", "noopener");
    }
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (e) {
    $("viewer-position").textContent = e.message;
  }
}
$("viewer-open").addEventListener("click", () => original(false));
$("viewer-download").addEventListener("click", () => original(true));

// -- filters -------------------------------------------------------------------------------
const RANGE_NAMES = { ">=": "gte", "<=": "lte", ">": "gt", "<": "lt" };

function filterParts(text) {
  return (text || "").trim().split(/\s+/).filter(Boolean);
}

// The filter field as the API's filter object, read as the CLI reads --filter: key=value (repeated:
// any of them), key~=value (any case of A-Z) and key>=value, key<=value, key>value, key<value (all
// of them), separated by spaces.
function parseFilter(text) {
  const filter = {};
  for (const part of filterParts(text)) {
    const m = part.match(/^([^=<>!~]+)(~=|>=|<=|=|>|<)(.*)$/);
    if (!m) throw new Error(`bad filter “${part}”: use key=value, key~=value (any case) or key>=value (also <=, > and <)`);
    const [, key, op, value] = m;
    if (!value) throw new Error(`bad filter “${part}”: give a value after ${op}`);
    if (/^[=<>~]/.test(value)) {
      const fixed = { "=>": ">=", "=<": "<=" }[op + value[0]];
      throw new Error(`bad filter “${part}”` + (fixed ? `: did you mean ${key}${fixed}${value.slice(1)}?` : ": a value can't start with =, <, > or ~"));
    }
    const isRange = op !== "=";
    if (key in filter && Array.isArray(filter[key]) === isRange) {
      throw new Error(`filter ${key}: give either values (${key}=…) or a range (${key}>=…), not both`);
    }
    if (op === "~=") ((filter[key] ||= {}).iexact ||= []).push(value);
    else if (isRange) (filter[key] ||= {})[RANGE_NAMES[op]] = value;
    else (filter[key] ||= []).push(value);
  }
  return Object.keys(filter).length ? filter : undefined;
}

function renderChips(view) {
  const chips = $("chips");
  chips.replaceChildren();
  const parts = filterParts(view.filter);
  for (const part of parts) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.textContent = part + " ×";
    chip.setAttribute("aria-label", `Remove the filter ${part}`);
    chip.addEventListener("click", () => {
      const rest = parts.filter((p) => p !== part).join(" ");
      go({ ...app.view, filter: rest });
    });
    chips.append(chip);
  }
  chips.hidden = !parts.length;
}

function applyFilter() {
  if (!app.view) return;
  go({ ...app.view, filter: $("filter").value.trim().replace(/\s+/g, " ") });
}

$("filter").addEventListener("keydown", (e) => {
  if (e.key === "Enter") {
    e.preventDefault();
    applyFilter();
  }
});

// Suggestions: the namespace's keys; then, after "key=", that key's most common values.
async function loadKeys(ns) {
  if (app.keys.has(ns)) return suggest();
  try {
    const data = await apiJson(`/api/v1/namespaces/${enc(ns)}/keys`);
    app.keys.set(ns, Object.fromEntries(data.keys.map((k) => [k.key, k])));
    suggest();
  } catch (e) { /* suggestions only */ }
}

async function suggest() {
  const list = $("filter-suggestions");
  const ns = app.view && app.view.ns;
  const keys = app.keys.get(ns);
  if (!keys) return;
  const text = $("filter").value;
  const head = text.replace(/\S*$/, "");
  const last = text.slice(head.length);
  const options = [];
  const m = last.match(/^([^=<>!~]+)(~?=)/);
  if (m && keys[m[1]]) {
    const cacheKey = ns + "\0" + m[1];
    if (!app.values.has(cacheKey)) {
      try {
        const data = await apiJson(`/api/v1/namespaces/${enc(ns)}/keys/${enc(m[1])}?limit=30`);
        app.values.set(cacheKey, data.values.map((v) => v.value).filter((v) => v !== null));
      } catch (e) {
        app.values.set(cacheKey, []);
      }
    }
    for (const v of app.values.get(cacheKey)) options.push(head + m[1] + m[2] + String(v).replace(/\s/g, ""));
  } else {
    for (const [key, info] of Object.entries(keys)) {
      const kinds = Object.keys(info.kinds || {});
      options.push(head + key + (kinds.length === 1 && kinds[0] === "number" ? ">=" : "="));
    }
  }
  list.replaceChildren(...options.slice(0, 100).map((value) => Object.assign(document.createElement("option"), { value })));
}
$("filter").addEventListener("input", suggest);

// -- namespaces, folders, the key ----------------------------------------------------------
async function loadNamespaces() {
  try {
    const data = await apiJson("/api/v1/namespaces");
    app.namespaces = data.namespaces;
    app.defaultNs = data.default;
    const select = $("namespace");
    select.replaceChildren();
    for (const ns of data.namespaces) {
      const option = document.createElement("option");
      option.value = ns.name;
      option.textContent = `${ns.name} (${ns.items})` + (ns.searchable_by_text ? "" : " · another model");
      if (!ns.searchable_by_text) option.title = "Made by another model than the server's: browse, similar and keyword search only";
      select.append(option);
    }
    select.disabled = data.namespaces.length < 2;
    return true;
  } catch (e) {
    showProblem(e);
    return false;
  }
}

async function loadFolders(ns, current) {
  const select = $("folder");
  if (select.dataset.ns !== ns) {
    select.dataset.ns = ns;
    select.replaceChildren(new Option("all folders", ""));
    try {
      const data = await apiJson(`/api/v1/namespaces/${enc(ns)}/folders`);
      for (const f of data.folders) {
        const option = new Option(`${lastName(f.folder)} (${f.items})`, f.folder);
        option.title = f.folder;
        select.append(option);
      }
    } catch (e) { /* the folder list only */ }
  }
  if (current && ![...select.options].some((o) => o.value === current)) select.append(new Option(lastName(current), current));
  select.value = current || "";
  select.closest("label").hidden = select.options.length < 2;
}

async function start() {
  if (await loadNamespaces()) {
    $("key-form").hidden = true;
    history.replaceState({ pages: 1, scroll: 0, ...(history.state || {}) }, "");
    show(readView());
  }
}

// -- searching -----------------------------------------------------------------------------
function currentView() {
  return app.view || browseView({ ns: $("namespace").value || app.defaultNs });
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("query").value.trim();
  const base = currentView();
  const filter = $("filter").value.trim().replace(/\s+/g, " ");
  if (!text) return go({ ...browseView(base), filter });
  go({ kind: "text", ns: base.ns, filter, q: text, mode: $("mode").value });
});

$("mode").addEventListener("change", () => {
  const view = currentView();
  if (view.kind === "text") go({ ...view, mode: $("mode").value });
});

$("namespace").addEventListener("change", () => {
  const view = currentView();
  const ns = $("namespace").value;
  // an item belongs to its namespace: "similar to" it means nothing in another
  go(view.kind === "similar" ? { ...browseView(view), ns } : { ...view, ns });
});

$("order").addEventListener("change", () => go({ ...browseView(currentView()), folder: currentView().folder || "", order: $("order").value }));
$("folder").addEventListener("change", () => go({ ...browseView(currentView()), order: currentView().order || "newest", folder: $("folder").value }));
$("context-clear").addEventListener("click", () => {
  go(browseView(currentView()));
  $("query").focus();
});
$("home").addEventListener("click", (e) => {
  e.preventDefault();
  go({ ...browseView(currentView()), filter: "" });
});

// A picked image is kept in this tab (and, when small enough, in its session storage, so that a
// reload can search by it again).
function rememberImage(file) {
  const token = Math.random().toString(36).slice(2, 10);
  app.images.set(token, file);
  if (file.size <= 2_000_000) {
    const reader = new FileReader();
    reader.onload = () => {
      try { sessionStorage.setItem("clipsearch-image-" + token, JSON.stringify({ name: file.name, data: reader.result })); } catch (e) { /* full */ }
    };
    reader.readAsDataURL(file);
  }
  return token;
}

function storedImage(token) {
  try {
    const saved = JSON.parse(sessionStorage.getItem("clipsearch-image-" + token) || "null");
    if (!saved) return null;
    const [head, body] = saved.data.split(",");
    const bytes = Uint8Array.from(atob(body), (c) => c.charCodeAt(0));
    const file = new File([bytes], saved.name, { type: head.slice(5).split(";")[0] });
    app.images.set(token, file);
    return file;
  } catch (e) {
    return null;
  }
}

function searchImage(file) {
  const base = currentView();
  go({ kind: "image", ns: base.ns, filter: $("filter").value.trim().replace(/\s+/g, " "), image: rememberImage(file), name: file.name });
}

$("pick-image").addEventListener("click", () => $("image-file").click());
$("image-file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    clearGrid();
    return setStatus(`${file.name} is not an image: pick a JPEG, PNG, WebP, HEIC… file`, true);
  }
  searchImage(file);
});

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  app.key = $("api-key").value.trim();
  localStorage.setItem("clipsearch-api-key", app.key);
  setStatus("checking the key…");
  start();
});

function showOptions(open) {
  $("options").classList.toggle("open", open);
  $("options-toggle").setAttribute("aria-expanded", String(open));
}
$("options-toggle").addEventListener("click", () => showOptions(!$("options").classList.contains("open")));

let dragDepth = 0;
window.addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; $("drop-hint").hidden = false; });
window.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("drop-hint").hidden = true; } });
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  $("drop-hint").hidden = true;
  const file = [...(e.dataTransfer?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file) searchImage(file);
  else setStatus("drop an image file", true);
});

history.scrollRestoration = "manual";
start();
