// The smtpproxy mailbox page: draws the list and one message from the JSON API.
// No framework and no build step.  Message data is only ever put into the page
// as text (textContent), never as markup; the HTML body goes into a sandboxed
// iframe loaded from /view/<id>.html, whose own CSP blocks scripts and requests.
"use strict";

(function () {
  const PAGE = 50;
  const $ = (id) => document.getElementById(id);
  let start = 0;
  let query = "";
  let current = null;

  function text(node, value) { node.textContent = value == null ? "" : String(value); }

  function who(list) {
    if (!list) return "";
    if (!Array.isArray(list)) list = [list];
    return list.map((a) => (a.Name ? a.Name + " <" + a.Address + ">" : a.Address)).join(", ");
  }

  function size(bytes) {
    if (bytes < 1024) return bytes + " B";
    const units = ["KiB", "MiB", "GiB"];
    let value = bytes;
    let unit = "B";
    for (const u of units) { if (value < 1024) break; value /= 1024; unit = u; }
    return value.toFixed(1) + " " + unit;
  }

  function when(iso) {
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }

  async function api(method, path, body) {
    const options = { method: method, headers: {} };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(path, options);
    if (!response.ok) throw new Error((await response.text()) || response.statusText);
    const type = response.headers.get("content-type") || "";
    return type.startsWith("application/json") ? response.json() : response.text();
  }

  function status(message) { text($("status"), message); }

  async function loadList() {
    const path = query
      ? "/api/v1/search?query=" + encodeURIComponent(query) + "&start=" + start + "&limit=" + PAGE
      : "/api/v1/messages?start=" + start + "&limit=" + PAGE;
    let data;
    try { data = await api("GET", path); } catch (e) { status(e.message); return; }
    const body = $("list").tBodies[0];
    body.replaceChildren();
    for (const m of data.messages) body.appendChild(row(m));
    $("empty").hidden = data.messages.length > 0;
    const last = Math.min(start + data.messages.length, data.messages_count);
    text($("range"), data.messages_count ? (start + 1) + "–" + last + " of " + data.messages_count : "");
    $("newer").disabled = start === 0;
    $("older").disabled = last >= data.messages_count;
    status(data.total + " message" + (data.total === 1 ? "" : "s") + (data.unread ? ", " + data.unread + " unread" : ""));
  }

  function row(m) {
    const tr = document.createElement("tr");
    tr.dataset.id = m.ID;
    if (!m.Read) tr.className = "unread";
    const cells = [who(m.From), who(m.To), null, when(m.Created), size(m.Size), m.Attachments ? String(m.Attachments) : ""];
    cells.forEach((value, i) => {
      const td = document.createElement("td");
      if (i === 2) {
        td.className = "subject";
        text(td, m.Subject || "(no subject)");
        const span = document.createElement("span");
        span.className = "snippet";
        text(span, m.Snippet);
        td.appendChild(span);
      } else {
        text(td, value);
      }
      if (i === 5 && m.Attachments) { td.title = m.Attachments + " attachment(s)"; td.className = "badge"; }
      tr.appendChild(td);
    });
    tr.addEventListener("click", () => { location.hash = "#" + encodeURIComponent(m.ID); });
    return tr;
  }

  async function showMessage(id) {
    let m;
    try { m = await api("GET", "/api/v1/message/" + encodeURIComponent(id)); } catch (e) { status(e.message); return; }
    current = m;
    $("list-pane").hidden = true;
    $("message-pane").hidden = false;
    text($("m-subject"), m.Subject || "(no subject)");
    text($("m-from"), who(m.From));
    text($("m-to"), who(m.To));
    text($("m-cc"), who(m.Cc));
    $("m-cc").hidden = $("m-cc-label").hidden = !m.Cc.length;
    text($("m-date"), when(m.Date));
    text($("m-size"), size(m.Size));
    $("download").href = "/api/v1/message/" + encodeURIComponent(m.ID) + "/raw?dl=1";
    text($("tab-text"), m.Text || "(no text body)");
    const frame = $("html-frame");
    frame.hidden = !m.HTML;
    $("no-html").hidden = !!m.HTML;
    frame.src = m.HTML ? "/view/" + encodeURIComponent(m.ID) + ".html" : "about:blank";
    const headers = $("tab-headers").tBodies[0];
    headers.replaceChildren();
    api("GET", "/api/v1/message/" + encodeURIComponent(m.ID) + "/headers").then((h) => {
      for (const [name, values] of Object.entries(h)) {
        for (const value of values) {
          const tr = document.createElement("tr");
          const a = document.createElement("td");
          const b = document.createElement("td");
          text(a, name);
          text(b, value);
          tr.append(a, b);
          headers.appendChild(tr);
        }
      }
    });
    api("GET", "/api/v1/message/" + encodeURIComponent(m.ID) + "/raw").then((raw) => text($("tab-raw"), raw));
    const list = $("tab-attachments");
    list.replaceChildren();
    for (const part of [...m.Attachments, ...m.Inline]) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = "/api/v1/message/" + encodeURIComponent(m.ID) + "/part/" + encodeURIComponent(part.PartID);
      text(a, part.FileName || "part " + part.PartID);
      li.appendChild(a);
      li.appendChild(document.createTextNode(" (" + part.ContentType + ", " + size(part.Size) + (part.ContentID ? ", inline" : "") + ")"));
      list.appendChild(li);
    }
    if (!list.children.length) { const li = document.createElement("li"); text(li, "No attachments."); list.appendChild(li); }
    tab(m.HTML ? "html" : "text");
    refreshStatus();
  }

  async function refreshStatus() {
    try {
      const info = await api("GET", "/api/v1/info");
      status(info.Messages + " message" + (info.Messages === 1 ? "" : "s") + (info.Unread ? ", " + info.Unread + " unread" : ""));
    } catch (e) { status(e.message); }
  }

  function tab(name) {
    for (const button of $("tabs").querySelectorAll("button")) {
      button.setAttribute("aria-selected", String(button.dataset.tab === name));
    }
    for (const pane of document.querySelectorAll(".tab")) pane.hidden = pane.id !== "tab-" + name;
  }

  function route() {
    const id = decodeURIComponent(location.hash.slice(1));
    if (id) { showMessage(id); return; }
    current = null;
    $("message-pane").hidden = true;
    $("list-pane").hidden = false;
    loadList();
  }

  function wire() {
    $("search").addEventListener("submit", (e) => { e.preventDefault(); query = $("query").value.trim(); start = 0; location.hash = ""; loadList(); });
    $("newer").addEventListener("click", () => { start = Math.max(0, start - PAGE); loadList(); });
    $("older").addEventListener("click", () => { start += PAGE; loadList(); });
    $("back").addEventListener("click", () => { location.hash = ""; });
    $("tabs").addEventListener("click", (e) => { if (e.target.dataset && e.target.dataset.tab) tab(e.target.dataset.tab); });
    $("remote").addEventListener("click", () => {
      if (current && current.HTML) $("html-frame").src = "/view/" + encodeURIComponent(current.ID) + ".html?remote=1";
    });
    $("delete").addEventListener("click", async () => {
      if (!current) return;
      await api("DELETE", "/api/v1/messages", { IDs: [current.ID] });
      location.hash = "";
    });
    $("delete-all").addEventListener("click", async () => {
      if (!confirm("Delete every message?")) return;
      await api("DELETE", "/api/v1/messages");
      location.hash = "";
      loadList();
    });
    $("release").addEventListener("submit", async (e) => {
      e.preventDefault();
      if (!current) return;
      const to = $("release-to").value.split(/[\s,;]+/).filter(Boolean);
      try { await api("POST", "/api/v1/message/" + encodeURIComponent(current.ID) + "/release", { To: to }); status("released to " + to.length + " recipient(s)"); }
      catch (err) { status(err.message); }
    });
    window.addEventListener("hashchange", route);
    if (window.EventSource) {
      const events = new EventSource("/events");
      events.addEventListener("new", () => { if (!current) loadList(); else status("new mail arrived"); });
    }
  }

  wire();
  route();
})();
