// The console's few live parts: forms and buttons that call /api/v1 with the session's CSRF
// token, and sections that refresh themselves. No framework, no build step.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

function formBody(form) {
  const body = {};
  for (const field of form.elements) {
    if (!field.name || field.disabled || field.type === "submit") continue;
    if (field.type === "checkbox") {
      if (!field.checked) continue;
      (body[field.name] = body[field.name] || []).push(field.value);
      continue;
    }
    let value = field.value.trim();
    if (value === "") continue;
    if (field.hasAttribute("data-number")) value = Number(value);
    if (field.hasAttribute("data-lines")) value = value.split(/\s+/).filter(Boolean);
    const dot = field.name.indexOf(".");
    if (dot > 0) {
      const group = field.name.slice(0, dot);
      (body[group] = body[group] || {})[field.name.slice(dot + 1)] = value;
    } else {
      body[field.name] = value;
    }
  }
  return body;
}

function fill(template, answer) {
  return template.replace(/\{(\w+)\}/g, (_, key) => encodeURIComponent(answer[key] ?? ""));
}

function cell(value) {
  if (value === null || value === undefined) return "";
  return Array.isArray(value) ? value.join("\\") : String(value);
}

function showTable(output, answer) {
  const rows = [];
  for (const peer of answer.answers || []) {
    if (peer.error) rows.push({ peer: peer.peer, error: peer.error });
    for (const match of peer.matches) rows.push({ peer: peer.peer, ...match });
  }
  const columns = [...new Set(rows.flatMap((row) => Object.keys(row)))];
  const table = document.createElement("table");
  table.className = "answers";
  const head = table.insertRow();
  for (const column of columns) {
    const th = document.createElement("th");
    th.textContent = column;
    head.appendChild(th);
  }
  for (const row of rows) {
    const tr = table.insertRow();
    for (const column of columns) tr.insertCell().textContent = cell(row[column]);
  }
  output.replaceChildren(table);
  if (!rows.length) output.textContent = "No matches.";
}

async function call(element, spec, body) {
  const [method, url] = spec.split(" ");
  const output = element.closest("form")?.querySelector("output") || element.parentElement.querySelector("output");
  if (element.dataset.confirm && !window.confirm(element.dataset.confirm)) return;
  if (output) output.textContent = "…";
  const response = await fetch(url, {
    method,
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
    body: method === "GET" ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  const text = await response.text();
  let answer;
  try { answer = JSON.parse(text); } catch { answer = { error: text }; }
  const then = element.dataset.then || "";
  if (!response.ok) {
    if (output) { output.className = "bad"; output.textContent = answer.error || `${response.status}`; }
    else window.alert(answer.error || `${response.status}`);
    return;
  }
  if (then === "reload") window.location.reload();
  else if (then.startsWith("go:")) window.location.assign(fill(then.slice(3), answer));
  else if (then === "table" && output) { output.className = "ok"; showTable(output, answer); }
  else if (output) { output.className = "ok"; output.textContent = JSON.stringify(answer, null, 1); }
}

document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!form.dataset.api) return;
  event.preventDefault();
  const spec = event.submitter?.dataset.apiSubmit || form.dataset.api;
  call(form, spec, formBody(form));
});

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-api]");
  if (!button) return;
  event.preventDefault();
  call(button, button.dataset.api, button.dataset.body ? JSON.parse(button.dataset.body) : {});
});

for (const live of document.querySelectorAll("[data-refresh]")) {
  const seconds = Number(live.dataset.refresh) || 5;
  setInterval(async () => {
    if (document.hidden) return;
    const response = await fetch(window.location.href, { credentials: "same-origin" });
    if (!response.ok) return;
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = page.getElementById(live.id);
    if (fresh) live.replaceChildren(...fresh.childNodes);
  }, seconds * 1000);
}
