"""Apps the fault tests run in app-node subprocesses
(``python -m siocluster.appnode tests.fault_apps:burst``). Each records what it handled in
Redis, under the cluster's prefix, so the test can count after killing processes."""

import json
import os
import time

import gevent

from siocluster import App

# Numbered messages; the set says which were handled, the counter how many times in all.
burst = App()


@burst.on("n")
def _n(sid, number):
    burst.redis.sadd(burst.key("seen"), number)
    burst.redis.incr(burst.key("handled"))
    gevent.sleep(0.002)      # a little work: several messages are in flight at any time


# A chat: the room gets what is said; the app records every message and every disconnect.
chat = App()


@chat.on("join")
def _join(sid, room):
    chat.enter_room(sid, room)
    return "joined"


@chat.on("say")
def _say(sid, data):
    chat.redis.sadd(chat.key("said"), data["id"])
    chat.emit("said", data, to=data["room"])
    return data["id"]


@chat.on("slow")
def _slow(sid, number):
    chat.redis.rpush(chat.key("started"), number)
    gevent.sleep(1.0)
    chat.redis.rpush(chat.key("finished"), number)
    return number


@chat.event
def disconnect(sid, reason):
    chat.redis.rpush(chat.key("left"), json.dumps({"sid": sid, "reason": reason,
                                                   "at": time.time(), "pid": os.getpid()}))
    chat.emit("left", sid, to="lobby")


# A message that kills whichever app-node handles it.
poison = App()


@poison.on("eat")
def _eat(sid, food):
    if food == "poison":
        os._exit(17)
    poison.redis.rpush(poison.key("ate"), food)
    return food
