// The clipsearch gallery: plain JavaScript over the JSON API, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: localStorage.getItem("clipsearch-api-key") || "", blobUrls: [] };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("Authorization", "Bearer " + state.key);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
    throw new Error("this server needs an API key: enter it above");
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
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

// Thumbnails need the API key too, so they are fetched and shown as blob URLs.
async function loadThumbnail(img, url) {
  try {
    const blob = await (await api(url)).blob();
    const objectUrl = URL.createObjectURL(blob);
    state.blobUrls.push(objectUrl);
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

function itemName(item) {
  const m = item.metadata || {};
  return m.title || m.label || m.filename || item.id;
}

function renderResults(results, what) {
  state.blobUrls.forEach((u) => URL.revokeObjectURL(u));
  state.blobUrls = [];
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of results) {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "card";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.alt = itemName(hit);
    img.loading = "lazy";
    const caption = document.createElement("div");
    caption.className = "caption";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = itemName(hit);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    caption.append(name, score);
    card.append(img, caption);
    card.addEventListener("click", () => showItem(hit));
    grid.append(card);
    loadThumbnail(img, hit.thumbnail_url);
  }
  setStatus(results.length ? `${results.length} results ${what}` : `no results ${what}`);
}

function namespace() {
  return $("namespace").value || undefined;
}

// A new search replaces what the page shows: the detail of an earlier item, an earlier query image.
function clearPanels() {
  $("detail").hidden = true;
  $("query-preview").hidden = true;
  if (state.queryUrl) URL.revokeObjectURL(state.queryUrl);
  state.queryUrl = null;
}

function showQueryImage(file) {
  state.queryUrl = URL.createObjectURL(file);
  $("query-image").src = state.queryUrl;
  $("query-name").textContent = file.name;
  $("query-preview").hidden = false;
}

const RANGE_NAMES = { ">=": "gte", "<=": "lte", ">": "gt", "<": "lt" };

// The filter field as the API's filter object, read as the CLI reads --filter: key=value (repeated:
// any of them), key~=value (any case of A-Z) and key>=value, key<=value, key>value, key<value (all
// of them), separated by spaces.
function parseFilter(text) {
  const filter = {};
  for (const part of text.trim().split(/\s+/).filter(Boolean)) {
    const m = part.match(/^([^=<>!~]+)(~=|>=|<=|=|>|<)(.+)$/);
    if (!m) throw new Error(`bad filter “${part}”: use key=value, key~=value (any case) or key>=value (also <=, > and <)`);
    const [, key, op, value] = m;
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

async function searchText(text) {
  clearPanels();
  setStatus("searching…");
  try {
    const mode = $("mode").value;
    const filter = parseFilter($("filter").value);
    const data = await apiJson("/api/v1/search", { text, namespace: namespace(), limit: 40, mode, filter });
    renderResults(data.results, mode === "vector" ? `for “${text}”` : `for “${text}” (${mode})`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function searchImage(file) {
  clearPanels();
  showQueryImage(file);
  setStatus(`searching by ${file.name}…`);
  const form = new FormData();
  form.append("file", file);
  form.append("limit", "40");
  if (namespace()) form.append("namespace", namespace());
  try {
    const filter = parseFilter($("filter").value);
    if (filter) form.append("filter", JSON.stringify(filter));
    const data = await (await api("/api/v1/images/search", { method: "POST", body: form })).json();
    renderResults(data.results, `similar to ${file.name}`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function showItem(hit) {
  clearPanels();
  const detail = $("detail");
  detail.hidden = false;
  detail.dataset.id = hit.id;
  $("detail-title").textContent = itemName(hit);
  const table = $("detail-meta");
  table.replaceChildren();
  const rows = { id: hit.id, score: hit.score.toFixed(4), ...hit.metadata };
  for (const [key, value] of Object.entries(rows)) {
    const tr = table.insertRow();
    tr.insertCell().textContent = key;
    tr.insertCell().textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
  }
  loadThumbnail($("detail-image"), hit.thumbnail_url.replace("/thumbnail?", "/thumbnail?size=512&"));
  setStatus("finding more like this…");
  try {
    const ns = encodeURIComponent(namespace() || "");
    const path = `/api/v1/items/${encodeURIComponent(hit.id)}/similar?limit=40` + (ns ? `&namespace=${ns}` : "");
    const data = await apiJson(path);
    renderResults(data.results, `like ${itemName(hit)}`);
  } catch (e) {
    setStatus(e.message, true);
  }
  window.scrollTo({ top: 0, behavior: "smooth" });
}

async function loadNamespaces() {
  try {
    const data = await apiJson("/api/v1/namespaces");
    const select = $("namespace");
    select.replaceChildren();
    for (const ns of data.namespaces) {
      const option = document.createElement("option");
      option.value = ns.name;
      option.textContent = `${ns.name} (${ns.items})`;
      option.selected = ns.name === data.default;
      select.append(option);
    }
    select.hidden = data.namespaces.length === 0;
    if (!data.namespaces.length) setStatus("nothing is stored yet: ingest some images first");
  } catch (e) {
    $("namespace").hidden = true; // no empty list while the key is missing
    setStatus(e.message, true);
  }
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("query").value.trim();
  if (text) searchText(text);
});
$("image-file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) searchImage(file);
  event.target.value = "";
});
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  localStorage.setItem("clipsearch-api-key", state.key);
  $("key-form").hidden = true;
  setStatus("key saved");
  loadNamespaces();
});
$("detail-close").addEventListener("click", () => { $("detail").hidden = true; });

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

loadNamespaces();
