"""Apps for tests/test_porting.py: each written for python-socketio or Flask-SocketIO as their
users write them, and run both there and, ported, on a cluster."""
