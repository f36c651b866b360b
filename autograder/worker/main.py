"""The worker: imports the learner's modules and answers requests, inside the sandbox.

Started as ``python -E -s -m autograder.worker.main CONFIG_JSON`` with the request and reply
channels on the file descriptors the config names.  Learner output goes to stdout/stderr, which
the trusted side only ever shows as text.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def _set_limits(limits: dict) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    file_bytes = limits.get("file_bytes")
    if file_bytes:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    nproc = limits.get("max_processes")
    if nproc:
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        except (ValueError, OSError):
            pass
    # CUDA reserves a huge virtual address space, so the address-space cap only applies on CPU;
    # the trusted side watches resident memory in every case.
    address_bytes = limits.get("address_bytes")
    if address_bytes and not Path("/dev/nvidiactl").exists():
        resource.setrlimit(resource.RLIMIT_AS, (address_bytes, address_bytes))


def main(argv: list[str] | None = None) -> int:
    config = json.loads((argv or sys.argv)[1])
    request_fd, reply_fd = config["fds"]
    root = Path(config["root"]).resolve()
    sys.path.insert(0, str(root))
    os.chdir(root)

    # Imported before any learner code runs, so the references held here are the real ones.
    from autograder.worker import guard, harness
    from autograder.worker.objects import ObjectTable, describe_exception, serve
    from autograder.worker.protocol import ProtocolError, pack, read_message, unpack, write_message

    # The helpers are looked up in this table, made before any learner code runs: replacing a
    # function on the harness module changes nothing the tests call.
    helpers = harness.helpers()
    guard.install(config.get("forbidden", []), config.get("course_files", []))
    _set_limits(config.get("limits", {}))
    table = ObjectTable()
    # Start-up (Python, torch) is not the learner's time: the client starts each call's clock
    # only after this message.
    write_message(reply_fd, pack({"ready": True}, table.to_handle))
    while True:
        try:
            header, blob = read_message(request_fd)
        except EOFError:
            return 0
        try:
            request = unpack(header, blob, table.from_handle, device_ok=lambda d: d)
            table.release(request.pop("release", []))
            reply = {"ok": serve(request, helpers)}
        except ProtocolError as exc:
            reply = {"error": {"type": "ProtocolError", "builtin": False, "message": str(exc), "frames": []}}
        except BaseException as exc:  # learner code may raise anything, SystemExit included
            reply = {"error": describe_exception(exc, root)}
        try:
            data = pack(reply, table.to_handle)
        except Exception as exc:
            data = pack({"error": {"type": "UnsendableResult", "builtin": False,
                                   "message": f"the result could not be sent back: {exc}", "frames": []}},
                        table.to_handle)
        sys.stdout.flush()
        sys.stderr.flush()
        write_message(reply_fd, data)


if __name__ == "__main__":
    sys.exit(main())
