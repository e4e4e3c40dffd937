/**
 * The kalphite web todo app: the same todo model as `kalphite todo` (kind `todo`, data
 * `{title, status, priority, due?, tags, projectId?, createdAt}`), local-first on
 * IndexedDB, synced with the server that serves it. Settings come from the URL:
 * `?room=todo&user=alice&token=…` (`server=ws://…` to sync with another server).
 */

import { type CollectionEvent, type ConflictPayload, type Entity, FrontendDatabase } from "../src/index.js";

interface Todo {
  title: string;
  status: "pending" | "in-progress" | "completed" | "cancelled";
  priority: "low" | "medium" | "high" | "urgent";
  due?: string;
  tags: string[];
  projectId?: string;
  createdAt: number;
}

const RANK = { low: 0, medium: 1, high: 2, urgent: 3 } as const;
const MARK = { low: " ", medium: "!", high: "!!", urgent: "!!!" } as const;

const params = new URLSearchParams(location.search);
const room = params.get("room") ?? "todo";
const user = params.get("user") ?? "me";
const token = params.get("token") ?? undefined;
const server = params.get("server") ?? `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}`;

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

const finished = (t: Todo) => t.status === "completed" || t.status === "cancelled";

/** The CLI's display order: open first, most urgent, oldest, then by id. */
function order(a: Entity<Todo>, b: Entity<Todo>): number {
  return (
    Number(finished(a.data)) - Number(finished(b.data)) ||
    RANK[b.data.priority] - RANK[a.data.priority] ||
    a.data.createdAt - b.data.createdAt ||
    (a.id < b.id ? -1 : a.id > b.id ? 1 : 0)
  );
}

function newId(): string {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

const db = new FrontendDatabase({
  dbName: `kalphite-todo:${room}:${user}`,
  sync: { wsUrl: server, roomId: room, userId: user, authToken: token },
});
const todos = db.collection<Todo>("todo");
const conflicts: ConflictPayload[] = [];

function render(): void {
  $("room").textContent = `${user} in ${room}`;
  const status = db.connectionStatus();
  const pending = db.offlineQueueSize();
  const state = $("state");
  state.textContent = `${status}${pending > 0 ? `, ${pending} pending` : ""}`;
  state.className = status;
  const list = $("list");
  list.replaceChildren(
    ...[...todos].sort(order).map((t, i) => {
      const li = document.createElement("li");
      li.dataset.id = t.id;
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = t.data.status === "completed";
      box.onchange = () => todos.upsert(t.id, { ...t.data, status: box.checked ? "completed" : "pending" });
      const title = document.createElement("span");
      title.className = `title ${finished(t.data) ? "done" : ""}`;
      title.textContent = `${i + 1}. ${t.data.title}`;
      const meta = document.createElement("small");
      meta.textContent = ` ${MARK[t.data.priority] ?? ""}${t.data.due ? ` due ${t.data.due}` : ""}${t.data.tags?.length ? ` #${t.data.tags.join(" #")}` : ""}`;
      const del = document.createElement("button");
      del.textContent = "delete";
      del.onclick = () => todos.delete(t.id);
      li.append(box, title, meta, del);
      return li;
    }),
  );
  const box = $("conflicts");
  box.hidden = conflicts.length === 0;
  box.replaceChildren(
    ...conflicts.map((c) => {
      const div = document.createElement("div");
      const yours = c.yours.entity?.data as Todo | undefined;
      const theirs = c.theirs.entity?.data as Todo | undefined;
      // The status too: the usual conflict is one side completing what the other edited.
      const show = (t: Todo | undefined) => (t ? `"${t.title}" (${t.status})` : "(deleted)");
      div.textContent = `Conflict on "${yours?.title ?? theirs?.title ?? c.yours.entityId}": yours ${show(yours)}, theirs ${show(theirs)} `;
      for (const [label, keep] of [["keep mine", "yours"], ["keep theirs", "theirs"]] as const) {
        const b = document.createElement("button");
        b.textContent = label;
        // Writes the pick; every tab, this one included, hears `conflictResolved`.
        b.onclick = () => db.resolveConflict(c, keep);
        div.append(b);
      }
      return div;
    }),
  );
}

$<HTMLFormElement>("add").onsubmit = (e) => {
  e.preventDefault();
  const input = $<HTMLInputElement>("title");
  const title = input.value.trim();
  if (!title) return;
  const priority = $<HTMLSelectElement>("priority").value as Todo["priority"];
  todos.upsert(newId(), { title, status: "pending", priority, tags: [], createdAt: Date.now() });
  input.value = "";
};

todos.subscribe((_e: CollectionEvent<Todo>) => render());
db.on("error", (e) => {
  $("error").textContent = e.message;
});
// On the database rather than on `db.sync`: a follower tab has no sync engine of its own,
// and the leader's conflicts and status reach every tab, including one that takes over.
db.on("conflict", (c) => {
  if (c.strategy === "manual") conflicts.push(c);
  render();
});
// Settled here or in another tab: the pick dominates every version shown of the entity.
db.on("conflictResolved", ({ conflict }) => {
  const { entityType, entityId } = conflict.yours;
  for (let i = conflicts.length - 1; i >= 0; i--) {
    if (conflicts[i]!.yours.entityType === entityType && conflicts[i]!.yours.entityId === entityId) conflicts.splice(i, 1);
  }
  render();
});
db.on("status", () => render());
await db.init();
render();
// The server's worker (app/sw.js) keeps a copy of this page, so that a reload while the
// server is unreachable still opens the app on what IndexedDB holds. Without one (not
// served by kalphite, or not a secure context) the app only opens online, as before.
navigator.serviceWorker?.register("/sw.js").catch(() => undefined);
(window as unknown as { kalphiteApp: unknown }).kalphiteApp = { db, todos };
