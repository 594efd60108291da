"""``cliptune ui``: serve a tracking store with MLflow's UI, and say where once it answers.

``mlflow ui`` takes 20-40 s before its first answer on a small machine (it migrates and loads the
store), so the URL is printed when the server answers, not before; any password in the store's
URI is masked in every line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO
from urllib.error import URLError
from urllib.parse import urlsplit
from urllib.request import urlopen

from cliptune.storage import mask_url
from cliptune.tracking import ML_WORKFLOW

STARTUP_TIMEOUT_S = 180.0


def _answers(url: str) -> bool:
    try:
        with urlopen(f"{url}/health", timeout=2):
            return True
    except (URLError, OSError):
        return False


def _relay(stream: IO[str], secret: str | None) -> None:
    """Copy the server's output to our stderr with the store's password masked."""
    for line in stream:
        sys.stderr.write(line.replace(secret, "***") if secret else line)
        sys.stderr.flush()


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_ui(uri: str, port: int) -> int:
    """Run ``mlflow ui`` on 127.0.0.1:``port`` for ``uri`` until Ctrl-C or SIGTERM; its exit
    status (0 when stopped so)."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--default-artifact-root", Path("mlruns").resolve().as_uri(),
               "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    print(f"Starting the MLflow UI for {mask_url(uri)} (this takes about 30 s)...",
          file=sys.stderr, flush=True)
    secret = urlsplit(uri).password if "://" in uri else None
    # The server's workers warn about their own dependencies; nothing a user can act on.
    quiet = "ignore::DeprecationWarning,ignore:starlette.middleware.wsgi is deprecated"
    env = {**os.environ, "PYTHONWARNINGS": quiet}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, env=env)
    relay = threading.Thread(target=_relay, args=(process.stdout, secret), daemon=True)
    relay.start()
    for signum in (signal.SIGINT, signal.SIGTERM):  # a kill, or a Ctrl-C that a shell running us
        signal.signal(signum, _stop)  # in the background would leave ignored: stop the server too
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while process.poll() is None and not _answers(url):
            if time.monotonic() > deadline:
                print(f"The MLflow UI did not answer on {url} within {STARTUP_TIMEOUT_S:.0f} s.",
                      file=sys.stderr)
                break
            time.sleep(0.5)
        if process.poll() is None:
            print(f"MLflow UI for {mask_url(uri)}: {url}/#/experiments?{ML_WORKFLOW} "
                  "(Ctrl-C to stop)", file=sys.stderr, flush=True)
        code = process.wait()
        relay.join(timeout=5)
        return code
    except KeyboardInterrupt:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a server stuck in its shutdown: stop it for good
            process.kill()
            process.wait()
        return 0
