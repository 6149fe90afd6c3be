// The chat page. It connects to a random io-node of window.SIOCLUSTER (from /config.js) and,
// when that io-node goes away, to another one by itself: it asks /config.json for the io-nodes
// alive now, avoids the ones that just failed, and joins the room it was in again.
// `?io=8082` (a port or a URL) prefers one io-node, for trying the failover by hand.
(function () {
  "use strict";

  const RETRY_MIN = 200;        // ms before the first attempt at another io-node
  const RETRY_MAX = 5000;       // the wait doubles up to this while none answers
  const AVOID_FOR = 30000;      // ms an io-node that failed is not tried again
  const ACK_TIMEOUT = 10000;    // ms to wait for the server's answer to join or say

  const configUrl = document.body.dataset.configUrl;
  const preferred = new URLSearchParams(location.search).get("io");
  const el = (id) => document.getElementById(id);
  const joinForm = el("join-form");
  const sayForm = el("say-form");

  let servers = (window.SIOCLUSTER && window.SIOCLUSTER.ioServers) || [];
  const failedAt = new Map();   // io-node url -> when it failed
  let socket = null;
  let joined = null;            // {name, room} once the server accepted a join
  let retry = RETRY_MIN;
  let timer = null;
  const seen = new Set();       // ids of the messages shown

  function status(text, state, url) {
    const node = el("status");
    node.textContent = text;
    node.dataset.state = state;
    node.dataset.url = url || "";
  }

  function showError(text) {
    el("error").textContent = text || "";
  }

  function pick() {
    const now = Date.now();
    let usable = servers.filter((s) => !(now - (failedAt.get(s.url) || -Infinity) < AVOID_FOR));
    if (!usable.length) usable = servers;
    const wanted = usable.find((s) => preferred && (s.url === preferred || String(s.port) === preferred));
    return wanted || usable[Math.floor(Math.random() * usable.length)];
  }

  async function refreshServers() {
    try {
      const response = await fetch(configUrl, { cache: "no-store" });
      const data = await response.json();
      if (response.ok && data.ioServers.length) servers = data.ioServers;
    } catch (e) {
      // the frontend-node is unreachable too: keep the list we have
    }
  }

  function connect() {
    const server = pick();
    if (!server) {
      status("no io-node is up; retrying…", "down");
      schedule();
      return;
    }
    status("connecting to " + server.url + "…", "connecting", server.url);
    // reconnection is ours: socket.io's own would only ever retry the same io-node
    const s = io(server.url, { reconnection: false, forceNew: true, timeout: 5000 });
    socket = s;
    s.on("connect", () => {
      retry = RETRY_MIN;
      status("connected to " + server.url, "connected", server.url);
      if (joined) join(joined.name, joined.room, true);
    });
    s.on("disconnect", (reason) => {
      if (reason !== "io client disconnect") lost(s, server, reason);
    });
    s.on("connect_error", (err) => lost(s, server, err.message));
    s.on("said", onSaid);
    s.on("presence", onPresence);
  }

  function lost(s, server, why) {
    if (s !== socket) return;
    failedAt.set(server.url, Date.now());
    s.off();
    s.close();
    socket = null;
    status("lost " + server.url + " (" + why + "); switching io-node…", "reconnecting");
    schedule();
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      await refreshServers();
      connect();
    }, retry);
    retry = Math.min(retry * 2, RETRY_MAX);
  }

  function request(event, payload, done) {
    if (!socket || !socket.connected) {
      showError("not connected to an io-node yet; try again in a moment");
      return;
    }
    socket.timeout(ACK_TIMEOUT).emit(event, payload, (err, answer) => {
      if (err) showError("no answer from the server; try again");
      else if (!answer.ok) showError(answer.error);
      else {
        showError("");
        done(answer);
      }
    });
  }

  function join(name, room, again) {
    request("join", { name, room }, (answer) => {
      const sameRoom = again && joined && joined.room === answer.room;
      joined = { name: name.trim(), room: answer.room };
      el("room").textContent = "Room: " + answer.room;
      if (!sameRoom) {
        el("messages").textContent = "";
        seen.clear();
      }
      // after a reconnect: what was said meanwhile is in the history, the rest is shown
      answer.history.forEach(addMessage);
      showMembers(answer.members);
    });
  }

  function addMessage(message) {
    if (seen.has(message.id)) return;
    seen.add(message.id);
    const item = document.createElement("li");
    item.className = "message";
    item.dataset.id = message.id;
    const time = document.createElement("time");
    time.textContent = new Date(message.ts).toLocaleTimeString();
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = message.name;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = message.text;
    item.append(time, name, text);
    appendToMessages(item);
  }

  function addNotice(text) {
    const item = document.createElement("li");
    item.className = "notice";
    item.textContent = text;
    appendToMessages(item);
  }

  function appendToMessages(item) {
    const list = el("messages");
    list.appendChild(item);
    list.scrollTop = list.scrollHeight;
  }

  function showMembers(names) {
    const list = el("members");
    list.textContent = "";
    for (const name of names) {
      const item = document.createElement("li");
      item.textContent = name;
      list.appendChild(item);
    }
  }

  function onSaid(message) {
    if (joined && message.room === joined.room) addMessage(message);
  }

  function onPresence(presence) {
    if (!joined || presence.room !== joined.room) return;
    showMembers(presence.members);
    if (presence.joined && presence.joined !== joined.name) addNotice(presence.joined + " joined");
    if (presence.left && presence.left !== joined.name) addNotice(presence.left + " left");
  }

  joinForm.addEventListener("submit", (event) => {
    event.preventDefault();
    join(joinForm.elements.name.value, joinForm.elements.room.value, false);
  });

  sayForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const input = sayForm.elements.text;
    request("say", { text: input.value }, () => {
      input.value = "";
    });
  });

  if (typeof io === "undefined") {
    status("the Socket.IO client did not load (/socket.io.min.js); reload the page", "down");
  } else {
    connect();
  }
})();
