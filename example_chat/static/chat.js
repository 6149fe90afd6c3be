// The chat page. It keeps one Socket.IO socket for its whole life, first connected to an io-node
// of window.SIOCLUSTER (from /config.js). When the connection drops, socket.io's own
// reconnection tries again, and right before each attempt the page points it at an io-node of
// the live list (/config.json), avoiding the ones that just failed. The same socket back within
// the server's recovery window (RECOVERY_WINDOW) gets its session back: the same id, still in
// its room, and every message it missed, so it joins nothing again. Later than that, it is a
// new client and joins its room again (what was said meanwhile comes in the room's history).
// An io-node behind a reverse proxy comes with a path (/io/1/socket.io/ of the proxy's host
// name, say): the socket is given it too, and each attempt is pointed at both, URL and path.
// `?io=8082` (a port, a URL or a path) prefers one io-node, for trying the failover by hand.
// window.chatSocket is the socket, window.chatState what happened to it (for the tests).
(function () {
  "use strict";

  const RECONNECT_DELAY = 500;       // ms before the first attempt after a drop (±50%)
  const RECONNECT_DELAY_MAX = 3000;  // the wait doubles up to this while none answers
  const CONNECT_TIMEOUT = 5000;      // ms an attempt may take
  const AVOID_FOR = 30000;           // ms an io-node that failed is not tried again
  const ACK_TIMEOUT = 10000;         // ms to wait for the server's answer to join or say
  const LIST_RETRY = 2000;           // ms between looks at /config.json while it lists none

  const configUrl = document.body.dataset.configUrl;
  const preferred = new URLSearchParams(location.search).get("io");
  const el = (id) => document.getElementById(id);
  const joinForm = el("join-form");
  const sayForm = el("say-form");

  let servers = (window.SIOCLUSTER && window.SIOCLUSTER.ioServers) || [];
  const failedAt = new Map();   // io-node (its key) -> when it failed
  let socket = null;
  let current = null;           // key of the io-node the socket uses or tries
  let everConnected = false;
  let joined = null;            // {name, room} once the server accepted a join
  let retry = RECONNECT_DELAY;  // for the reconnects socket.io leaves to the page
  let timer = null;
  const seen = new Set();       // ids of the messages shown
  const chatState = {
    sid: null,          // socket.id while connected
    url: null,          // the io-node connected to
    connects: 0,        // connections made, the first one included
    recoveries: 0,      // reconnects with the session recovered (socket.recovered)
    rejoins: 0,         // reconnects as a new client, after which the page joined again
    repeats: 0,         // `said` events for a message already shown (none expected)
  };
  window.chatState = chatState;

  function status(text, state, url) {
    const node = el("status");
    node.textContent = text;
    node.dataset.state = state;
    node.dataset.url = url || "";
  }

  function showError(text) {
    el("error").textContent = text || "";
  }

  // An io-node's full address: its url, plus its path when it has one (io-nodes behind one
  // proxy share the url and differ by path).
  function key(server) {
    return server.path ? server.url + server.path : server.url;
  }

  function pick() {
    const now = Date.now();
    let usable = servers.filter((s) => !(now - (failedAt.get(key(s)) || -Infinity) < AVOID_FOR));
    if (!usable.length) usable = servers;
    const wanted = usable.find((s) => preferred && (key(s) === preferred || s.url === preferred
      || String(s.port) === preferred || (s.path && s.path.startsWith(preferred))));
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

  function start() {
    const server = pick();
    if (!server) {
      status("no io-node is up; retrying…", "down");
      timer = setTimeout(async () => {
        await refreshServers();
        start();
      }, LIST_RETRY);
      return;
    }
    current = key(server);
    status("connecting to " + current + "…", "connecting", current);
    socket = io(server.url, {
      path: server.path,            // undefined: socket.io's default, /socket.io/
      forceNew: true,
      reconnection: true,
      reconnectionDelay: RECONNECT_DELAY,
      reconnectionDelayMax: RECONNECT_DELAY_MAX,
      timeout: CONNECT_TIMEOUT,
    });
    window.chatSocket = socket;
    socket.on("connect", onConnect);
    socket.on("disconnect", onDisconnect);
    socket.on("connect_error", onConnectError);
    // every server event carries the recovery offset as its last argument: only the first
    // argument is the chat's
    socket.on("said", (message) => onSaid(message));
    socket.on("presence", (presence) => onPresence(presence));
    socket.io.on("reconnect_attempt", onReconnectAttempt);
  }

  // The Manager opens each new connection from socket.io.uri and socket.io.opts (its path),
  // right after this event.
  function onReconnectAttempt(attempt) {
    const server = pick();
    if (server) moveTo(server);
    status("connecting to " + current + " (attempt " + attempt + ")…", "connecting", current);
    refreshServers();             // for the next attempt, if this one fails
  }

  function moveTo(server) {
    current = key(server);
    socket.io.uri = server.url;
    socket.io.opts.path = server.path || "/socket.io";
  }

  function onConnect() {
    retry = RECONNECT_DELAY;
    clearTimeout(timer);
    chatState.sid = socket.id;
    chatState.url = current;
    chatState.connects += 1;
    const again = everConnected;
    everConnected = true;
    if (socket.recovered) {
      // same id, same room, and the events missed meanwhile come now, in order: nothing to do
      chatState.recoveries += 1;
      status("reconnected to " + current + ": session recovered, nothing missed", "connected",
             current);
      if (joined) addNotice("connection lost and recovered: nothing missed");
    } else if (again && joined) {
      chatState.rejoins += 1;
      status("connected anew to " + current + ": joining again…", "connected", current);
      const url = current;
      join(joined.name, joined.room, true, () => {
        if (socket.connected && current === url) {
          status("connected anew to " + url + ": joined again", "connected", url);
        }
        addNotice("reconnected as a new client: joined " + joined.room + " again");
      });
    } else {
      status("connected to " + current, "connected", current);
    }
  }

  function onDisconnect(reason) {
    chatState.sid = null;
    if (reason === "io client disconnect") return;       // the page closed it
    failedAt.set(current, Date.now());
    refreshServers();             // a fresh list for the reconnect
    if (reason === "io server disconnect") {
      // the server ended this client: socket.io leaves reconnecting to the page then
      status("disconnected by " + current + "; reconnecting…", "reconnecting");
      reconnectLater();
    } else {
      status("lost " + current + " (" + reason + "); reconnecting…", "reconnecting");
    }
  }

  function onConnectError(err) {
    failedAt.set(current, Date.now());
    if (socket.active) {
      // no connection at all: socket.io tries again by itself (onReconnectAttempt)
      status("cannot reach " + current + " (" + err.message + "); trying again…", "reconnecting");
    } else {
      // the server answered but refused the client (busy, no verdict in time)
      status("refused by " + current + " (" + err.message + "); retrying…", "reconnecting");
      reconnectLater();
    }
  }

  function reconnectLater() {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      await refreshServers();
      if (socket.connected) return;
      const server = pick();
      if (server) moveTo(server);
      status("connecting to " + current + "…", "connecting", current);
      socket.connect();
    }, retry);
    retry = Math.min(retry * 2, RECONNECT_DELAY_MAX);
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

  function join(name, room, again, then) {
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
      if (then) then();
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
    if (!joined || message.room !== joined.room) return;
    if (seen.has(message.id)) chatState.repeats += 1;
    addMessage(message);
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
    start();
  }
})();
