from siocluster import App


def test_echo_round_trip(cluster):
    app = App()

    @app.on("echo")
    def echo(sid, data):
        return {"echo": data}

    io = cluster.io_node()
    cluster.app_node(app)
    client = cluster.client(io)
    assert client.call("echo", "hi") == [{"echo": "hi"}]
