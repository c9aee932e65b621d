"""``python -m helpers.rl.arbor_cpu serve --port 7453``: the CPU Arbor server for the active profile's embedded model.

The server itself is machinery (``helpers.backend.arbor_server``); this command lives here because it needs the
profile -- where the converted model is cached -- and ``lm_setup.embedded_engine``, which the backend layer may not
import. The seeds' client code then runs against it unchanged: ``RLMH_LM=arbor RLMH_ARBOR_URL=http://127.0.0.1:7453/v1/``.
"""

import argparse
import logging
import sys

from helpers.backend import arbor_server
from helpers.profiles import get_profile
from helpers.program import lm_setup
from helpers.util.errors import TutorialError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.rl.arbor_cpu", description=arbor_server.LIMITS)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve Arbor's protocol on 127.0.0.1")
    serve.add_argument("--port", type=int, default=7453, help="0 picks a free port (the banner names it)")
    serve.add_argument("--storage", default=None, help="checkpoint folder (default: <profile cache>/arbor-cpu)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        profile = get_profile()
        engine = lm_setup.embedded_engine(profile)
        server = arbor_server.make_server(engine, args.storage or profile.cache_dir / "arbor-cpu", args.port)
    except TutorialError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, or not ours to bind
        print(f"error: cannot listen on 127.0.0.1:{args.port} ({exc.strerror}): pick another --port", file=sys.stderr)
        return 2
    print(arbor_server.banner(server), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
