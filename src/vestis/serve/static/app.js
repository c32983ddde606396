// The vestis search page: plain JavaScript, talks only to the server that sent it.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = {
  file: null,
  photoUrl: null,
  facets: {},
  token: sessionStorage.getItem("vestis-token") || "",
  searchSeq: 0,
};

// -- talking to the API ------------------------------------------------------------------
function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function api(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 401 || response.status === 403) $("#token-box").open = true;
    const error = new Error(body.detail || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// Private servers need the token on image requests too, which <img src> cannot send.
async function showImage(img, url) {
  if (!state.token) {
    img.src = url;
    return;
  }
  const response = await fetch(url, { headers: authHeaders() });
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function setStatus(message, isError = false) {
  const status = $("#status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

// -- start-up ----------------------------------------------------------------------------
async function waitUntilReady() {
  for (;;) {
    const response = await fetch("/health").catch(() => null);
    const body = response ? await response.json().catch(() => ({})) : {};
    if (body.ready) return;
    if (body.status === "failed") {
      $("#stats").textContent = `The server could not load its model: ${body.detail}`;
      throw new Error(body.detail);
    }
    $("#stats").textContent = "Loading the model…";
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function loadCatalogInfo() {
  try {
    const stats = await api("/stats");
    $("#stats").textContent =
      `${stats.items} items, ${stats.images} images · model ${stats.model} · index ${stats.index}`;
    state.facets = await api("/facets");
    fillCategories();
  } catch (error) {
    $("#stats").textContent = error.message;
  }
}

function fillCategories() {
  const select = $("#category");
  const category = state.facets.category;
  select.closest("label").hidden = !category;
  for (const value of category ? category.values : []) {
    select.append(el("option", { value, text: value }));
  }
}

// -- filters -----------------------------------------------------------------------------
function addFilterRow() {
  const fields = Object.keys(state.facets).filter((key) => key !== "category");
  const n = document.querySelectorAll(".filter-row").length + 1;
  const field = el("select", { "aria-label": `Filter ${n} field` },
    ...fields.map((key) => el("option", { value: key, text: key })));
  const listId = `values-${n}-${Date.now()}`;
  const list = el("datalist", { id: listId });
  const value = el("input", { type: "text", list: listId, "aria-label": `Filter ${n} value`,
    placeholder: "value" });
  const fillValues = () => {
    list.replaceChildren(...(state.facets[field.value]?.values || [])
      .map((v) => el("option", { value: v })));
  };
  const remove = el("button", { type: "button", class: "secondary icon",
    "aria-label": `Remove filter ${n}`, text: "×" });
  const row = el("div", { class: "filter-row" }, field, value, list, remove);
  field.addEventListener("change", () => { fillValues(); value.value = ""; search(); });
  value.addEventListener("change", search);
  remove.addEventListener("click", () => { row.remove(); $("#add-filter").focus(); search(); });
  fillValues();
  $("#extra-filters").append(row);
  field.focus();
}

function currentFilters() {
  const filters = [];
  if ($("#category").value) filters.push(["category", $("#category").value]);
  for (const row of document.querySelectorAll(".filter-row")) {
    const [field, value] = row.querySelectorAll("select, input");
    if (field.value && value.value) filters.push([field.value, value.value]);
  }
  return filters;
}

// -- search ------------------------------------------------------------------------------
function useFile(file) {
  if (!file) return;
  state.file = file;
  $("#outfit").replaceChildren();
  $("#complete").disabled = false;
  search();
}

async function search() {
  if (!state.file) return searchWords();
  const seq = ++state.searchSeq;
  const form = new FormData();
  form.append("image", state.file, state.file.name || "pasted-photo");
  form.append("k", $("#k").value || "12");
  if ($("#whole").checked) form.append("whole", "true");
  const words = $("#text").value.trim();
  if (words) form.append("text", words);
  for (const [key, value] of currentFilters()) form.append("where", `${key}=${value}`);
  setStatus("Searching…");
  $("#garments").setAttribute("aria-busy", "true");
  try {
    const result = await api("/search", { method: "POST", body: form });
    if (seq !== state.searchSeq) return;
    showPhoto(result);
    showResults(result);
  } catch (error) {
    if (seq !== state.searchSeq) return;
    $("#preview").hidden = true;
    $("#garments").replaceChildren();
    setStatus(error.message, true);
  } finally {
    $("#garments").removeAttribute("aria-busy");
  }
}

// Words without a photo: one result list.
async function searchWords() {
  const words = $("#text").value.trim();
  if (!words) return;
  const seq = ++state.searchSeq;
  const form = new FormData();
  form.append("text", words);
  form.append("k", $("#k").value || "12");
  for (const [key, value] of currentFilters()) form.append("where", `${key}=${value}`);
  setStatus("Searching…");
  try {
    const result = await api("/search/text", { method: "POST", body: form });
    if (seq !== state.searchSeq) return;
    $("#preview").hidden = true;
    const cards = result.matches.map(card);
    $("#garments").replaceChildren(el("section", { class: "garment", "aria-label": "Words" },
      el("h3", { text: `“${words}”` }),
      cards.length ? el("ul", { class: "cards" }, ...cards)
        : el("p", { class: "muted", text: "No matching items (check the filters)." })));
    setStatus(`${cards.length} result${cards.length === 1 ? "" : "s"} in ` +
      `${Math.round(result.took_ms)} ms`);
  } catch (error) {
    if (seq !== state.searchSeq) return;
    setStatus(error.message, true);
  }
}

function showPhoto(result) {
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = URL.createObjectURL(state.file);
  $("#photo").src = state.photoUrl;
  const boxes = result.garments.map((garment, i) => {
    const [x1, y1, x2, y2] = garment.box;
    const box = el("div", { class: "box", "data-garment": String(i) },
      el("span", { text: `${i + 1} · ${garment.group}` }));
    box.style.left = `${(100 * x1) / result.width}%`;
    box.style.top = `${(100 * y1) / result.height}%`;
    box.style.width = `${(100 * (x2 - x1)) / result.width}%`;
    box.style.height = `${(100 * (y2 - y1)) / result.height}%`;
    return box;
  });
  $("#boxes").replaceChildren(...boxes);
  $("#photo-caption").textContent =
    `${result.garments.length} garment${result.garments.length === 1 ? "" : "s"} found`;
  $("#preview").hidden = false;
}

function showResults(result) {
  const sections = result.garments.map((garment, i) => {
    const cards = garment.matches.map(card);
    const list = cards.length
      ? el("ul", { class: "cards" }, ...cards)
      : el("p", { class: "muted", text: "No matching items (check the filters)." });
    const section = el("section", { class: "garment", "aria-label": `Garment ${i + 1}` },
      el("h3", { text: `Garment ${i + 1} · ${garment.group}` }), list);
    section.addEventListener("mouseenter", () => highlight(i, true));
    section.addEventListener("mouseleave", () => highlight(i, false));
    return section;
  });
  $("#garments").replaceChildren(...sections);
  const total = result.garments.reduce((sum, g) => sum + g.matches.length, 0);
  setStatus(`${total} result${total === 1 ? "" : "s"} in ${Math.round(result.took_ms)} ms`);
}

function highlight(index, on) {
  const box = document.querySelector(`.box[data-garment="${index}"]`);
  if (box) box.classList.toggle("active", on);
}

const HIDDEN_FIELDS = new Set(["name", "description"]);
const PREDICTED = "predicted.";

// Shop names may hold HTML entities ("LumaTech&trade;"): show them as text. Parsing into
// an inert document runs nothing, and only the text is kept.
function plainText(value) {
  const text = String(value);
  if (!text.includes("&")) return text;
  return new DOMParser().parseFromString(text, "text/html").documentElement.textContent;
}

// Long paths such as Men/Bottoms/Pants may wrap after a slash, not mid-word.
function breakable(value) {
  return String(value).replaceAll("/", "/\u200b");
}

function metadataList(metadata, skip = []) {
  const rows = Object.entries(metadata)
    .filter(([key]) => !HIDDEN_FIELDS.has(key) && !skip.includes(key)
      && !key.startsWith(PREDICTED))
    .flatMap(([key, value]) => [el("dt", { text: key }), el("dd", { text: breakable(value) })]);
  return el("dl", { class: "meta" }, ...rows);
}

// Attributes the model predicted at index time (vestis index --attributes), as chips.
function attributeChips(metadata) {
  const chips = Object.entries(metadata)
    .filter(([key]) => key.startsWith(PREDICTED) && key !== `${PREDICTED}category`)
    .map(([key, value]) => el("span", { class: "chip", title: key,
      text: plainText(value) }));
  return el("span", { class: "chips", "aria-label": "Predicted attributes" }, ...chips);
}

function card(match) {
  const name = plainText(match.metadata.name || match.item_id);
  const img = el("img", { alt: name, loading: "lazy", width: "200", height: "250" });
  showImage(img, match.image_url);
  const button = el("button", { type: "button", class: "card", "data-item": match.item_id,
    "aria-label": `${name}, score ${match.score.toFixed(3)}: show all images` },
    img,
    el("span", { class: "name", text: name }),
    el("span", { class: "score", text: `score ${match.score.toFixed(3)}` }),
    attributeChips(match.metadata),
    metadataList(match.metadata));
  button.addEventListener("click", () => openItem(match.item_id, button));
  return el("li", {}, button);
}

// -- complete the look -------------------------------------------------------------------
async function completeLook() {
  if (!state.file) return;
  const form = new FormData();
  form.append("image", state.file, state.file.name || "pasted-photo");
  form.append("k", $("#k").value || "12");
  for (const [key, value] of currentFilters()) {
    if (key !== "category") form.append("where", `${key}=${value}`);
  }
  setStatus("Finding what goes with it…");
  try {
    const result = await api("/complete", { method: "POST", body: form });
    const cards = result.matches.map(card);
    const kind = result.category ? breakable(result.category) : "this garment";
    $("#outfit").replaceChildren(el("section", { class: "garment", "aria-label": "Goes with" },
      el("h3", { text: `Goes with ${kind}` }),
      cards.length ? el("ul", { class: "cards" }, ...cards)
        : el("p", { class: "muted", text: "Nothing to suggest." })));
    setStatus(`${result.matches.length} suggestions in ${Math.round(result.took_ms)} ms`);
    $("#outfit").scrollIntoView({ block: "start" });
  } catch (error) {
    setStatus(error.message, true);
  }
}

// -- one item ----------------------------------------------------------------------------
async function openItem(itemId, opener) {
  const dialog = $("#item-dialog");
  try {
    const item = await api(`/items/${encodeURIComponent(itemId)}`);
    const name = plainText(item.metadata.name || item.item_id);
    $("#item-title").textContent = name;
    $("#item-id").textContent =
      `${item.item_id} · ${item.images.length} image${item.images.length === 1 ? "" : "s"}`;
    // Caption each image with what differs between the item's images, e.g. the view.
    const varying = Object.keys(Object.assign({}, ...item.images.map((i) => i.metadata)))
      .filter((key) => new Set(item.images.map((i) => i.metadata[key])).size > 1);
    $("#item-images").replaceChildren(...item.images.map((image, i) => {
      const img = el("img", { alt: `${name}, image ${i + 1}` });
      showImage(img, image.url);
      const caption = varying.map((key) => `${key}: ${image.metadata[key] ?? "-"}`).join(" · ");
      return el("li", {}, img, el("span", { class: "muted", text: caption }));
    }));
    const meta = metadataList(item.metadata, varying); // per-image values are captions
    $("#item-meta").replaceWith(Object.assign(meta, { id: "item-meta" }));
    dialog.showModal();
    $("#close-item").focus();
    dialog.addEventListener("close", () => opener.focus(), { once: true });
  } catch (error) {
    setStatus(error.message, true);
  }
}

// -- wiring ------------------------------------------------------------------------------
function wire() {
  const drop = $("#drop");
  const file = $("#file");
  // The label opens the chooser itself; a click elsewhere on the drop zone does too.
  drop.addEventListener("click", (event) => {
    if (!event.target.closest("label, input")) file.click();
  });
  file.addEventListener("change", () => { useFile(file.files[0]); file.value = ""; });
  // Dropping anywhere counts, so a near miss does not navigate away from the page.
  window.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
  window.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) drop.classList.remove("dragging");
  });
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    useFile(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const pasted = [...event.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (pasted) {
      event.preventDefault();
      useFile(pasted);
    }
  });
  $("#category").addEventListener("change", search);
  $("#k").addEventListener("change", search);
  $("#whole").addEventListener("change", search);
  $("#complete").addEventListener("click", completeLook);
  $("#text-form").addEventListener("submit", (event) => { event.preventDefault(); search(); });
  $("#add-filter").addEventListener("click", addFilterRow);
  $("#filters").addEventListener("submit", (event) => { event.preventDefault(); search(); });
  $("#close-item").addEventListener("click", () => $("#item-dialog").close());
  $("#item-dialog").addEventListener("click", (event) => {
    if (event.target === $("#item-dialog")) $("#item-dialog").close(); // backdrop click
  });
  const token = $("#token");
  token.value = state.token;
  $("#token-form").addEventListener("submit", (event) => event.preventDefault());
  token.addEventListener("change", () => {
    state.token = token.value.trim();
    sessionStorage.setItem("vestis-token", state.token);
    loadCatalogInfo();
  });
}

wire();
waitUntilReady().then(loadCatalogInfo).catch(() => {});
