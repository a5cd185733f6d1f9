// ghindex page: search the served index by image or id, show the k nearest images, click to go on.
// Plain JavaScript, no build step, nothing loaded from outside this server.
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "ghindex-token";
  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    info: null,
    last: null, // {kind: "id", id} or {kind: "file", file}
    urls: [], // object URLs to release on the next render
    seq: 0, // newer searches win over slower older ones
  };

  const { AuthError } = window.ghindexClient;

  const k = () => parseInt($("k").value, 10) || 10;
  const fmt = (n) => Number(n).toLocaleString("en-US");
  const labelText = (name, value) => {
    const v = name ?? value;
    if (v === null || v === undefined) return "";
    return Array.isArray(v) ? v.join(", ") : String(v);
  };

  const { api, setImage } = window.ghindexClient.connect(
    state, () => showToken(state.token ? "That token was not accepted." : ""), (url) => state.urls.push(url));

  function releaseUrls() {
    state.urls.forEach((u) => URL.revokeObjectURL(u));
    state.urls = [];
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  function showToken(note) {
    $("token-form").hidden = false;
    const input = $("token-input");
    input.placeholder = note || "token";
    input.value = "";
    input.focus();
  }

  // ---- info line
  async function loadInfo() {
    try {
      const info = await (await api("/api/info")).json();
      state.info = info;
      const idx = info.index;
      let text = `${fmt(idx.ntotal)} images · ${idx.bits}-bit codes · ${idx.index_key}`;
      if (info.model) text += ` · model ${info.model.backbone}`;
      $("summary").textContent = text;
      $("summary").title = text;
      $("token-button").hidden = !info.auth;
      $("token-form").hidden = true;
      const drop = $("drop");
      if (!info.model) {
        drop.classList.add("disabled");
        $("file").disabled = true;
        $("drop-note").textContent = "image search needs a server started with --model";
      }
      return true;
    } catch (err) {
      $("summary").textContent = err instanceof AuthError ? "token needed" : "cannot reach the server";
      if (!(err instanceof AuthError)) showError(err.message);
      return false;
    }
  }

  // ---- searches
  async function searchId(id) {
    state.last = { kind: "id", id };
    const seq = ++state.seq;
    const started = performance.now();
    showError("");
    try {
      const res = await api("/api/search", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ ids: [id], k: k() }),
      });
      const body = await res.json();
      if (seq !== state.seq) return;
      render(body, started, (img) => setImage(img, id));
    } catch (err) {
      if (seq === state.seq && !(err instanceof AuthError)) showError(err.message);
    }
  }

  async function searchFile(file) {
    if (!file) return;
    state.last = { kind: "file", file };
    const seq = ++state.seq;
    const started = performance.now();
    showError("");
    if (location.hash) history.replaceState(null, "", location.pathname);
    const form = new FormData();
    form.append("image", file, file.name || "image");
    try {
      const res = await api("/api/search?k=" + k(), { method: "POST", body: form });
      const body = await res.json();
      if (seq !== state.seq) return;
      render(body, started, (img) => {
        const url = URL.createObjectURL(file);
        state.urls.push(url);
        img.src = url;
      });
    } catch (err) {
      if (seq === state.seq && !(err instanceof AuthError)) showError(err.message);
    }
  }

  function rerun() {
    if (!state.last) return;
    if (state.last.kind === "id") go(state.last.id);
    else searchFile(state.last.file);
  }

  // Searching by id goes through the address (#id=42&k=10): links and the back button work.
  function go(id) {
    const hash = "#id=" + encodeURIComponent(id) + "&k=" + k();
    if (location.hash === hash) searchId(id);
    else location.hash = hash;
  }

  function fromHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const id = params.get("id");
    if (params.get("k") && [...$("k").options].some((o) => o.value === params.get("k"))) $("k").value = params.get("k");
    if (id !== null && /^-?\d+$/.test(id)) {
      $("id-input").value = id;
      searchId(Number(id));
    }
  }

  // ---- rendering
  function render(body, started, setQueryImage) {
    releaseUrls();
    const result = body.results[0];
    const total = performance.now() - started;
    $("empty").hidden = true;
    $("results").hidden = false;
    const qimg = $("query-img");
    qimg.removeAttribute("src");
    setQueryImage(qimg);
    $("query-name").textContent = result.query_id !== null ? "id " + result.query_id : result.query;
    const qlabel = labelText(result.query_label_name, result.query_label);
    $("query-label").textContent = qlabel;
    $("query-label").hidden = !qlabel;
    const n = result.neighbors.length;
    $("timing").textContent =
      `${n} neighbour${n === 1 ? "" : "s"} · search ${body.took_ms.toFixed(1)} ms · page ${total.toFixed(0)} ms`;

    const grid = $("grid");
    const tiles = result.neighbors.map((nb) => tile(nb));
    grid.replaceChildren(...tiles);
  }

  function tile(nb) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "tile";
    if (nb.relevant === true) button.classList.add("rel-yes");
    if (nb.relevant === false) button.classList.add("rel-no");
    button.dataset.id = nb.id;
    const label = labelText(nb.label_name, nb.label);
    button.setAttribute("aria-label",
      `Rank ${nb.rank}: id ${nb.id}${label ? ", " + label : ""}, distance ${nb.distance}. Search by it.`);
    button.title = (nb.path || "id " + nb.id) +
      (nb.relevant === true ? "\nsame label as the query" : nb.relevant === false ? "\nanother label than the query" : "");

    const thumb = document.createElement("span");
    thumb.className = "thumb";
    const img = document.createElement("img");
    img.alt = "";
    img.loading = "lazy";
    img.decoding = "async";
    img.addEventListener("error", () => thumb.classList.add("missing"), { once: true });
    setImage(img, nb.id);
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "#" + nb.rank;
    thumb.append(img, badge);

    const info = document.createElement("span");
    info.className = "info";
    const top = document.createElement("span");
    top.className = "top";
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label || "—";
    const dist = document.createElement("span");
    dist.className = "dist";
    dist.append(document.createTextNode(String(nb.distance)));
    const unit = document.createElement("small");
    unit.textContent = nb.distance === 1 ? " bit" : " bits";
    dist.append(unit);
    // uploaded images are ranked by weighted Hamming distance (bits weighed by how sure the query is of each)
    dist.title = nb.weighted_distance === undefined || nb.weighted_distance === null ? "Hamming distance"
      : `Hamming distance; ranked by weighted distance ${nb.weighted_distance.toFixed(2)}`;
    top.append(name, dist);
    const idLine = document.createElement("span");
    idLine.className = "id";
    idLine.textContent = "id " + nb.id;
    info.append(top, idLine);

    button.append(thumb, info);
    button.addEventListener("click", () => {
      $("id-input").value = nb.id;
      go(nb.id);
      window.scrollTo({ top: 0, behavior: "smooth" });
    });
    li.append(button);
    return li;
  }

  // ---- wiring
  function wire() {
    $("file").addEventListener("change", (e) => {
      searchFile(e.target.files[0]);
      e.target.value = "";
    });
    const drop = $("drop");
    ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
      e.preventDefault();
      if (!drop.classList.contains("disabled")) drop.classList.add("over");
    }));
    ["dragleave", "dragend"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      if (drop.classList.contains("disabled")) return;
      const file = [...(e.dataTransfer?.files || [])].find((f) => f.type.startsWith("image/")) || e.dataTransfer?.files[0];
      searchFile(file);
    });
    document.addEventListener("paste", (e) => {
      if (!state.info || !state.info.model) return;
      const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
      if (file) searchFile(file);
    });
    $("id-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("id-input").value.trim();
      if (!/^-?\d+$/.test(text)) {
        showError("An id is a whole number, such as 42.");
        return;
      }
      go(text);
    });
    $("random").addEventListener("click", async () => {
      showError("");
      try {
        const body = await (await api("/api/sample?n=1")).json();
        if (body.ids.length) {
          $("id-input").value = body.ids[0];
          go(body.ids[0]);
        }
      } catch (err) {
        if (!(err instanceof AuthError)) showError(err.message);
      }
    });
    $("k").addEventListener("change", rerun);
    window.addEventListener("hashchange", fromHash);
    $("token-button").addEventListener("click", () => showToken(""));
    $("token-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      state.token = $("token-input").value.trim();
      if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
      else sessionStorage.removeItem(TOKEN_KEY);
      if (await loadInfo()) {
        if (state.last) rerun();
        else fromHash();
      }
    });
  }

  wire();
  loadInfo().then((ok) => { if (ok) fromHash(); });
})();
