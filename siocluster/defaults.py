"""Every default of siocluster in one place; `Config` starts from these."""

PREFIX = "siocluster"
CLUSTER_SHARDS = 3           # shards on a Redis Cluster: one per master of the usual 3
REDIS_URL = "redis://localhost:6379/0"

HTTP_HOST = "127.0.0.1"
HTTP_PORT = 8080
CLIENT_CONFIG_URL = "/config.js"
POLICY_PORT = 843
POLICY_TIMEOUT = 5.0          # seconds a policy client has to send its request
POLICY_MAX_REQUEST = 64       # bytes of a policy request; more is cut off unanswered

# app-node
WORKERS = 8                  # greenlets popping the inbox in one app-node
POP_TIMEOUT = 1.0            # seconds a blocking pop waits before looping (lets stop() be seen)
MAX_ATTEMPTS = 5             # deliveries of one message before it goes to the dead-letter list
CALL_TIMEOUT = 10.0          # app.call(): seconds to wait for the client's answer

# io-node
CONNECT_TIMEOUT = 5.0        # seconds an io-node waits for the app tier's connect verdict
CONNECT_TIMEOUT_ACCEPT = False  # the answer when no verdict came in time (true: fail open)
ACK_TIMEOUT = 60.0           # seconds an io-node keeps a client's pending ack
OUTBOX_SIZE = 10_000         # client messages an io-node buffers while Redis is unreachable
MAX_MESSAGE_SIZE = 1_000_000  # bytes of one client message
RATE_LIMIT = 100.0           # events per second one connection may send (0 turns it off)
RATE_BURST = 200             # events a connection may send at once above the rate
MAX_SEND_BACKLOG = 4 << 20   # bytes waiting for one slow websocket client before it is cut off
OUTBOX_MAX_BYTES = 64 << 20  # bytes of client messages an io-node buffers while Redis is away
MAX_ATTACHMENTS = 10         # binary attachments of one client message
MAX_CONNECTIONS = 20_000     # connections one io-node holds at once
MAX_CONNECTIONS_PER_ADDRESS = 1_000  # of those, from one client address
HANDSHAKE_TIMEOUT = 10.0     # seconds a client has to send a request, or finish an upgrade
POLICY_MAX_CONNECTIONS = 1_000  # policy requests answered at once

# Redis structures
INBOX_MAXLEN = 100_000       # client messages waiting for the app tier before new ones are refused
INBOX_MAX_BYTES = 256 << 20  # bytes of them before new ones are refused
CLIENT_QUEUE_MAXLEN = 1_000  # of them, from one client (its messages are handled in turn)
DEAD_MAXLEN = 1_000          # records kept in the dead-letter list, the oldest dropped
DEAD_RECORD_SIZE = 64 << 10  # bytes of one dead-letter record: a larger message is cut
STREAM_MAXLEN = 100_000      # commands kept in a stream for io-nodes that reconnect
# connection-state recovery: a client that comes back within the window gets its sid, rooms,
# session and what it missed (at most so many packets and bytes of them)
RECOVERY_WINDOW = 120.0
RECOVERY_MAX_PACKETS = 1_000
RECOVERY_MAX_BYTES = 1 << 20
# packets an io-node holds for a client until its connect is answered; past that it goes
HELD_PACKETS = 10_000
COMMAND_BATCH = 256          # stream entries one io-node reads per round trip

# logs
LOG_LEVEL = "INFO"
LOG_FORMAT = "text"          # or json: one event a line

# liveness
HEARTBEAT_INTERVAL = 2.0     # seconds between a node's heartbeats
NODE_TTL = 10.0              # seconds without a heartbeat after which a node is dead

# connections to Redis: the socket timeout stays above the blocking-pop timeout so an idle
# pop is never mistaken for a dead connection
REDIS_SOCKET_TIMEOUT = 10.0
REDIS_CONNECT_TIMEOUT = 5.0
REDIS_HEALTH_CHECK_INTERVAL = 5
RECONNECT_BACKOFF_START = 0.1
RECONNECT_BACKOFF_MAX = 5.0
