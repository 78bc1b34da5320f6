// The console's page: no build step, no framework. Events arrive as Server-Sent Events whose data
// is the swarm.v1 event in proto3 JSON and whose id is its sequence. They are folded into a model
// as they come (cheap), and the DOM is touched once per animation frame for whatever changed, so
// a 100-agent swarm streaming thousands of events a second does not freeze the page.
//
// Ideas, titles and model output are untrusted: they reach the DOM as text nodes, except the
// synthesis, which is Markdown with raw HTML escaped, sanitized by DOMPurify.

import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.js";

const KINDS = [
  "accepted", "planCreated", "subtaskStarted", "subtaskDelta", "subtaskCompleted", "subtaskFailed",
  "synthesisDelta", "swarmCompleted", "swarmFailed", "swarmCancelled", "swarmResumed",
  "partialSynthesis", "answerBudget",
];
// Stop reasons of an answer that was cut off rather than finished.
const CUT_OFF = new Set(["max_tokens", "model_context_window_exceeded"]);
const OUTCOMES = { swarmCompleted: "completed", swarmFailed: "failed", swarmCancelled: "cancelled" };
// When the browser gives up on a stream (the console itself was unreachable), we try again.
const RECONNECT_MS = 2000;
// The synthesis is re-rendered as Markdown at most this often while it streams.
const SYNTHESIS_RENDER_MS = 150;
const HISTORY_PAGE_SIZE = 10;
const SANITIZE = {
  FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "iframe", "svg", "math"],
  FORBID_ATTR: ["style"],
};

const $ = (id) => document.getElementById(id);
const numbers = new Intl.NumberFormat("en");
const escapeHtml = (text) =>
  text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

// Raw HTML in model output is shown as the text it is, never parsed as markup.
marked.use({ gfm: true, renderer: { html: ({ text }) => escapeHtml(text) } });

function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text), SANITIZE);
  for (const link of element.querySelectorAll("a")) {
    link.rel = "noopener noreferrer nofollow";
    link.target = "_blank";
  }
}

