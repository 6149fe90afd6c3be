"use strict";
// The example chat's protocol (example_chat/app.py) on Node's socket.io 4.8 with
// @socket.io/redis-adapter 8.3 and node-redis 4, as the adapter's documentation sets it up:
// a baseline of the bench's chat scenario. Run two or more on one Redis:
//
//     node bench/node/chat.js --port 9001 --redis-url redis://127.0.0.1:6379/0
//
// The protocol, on namespace "/", as the example chat's:
// - join {name, room} -> {ok: true, room, members, history}; the room gets
//   presence {room, members, joined: name} (a client in another room leaves it first)
// - say {text} -> {ok: true, id}; the room, sender included, gets said {id, room, name, text, ts}
// - leave {} -> {ok: true}; the room gets presence {room, members, left: name}; a disconnect too
// - anything malformed -> {ok: false, error}
// A client's name and room are in socket.data, the room's members come from
// io.in(room).fetchSockets() (the adapter asks every server), and the room's last 50 messages
// are in a capped Redis list.

const http = require("http");
const { randomUUID } = require("crypto");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const MAX_NAME = 32;
const MAX_ROOM = 64;
const MAX_TEXT = 2000;
const HISTORY = 50;

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at > 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

const host = option("host", "127.0.0.1");
const port = Number(option("port", "9001"));
const redisUrl = option("redis-url", "redis://127.0.0.1:6379/0");
const prefix = option("prefix", "chat");

class BadInput extends Error {}

// the Socket.IO room of a chat room: every socket's id is a room too, and a chat room named
// like someone's id must not reach that client
const channel = (room) => "chat:" + room;
const historyKey = (room) => `${prefix}:app:history:${room}`;

function field(payload, key, limit) {
  const value = payload[key];
  if (value === undefined || value === null || (typeof value === "string" && !value.trim())) {
    throw new BadInput(`${key} is required`);
  }
  if (typeof value !== "string") throw new BadInput(`${key} must be a string`);
  if (value.trim().length > limit) throw new BadInput(`${key} is longer than ${limit} characters`);
  return value.trim();
}

async function main() {
  const pubClient = createClient({ url: redisUrl });
  const subClient = pubClient.duplicate();
  const db = pubClient.duplicate();      // the chat's own commands
  for (const client of [pubClient, subClient, db]) {
    client.on("error", (err) => console.error("redis:", err.message));
  }
  await Promise.all([pubClient.connect(), subClient.connect(), db.connect()]);

  const httpServer = http.createServer();
  const io = new Server(httpServer);
  io.adapter(createAdapter(pubClient, subClient));

  // The names of the room's clients, each once (a user may have two tabs open).
  async function members(room) {
    const sockets = await io.in(channel(room)).fetchSockets();
    return [...new Set(sockets.map((s) => s.data.name).filter(Boolean))].sort();
  }

  async function history(room) {
    return (await db.lRange(historyKey(room), 0, -1)).map((raw) => JSON.parse(raw));
  }

  // Take the client out of its room and tell the room.
  async function leaveCurrent(socket) {
    const room = socket.data.room;
    if (room === undefined) return;
    delete socket.data.room;
    socket.leave(channel(room));
    io.to(channel(room)).emit("presence", { room, members: await members(room),
                                            left: socket.data.name });
  }

  // handler(payload) answers the ack; a BadInput becomes {ok: false, error}
  function answers(handler) {
    return async (...args) => {
      const ack = typeof args[args.length - 1] === "function" ? args.pop() : () => {};
      let answer;
      try {
        const payload = args[0];
        if (args.length !== 1 || payload === null || typeof payload !== "object" ||
            Array.isArray(payload)) {
          throw new BadInput('send one object as the payload, e.g. {"text": "hi"}');
        }
        answer = await handler(payload);
      } catch (err) {
        if (!(err instanceof BadInput)) {
          console.error(err);          // as python-socketio: logged, and no answer
          return;
        }
        answer = { ok: false, error: err.message };
      }
      ack(answer);
    };
  }

  io.on("connection", (socket) => {
    socket.on("join", answers(async (payload) => {
      const name = field(payload, "name", MAX_NAME);
      const room = field(payload, "room", MAX_ROOM);
      if (socket.data.room !== room) await leaveCurrent(socket);
      socket.data.name = name;      // before joining, so that members() finds it
      socket.data.room = room;
      socket.join(channel(room));
      const present = await members(room);
      io.to(channel(room)).emit("presence", { room, members: present, joined: name });
      return { ok: true, room, members: present, history: await history(room) };
    }));

    socket.on("say", answers(async (payload) => {
      const text = payload.text;
      if (typeof text !== "string") {
        throw new BadInput(text === undefined || text === null ? "text is required"
                                                                : "text must be a string");
      }
      if (!text.trim()) throw new BadInput("text is empty");
      if (text.length > MAX_TEXT) throw new BadInput(`text is longer than ${MAX_TEXT} characters`);
      const room = socket.data.room;
      if (room === undefined) throw new BadInput("join a room first");
      const message = { id: randomUUID().replace(/-/g, ""), room, name: socket.data.name, text,
                        ts: Date.now() };
      const key = historyKey(room);
      await db.multi().rPush(key, JSON.stringify(message)).lTrim(key, -HISTORY, -1).exec();
      io.to(channel(room)).emit("said", message);
      return { ok: true, id: message.id };
    }));

    socket.on("leave", answers(async () => {
      if (socket.data.room === undefined) throw new BadInput("not in a room");
      await leaveCurrent(socket);
      return { ok: true };
    }));

    socket.on("disconnect", () => {
      leaveCurrent(socket).catch((err) => console.error(err));
    });
  });

  const stop = () => {
    io.close();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  httpServer.listen(port, host, () => console.log(`listening on ${host}:${port}`));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
