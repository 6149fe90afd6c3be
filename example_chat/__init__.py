"""The seed's chat example, run as a siocluster cluster.

- ``example_chat.app``: the app-node logic (``python -m siocluster.appnode example_chat.app:app``);
- ``example_chat.frontend``: the page and ``/config.js`` (``python -m example_chat.frontend``);
- the io-nodes are plain ``python -m siocluster.ionode --port 8081``: the chat needs nothing
  of its own there.

``make run-cluster`` starts all of them with an embedded Redis; see ``example_chat/README.md``
to start them one by one, as the seed did.
"""