const int = (value) => Number(value ?? 0);
const kindOf = (event) => KINDS.find((kind) => kind in event) ?? "";
const formatSeconds = (ms) => (ms < 60_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.floor(ms / 60_000)} min ${Math.round((ms % 60_000) / 1000)} s`);
const stateName = (state) => (state ?? "").replace(/^SWARM_STATE_/, "").toLowerCase() || "unknown";

/** One agent (subtask) as the events tell it. */
class Agent {
  constructor(index, subtask) {
    this.index = index;
    this.id = subtask.id;
    this.title = subtask.title || subtask.id;
    this.state = "queued";
    this.worker = "";
    this.attempt = 0;
    this.chars = 0;
    this.usage = null;
    this.cutOff = false; // the answer stopped at its answer budget
    this.failures = [];
    this.pending = ""; // text not yet in the DOM
    this.restart = false; // a new attempt: the card's text starts afresh
  }
}

/** A swarm folded from its events; `changed` says what the next frame has to draw. */
class SwarmModel {
  constructor(id) {
    this.id = id;
    this.accepted = null;
    this.agents = new Map();
    this.synthesis = "";
    this.synthesisAttempt = 0;
    this.partials = new Map(); // level -> { count, done: Set of partial ids }: a synthesis in parts
    this.outcome = "";
    this.outcomeText = "";
    this.total = null;
    this.spent = { inputTokens: 0, outputTokens: 0, costUsd: 0 };
    this.lastSequence = 0;
    this.started = null;
    this.ended = null;
    this.lastEventTime = null;
    this.lastEventSeenAt = 0;
    this.resumed = false;
    this.changed = new Set();
    this.newPlan = false;
    this.headChanged = true;
    this.synthesisChanged = false;
  }

  get state() {
    if (this.outcome) return this.outcome;
    if (this.synthesis) return "synthesizing";
    if (this.agents.size) return "running";
    return this.accepted ? "planning" : "connecting";
  }

  agent(id) {
    let agent = this.agents.get(id);
    if (!agent) {
      agent = new Agent(this.agents.size + 1, { id, title: id });
      this.agents.set(id, agent);
      this.newPlan = true;
    }
    this.changed.add(agent);
    return agent;
  }

  spend(usage) {
    for (const key of Object.keys(this.spent)) this.spent[key] += Number(usage?.[key] ?? 0);
  }

  apply(event) {
    this.lastSequence = int(event.sequence);
    this.lastEventTime = Date.parse(event.time);
    this.lastEventSeenAt = performance.now();
    this.headChanged = true;
    const kind = kindOf(event);
    const body = event[kind] ?? {};
    switch (kind) {
      case "accepted":
        this.accepted = body;
        this.started = this.lastEventTime;
        break;
      case "planCreated":
        (body.subtasks ?? []).forEach((subtask, i) => this.agents.set(subtask.id, new Agent(i + 1, subtask)));
        this.spend(body.usage);
        this.newPlan = true;
        break;
      case "subtaskStarted": {
        const agent = this.agent(body.subtaskId);
        Object.assign(agent, { state: "running", worker: body.workerId ?? "", attempt: int(body.attempt) });
        Object.assign(agent, { chars: 0, pending: "", restart: true });
        break;
      }
      case "subtaskDelta": {
        const agent = this.agent(body.subtaskId);
        if (int(body.attempt) === agent.attempt) {
          agent.pending += body.text ?? "";
          agent.chars += (body.text ?? "").length;
        }
        break;
      }
      case "subtaskCompleted": {
        const agent = this.agent(body.subtaskId);
        Object.assign(agent, { state: "done", worker: body.workerId ?? agent.worker, usage: body.usage ?? {} });
        agent.cutOff = CUT_OFF.has(body.stopReason ?? "");
        this.spend(body.usage);
        break;
      }
      case "partialSynthesis": {
        const level = this.partials.get(int(body.level)) ?? { count: int(body.count), done: new Set() };
        level.done.add(body.id ?? "");
        this.partials.set(int(body.level), level);
        this.spend(body.usage);
        this.synthesisChanged = true;
        break;
      }
      case "subtaskFailed": {
        const agent = this.agent(body.subtaskId);
        agent.state = body.willRetry ? "retrying" : "failed";
        agent.failures.push({ attempt: int(body.attempt), worker: body.workerId ?? "", error: body.error ?? "", retry: !!body.willRetry });
        break;
      }
      case "synthesisDelta":
        if (int(body.attempt) !== this.synthesisAttempt) {
          this.synthesisAttempt = int(body.attempt);
          this.synthesis = "";
        }
        this.synthesis += body.text ?? "";
        this.synthesisChanged = true;
        break;
      case "swarmResumed":
        this.resumed = true;
        break;
      case "swarmCompleted":
      case "swarmFailed":
      case "swarmCancelled":
        this.outcome = OUTCOMES[kind];
        this.outcomeText = body.error ?? body.reason ?? "";
        if (kind === "swarmCompleted") this.total = body.usage ?? {};
        this.ended = this.lastEventTime;
        this.synthesisChanged = true;
        break;
    }
  }

  elapsedMs() {
    if (this.started === null) return null;
    if (this.ended !== null) return this.ended - this.started;
    // Server time of the last event, plus local time since: no reliance on the two clocks agreeing.
    return this.lastEventTime - this.started + (performance.now() - this.lastEventSeenAt);
  }

  get done() {
    let done = 0;
    for (const agent of this.agents.values()) if (agent.state === "done") done += 1;
    return done;
  }
}

// ---- drawing: once per animation frame, only what changed ------------------------------------

const view = {
  current: null, // { model, source, timer }
  frame: 0,
  lastSynthesisRender: 0,
  cards: new Map(), // Agent -> its card's elements
};

function invalidate() {
  if (!view.frame) view.frame = requestAnimationFrame(draw);
}

function draw(now) {
  view.frame = 0;
  const model = view.current?.model;
  if (!model) return;
  if (model.newPlan) buildCards(model);
  for (const agent of model.changed) drawCard(agent);
  model.changed.clear();
  if (model.headChanged) drawHead(model);
  if (model.synthesisChanged) {
    if (model.outcome || now - view.lastSynthesisRender >= SYNTHESIS_RENDER_MS) {
      drawSynthesis(model);
    } else {
      invalidate(); // drawn on a later frame, once the interval has passed
    }
  }
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function buildCards(model) {
  model.newPlan = false;
  const list = $("cards");
  const fragment = document.createDocumentFragment();
  for (const agent of model.agents.values()) {
    if (view.cards.has(agent)) continue;
    const card = element("li", "card");
    card.dataset.subtaskId = agent.id;
    const head = element("div", "card-head");
    head.append(element("span", "card-num", `${agent.index}`));
    const title = element("h4", "card-title", agent.title);
    title.title = agent.title;
    const badge = element("span", "badge");
    head.append(title, badge);
    const meta = element("p", "card-meta");
    const failures = element("ul", "failures");
    const output = element("div", "output");
    const text = element("div", "text");
    output.append(text);
    card.append(head, meta, failures, output);
    fragment.append(card);
    view.cards.set(agent, { card, badge, meta, failures, text, shownFailures: 0 });
    model.changed.add(agent);
  }
  list.append(fragment);
}

function drawCard(agent) {
  const parts = view.cards.get(agent);
  if (!parts) return;
  parts.card.dataset.state = agent.state;
  parts.badge.textContent = agent.cutOff ? "cut off" : agent.state;
  parts.badge.className = `badge state-${agent.cutOff ? "cut-off" : agent.state}`;
  if (agent.cutOff) parts.badge.title = "The answer stopped at its answer budget (stop reason max_tokens).";
  const meta = [];
  if (agent.worker) meta.push(agent.worker);
  if (agent.attempt) meta.push(`attempt ${agent.attempt}`);
  if (agent.usage) {
    meta.push(`${numbers.format(int(agent.usage.inputTokens))} in / ${numbers.format(int(agent.usage.outputTokens))} out tokens`);
  } else if (agent.chars) {
    meta.push(`~${numbers.format(Math.ceil(agent.chars / 4))} tokens`);
  }
  parts.meta.textContent = meta.join(" · ") || "waiting for a worker";
  for (const failure of agent.failures.slice(parts.shownFailures)) {
    const then = failure.retry ? "retrying" : "gave up";
    parts.failures.append(
      element("li", "", `attempt ${failure.attempt} on ${failure.worker || "?"} failed (${then}): ${failure.error}`),
    );
  }
  parts.shownFailures = agent.failures.length;
  if (agent.restart) {
    parts.text.textContent = "";
    agent.restart = false;
  }
  if (agent.pending) {
    parts.text.append(agent.pending);
    agent.pending = "";
  }
}

function drawHead(model) {
  model.headChanged = false;
  const state = model.state;
  $("swarm-state").textContent = state;
  $("swarm-state").className = `badge state-${state}`;
  if (model.accepted) {
    $("swarm-idea").textContent = model.accepted.idea ?? "";
    const bits = [`${int(model.accepted.numAgents)} agents`, model.accepted.model ?? ""];
    if (int(model.accepted.maxParallel)) bits.push(`at most ${int(model.accepted.maxParallel)} at once`);
    $("swarm-meta").textContent = bits.filter(Boolean).join(" · ");
    const notes = [];
    if (model.accepted.provider === "simulated") notes.push("Simulated provider: no model is called, and every answer begins with [simulated].");
    if (model.resumed) notes.push("Resumed after an orchestrator restart.");
    $("notice").textContent = notes.join(" ");
    $("notice").hidden = notes.length === 0;
  }
  const total = model.agents.size || int(model.accepted?.numAgents);
  const done = model.done;
  const failed = [...model.agents.values()].filter((a) => a.state === "failed").length;
  const progress = $("progress");
  progress.setAttribute("aria-valuemax", `${total}`);
  progress.setAttribute("aria-valuenow", `${done}`);
  progress.dataset.state = state;
  $("progress-fill").style.width = total ? `${(100 * done) / total}%` : "0";
  $("progress-text").textContent = `${done} of ${total} agents done${failed ? ` · ${failed} failed` : ""}`;
  const usage = model.total ?? model.spent;
  $("stat-input").textContent = numbers.format(int(usage.inputTokens));
  $("stat-output").textContent = numbers.format(int(usage.outputTokens));
  $("stat-cost").textContent = `$${Number(usage.costUsd ?? 0).toFixed(4)}`;
  const elapsed = model.elapsedMs();
  $("stat-elapsed").textContent = elapsed === null ? "–" : formatSeconds(Math.max(0, elapsed));
  const outcome = $("outcome");
  outcome.className = `outcome state-${model.outcome}`;
  outcome.textContent =
    model.outcome === "completed" ? `Completed in ${formatSeconds(elapsed)}.`
    : model.outcome === "failed" ? `Failed: ${model.outcomeText}`
    : model.outcome === "cancelled" ? `Cancelled${model.outcomeText ? `: ${model.outcomeText}` : "."}`
    : "";
  $("cancel-button").disabled = !!model.outcome;
  // The history lists this swarm as it was when listed: its badge follows the swarm.
  const listed = document.querySelector(`.history-item[data-swarm-id="${CSS.escape(model.id)}"] .badge`);
  if (listed && model.accepted) {
    listed.textContent = state;
    listed.className = `badge state-${state}`;
  }
}

function drawSynthesis(model) {
  model.synthesisChanged = false;
  view.lastSynthesisRender = performance.now();
  const target = $("synthesis");
  if (model.synthesis) {
    renderMarkdown(target, model.synthesis);
  } else if (model.partials.size && !model.outcome) {
    // Too many outputs for one prompt: they are combined in parts first, level by level.
    const levels = [...model.partials.entries()].sort(([a], [b]) => a - b);
    const progress = levels.map(([level, { count, done }]) => `level ${level}: ${done.size} of ${count}`).join(" · ");
    target.replaceChildren(element("p", "placeholder", `Synthesizing in parts (${progress}).`));
  } else {
    target.replaceChildren(element("p", "placeholder", model.outcome ? "No synthesis." : "The synthesis streams in here once the agents are done."));
  }
  target.setAttribute("aria-busy", model.outcome ? "false" : "true");
}

// The elapsed time moves while a swarm runs, with or without events.
setInterval(() => {
  const model = view.current?.model;
  if (model && model.started !== null && !model.outcome) {
    model.headChanged = true;
    invalidate();
  }
}, 250);

// ---- following a swarm ------------------------------------------------------------------------

function setConnection(text) {
  $("connection").textContent = text;
}

function closeCurrent() {
  const current = view.current;
  if (!current) return;
  current.source?.close();
  clearTimeout(current.timer);
  view.current = null;
}

function resetView() {
  $("cards").replaceChildren();
  view.cards.clear();
  for (const id of ["swarm-idea", "swarm-meta", "outcome", "progress-text"]) $(id).textContent = "";
  $("notice").hidden = true;
  $("synthesis").replaceChildren(element("p", "placeholder", "The synthesis streams in here once the agents are done."));
  setConnection("");
}

async function openSwarm(id, { focus = false } = {}) {
  closeCurrent();
  resetView();
  const model = new SwarmModel(id);
  view.current = { model, source: null, timer: 0 };
  $("swarm-id").textContent = id;
  $("empty").hidden = true;
  $("swarm").hidden = false;
  document.title = `Swarm ${id.slice(0, 8)} · console`;
  if (focus) $("main").focus();
  invalidate();
  let response;
  try {
    response = await fetch(`/api/swarms/${encodeURIComponent(id)}`);
  } catch {
    response = null;
  }
  if (view.current?.model !== model) return; // another swarm was opened meanwhile
  if (!response?.ok) {
    const message = response ? (await response.json().catch(() => ({}))).error : "the console cannot be reached";
    showEmpty(`Cannot open swarm ${id}: ${message || response.statusText}`);
    return;
  }
  follow(model);
}

function follow(model) {
  // The first connect says where the page stands; the browser's own reconnects send Last-Event-ID.
  const source = new EventSource(`/api/swarms/${encodeURIComponent(model.id)}/events?after=${model.lastSequence}`);
  view.current.source = source;
  source.onopen = () => setConnection("");
  source.onmessage = (message) => {
    model.apply(JSON.parse(message.data));
    if (model.outcome) {
      source.close(); // the terminal event is the last one
      setConnection("");
      loadHistory();
    }
    invalidate();
  };
  source.onerror = () => {
    if (model.outcome || view.current?.model !== model) return;
    setConnection("Connection lost; reconnecting…");
    if (source.readyState === EventSource.CLOSED) {
      view.current.timer = setTimeout(() => {
        if (view.current?.model === model && !model.outcome) follow(model);
      }, RECONNECT_MS);
    }
  };
}

function showEmpty(message) {
  closeCurrent();
  $("swarm").hidden = true;
  $("empty").hidden = false;
  $("empty").querySelector("p").textContent = message ?? "Start one with the form, or open one from the history.";
  document.title = "Swarm console";
}

function route({ focus = false } = {}) {
  const match = location.pathname.match(/^\/swarms\/([^/]+)\/?$/);
  if (match) openSwarm(decodeURIComponent(match[1]), { focus });
  else showEmpty();
}

function navigate(path) {
  if (location.pathname !== path) history.pushState(null, "", path);
  route({ focus: true });
}

window.addEventListener("popstate", () => route());

$("cancel-button").addEventListener("click", async () => {
  const model = view.current?.model;
  if (!model) return;
  $("cancel-button").disabled = true;
  const response = await fetch(`/api/swarms/${encodeURIComponent(model.id)}/cancel`, { method: "POST" }).catch(() => null);
  if (!response?.ok) {
    setConnection(`Cancel failed: ${(await response?.json().catch(() => ({})))?.error ?? "the console cannot be reached"}`);
    $("cancel-button").disabled = !!model.outcome;
  }
  // The swarm_cancelled event arrives on the stream like any other.
});

// ---- the form -----------------------------------------------------------------------------------

const FIELD_ERRORS = { idea: "idea-error", num_agents: "agents-error", model: "model-error" };
const FIELD_INPUTS = { idea: "idea", num_agents: "agents", model: "model" };
let maxAgents = 256;

function requestId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function showViolations(violations, fallback) {
  let first = null;
  for (const { field, description } of violations) {
    const errorId = FIELD_ERRORS[field];
    if (errorId) {
      $(errorId).textContent = `${field === "num_agents" ? "Agents" : field[0].toUpperCase() + field.slice(1)} ${description}.`;
      $(FIELD_INPUTS[field]).setAttribute("aria-invalid", "true");
      first ??= $(FIELD_INPUTS[field]);
    } else {
      $("form-error").textContent = `${field}: ${description}`;
    }
  }
  if (!violations.length) $("form-error").textContent = fallback;
  (first ?? $("start-button")).focus();
}

function clearErrors() {
  for (const id of [...Object.values(FIELD_ERRORS), "form-error"]) $(id).textContent = "";
  for (const id of Object.values(FIELD_INPUTS)) $(id).removeAttribute("aria-invalid");
}

$("start-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  const idea = $("idea").value;
  const agents = Number($("agents").value);
  const violations = [];
  if (!idea.trim()) violations.push({ field: "idea", description: "must not be empty" });
  if (!Number.isInteger(agents) || agents < 1 || agents > maxAgents) {
    violations.push({ field: "num_agents", description: `must be a whole number from 1 to ${maxAgents}` });
  }
  if (violations.length) return showViolations(violations, "");
  const button = $("start-button");
  button.disabled = true;
  button.textContent = "Starting…";
  try {
    const response = await fetch("/api/swarms", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ idea, numAgents: agents, model: $("model").value.trim(), requestId: requestId() }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) return showViolations(body.violations ?? [], body.error ?? response.statusText);
    navigate(`/swarms/${encodeURIComponent(body.swarmId)}`);
    loadHistory();
  } catch {
    showViolations([], "The console cannot be reached.");
  } finally {
    button.disabled = false;
    button.textContent = "Start swarm";
  }
});

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    const info = await response.json();
    if (!response.ok) throw new Error(info.error ?? response.statusText);
    maxAgents = int(info.maxAgents) || maxAgents;
    $("agents").max = `${maxAgents}`;
    $("agents-hint").textContent = `1 to ${maxAgents}`;
    $("model").placeholder = info.defaultModel ?? "";
    $("model-hint").textContent = `default: ${info.defaultModel ?? "the server's"}`;
    $("server").textContent = `${info.provider === "simulated" ? "simulated provider" : info.provider} · up to ${maxAgents} agents`;
    $("server").dataset.provider = info.provider ?? "";
  } catch (error) {
    $("server").textContent = `Orchestrator unreachable: ${error.message}`;
    $("server").dataset.provider = "down";
  }
}

// ---- history ------------------------------------------------------------------------------------

const pages = { tokens: [""], index: 0, next: "" };
let historyAsked = 0; // only the latest listing is shown: an older answer may arrive after it

async function loadHistory() {
  const asked = ++historyAsked;
  const params = new URLSearchParams({ page_size: `${HISTORY_PAGE_SIZE}`, page_token: pages.tokens[pages.index] });
  const state = $("history-state").value;
  if (state) params.set("state", state);
  let body;
  try {
    const response = await fetch(`/api/swarms?${params}`);
    body = await response.json();
    if (!response.ok) throw new Error(body.error ?? response.statusText);
  } catch (error) {
    if (asked === historyAsked) $("history-error").textContent = `Cannot list swarms: ${error.message}`;
    return;
  }
  if (asked !== historyAsked) return;
  $("history-error").textContent = "";
  // A keyboard user on a link keeps their place when the list is drawn anew.
  const focused = document.activeElement?.closest?.(".history-item")?.dataset.swarmId;
  pages.next = body.nextPageToken ?? "";
  const items = (body.swarms ?? []).map((swarm) => {
    const item = element("li", "history-item");
    item.dataset.swarmId = swarm.swarmId;
    const link = element("a", "history-link", swarm.idea || "(no idea)");
    link.href = `/swarms/${encodeURIComponent(swarm.swarmId)}`;
    const state = stateName(swarm.state);
    const created = swarm.createTime ? new Date(swarm.createTime).toLocaleString() : "";
    const meta = element("span", "history-meta", `${int(swarm.numAgents)} agents · ${created}`);
    item.append(link, element("span", `badge state-${state}`, state), meta);
    return item;
  });
  $("history-list").replaceChildren(...(items.length ? items : [element("li", "history-none", "No swarms here yet.")]));
  if (focused) {
    document.querySelector(`.history-item[data-swarm-id="${CSS.escape(focused)}"] .history-link`)?.focus();
  }
  $("history-newer").disabled = pages.index === 0;
  $("history-older").disabled = !pages.next;
}

$("history-list").addEventListener("click", (event) => {
  const link = event.target.closest("a.history-link");
  if (!link || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  navigate(new URL(link.href).pathname);
});
$("history-state").addEventListener("change", () => {
  Object.assign(pages, { tokens: [""], index: 0, next: "" });
  loadHistory();
});
$("history-older").addEventListener("click", () => {
  if (!pages.next) return;
  pages.tokens[pages.index + 1] = pages.next;
  pages.index += 1;
  loadHistory();
});
$("history-newer").addEventListener("click", () => {
  if (pages.index === 0) return;
  pages.index -= 1;
  loadHistory();
});

loadInfo();
loadHistory();
route();
