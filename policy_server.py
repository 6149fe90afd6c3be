"""Entry point of the flash policy server: ``python policy_server.py --help``.

    python policy_server.py --host 0.0.0.0 --allow-ports 8081,8082   # port 843: needs root
    python policy_server.py --port 10843 --allow-ports 8081,8082
"""

from gevent import monkey

monkey.patch_all()  # before anything else imports socket or ssl

from siocluster.policy import main

if __name__ == "__main__":
    main()
