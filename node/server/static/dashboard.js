// The node's dashboard: renders /dashboard/events (server-sent state) and asks skills.
// Plain DOM code, no library: the node may run offline. Text goes in with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);

function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function seconds(s) {
  if (s == null) return "–";
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function ago(unix) {
  if (!unix) return "–";
  return `${seconds(Math.max(0, Date.now() / 1000 - unix))} ago`;
}

function short(text, n = 14) {
  if (!text) return "–";
  return text.length > n ? `${text.slice(0, n)}…` : text;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fillTable(id, items, render) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...items.map((item) => {
    const row = document.createElement("tr");
    render(row, item);
    return row;
  }));
}

function budget(barId, used, limit) {
  $(barId).style.width = limit ? `${Math.min(100, (100 * used) / limit).toFixed(1)}%` : "0";
}

function savedText(part) {
  return `${part.prefill_tokens_avoided} tokens not prefilled · ${part.tasks} tasks · ` +
    `${part.sessions} sessions · ${part.prefilled_tokens} prefilled`;
}

function renderTask(row, t) {
  cell(row, t.task_id);
  cell(row, t.skill);
  cell(row, short(t.agent_id, 28), "mono");
  cell(row, t.state);
  const prefill = cell(row, "");
  if (t.prefill_total) {
    const bar = document.createElement("span");
    bar.className = "progress";
    const fill = document.createElement("div");
    fill.style.width = `${(100 * t.prefill_done) / t.prefill_total}%`;
    bar.appendChild(fill);
    prefill.append(bar, `${t.prefill_done} / ${t.prefill_total}`);
  } else {
    prefill.textContent = t.state === "queued" ? "waiting" : "from cache";
  }
  cell(row, `${t.pieces} tokens`);
  cell(row, seconds(t.elapsed_s));
}

function renderContext(row, c) {
  cell(row, c.skill || c.api || "–");
  cell(row, short(c.context_id, 18), "mono");
  cell(row, short(c.agent_id, 30), "mono");
  cell(row, c.in_memory ? "memory + disk" : "disk");
  cell(row, c.tokens);
  cell(row, c.in_memory ? bytes(c.bytes_in_memory) : "–");
  cell(row, bytes(c.bytes_on_disk));
  cell(row, c.turns);
  cell(row, c.restores);
  cell(row, ago(c.last_used));
}

function renderMember(row, m) {
  cell(row, m.url, "mono");
  cell(row, m.skills ? m.skills.join(", ") : "unreachable");
  cell(row, m.via);
}

function renderTool(row, t) {
  cell(row, t.name, "mono");
  cell(row, short(t.description, 60));
  cell(row, t.server, "mono");
}

let skillsShown = "";

function render(state) {
  const node = state.node;
  $("node-line").textContent = `${node.url} · ${node.model || "model loading"} · ${node.status}`;
  const skills = node.skills.join(",");
  if (skills !== skillsShown) {
    skillsShown = skills;
    $("ask-skill").replaceChildren(...node.skills.map((s) => new Option(s, s)));
  }
  if (!state.memory) return;
  const m = state.memory, d = state.disk, saved = state.saved;
  $("memory-bytes").textContent = bytes(m.bytes);
  $("memory-detail").textContent =
    `of ${bytes(m.budget_bytes)} · ${m.agents} of ${m.max_agents} agents · ${m.tokens} tokens`;
  budget("memory-bar", m.bytes, m.budget_bytes);
  $("disk-bytes").textContent = bytes(d.bytes);
  $("disk-detail").textContent =
    `${d.budget_bytes ? `of ${bytes(d.budget_bytes)} · ` : ""}${d.agents} agents · ${d.tokens} tokens`;
  budget("disk-bar", d.bytes, d.budget_bytes);
  $("saved-today").textContent = seconds(saved.today.seconds_saved);
  $("saved-today-detail").textContent = savedText(saved.today);
  $("saved-overall").textContent = seconds(saved.overall.seconds_saved);
  $("saved-overall-detail").textContent = savedText(saved.overall);
  fillTable("tasks", state.tasks, renderTask);
  $("task-count").textContent = state.tasks.length;
  $("tasks-empty").hidden = state.tasks.length > 0;
  fillTable("contexts", state.contexts, renderContext);
  $("context-count").textContent = state.contexts.length;
  fillTable("network", state.network, renderMember);
  fillTable("mcp-tools", state.mcp_tools, renderTool);
  $("mcp-tools-empty").hidden = state.mcp_tools.length > 0;
}

function connect() {
  const events = new EventSource("/dashboard/events");
  events.addEventListener("state", (e) => {
    $("live").textContent = "live";
    $("live").className = "badge on";
    render(JSON.parse(e.data));
  });
  events.onerror = () => {
    $("live").textContent = "reconnecting";
    $("live").className = "badge off";
  };
}

async function ask(event) {
  event.preventDefault();
  const button = $("ask-button");
  button.disabled = true;
  $("ask-answer").textContent = "…";
  $("ask-usage").textContent = "";
  try {
    const response = await fetch("/dashboard/ask", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        skill: $("ask-skill").value,
        question: $("ask-question").value,
        context_id: $("ask-context").value || null,
      }),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    $("ask-answer").textContent = body.answer;
    $("ask-context").value = body.context_id; // a follow-up continues this conversation
    const u = body.usage;
    $("ask-usage").textContent = `prompt ${u.promptTokens} tokens, ${u.cachedTokens} from cache, ` +
      `${u.generatedTokens} generated, prefill ${seconds(u.prefillSeconds)}`;
  } catch (error) {
    $("ask-answer").textContent = `error: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

$("ask").addEventListener("submit", ask);
connect();
