// corral console: a little progressive enhancement. Every page works without this file;
// with it, dialogs open in place, exact counts arrive after the page, logs stream live.
"use strict";

(function () {
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));
  const fmt = new Intl.NumberFormat("en-US");

  // --- menus (<details data-menu>): close on outside click and Escape ---------------------
  document.addEventListener("click", (ev) => {
    for (const menu of $$("details[data-menu][open]")) {
      if (!menu.contains(ev.target)) menu.removeAttribute("open");
    }
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key !== "Escape") return;
    for (const menu of $$("details[data-menu][open]")) {
      menu.removeAttribute("open");
      const summary = $("summary", menu);
      if (summary) summary.focus();
    }
  });

  // --- dialogs: a link with data-dialog-link opens that <dialog> instead of navigating ------
  for (const opener of $$("[data-dialog-link]")) {
    opener.addEventListener("click", (ev) => {
      const dialog = document.getElementById(opener.dataset.dialogLink);
      if (!dialog || typeof dialog.showModal !== "function") return; // follow the link
      ev.preventDefault();
      dialog.showModal();
      const first = $("input:not([type=hidden]), textarea, select, button", dialog);
      if (first) first.focus();
    });
  }
  for (const closer of $$("dialog [data-close]")) {
    closer.addEventListener("click", (ev) => { ev.preventDefault(); closer.closest("dialog").close(); });
  }
  // a dialog the server sent back open (a form with errors, or ?invite=1): make it modal
  for (const dialog of $$("dialog[data-reopen]")) {
    if (typeof dialog.showModal !== "function") continue;
    dialog.close();
    dialog.showModal();
    const bad = $("[aria-invalid=true]", dialog) || $("input:not([type=hidden]), select, textarea", dialog);
    if (bad) bad.focus();
  }

  // --- confirmations on destructive buttons --------------------------------------------------
  document.addEventListener("click", (ev) => {
    const button = ev.target.closest("[data-confirm]");
    if (button && !window.confirm(button.dataset.confirm)) ev.preventDefault();
  });

  // --- exact counts: the page shows a bounded count ("10,000+"), the exact one follows ------
  for (const el of $$("[data-exact-count]")) {
    if (!el.textContent.trim().endsWith("+")) continue;
    fetch(el.dataset.exactCount, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.json() : null))
      .then((body) => { if (body && typeof body.total === "number") el.textContent = fmt.format(body.total); })
      .catch(() => {});
  }
  for (const box of $$("[data-stats-url]")) {
    if (!box.dataset.statsUrl) continue;
    const bounded = $$("[data-stat]", box).some((el) => el.textContent.trim().endsWith("+"));
    if (!bounded) continue;
    fetch(box.dataset.statsUrl, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.json() : null))
      .then((body) => {
        if (!body) return;
        for (const el of $$("[data-stat]", box)) {
          const v = body[el.dataset.stat];
          if (typeof v === "number") el.textContent = fmt.format(v);
        }
      })
      .catch(() => {});
  }

  // --- filters: the extra filters start open on wide screens -----------------------------
  if (window.matchMedia("(min-width: 801px)").matches) {
    for (const d of $$("details[data-open-wide]")) d.setAttribute("open", "");
  }

  // --- bulk selection ----------------------------------------------------------------------
  for (const form of $$("form[data-bulk]")) {
    const all = $("[data-select-all]", form);
    const boxes = $$("input[name=device]", form);
    const label = $("[data-selected-count]", form);
    const update = () => {
      const n = boxes.filter((b) => b.checked).length;
      if (label) label.textContent = n ? `${n} selected` : "Select devices to act on them";
      if (all) {
        all.checked = n > 0 && n === boxes.length;
        all.indeterminate = n > 0 && n < boxes.length;
      }
    };
    if (all) all.addEventListener("change", () => { boxes.forEach((b) => { b.checked = all.checked; }); update(); });
    boxes.forEach((b) => b.addEventListener("change", update));
    update();
  }

  // --- the live log: EventSource on the console's stream of the /v1 events ------------------
  const MAX_ROWS = 1000;
  const when = (iso) => (iso || "").replace("T", " ").replace(/\.\d+/, "").replace("Z", "");

  function eventRow(e, deviceBase, names) {
    const tr = document.createElement("tr");
    tr.dataset.eventId = e.id;
    tr.className = "fresh";
    const cell = (cls, child) => {
      const td = document.createElement("td");
      td.className = cls;
      if (child) td.append(child);
      tr.append(td);
      return td;
    };
    const time = document.createElement("time");
    time.dateTime = e.published_at;
    time.textContent = when(e.published_at);
    cell("nowrap log-time", time);
    const code = document.createElement("code");
    code.textContent = e.name;
    cell("log-name", code);
    cell("log-data").textContent = e.data == null ? "" : e.data;
    const dev = cell("log-device");
    if (/^[0-9a-f]{24}$/.test(e.coreid || "")) {
      const label = names.get(e.coreid) || e.coreid;
      if (deviceBase) {
        const a = document.createElement("a");
        a.href = deviceBase + e.coreid;
        a.textContent = label;
        dev.append(a);
      } else {
        dev.textContent = label;
      }
    } else {
      const span = document.createElement("span");
      span.className = "muted";
      span.textContent = e.coreid === "particle-internal" ? "cloud" : "api";
      dev.append(span);
    }
    return tr;
  }

  function wireOlder(log) {
    log.addEventListener("click", (ev) => {
      const link = ev.target.closest("tr.log-more a");
      if (!link) return;
      ev.preventDefault();
      const row = link.closest("tr");
      link.textContent = "Loading…";
      const url = link.getAttribute("href") + (link.getAttribute("href").includes("?") ? "&" : "?") + "fragment=1";
      fetch(url, { credentials: "same-origin" })
        .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
        .then((html) => {
          const tpl = document.createElement("template");
          tpl.innerHTML = "<table><tbody>" + html + "</tbody></table>";
          const fresh = tpl.content.querySelectorAll("tbody > tr");
          row.replaceWith(...fresh);
        })
        .catch(() => { link.textContent = "Could not load older events; try again"; });
    });
  }

  for (const log of $$("[data-live-log]")) {
    wireOlder(log);
    if (log.hasAttribute("data-history-only") || typeof EventSource === "undefined") continue;
    const rows = $("[data-log-rows]", log);
    const state = $("[data-log-state]", log);
    const pause = $("[data-log-pause]", log);
    const clear = $("[data-log-clear]", log);
    const empty = $("[data-log-empty]", log);
    const deviceBase = log.dataset.deviceBase;
    const names = new Map();
    for (const a of $$("td.log-device a", log)) {
      const id = a.getAttribute("href").split("/").pop();
      if (a.textContent !== id) names.set(id, a.textContent);
    }
    const seen = new Set($$("tr[data-event-id]", log).map((tr) => tr.dataset.eventId));
    let paused = false;
    let buffered = [];
    const show = (cls, text) => { state.className = "log-state " + cls; state.textContent = text; };
    const add = (e) => {
      if (empty) empty.remove();
      rows.prepend(eventRow(e, deviceBase, names));
      const all = rows.querySelectorAll("tr[data-event-id]");
      for (let i = MAX_ROWS; i < all.length; i++) all[i].remove();
    };
    const source = new EventSource(log.dataset.stream);
    source.onopen = () => { if (!paused) show("live", "Live"); };
    source.onerror = () => show("down", source.readyState === EventSource.CLOSED ? "Disconnected" : "Reconnecting…");
    source.onmessage = (m) => {
      let e;
      try { e = JSON.parse(m.data); } catch (err) { return; }
      const key = String(e.id);
      if (seen.has(key)) return;
      seen.add(key);
      if (paused) {
        buffered.push(e);
        show("paused", `Paused · ${buffered.length} new event${buffered.length === 1 ? "" : "s"}`);
      } else {
        add(e);
      }
    };
    if (pause) pause.addEventListener("click", () => {
      paused = !paused;
      pause.setAttribute("aria-pressed", String(paused));
      pause.textContent = paused ? "Resume" : "Pause";
      if (paused) {
        show("paused", "Paused");
      } else {
        buffered.forEach(add);
        buffered = [];
        show("live", "Live");
      }
    });
    if (clear) clear.addEventListener("click", () => { for (const tr of $$("tr[data-event-id]", rows)) tr.remove(); });
    window.addEventListener("pagehide", () => source.close());
  }

  // --- the device page: function calls and variable reads in place -------------------------
  for (const form of $$("form[data-call]")) {
    const out = $("[data-call-result]", form);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const button = $("button[type=submit]", form);
      button.disabled = true;
      out.textContent = "Calling…";
      fetch(form.action, { method: "POST", body: new FormData(form), credentials: "same-origin",
                           headers: { Accept: "application/json" } })
        .then((r) => r.json())
        .then((body) => {
          out.textContent = "";
          if (body.ok) {
            const strong = document.createElement("strong");
            strong.className = "mono";
            strong.textContent = String(body.value);
            out.append("Returned ", strong);
          } else {
            const span = document.createElement("span");
            span.className = "error";
            span.textContent = body.error || "The call failed";
            out.append(span);
          }
        })
        .catch(() => { out.textContent = "The call could not be sent; try again."; })
        .finally(() => { button.disabled = false; });
    });
  }
  document.addEventListener("click", (ev) => {
    const link = ev.target.closest("a[data-read]");
    if (!link) return;
    ev.preventDefault();
    const cell = document.querySelector(`[data-var-value="${CSS.escape(link.dataset.read)}"]`);
    if (cell) cell.textContent = "Reading…";
    fetch(link.href, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((r) => r.json())
      .then((body) => {
        if (!cell) return;
        cell.textContent = "";
        if (body.ok) {
          cell.textContent = String(body.value);
        } else {
          const span = document.createElement("span");
          span.className = "error";
          span.textContent = body.error || "The read failed";
          cell.append(span);
        }
        link.textContent = "Refresh";
      })
      .catch(() => { if (cell) cell.textContent = "Could not read; try again."; });
  });
  for (const button of $$("[data-copy]")) {
    button.addEventListener("click", () => {
      const input = document.getElementById(button.dataset.copy);
      if (!input) return;
      input.select();
      const done = () => { button.textContent = "Copied"; };
      if (navigator.clipboard) navigator.clipboard.writeText(input.value).then(done, () => {});
      else if (document.execCommand("copy")) done();
    });
  }

  // --- <details> opened by a link (the firmware upload) ------------------------------------
  for (const link of $$("[data-open-details]")) {
    link.addEventListener("click", (ev) => {
      const box = document.getElementById(link.dataset.openDetails);
      if (!box) return;
      ev.preventDefault();
      box.open = true;
      box.scrollIntoView({ block: "start" });
      const first = $("input:not([type=hidden]), textarea, select", box);
      if (first) first.focus();
    });
  }

  // --- uploads with a progress bar (firmware) -----------------------------------------------
  function showFormErrors(form, fields, general) {
    for (const old of $$(".js-error", form)) old.remove();
    for (const el of $$("[aria-invalid]", form)) el.removeAttribute("aria-invalid");
    const top = document.createElement("div");
    top.className = "alert alert-error js-error";
    top.setAttribute("role", "alert");
    for (const [name, msg] of Object.entries(fields || {})) {
      const input = form.querySelector(`[name="${CSS.escape(name)}"]`);
      if (!input) { (general = general || []).push(msg); continue; }
      input.setAttribute("aria-invalid", "true");
      const p = document.createElement("p");
      p.className = "error js-error";
      p.id = `${input.id}-jserr`;
      p.textContent = msg;
      input.closest(".field").append(p);
      input.setAttribute("aria-describedby", p.id);
    }
    for (const msg of general || []) {
      const p = document.createElement("p");
      p.textContent = msg;
      top.append(p);
    }
    if (top.childNodes.length) form.prepend(top);
  }
  for (const form of $$("form[data-upload]")) {
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const box = $("[data-progress]", form);
      const bar = $("progress", box);
      const label = $("[data-progress-text]", box);
      const button = $("button[type=submit]", form);
      box.hidden = false;
      button.disabled = true;
      const xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.onprogress = (e) => {
        if (!e.lengthComputable) return;
        const pct = Math.round((e.loaded * 100) / e.total);
        bar.value = pct;
        label.textContent = `${pct} % of ${fmt.format(Math.round(e.total / 1024))} KB`;
      };
      xhr.onload = () => {
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch (err) { body = null; }
        if (body && body.ok) { window.location.assign(body.location); return; }
        button.disabled = false;
        box.hidden = true;
        showFormErrors(form, body && body.fields, body ? body.general : [`The upload failed (${xhr.status})`]);
      };
      xhr.onerror = () => { button.disabled = false; label.textContent = "The upload failed; check the connection and try again."; };
      xhr.send(new FormData(form));
    });
  }

  // --- a rollout's progress, refreshed while it is live -----------------------------------
  for (const box of $$("[data-rollout-progress][data-live]")) {
    const url = box.dataset.rolloutProgress;
    const state = $("[data-rollout-state]");
    const tick = () => fetch(url, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.json() : null))
      .then((body) => {
        if (!body) return;
        const p = body.progress;
        for (const el of $$("[data-progress-key]", box)) {
          const v = p[el.dataset.progressKey];
          if (typeof v === "number") el.textContent = fmt.format(v);
        }
        const total = p.targeted || 0;
        let x = 0;
        for (const key of ["updated", "failed", "pending"]) {
          const rect = $(`[data-meter-part=${key}]`, box);
          const w = total ? (p[key] * 100) / total : 0;
          if (rect) { rect.setAttribute("x", x.toFixed(3)); rect.setAttribute("width", w.toFixed(3)); }
          x += w;
        }
        if (state && body.rollout.state) {
          const r = body.rollout;
          const text = r.state.charAt(0).toUpperCase() + r.state.slice(1) + (r.state_reason ? `: ${r.state_reason}` : "");
          if (state.textContent.trim() !== text) state.textContent = text;
        }
        if (!["active", "paused"].includes(body.rollout.state)) clearInterval(timer);
      })
      .catch(() => {});
    const timer = setInterval(tick, 3000);
  }

  // --- file drop zones ---------------------------------------------------------------------
  for (const zone of $$("[data-dropzone]")) {
    const input = $("input[type=file]", zone);
    if (!input) continue;
    ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (ev) => { ev.preventDefault(); zone.classList.add("dragging"); }));
    ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("dragging")));
    zone.addEventListener("drop", (ev) => {
      ev.preventDefault();
      if (ev.dataTransfer && ev.dataTransfer.files.length) input.files = ev.dataTransfer.files;
    });
  }

  // --- group editor: a live preview of a dynamic group's query (debounced, a server-rendered
  // fragment: how many devices match now and the first of them, or where the query is wrong)
  for (const box of $$("[data-preview-url]")) {
    const input = document.getElementById(box.id.replace(/-preview$/, ""));
    if (!input) continue;
    let timer = null;
    let asked = 0;
    const refresh = () => {
      const query = input.value.trim();
      const mine = ++asked;
      if (!query) { box.innerHTML = ""; return; }
      box.setAttribute("aria-busy", "true");
      fetch(box.dataset.previewUrl + "?query=" + encodeURIComponent(query), { credentials: "same-origin" })
        .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
        .then((html) => { if (mine === asked) box.innerHTML = html; })
        .catch(() => { if (mine === asked) box.textContent = "Could not preview this query; try again."; })
        .finally(() => { if (mine === asked) box.removeAttribute("aria-busy"); });
    };
    input.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(refresh, 300);
    });
    // a query already there: previewed when shown (the new-group form sent back with an
    // error), or when an edit menu's field is first focused; never for every group at load
    if (input.value.trim() && input.offsetParent !== null) refresh();
    input.addEventListener("focus", () => { if (!box.innerHTML.trim()) refresh(); });
  }
})();
