// ghindex duplicates page: the groups of a `ghindex dedup` jsonl, a page of groups at a time, each image
// with its neighbours in the group and a link to the search page by its id. Plain JavaScript, nothing
// loaded from outside this server.
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "ghindex-token"; // the search page's: one token per tab for both pages
  const PAGE = 20;
  const state = { token: sessionStorage.getItem(TOKEN_KEY) || "", offset: 0, total: null, loading: false };
  const fmt = (n) => Number(n).toLocaleString("en-US");
  const bits = (d) => `${d} bit${d === 1 ? "" : "s"}`;

  const { AuthError } = window.ghindexClient;

  const { api, setImage } = window.ghindexClient.connect(state, () => {
    $("token-form").hidden = false;
    $("token-input").focus();
  });

  function showError(message) {
    $("error").textContent = message || "";
    $("error").hidden = !message;
  }

  // A member is its id and its side: "o" for the other collection of `dedup --against` (ids of the two
  // may coincide), "" otherwise; pairs there are [id, other id, distance].
  const anchorOf = (group, id, other) => `g${group.group ?? "x"}-${other ? "o" : ""}${id}`;

  // neighbours of each member of a group: anchor -> [[id, other, distance], ...], closest first
  function neighbours(group) {
    const near = new Map();
    const against = Array.isArray(group.other_ids);
    const add = (from, to) => {
      const key = anchorOf(group, from[0], from[1]);
      if (!near.has(key)) near.set(key, []);
      near.get(key).push(to);
    };
    for (const [a, b, d] of group.pairs || []) {
      add([a, false], [b, against, d]);
      add([b, against], [a, false, d]);
    }
    for (const list of near.values()) list.sort((x, y) => x[2] - y[2] || x[0] - y[0]);
    return near;
  }

  function member(group, id, other, near, missing) {
    const anchor = anchorOf(group, id, other);
    const li = document.createElement("li");
    li.className = "member";
    li.id = anchor;
    li.dataset.id = id;
    const kept = !other && group.kept && group.kept.includes(id);
    if (kept) li.classList.add("kept");
    if (other) li.classList.add("other");

    const link = document.createElement("a");
    link.className = "thumb";
    link.href = "/#id=" + encodeURIComponent(id) + "&k=10";
    link.title = `Search by id ${id}`;
    const img = document.createElement("img");
    img.alt = `id ${id}`;
    img.loading = "lazy";
    img.decoding = "async";
    img.addEventListener("error", () => link.classList.add("missing"), { once: true });
    if (missing.has(id)) link.classList.add("missing");
    else setImage(img, id);
    link.append(img);
    if (kept || other) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = kept ? "kept" : "in index";
      link.append(badge);
    }

    const info = document.createElement("div");
    info.className = "info";
    const name = document.createElement("span");
    name.className = "id";
    name.textContent = "id " + id;
    const list = document.createElement("span");
    list.className = "near";
    const mine = near.get(anchor) || [];
    list.append(document.createTextNode(mine.length ? "near " : ""));
    mine.forEach(([n, nOther, d], k) => {
      const a = document.createElement("a");
      a.href = "#" + anchorOf(group, n, nOther);
      a.dataset.neighbour = n;
      a.textContent = `${n} (${bits(d)})`;
      a.addEventListener("click", (e) => {
        e.preventDefault();
        const target = document.getElementById(anchorOf(group, n, nOther));
        if (!target) return;
        target.scrollIntoView({ block: "nearest", behavior: "smooth" });
        target.classList.remove("flash");
        void target.offsetWidth; // restart the animation
        target.classList.add("flash");
      });
      if (k) list.append(document.createTextNode(", "));
      list.append(a);
    });
    info.append(name, list);
    li.append(link, info);
    return li;
  }

  function groupItem(group) {
    const li = document.createElement("li");
    li.className = "group panel";
    li.dataset.group = group.group;
    const head = document.createElement("div");
    head.className = "group-head";
    const title = document.createElement("strong");
    title.textContent = `Group ${group.group ?? ""}`.trim();
    const facts = document.createElement("span");
    facts.className = "muted";
    const pairs = group.num_pairs ?? group.pairs.length;
    let text = `${fmt(group.size)} images · ${fmt(pairs)} pair${pairs === 1 ? "" : "s"}`;
    if (group.max_distance !== null && group.max_distance !== undefined) text += ` up to ${bits(group.max_distance)} apart`;
    if (group.diameter !== null && group.diameter !== undefined) text += ` · diameter ${bits(group.diameter)}`;
    facts.textContent = text;
    head.append(title, facts);
    if (group.chained) {
      const chip = document.createElement("span");
      chip.className = "chip chain";
      chip.textContent = "chain";
      chip.title = "Some members are further apart than the radius: pairs in between join them.";
      head.append(chip);
    }
    const near = neighbours(group);
    const missing = new Set(group.missing || []);
    const members = document.createElement("ol");
    members.className = "members";
    group.ids.forEach((id) => members.append(member(group, id, false, near, missing)));
    (group.other_ids || []).forEach((id) => members.append(member(group, id, true, near, missing)));
    li.append(head, members);
    return li;
  }

  async function loadMore() {
    if (state.loading) return;
    state.loading = true;
    showError("");
    try {
      const body = await (await api(`/api/duplicates?offset=${state.offset}&limit=${PAGE}`)).json();
      state.total = body.total;
      state.offset += body.groups.length;
      $("groups").append(...body.groups.map(groupItem));
      const text = `${fmt(body.total)} group${body.total === 1 ? "" : "s"} · ${fmt(body.items)} images · ${body.file}`;
      $("summary").textContent = text;
      $("summary").title = text;
      $("empty").hidden = body.total > 0;
      $("more").hidden = state.offset >= body.total;
      $("more").textContent = `More groups (${fmt(body.total - state.offset)} left)`;
      $("token-form").hidden = true;
    } catch (err) {
      if (!(err instanceof AuthError)) showError(err.message);
      else $("summary").textContent = "token needed";
    } finally {
      state.loading = false;
    }
  }

  $("more").addEventListener("click", loadMore);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token-input").value.trim();
    if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
    else sessionStorage.removeItem(TOKEN_KEY);
    $("groups").replaceChildren();
    state.offset = 0;
    loadMore();
  });
  loadMore();
})();
