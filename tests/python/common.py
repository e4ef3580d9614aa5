"""What test_xmlrpc and test_json share: where run.sh put the host agent and the
guests (environment variables, see run.sh), and polling with a deadline."""

import os
import time

URL = os.environ.get("VMC_XMLRPC_URL", "http://127.0.0.1:50505")
VMS = os.environ.get("VMC_TEST_VMS", "py-box-1 py-box-2 py-box-3").split()
FILES = os.environ.get("VMC_TEST_FILES", "/tmp")
HOST_FILES = os.environ.get("VMC_TEST_HOST_FILES", "/tmp")
VM, OTHER_VM, SPARE_VM = VMS[0], VMS[1], VMS[2]
PATIENCE = 30.0


def wait_until(what, condition, patience=PATIENCE, every=0.05):
    """Polls condition() until it answers something true, and answers that; fails
    naming `what` after `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {patience} s for {what}")
        time.sleep(every)
