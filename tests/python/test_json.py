"""The JSON API of vmc-host, its event stream, /healthz, /metrics and the `vmc` CLI.

Run by tests/python/run.sh, which starts a real vmc-host (unmanaged backend) and
real vmc-guest processes on a real broker and tells this module where they are:

  VMC_XMLRPC_URL       http://127.0.0.1:PORT (the JSON API is on the same listener)
  VMC_TEST_VMS         the guests' ids, space-separated (at least three)
  VMC_TEST_FILES       the directory the guests may read and write
  VMC_TEST_HOST_FILES  a directory of the host side's files
  VMC_TEST_HOST_STATE  the host agent's state directory
  VMC_CLI_BIN          the `vmc` binary

Standard library only: unittest, urllib, http.client, subprocess. Every test
asserts what a caller would check: statuses, error codes and names, values, the
bytes that arrive, exit codes; answers are checked against the schemas of the
served OpenAPI document, undocumented keys included.
"""

import base64
import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import tempfile
import unittest
import urllib.parse

from common import FILES, HOST_FILES, OTHER_VM, PATIENCE, SPARE_VM, URL, VM, VMS, wait_until

HOST_STATE = os.environ.get("VMC_TEST_HOST_STATE", "")
CLI = os.environ.get("VMC_CLI_BIN", "vmc")
_url = urllib.parse.urlsplit(URL)
HOST, PORT = _url.hostname, _url.port

# The stable codes of docs/API.md, as (code, name).
UNKNOWN_VM = (1, "unknown-vm")
BAD_ARGUMENT = (2, "bad-argument")
NOT_SUPPORTED = (6, "not-supported")
UNKNOWN_COMMAND = (8, "unknown-command")
UNKNOWN_TRANSFER = (9, "unknown-transfer")
VM_EXISTS = (10, "vm-exists")
NOT_FINISHED = (11, "not-finished")
TRANSFER_FAILED = (15, "transfer-failed")
MALFORMED_REQUEST = (-32700, "malformed-request")
UNKNOWN_METHOD = (-32601, "unknown-method")
INVALID_PARAMS = (-32602, "invalid-params")

ACTIONS = ["start", "shutdown", "sleep", "reset", "powerOff", "pause", "resume",
           "saveState", "discardState"]


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self):
        return json.loads(self.body)

    def header(self, name):
        return self.headers.get(name.lower())


def request(method, path, body=None, headers=None, raw=None):
    """One request; `body` is sent as JSON, `raw` as it is."""
    conn = http.client.HTTPConnection(HOST, PORT, timeout=PATIENCE)
    try:
        headers = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()},
                      response.read())
    finally:
        conn.close()


def get(path):
    return request("GET", path)


def q(text):
    return urllib.parse.quote(text, safe="")


_openapi = None


def openapi():
    global _openapi
    if _openapi is None:
        answer = get("/api/v1/openapi.json")
        assert answer.status == 200, answer.status
        _openapi = answer.json
    return _openapi


