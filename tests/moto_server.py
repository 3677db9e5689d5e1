"""moto's server, one request at a time.

`moto_server` runs werkzeug with threaded=True, and moto's TransactWriteItems checks its
conditions and writes without a lock (on a failed condition it even restores a copy of the
whole table taken before), so two concurrent transactions can both pass a version check.
DynamoDB's transactions are serializable; serving one request at a time gives the tests that
guarantee, while the clients under test stay fully concurrent.

Usage: python tests/moto_server.py HOST PORT
"""

import sys

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, app, threaded=False, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
