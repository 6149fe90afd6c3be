"""A background task started from a handler behind the usual `if ticker is None` guard, for
tests/test_porting.py: run by two app-nodes with --background-tasks cluster, its ticks must
arrive once, and go on from another app-node when the one running it is killed."""

import siocluster

app = siocluster.App()
ticker = None


def tick(every):
    count = 0
    while True:
        app.sleep(every)
        count += 1
        app.emit("tick", {"count": count, "node": app.node.id})


@app.event
def start(sid, every):
    global ticker
    if ticker is None:
        ticker = app.start_background_task(tick, every)
    return siocluster.current().node.id