def check_schema(value, schema, where="$"):
    """Checks a JSON value against an OpenAPI schema: types, required and
    undocumented keys (additionalProperties false), enums, items, $ref."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return check_schema(value, openapi()["components"]["schemas"][name], where)
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"{where}: {value!r} is not an object"
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{where}: the required key {key!r} is missing"
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                check_schema(item, props[key], f"{where}.{key}")
            elif extra is False:
                raise AssertionError(f"{where}: the key {key!r} is not documented")
            elif isinstance(extra, dict):
                check_schema(item, extra, f"{where}.{key}")
    elif kind == "array":
        assert isinstance(value, list), f"{where}: {value!r} is not an array"
        for i, item in enumerate(value):
            check_schema(item, schema.get("items", {}), f"{where}[{i}]")
    elif kind == "string":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), \
            f"{where}: {value!r} is not an integer"
        if "minimum" in schema:
            assert value >= schema["minimum"], f"{where}: {value} < {schema['minimum']}"
    elif kind == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), \
            f"{where}: {value!r} is not a number"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} is not one of {schema['enum']}"


def run_cmd(vm, script, **extra):
    body = {"cmd": "/bin/sh", "args": ["-c", script]}
    body.update(extra)
    answer = request("POST", f"/api/v1/vms/{q(vm)}/commands", body)
    assert answer.status == 202, (answer.status, answer.body)
    return answer.json["cmdId"]


def result(cmd_id, wait=PATIENCE):
    answer = get(f"/api/v1/commands/{cmd_id}/result?wait={wait}")
    assert answer.status == 200, (answer.status, answer.body)
    return answer.json


class EventStream:
    """A raw SSE connection: read events as they come, with a deadline."""

    def __init__(self, query="", rcvbuf=None):
        self.sock = socket.create_connection((HOST, PORT), timeout=PATIENCE)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.sendall(f"GET /api/v1/events{query} HTTP/1.1\r\nHost: x\r\n"
                          "Accept: text/event-stream\r\n\r\n".encode())
        self.file = self.sock.makefile("rb")
        status = self.file.readline().decode()
        self.status = int(status.split()[1])
        self.headers = {}
        while True:
            line = self.file.readline().decode().strip()
            if not line:
                break
            name, _, value = line.partition(":")
            self.headers[name.lower()] = value.strip()
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "")
        self.buffer = b""
        self.ended = False

    def _more(self):
        """Reads the next piece of the body; False at its end."""
        if self.chunked:
            size = int(self.file.readline().split(b";")[0], 16)
            if size == 0:
                self.ended = True
                return False
            self.buffer += self.file.read(size)
            self.file.readline()
            return True
        data = self.file.read1(65536)
        if not data:
            self.ended = True
            return False
        self.buffer += data
        return True

    def next(self):
        """The next event as (name, data), or None at the end of the stream."""
        while True:
            while b"\n\n" not in self.buffer:
                if not self._more():
                    return None
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            name, data = "message", None
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    continue
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    name = value
                elif field == "data":
                    data = value if data is None else data + "\n" + value
            if data is not None:
                return name, json.loads(data)

    def until(self, what, predicate, patience=PATIENCE):
        """Events up to and including the first that satisfies `predicate`."""
        self.sock.settimeout(patience)
        seen = []
        while True:
            event = self.next()
            if event is None:
                raise AssertionError(f"the stream ended before {what}; saw {seen}")
            seen.append(event)
            if predicate(*event):
                return seen

    def close(self):
        self.file.close()
        self.sock.close()


def vmc(*args, url=URL, stdin=None, env=None):
    full_env = dict(os.environ)
    full_env.pop("VMC_URL", None)
    full_env.update(env or {})
    argv = [CLI] + (["--url", url] if url else []) + list(args)
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=PATIENCE * 2,
                          env=full_env)


class ApiTest(unittest.TestCase):
    def assertError(self, answer, status, fault):
        self.assertEqual(answer.status, status, answer.body[:300])
        self.assertEqual(answer.header("content-type"), "application/json")
        error = answer.json["error"]
        self.assertEqual((error["code"], error["name"]), fault, error["message"])
        self.assertTrue(error["message"].strip(), "an error says what went wrong")
        check_schema(answer.json, {"$ref": "#/components/schemas/Error"})
        return error["message"]

    def assertOk(self, answer, schema, status=200):
        self.assertEqual(answer.status, status, answer.body[:300])
        check_schema(answer.json, schema)
        return answer.json


def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def array(name):
    return {"type": "array", "items": ref(name)}


class OpenApi(ApiTest):
    def test_the_document_is_openapi_3_with_every_fault_code(self):
        doc = openapi()
        self.assertTrue(doc["openapi"].startswith("3."))
        names = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"][
            "name"]["enum"]
        for _, name in [UNKNOWN_VM, BAD_ARGUMENT, NOT_SUPPORTED, UNKNOWN_COMMAND,
                        MALFORMED_REQUEST, UNKNOWN_METHOD, INVALID_PARAMS]:
            self.assertIn(name, names)

    def test_every_documented_route_answers(self):
        """Each documented method and path reaches a handler: never 405, never the
        'no such route' 404. Made-up ids, so nothing is changed."""
        fill = {"vm": "no-such-vm", "cmd": "cmd-none", "transfer": "xfer-none",
                "snapshot": "snap", "action": "start"}
        for path, item in openapi()["paths"].items():
            for method in item:
                concrete = re.sub(r"\{(\w+)\}", lambda m: fill[m.group(1)], path)
                with self.subTest(method=method, path=path):
                    if path == "/api/v1/events":
                        stream = EventStream()
                        self.assertEqual(stream.status, 200)
                        stream.close()
                        continue
                    if path.endswith("/files"):
                        concrete += "?path=/tmp/x"
                    if path in ("/RPC2", "/"):
                        answer = request("POST", path, raw=b"<methodCall><methodName>version"
                                         b"</methodName></methodCall>",
                                         headers={"Content-Type": "text/xml"})
                    elif method == "get":
                        answer = request("GET", concrete)
                    else:
                        answer = request(method.upper(), concrete, raw=b"{}")
                    self.assertNotEqual(answer.status, 405, answer.body[:200])
                    if answer.status == 404:
                        self.assertNotEqual(answer.json["error"]["name"], "unknown-method",
                                            answer.body)

    def test_get_answers_match_their_documented_schemas(self):
        cmd_id = run_cmd(VM, "echo schema")
        result(cmd_id)
        transfer = request("POST", "/api/v1/transfers", {
            "vm": VM, "direction": "from-guest", "wait": True,
            "guestPath": self.guest_file("schema.txt"),
            "hostPath": os.path.join(HOST_FILES, "schema.txt")}).json
        fill = {"vm": VM, "cmd": cmd_id, "transfer": transfer["transferId"]}
        for path, item in openapi()["paths"].items():
            op = item.get("get")
            if not op or path in ("/api/v1/events", "/metrics", "/api/v1/openapi.json") \
                    or path.endswith("/files") or path.endswith("/performance"):
                continue
            concrete = re.sub(r"\{(\w+)\}", lambda m: fill[m.group(1)], path)
            with self.subTest(path=path):
                answer = get(concrete)
                schema = op["responses"]["200"]["content"]["application/json"]["schema"]
                self.assertOk(answer, schema)

    def guest_file(self, name, data=b"schema\n"):
        path = os.path.join(FILES, name)
        with open(path, "wb") as f:
            f.write(data)
        return path


class Vms(ApiTest):
    def test_vms_are_listed_with_their_guests(self):
        vms = self.assertOk(get("/api/v1/vms"), array("Vm"))
        by_name = {vm["name"]: vm for vm in vms}
        for name in VMS:
            self.assertIn(name, by_name)
        vm = by_name[VM]
        self.assertEqual((vm["state"], vm["presence"], vm["backend"], vm["running"]),
                         ("Unknown", "alive", "unmanaged", True))
        if "guest" in vm:  # what the agent said in HELLO, if the host heard it
            self.assertEqual(vm["guest"]["id"], VM)
        one = self.assertOk(get(f"/api/v1/vms/{VM}"), ref("Vm"))
        self.assertEqual(one["name"], VM)

    def test_presence_and_guests(self):
        presence = self.assertOk(get(f"/api/v1/vms/{VM}/presence"), ref("GuestPresence"))
        self.assertEqual((presence["vm"], presence["presence"]), (VM, "alive"))
        guests = self.assertOk(get("/api/v1/guests"), array("GuestPresence"))
        self.assertIn(VM, [g["vm"] for g in guests])

    def test_unknown_vm_is_404_with_code_1_everywhere(self):
        for method, path in [
            ("GET", "/api/v1/vms/nope"), ("DELETE", "/api/v1/vms/nope"),
            ("POST", "/api/v1/vms/nope/actions/start"), ("GET", "/api/v1/vms/nope/presence"),
            ("GET", "/api/v1/vms/nope/snapshots"), ("POST", "/api/v1/vms/nope/ping"),
            ("GET", "/api/v1/vms/nope/performance"),
        ]:
            with self.subTest(method=method, path=path):
                message = self.assertError(request(method, path), 404, UNKNOWN_VM)
                self.assertIn('"nope"', message)
        answer = request("POST", "/api/v1/vms/nope/commands", {"cmd": "true"})
        self.assertError(answer, 404, UNKNOWN_VM)

    def test_every_action_is_not_supported_on_an_unmanaged_guest(self):
        for action in ACTIONS:
            with self.subTest(action=action):
                message = self.assertError(
                    request("POST", f"/api/v1/vms/{VM}/actions/{action}"), 501, NOT_SUPPORTED)
                self.assertIn("unmanaged", message)
        self.assertError(request("POST", f"/api/v1/vms/{VM}/actions/start", {}), 501,
                         NOT_SUPPORTED)
        self.assertError(request("POST", f"/api/v1/vms/{VM}/actions/start", {"force": True}),
                         400, INVALID_PARAMS)
        message = self.assertError(request("POST", f"/api/v1/vms/{VM}/actions/explode"), 404,
                                   UNKNOWN_METHOD)
        self.assertIn("powerOff", message, "the error lists the actions")
        self.assertError(get(f"/api/v1/vms/{VM}/performance"), 501, NOT_SUPPORTED)

    def test_snapshots(self):
        self.assertEqual(self.assertOk(get(f"/api/v1/vms/{VM}/snapshots"), array("Snapshot")),
                         [])
        self.assertError(request("POST", f"/api/v1/vms/{VM}/snapshots",
                                 {"name": "s1", "description": "d"}), 501, NOT_SUPPORTED)
        self.assertError(request("POST", f"/api/v1/vms/{VM}/snapshots/s1/restore"), 501,
                         NOT_SUPPORTED)
        self.assertError(request("DELETE", f"/api/v1/vms/{VM}/snapshots/s1"), 501,
                         NOT_SUPPORTED)
        self.assertError(request("POST", f"/api/v1/vms/{VM}/snapshots", {}), 400,
                         INVALID_PARAMS)

    def test_create_vm(self):
        answer = request("POST", "/api/v1/vms", {"name": "new-vm", "image": "/images/a.qcow2"})
        self.assertIn("createVM", self.assertError(answer, 501, NOT_SUPPORTED))
        self.assertError(request("POST", "/api/v1/vms", {"name": VM, "image": "/i.qcow2"}), 409,
                         VM_EXISTS)
        self.assertError(request("POST", "/api/v1/vms", {"name": "bad name!"}), 400,
                         BAD_ARGUMENT)
        self.assertError(request("POST", "/api/v1/vms", {"name": "n", "image": "rel.qcow2"}),
                         400, BAD_ARGUMENT)
        self.assertError(request("POST", "/api/v1/vms", {"image": "/i.qcow2"}), 400,
                         INVALID_PARAMS)

    def test_ping(self):
        pong = self.assertOk(request("POST", f"/api/v1/vms/{VM}/ping"), ref("Ping"))
        self.assertIs(pong["alive"], True)
        self.assertGreater(pong["rttMs"], 0)
        pong = self.assertOk(request("POST", f"/api/v1/vms/{VM}/ping", {"timeoutSecs": 2}),
                             ref("Ping"))
        self.assertIs(pong["alive"], True)
        self.assertError(request("POST", f"/api/v1/vms/{VM}/ping", {"timeoutSecs": 0}), 400,
                         BAD_ARGUMENT)
        self.assertError(request("POST", f"/api/v1/vms/{VM}/ping", {"timeoutSecs": "soon"}),
                         400, INVALID_PARAMS)

    def test_remove_forgets_an_unmanaged_guest_until_it_speaks_again(self):
        answer = request("DELETE", f"/api/v1/vms/{SPARE_VM}")
        self.assertEqual(answer.status, 204, answer.body)
        wait_until(f"{SPARE_VM} to be listed again",
                   lambda: SPARE_VM in [vm["name"] for vm in get("/api/v1/vms").json])


class Commands(ApiTest):
    def test_run_then_result_asked_twice(self):
        answer = request("POST", f"/api/v1/vms/{VM}/commands",
                         {"cmd": "/bin/sh", "args": ["-c", "echo hello; echo oops >&2; exit 3"]})
        command = self.assertOk(answer, ref("Command"), status=202)
        cmd_id = command["cmdId"]
        self.assertEqual(answer.header("location"), f"/api/v1/commands/{cmd_id}")
        self.assertEqual((command["vm"], command["cmd"], command["done"]),
                         (VM, "/bin/sh", False))
        first = self.assertOk(get(f"/api/v1/commands/{cmd_id}/result?wait={PATIENCE}"),
                              ref("CommandResult"))
        self.assertEqual((first["out"], first["err"], first["exitCodeOrSignal"]),
                         ("hello\n", "oops\n", 3))
        self.assertEqual((first["outcome"], first["finished"], first["state"]),
                         ("exited", True, "finished"))
        self.assertGreater(first["resources"]["ru_maxrss"], 0)
        self.assertEqual(get(f"/api/v1/commands/{cmd_id}/result").json, first,
                         "results are not read-once")
        details = self.assertOk(get(f"/api/v1/commands/{cmd_id}"), ref("Command"))
        self.assertEqual((details["state"], details["done"], details["exitCodeOrSignal"]),
                         ("finished", True, 3))

    def test_a_signal_is_told_apart_from_an_exit(self):
        killed = result(run_cmd(VM, "kill -TERM $$"))
        self.assertEqual((killed["outcome"], killed["finished"], killed["exitCodeOrSignal"]),
                         ("signalled", False, 15))

    def test_env_cwd_stdin_and_timeout(self):
        stdin = os.path.join(FILES, "json-stdin.txt")
        with open(stdin, "w") as f:
            f.write("a\nb\nc\n")
        cmd_id = run_cmd(VM, 'echo "$GREETING"; pwd; wc -l', env={"GREETING": "hi there"},
                         path=FILES, stdin=stdin)
        out = result(cmd_id)["out"].split("\n")
        self.assertEqual(out[:2], ["hi there", os.path.realpath(FILES)])
        self.assertEqual(out[2].strip(), "3")
        timed = result(run_cmd(VM, "sleep 10", timeoutSecs=0.3))
        self.assertEqual((timed["outcome"], timed["state"]), ("timed-out", "timedout"))
        self.assertError(request("POST", f"/api/v1/vms/{VM}/commands",
                                 {"cmd": "true", "timeoutSecs": -1}), 400, BAD_ARGUMENT)

    def test_a_running_command_is_not_finished_and_its_details_are_live(self):
        cmd_id = run_cmd(VM, "echo tick; sleep 0.6")
        self.assertError(get(f"/api/v1/commands/{cmd_id}/result"), 409, NOT_FINISHED)
        details = wait_until("the command to run", lambda: (
            lambda d: d if d["state"] == "running" and "live" in d else None)(
                get(f"/api/v1/commands/{cmd_id}").json))
        check_schema(details, ref("Command"))
        self.assertEqual(details["live"]["state"], "running")
        self.assertIn("ru_utime", details["resources"])
        self.assertEqual(result(cmd_id)["out"], "tick\n")

    def test_cancel(self):
        cmd_id = run_cmd(VM, "echo started; sleep 60")
        wait_until("the command to run",
                   lambda: get(f"/api/v1/commands/{cmd_id}").json["state"] == "running")
        answer = request("POST", f"/api/v1/commands/{cmd_id}/cancel")
        self.assertOk(answer, ref("Command"), status=202)
        done = result(cmd_id)
        self.assertEqual((done["state"], done["finished"]), ("cancelled", False))

    def test_output_is_read_as_base64_bytes_from_an_offset(self):
        answer = request("POST", f"/api/v1/vms/{VM}/commands",
                         {"cmd": "/usr/bin/printf", "args": ["\\000\\033[31mred\\377 end"]})
        cmd_id = answer.json["cmdId"]
        result(cmd_id)
        wanted = b"\x00\x1b[31mred\xff end"
        data, offset = b"", 0
        while True:
            page = self.assertOk(
                get(f"/api/v1/commands/{cmd_id}/output?offset={offset}&maxBytes=4"),
                ref("OutputPage"))
            self.assertEqual(page["offset"], offset)
            chunk = base64.b64decode(page["data"])
            self.assertLessEqual(len(chunk), 4)
            data += chunk
            offset = page["nextOffset"]
            if page["finished"] and not chunk:
                break
        self.assertEqual(data, wanted)
        self.assertEqual(page["totalBytes"], len(wanted))
        err = get(f"/api/v1/commands/{cmd_id}/output?stream=err").json
        self.assertEqual(err["data"], "")
        self.assertError(get(f"/api/v1/commands/{cmd_id}/output?stream=stdout"), 400,
                         BAD_ARGUMENT)
        self.assertError(get(f"/api/v1/commands/{cmd_id}/output?offset=-1"), 400,
                         INVALID_PARAMS)
        self.assertError(get(f"/api/v1/commands/{cmd_id}/output?maxBytes=0"), 400,
                         BAD_ARGUMENT)

    def test_commands_are_listed_with_filters(self):
        cmd_id = run_cmd(OTHER_VM, "echo listed")
        result(cmd_id)
        listed = self.assertOk(get(f"/api/v1/commands?vm={OTHER_VM}&limit=5"), array("Command"))
        self.assertEqual(listed[0]["cmdId"], cmd_id, "newest first")
        self.assertTrue(all(c["vm"] == OTHER_VM for c in listed))
        finished = get("/api/v1/commands?state=finished,failed&finished=true&limit=3").json
        self.assertLessEqual(len(finished), 3)
        self.assertTrue(all(c["state"] in ("finished", "failed") for c in finished))
        self.assertError(get("/api/v1/commands?limit=0"), 400, BAD_ARGUMENT)
        self.assertError(get("/api/v1/commands?state=sleeping"), 400, BAD_ARGUMENT)
        self.assertError(get("/api/v1/commands?limit=many"), 400, INVALID_PARAMS)
        self.assertError(get("/api/v1/commands?colour=red"), 400, INVALID_PARAMS)

    def test_multicast_on_a_glob(self):
        glob = VM[:-1] + "[" + VM[-1] + OTHER_VM[-1] + "]"
        answer = request("POST", "/api/v1/commands",
                         {"glob": glob, "cmd": "/bin/sh", "args": ["-c", "echo from $X"],
                          "env": {"X": "fan"}})
        fanout = self.assertOk(answer, ref("Fanout"), status=202)
        self.assertEqual(sorted(t["vm"] for t in fanout["commands"]), sorted([VM, OTHER_VM]))
        for target in fanout["commands"]:
            done = result(target["cmdId"])
            self.assertEqual((done["vm"], done["out"]), (target["vm"], "from fan\n"))
        listed = get(f"/api/v1/commands?fanout={fanout['fanoutId']}").json
        self.assertEqual(len(listed), 2)
        self.assertError(request("POST", "/api/v1/commands", {"glob": "no-such-*", "cmd": "true"}),
                         400, BAD_ARGUMENT)
        self.assertError(request("POST", "/api/v1/commands", {"cmd": "true"}), 400, BAD_ARGUMENT)
        self.assertError(request("POST", f"/api/v1/vms/{VM}/commands",
                                 {"glob": "*", "cmd": "true"}), 400, BAD_ARGUMENT)

    def test_unknown_command_is_404_with_code_8_everywhere(self):
        for method, path in [("GET", "/api/v1/commands/cmd-nope"),
                             ("GET", "/api/v1/commands/cmd-nope/result"),
                             ("GET", "/api/v1/commands/cmd-nope/output"),
                             ("POST", "/api/v1/commands/cmd-nope/cancel")]:
            with self.subTest(path=path):
                self.assertIn("cmd-nope", self.assertError(request(method, path), 404,
                                                           UNKNOWN_COMMAND))
        self.assertError(get("/api/v1/commands/cmd-nope/result?wait=-1"), 400, BAD_ARGUMENT)


class Transfers(ApiTest):
    def test_copies_between_host_files_and_a_guest(self):
        data = os.urandom(300_000)
        digest = hashlib.sha256(data).hexdigest()
        local = os.path.join(HOST_FILES, "json-to-guest.bin")
        with open(local, "wb") as f:
            f.write(data)
        remote = os.path.join(FILES, "json-on-guest.bin")
        sent = self.assertOk(request("POST", "/api/v1/transfers", {
            "vm": VM, "direction": "to-guest", "hostPath": local, "guestPath": remote,
            "wait": True}), ref("Transfer"))
        self.assertEqual((sent["state"], sent["size"], sent["sha256"]),
                         ("done", len(data), digest))
        back = os.path.join(HOST_FILES, "json-back.bin")
        answer = request("POST", "/api/v1/transfers", {
            "vm": VM, "direction": "from-guest", "guestPath": remote, "hostPath": back})
        started = self.assertOk(answer, ref("Transfer"), status=202)
        self.assertEqual(answer.header("location"),
                         f"/api/v1/transfers/{started['transferId']}")
        done = wait_until("the copy back", lambda: (lambda t: t if t["state"] == "done" else None)(
            get(f"/api/v1/transfers/{started['transferId']}").json))
        check_schema(done, ref("Transfer"))
        with open(back, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), digest)
        listed = self.assertOk(get(f"/api/v1/transfers?vm={VM}"), array("Transfer"))
        self.assertIn(started["transferId"], [t["transferId"] for t in listed])

    def test_transfer_errors(self):
        self.assertError(get("/api/v1/transfers/xfer-nope"), 404, UNKNOWN_TRANSFER)
        self.assertError(request("POST", "/api/v1/transfers", {
            "vm": VM, "direction": "sideways", "hostPath": "/a"}), 400, BAD_ARGUMENT)
        self.assertIn("hostPath", self.assertError(request("POST", "/api/v1/transfers", {
            "vm": VM, "direction": "to-guest", "guestPath": "/a"}), 400, BAD_ARGUMENT))
        self.assertError(request("POST", "/api/v1/transfers", {
            "vm": VM, "direction": "to-guest", "hostPath": "relative"}), 400, BAD_ARGUMENT)
        self.assertError(request("POST", "/api/v1/transfers", {
            "vm": "nope", "direction": "to-guest", "hostPath": "/etc/hostname"}), 404,
            UNKNOWN_VM)
        message = self.assertError(request("POST", "/api/v1/transfers", {
            "vm": VM, "direction": "from-guest", "wait": True,
            "guestPath": os.path.join(FILES, "missing"),
            "hostPath": os.path.join(HOST_FILES, "missing")}), 502, TRANSFER_FAILED)
        self.assertIn("not-found", message)


class Files(ApiTest):
    def staged(self):
        return sorted(os.listdir(os.path.join(HOST_STATE, "api-files")))

    def test_upload_then_download_through_the_host(self):
        data = os.urandom(2 * 1024 * 1024 + 5)
        digest = hashlib.sha256(data).hexdigest()
        remote = os.path.join(FILES, "json-upload.bin")
        answer = request("PUT", f"/api/v1/vms/{VM}/files?path={q(remote)}", raw=data,
                         headers={"Content-Type": "application/octet-stream"})
        transfer = self.assertOk(answer, ref("Transfer"))
        self.assertEqual((transfer["state"], transfer["size"], transfer["sha256"],
                          transfer["guestPath"], transfer["direction"]),
                         ("done", len(data), digest, remote, "to-guest"))
        with open(remote, "rb") as f:
            self.assertEqual(f.read(), data)
        answer = get(f"/api/v1/vms/{VM}/files?path={q(remote)}")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.body, data)
        self.assertEqual(answer.header("x-vmc-sha256"), digest)
        self.assertEqual(answer.header("content-type"), "application/octet-stream")
        self.assertEqual(int(answer.header("content-length")), len(data))
        self.assertEqual(self.staged(), [], "staged files are removed")

    def test_a_chunked_upload_without_length(self):
        remote = os.path.join(FILES, "json-chunked.txt")
        conn = http.client.HTTPConnection(HOST, PORT, timeout=PATIENCE)
        try:
            conn.request("PUT", f"/api/v1/vms/{VM}/files?path={q(remote)}",
                         body=iter([b"first part, ", b"second part\n"]), encode_chunked=True)
            response = conn.getresponse()
            transfer = json.loads(response.read())
            self.assertEqual(response.status, 200, transfer)
        finally:
            conn.close()
        self.assertEqual(transfer["sha256"],
                         hashlib.sha256(b"first part, second part\n").hexdigest())
        with open(remote, "rb") as f:
            self.assertEqual(f.read(), b"first part, second part\n")

    def test_file_errors(self):
        self.assertError(request("PUT", f"/api/v1/vms/nope/files?path=/tmp/x", raw=b"x"), 404,
                         UNKNOWN_VM)
        self.assertError(request("PUT", f"/api/v1/vms/{VM}/files?path=relative", raw=b"x"),
                         400, BAD_ARGUMENT)
        self.assertError(request("PUT", f"/api/v1/vms/{VM}/files", raw=b"x"), 400,
                         INVALID_PARAMS)
        message = self.assertError(request("PUT", f"/api/v1/vms/{VM}/files?path=/etc/vmc-x",
                                           raw=b"x"), 502, TRANSFER_FAILED)
        self.assertIn("outside-allowed-roots", message)
        missing = os.path.join(FILES, "no-such-file")
        self.assertIn("not-found", self.assertError(
            get(f"/api/v1/vms/{VM}/files?path={q(missing)}"), 502, TRANSFER_FAILED))
        self.assertError(get(f"/api/v1/vms/nope/files?path=/tmp/x"), 404, UNKNOWN_VM)
        self.assertEqual(self.staged(), [], "staged files are removed after failures too")


class Events(ApiTest):
    def test_a_vm_stream_tells_a_commands_life_and_output(self):
        stream = EventStream(f"?vm={VM}")
        try:
            self.assertEqual(stream.status, 200)
            self.assertTrue(stream.headers["content-type"].startswith("text/event-stream"))
            cmd_id = run_cmd(VM, "echo one; echo two >&2")
            seen = stream.until("the command's end", lambda name, data: name == "command"
                                and data["cmdId"] == cmd_id and data["done"])
            mine = [(n, d) for n, d in seen if d.get("cmdId") == cmd_id]
            states = [d["state"] for n, d in mine if n == "command"]
            self.assertIn("running", states)
            self.assertEqual(states[-1], "finished")
            self.assertEqual(mine[-1][1]["exitCodeOrSignal"], 0)
            out = b"".join(base64.b64decode(d["data"]) for n, d in mine
                           if n == "output" and d["stream"] == "out")
            self.assertEqual(out, b"one\n")
            self.assertTrue(all(d.get("vm") == VM for n, d in seen if "vm" in d))
        finally:
            stream.close()

    def test_a_command_stream_replays_from_the_start_and_ends_with_the_command(self):
        cmd_id = run_cmd(VM, "echo early; sleep 0.4; echo late; exit 4")
        wait_until("some output", lambda: get(f"/api/v1/commands/{cmd_id}").json["outBytes"])
        stream = EventStream(f"?cmd={cmd_id}")
        try:
            events = []
            while (event := stream.next()) is not None:
                events.append(event)
            self.assertTrue(stream.ended, "the stream ends once the command did")
            out = b"".join(base64.b64decode(d["data"]) for n, d in events if n == "output")
            self.assertEqual(out, b"early\nlate\n", "nothing missed, nothing twice")
            name, last = events[-1]
            self.assertEqual((name, last["state"], last["exitCodeOrSignal"]),
                             ("command", "finished", 4))
        finally:
            stream.close()
        # Asked again after the end: the whole story at once.
        stream = EventStream(f"?cmd={cmd_id}")
        events = []
        while (event := stream.next()) is not None:
            events.append(event)
        stream.close()
        self.assertEqual(events[-1][1]["outcome"], "exited")

    def test_a_stream_of_several_commands_ends_after_the_last(self):
        fast, slow = run_cmd(VM, "echo fast"), run_cmd(OTHER_VM, "sleep 0.3; echo slow")
        stream = EventStream(f"?cmd={fast},{slow}")
        events = []
        while (event := stream.next()) is not None:
            events.append(event)
        stream.close()
        ended = [d["cmdId"] for n, d in events if n == "command" and d["done"]]
        self.assertEqual(sorted(ended), sorted([fast, slow]))

    def test_transfers_report_progress_events(self):
        stream = EventStream(f"?vm={VM}")
        try:
            data = os.urandom(5 * 1024 * 1024)
            remote = os.path.join(FILES, "json-events.bin")
            answer = request("PUT", f"/api/v1/vms/{VM}/files?path={q(remote)}", raw=data)
            transfer_id = answer.json["transferId"]
            seen = stream.until("the transfer's end", lambda name, d: name == "transfer"
                                and d["transferId"] == transfer_id and d["state"] == "done")
            self.assertEqual((seen[-1][1]["bytesDone"], seen[-1][1]["vm"],
                              seen[-1][1]["direction"]), (len(data), VM, "to-guest"))
        finally:
            stream.close()

    def test_filters_are_checked(self):
        self.assertError(get("/api/v1/events?vm=a&cmd=b"), 400, BAD_ARGUMENT)
        self.assertError(get("/api/v1/events?cmd=cmd-nope"), 404, UNKNOWN_COMMAND)
        self.assertError(get("/api/v1/events?colour=red"), 400, INVALID_PARAMS)

    def test_a_client_that_does_not_read_stalls_nobody(self):
        stalled = EventStream("", rcvbuf=4096)  # never read from
        try:
            metrics = get("/metrics").body.decode()
            self.assertRegex(metrics, r"(?m)^vmc_api_event_streams [1-9]")
            listener = EventStream(f"?vm={OTHER_VM}")
            cmd_ids = [run_cmd(OTHER_VM, "head -c 200000 /dev/zero | tr '\\0' x")
                       for _ in range(10)]
            for cmd_id in cmd_ids:
                self.assertEqual(result(cmd_id)["outBytes"], 200000)
            listener.until("the last command's end", lambda name, d: name == "command"
                           and d["cmdId"] == cmd_ids[-1] and d["done"])
            listener.close()
        finally:
            stalled.close()


class Observability(ApiTest):
    def test_healthz(self):
        health = self.assertOk(get("/healthz"), ref("Health"))
        self.assertEqual((health["status"], health["broker"]["state"]), ("ok", "up"))
        self.assertGreaterEqual(health["guestsByPresence"]["alive"], 2)
        self.assertGreaterEqual(health["broker"]["connections"], 1)
        self.assertEqual(health["broker"]["reconnects"], health["broker"]["connections"] - 1)

    def test_host_info(self):
        host = self.assertOk(get("/api/v1/host"), ref("HostInfo"))
        self.assertRegex(host["version"], r"^\d+\.\d+\.\d+")
        self.assertEqual((host["backend"], host["protocol"]), ("unmanaged", 1))
        self.assertEqual(sum(host["vmsByState"].values()), host["vms"])

    def test_metrics_in_prometheus_text_format(self):
        result(run_cmd(VM, "true"))
        request("PUT", f"/api/v1/vms/{VM}/files?path={q(os.path.join(FILES, 'm.txt'))}",
                raw=b"metrics")
        answer = get("/metrics")
        self.assertEqual(answer.status, 200)
        self.assertTrue(answer.header("content-type").startswith("text/plain; version=0.0.4"))
        text = answer.body.decode()
        samples = {}
        for line in text.splitlines():
            if line.startswith("#"):
                self.assertRegex(line, r"^# (HELP|TYPE) vmc_\w+ ")
                continue
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
        self.assertGreaterEqual(samples['vmc_guests{presence="alive"}'], 2)
        self.assertEqual(samples['vmc_vms{state="Unknown"}'], get("/api/v1/host").json["vms"])
        self.assertGreaterEqual(samples['vmc_commands{state="finished"}'], 1)
        self.assertEqual(samples["vmc_broker_connected"], 1)
        self.assertIn("vmc_broker_reconnects_total", samples)
        self.assertGreaterEqual(samples['vmc_transfer_bytes{direction="to-guest"}'], 7)
        self.assertIn('vmc_transfers{state="done"}', samples)


class BadInput(ApiTest):
    def assertServerAnswers(self):
        self.assertEqual(get("/healthz").status, 200)

    def test_malformed_json_wrong_types_and_unknown_keys(self):
        path = f"/api/v1/vms/{VM}/commands"
        for raw in [b'{"cmd": ', b"not json", b"\xff\xfe{}", b'{"cmd": "true"} trailing']:
            with self.subTest(raw=raw):
                self.assertError(request("POST", path, raw=raw), 400, MALFORMED_REQUEST)
        for body in [{"cmd": 5}, {"cmd": "ls", "args": "-l"}, {"cmd": "ls", "args": [1]},
                     {"cmd": "ls", "env": {"A": 1}}, {"cmd": "ls", "bogus": True}, [], {}]:
            with self.subTest(body=body):
                self.assertError(request("POST", path, body), 400, INVALID_PARAMS)
        self.assertIn("body", self.assertError(request("POST", path), 400, INVALID_PARAMS))
        self.assertError(request("POST", path, {"cmd": ""}), 400, BAD_ARGUMENT)
        self.assertError(request("POST", path, {"cmd": "x", "env": {"A=B": "c"}}), 400,
                         BAD_ARGUMENT)
        self.assertServerAnswers()

    def test_an_oversized_body_is_413_and_the_server_still_answers(self):
        conn = http.client.HTTPConnection(HOST, PORT, timeout=PATIENCE)
        try:
            conn.putrequest("POST", f"/api/v1/vms/{VM}/commands")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(2 * 1024 * 1024))
            conn.endheaders()
            try:
                conn.send(b'{"cmd": "' + b"x" * (256 * 1024))
            except OSError:
                pass  # the server may have answered and closed already
            response = conn.getresponse()
            body = json.loads(response.read())
            self.assertEqual(response.status, 413)
            self.assertEqual(body["error"]["name"], "malformed-request")
        finally:
            conn.close()
        answer = request("POST", f"/api/v1/vms/{VM}/commands",
                         raw=b'{"cmd": "' + b"x" * (1024 * 1024 + 1) + b'"}')
        self.assertError(answer, 413, MALFORMED_REQUEST)
        self.assertServerAnswers()

    def test_a_chunked_oversized_body_is_413(self):
        conn = http.client.HTTPConnection(HOST, PORT, timeout=PATIENCE)
        try:
            pieces = iter([b'{"cmd": "'] + [b"y" * 65536] * 20 + [b'"}'])
            conn.request("POST", f"/api/v1/vms/{VM}/commands", body=pieces,
                         encode_chunked=True)
            response = conn.getresponse()
            response.read()
            self.assertEqual(response.status, 413)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while sending: the server stopped reading, as it should
        finally:
            conn.close()
        self.assertServerAnswers()

    def test_unknown_routes_and_methods(self):
        message = self.assertError(get("/api/v1/nope"), 404, UNKNOWN_METHOD)
        self.assertIn("openapi.json", message)
        self.assertError(get("/api/v2/vms"), 404, UNKNOWN_METHOD)
        answer = request("PATCH", "/api/v1/vms")
        self.assertError(answer, 405, UNKNOWN_METHOD)
        self.assertEqual(answer.header("allow"), "GET, POST")
        self.assertError(request("DELETE", "/api/v1/commands"), 405, UNKNOWN_METHOD)
        self.assertServerAnswers()

    def test_names_with_odd_characters_are_just_unknown(self):
        for name in ["a%20b", "%C3%BC", "..", "x%2Fy"]:
            with self.subTest(name=name):
                self.assertError(get(f"/api/v1/vms/{name}"), 404, UNKNOWN_VM)


class Cli(ApiTest):
    def test_help_version_and_usage_errors(self):
        shown = vmc("--help")
        self.assertEqual(shown.returncode, 0)
        self.assertIn(b"Exit codes:", shown.stdout)
        self.assertEqual(vmc("--version", url=None).returncode, 0)
        version = vmc("version")
        self.assertEqual(version.returncode, 0)
        self.assertIn(b"vmc-host", version.stdout)
        for args in [[], ["frobnicate"], ["vm"], ["run", VM], ["cp", "a", "b"],
                     ["ping", VM, "--timeout", "soon"]]:
            with self.subTest(args=args):
                failed = vmc(*args)
                self.assertEqual(failed.returncode, 2, failed.stderr)
                self.assertTrue(failed.stderr.startswith(b"vmc: "), failed.stderr)

    def test_cannot_connect_is_exit_3(self):
        failed = vmc("vms", url="http://127.0.0.1:1")
        self.assertEqual(failed.returncode, 3)
        self.assertIn(b"cannot connect", failed.stderr)
        failed = vmc("vms", url=None, env={"VMC_URL": "http://127.0.0.1:1"})
        self.assertEqual(failed.returncode, 3, "VMC_URL is used")

    def test_tables_and_json(self):
        shown = vmc("vms")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        lines = shown.stdout.decode().splitlines()
        self.assertEqual(lines[0].split()[:3], ["NAME", "STATE", "PRESENCE"])
        self.assertTrue(any(line.split()[0] == VM for line in lines[1:]))
        listed = json.loads(vmc("--json", "vms").stdout)
        self.assertIn(VM, [vm["name"] for vm in listed])
        self.assertIn(b"alive", vmc("vm", VM).stdout)
        self.assertEqual(vmc("guests").returncode, 0)
        self.assertEqual(vmc("snapshots", VM).returncode, 0)
        self.assertEqual(vmc("host").returncode, 0)

    def test_remote_errors_are_exit_1_with_the_reason(self):
        for args, name in [(["vm", "nope"], b"unknown-vm"), (["start", VM], b"not-supported"),
                           (["poweroff", VM], b"not-supported"),
                           (["snapshot", "take", VM, "s"], b"not-supported"),
                           (["result", "cmd-nope"], b"unknown-command"),
                           (["cancel", "cmd-nope"], b"unknown-command"),
                           (["run", "nope", "--", "true"], b"unknown-vm"),
                           (["run", "--glob", "no-such-*", "--", "true"], b"bad-argument")]:
            with self.subTest(args=args):
                failed = vmc(*args)
                self.assertEqual(failed.returncode, 1, failed.stderr)
                self.assertIn(name, failed.stderr)

    def test_run_exits_with_the_remote_exit_code(self):
        ran = vmc("run", VM, "--", "/bin/sh", "-c", "echo out; echo err >&2; exit 3")
        self.assertEqual((ran.returncode, ran.stdout), (3, b"out\n"))
        self.assertIn(b"err\n", ran.stderr)
        for script, code in [("exit 0", 0), ("kill -KILL $$", 137), ("kill -TERM $$", 143)]:
            with self.subTest(script=script):
                self.assertEqual(vmc("run", VM, "--", "/bin/sh", "-c", script).returncode, code)
        self.assertEqual(vmc("run", VM, "--", "/no/such/program").returncode, 127)
        timed = vmc("run", "--timeout", "0.3", VM, "--", "sleep", "5")
        self.assertEqual(timed.returncode, 124, timed.stderr)
        ran = vmc("run", "-e", "A=1 2", "--cwd", FILES, VM, "--", "/bin/sh", "-c",
                  'echo "$A"; pwd')
        self.assertEqual(ran.stdout.decode().split("\n")[:2], ["1 2", os.path.realpath(FILES)])

    def test_run_streams_output_as_it_comes(self):
        # The command cannot end before the test saw its first line: it waits for a
        # file the test makes only then.
        go = os.path.join(FILES, "cli-go")
        if os.path.exists(go):
            os.remove(go)
        proc = subprocess.Popen([CLI, "--url", URL, "run", VM, "--", "/bin/sh", "-c",
                                 f"echo first; while [ ! -e {go} ]; do sleep 0.02; done; "
                                 "echo second"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            first = proc.stdout.readline()
            with open(go, "w"):
                pass
            rest = proc.stdout.read()
            self.assertEqual(proc.wait(timeout=PATIENCE), 0)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            proc.stderr.close()
        self.assertEqual((first, rest), (b"first\n", b"second\n"))

    def test_run_on_a_glob_prefixes_lines_and_exits_with_the_highest_code(self):
        glob = VM[:-1] + "[" + VM[-1] + OTHER_VM[-1] + "]"
        ran = vmc("run", "--glob", glob, "--", "/bin/echo", "hello")
        self.assertEqual(ran.returncode, 0, ran.stderr)
        lines = sorted(ran.stdout.decode().splitlines())
        self.assertEqual(lines, sorted([f"[{VM}] hello", f"[{OTHER_VM}] hello"]))
        failed = vmc("run", "--glob", glob, "--", "/bin/sh", "-c", "exit 5")
        self.assertEqual(failed.returncode, 5)
        detached = vmc("run", "-d", "--glob", glob, "--", "true")
        self.assertEqual(detached.returncode, 0)
        self.assertEqual(len(detached.stdout.decode().splitlines()), 2)

    def test_run_json_detach_result_command_and_cancel(self):
        ran = json.loads(vmc("--json", "run", VM, "--", "/bin/echo", "json").stdout)
        self.assertEqual((ran["out"], ran["exitCodeOrSignal"]), ("json\n", 0))
        detached = vmc("run", "-d", VM, "--", "/bin/sh", "-c", "echo bg; sleep 30")
        self.assertEqual(detached.returncode, 0)
        cmd_id = detached.stdout.decode().strip()
        self.assertRegex(cmd_id, r"^cmd-")
        wait_until("the command to run",
                   lambda: get(f"/api/v1/commands/{cmd_id}").json["state"] == "running")
        shown = vmc("command", cmd_id)
        self.assertIn(b"running", shown.stdout)
        self.assertEqual(vmc("cancel", cmd_id).returncode, 0)
        shown = vmc("result", cmd_id, "--wait", "10")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertIn(b"cancelled", shown.stdout)
        self.assertIn(b"bg\n", shown.stdout)
        self.assertIn(cmd_id.encode(), vmc("commands", "--vm", VM).stdout)

    def test_cp_both_ways_with_progress(self):
        data = os.urandom(1024 * 1024 + 3)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "cli.bin")
            with open(local, "wb") as f:
                f.write(data)
            remote = os.path.join(FILES, "cli.bin")
            sent = vmc("--progress", "cp", local, f"{VM}:{remote}")
            self.assertEqual(sent.returncode, 0, sent.stderr)
            self.assertIn(b"100%", sent.stderr)
            self.assertIn(hashlib.sha256(data).hexdigest().encode(), sent.stdout)
            with open(remote, "rb") as f:
                self.assertEqual(f.read(), data)
            back = os.path.join(tmp, "back.bin")
            got = vmc("--progress", "cp", f"{VM}:{remote}", back)
            self.assertEqual(got.returncode, 0, got.stderr)
            self.assertIn(b"100%", got.stderr)
            with open(back, "rb") as f:
                self.assertEqual(f.read(), data)
            into_dir = vmc("cp", f"{VM}:{remote}", tmp + "/")
            self.assertEqual(into_dir.returncode, 0, into_dir.stderr)
            self.assertEqual(sorted(os.listdir(tmp)), ["back.bin", "cli.bin"],
                             "no partial files left")
            piped = vmc("cp", "-", f"{VM}:{FILES}/cli-stdin.txt", stdin=b"from stdin\n")
            self.assertEqual(piped.returncode, 0, piped.stderr)
            self.assertEqual(vmc("cp", f"{VM}:{FILES}/cli-stdin.txt", "-").stdout,
                             b"from stdin\n")

    def test_cp_errors_have_their_exit_codes(self):
        missing = vmc("cp", "/no/such/local/file", f"{VM}:{FILES}/x")
        self.assertEqual(missing.returncode, 4, missing.stderr)
        outside = vmc("cp", "/etc/hostname", f"{VM}:/etc/vmc-outside")
        self.assertEqual(outside.returncode, 1)
        self.assertIn(b"outside-allowed-roots", outside.stderr)
        gone = vmc("cp", f"{VM}:{FILES}/no-such", os.path.join(HOST_FILES, "x"))
        self.assertEqual(gone.returncode, 1)
        self.assertIn(b"not-found", gone.stderr)
        self.assertFalse(os.path.exists(os.path.join(HOST_FILES, "x")))

    def test_ping_health_and_events(self):
        self.assertEqual(vmc("ping", VM).returncode, 0)
        self.assertEqual(vmc("ping", "nope").returncode, 1)
        self.assertEqual(vmc("health").returncode, 0)
        cmd_id = run_cmd(VM, "echo followed")
        followed = vmc("events", "--cmd", cmd_id)
        self.assertEqual(followed.returncode, 0, followed.stderr)
        self.assertIn(b'"followed\\n"', followed.stdout)
        self.assertRegex(followed.stdout.decode().splitlines()[-1], r"state=finished exit=0$")
        lines = vmc("--json", "events", "--cmd", cmd_id).stdout.decode().splitlines()
        events = [json.loads(line) for line in lines]
        self.assertEqual(events[-1]["event"], "command")
        self.assertEqual(events[-1]["data"]["state"], "finished")


if __name__ == "__main__":
    unittest.main()
