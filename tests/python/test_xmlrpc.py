"""Interoperability of vmc-host's XML-RPC API with Python's standard xmlrpc.client.

Run by tests/python/run.sh, which starts a real vmc-host (unmanaged backend) and
real vmc-guest processes on a real broker and tells this module where they are:

  VMC_XMLRPC_URL   http://127.0.0.1:PORT
  VMC_TEST_VMS     the guests' ids, space-separated (at least three)
  VMC_TEST_FILES   the directory the guests may read and write (their allowed root)
  VMC_TEST_HOST_FILES  a directory of the host side's files

Standard library only: unittest, xmlrpc.client, http.client. Every test asserts
what a caller would check: values, types as Python decodes them, fault codes.
"""

import base64
import hashlib
import http.client
import os
import time
import unittest
import urllib.parse
import xmlrpc.client

import common
from common import FILES, HOST_FILES, OTHER_VM, PATIENCE, SPARE_VM, URL, VM, VMS


# The stable fault codes of docs/API.md.
UNKNOWN_VM = 1
BAD_ARGUMENT = 2
NOT_SUPPORTED = 6
UNKNOWN_COMMAND = 8
UNKNOWN_TRANSFER = 9
VM_EXISTS = 10
NOT_FINISHED = 11
TRANSFER_FAILED = 15
MALFORMED_REQUEST = -32700
UNKNOWN_METHOD = -32601
INVALID_PARAMS = -32602

ORIGINAL_METHODS = [
    "createVM", "removeVM", "start", "shutdown", "sleep", "reset", "powerOff",
    "pause", "resume", "getState", "saveState", "discardState", "takeSnapshot",
    "restoreSnapshot", "deleteSnapshot", "ping", "runCmd", "listFinishedCmds",
    "getCmdResults", "getCmdDetails", "cpFileToVM", "cpFileFromVM", "help",
    "listVMs", "listVMsWithState", "listRunningVMs", "listSnapshots",
    "getIdsToNamesMapping", "getNamesToIdsMapping", "getPerformanceData",
]
ALIASES = ["unpause", "listAvailableVMs", "listRegisteredVMs", "saveSnapshot", "getStats"]
NEW_METHODS = [
    "version", "runCmdOnVMs", "cancelCmd", "getCmdOutput", "startCpFileToVM",
    "startCpFileFromVM", "getTransferProgress", "getPresence", "getVMInfo",
]
INTROSPECTION = [
    "system.listMethods", "system.methodHelp", "system.methodSignature", "system.multicall",
]
STATE_NAMES = {
    "Unknown", "PoweredOff", "Saved", "Aborted", "Running", "Paused", "Stuck",
    "Starting", "Stopping", "Saving", "Restoring", "Discarding",
}
RU_KEYS = [
    "ru_utime", "ru_stime", "ru_maxrss", "ru_ixrss", "ru_idrss", "ru_isrss",
    "ru_minflt", "ru_majflt", "ru_nswap", "ru_inblock", "ru_oublock", "ru_msgsnd",
    "ru_msgrcv", "ru_nsignals", "ru_nvcsw", "ru_nivcsw",
]


_open_proxies = []


def proxy(path="", **options):
    """A client as a 2010 caller would make one (with nil allowed unless asked);
    closed at the end of the test."""
    options.setdefault("allow_none", True)
    client = xmlrpc.client.ServerProxy(URL + path, **options)
    _open_proxies.append(client)
    return client


def wait_until(what, condition, patience=PATIENCE):
    return common.wait_until(what, condition, patience, every=0.1)


def post(body, path="/RPC2", headers=None, method="POST"):
    """Sends a raw request; answers (status, body bytes)."""
    url = urllib.parse.urlsplit(URL)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=PATIENCE)
    try:
        conn.request(method, path, body=body,
                     headers=headers or {"Content-Type": "text/xml"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def sh(vmc, script, vm=VM, **kwargs):
    return vmc.runCmd(vm, "/bin/sh", ["-c", script], kwargs.get("env", {}))


class ApiTest(unittest.TestCase):
    def tearDown(self):
        while _open_proxies:
            _open_proxies.pop()("close")()

    def assertFault(self, code, call, *args):
        with self.assertRaises(xmlrpc.client.Fault) as caught:
            call(*args)
        fault = caught.exception
        self.assertEqual(fault.faultCode, code, fault.faultString)
        self.assertTrue(fault.faultString.strip(), "a fault says what went wrong")
        return fault


class Introspection(ApiTest):
    def test_list_methods_names_every_method_and_alias(self):
        methods = proxy().system.listMethods()
        for name in ORIGINAL_METHODS + ALIASES + NEW_METHODS + INTROSPECTION:
            self.assertIn(name, methods)
        self.assertEqual(methods, sorted(methods))

    def test_help_lists_every_method_with_its_signature_and_meaning(self):
        vmc = proxy()
        text = vmc.help()
        for name in vmc.system.listMethods():
            self.assertIn(f"\n{name}(", text, name)
        self.assertIn("runCmd(toVmName, cmd, args=(), env={}, path=None, fileForStdin='')", text)
        self.assertIn("ping(vm, timeout_secs=5.0) -> boolean", text)
        self.assertIn("cpFileFromVM(vmName, pathToRemoteFileName, pathToLocalFileName=None)", text)
        one = vmc.help("takeSnapshot")
        self.assertTrue(one.startswith("takeSnapshot(vm, name, desc='') -> string"), one)
        self.assertIn("old name of takeSnapshot", vmc.help("saveSnapshot"))
        self.assertFault(UNKNOWN_METHOD, vmc.help, "noSuchMethod")

    def test_method_help_and_signature(self):
        vmc = proxy()
        self.assertIn("fileForStdin", vmc.system.methodHelp("runCmd"))
        self.assertEqual(vmc.system.methodSignature("getState"), [["string", "string"]])
        self.assertEqual(
            vmc.system.methodSignature("ping"),
            [["boolean", "string"], ["boolean", "string", "double"]],
        )
        runcmd = vmc.system.methodSignature("runCmd")
        self.assertEqual(len(runcmd), 5, "2 to 6 arguments")
        self.assertEqual(runcmd[-1], ["string", "string", "string", "array", "struct",
                                      "string", "string"])
        self.assertEqual(vmc.system.methodSignature("unpause"),
                         vmc.system.methodSignature("resume"))
        self.assertFault(UNKNOWN_METHOD, vmc.system.methodSignature, "nope")

    def test_version(self):
        version = proxy().version()
        self.assertRegex(version, r"^\d+\.\d+\.\d+")

    def test_the_original_address_forms_reach_the_same_server(self):
        self.assertEqual(proxy().version(), proxy("/RPC2").version())

    def test_unknown_method_is_a_fault_with_its_code(self):
        fault = self.assertFault(UNKNOWN_METHOD, proxy().noSuchMethod, 1, 2)
        self.assertIn("noSuchMethod", fault.faultString)


class Vms(ApiTest):
    def test_guests_are_listed_with_state_and_ids(self):
        vmc = proxy()
        names = vmc.listVMs()
        for vm in VMS:
            self.assertIn(vm, names)
        self.assertEqual(vmc.listAvailableVMs(), names)
        self.assertEqual(vmc.listRegisteredVMs(), names)
        with_state = vmc.listVMsWithState()
        self.assertEqual(sorted(with_state), sorted(names))
        self.assertEqual(with_state[VM], "Unknown", "an unmanaged guest has no hypervisor state")
        self.assertLessEqual(set(with_state.values()), STATE_NAMES)
        running = vmc.listRunningVMs()
        self.assertIn(VM, running, "an unmanaged guest whose agent is alive runs")
        ids_to_names = vmc.getIdsToNamesMapping()
        names_to_ids = vmc.getNamesToIdsMapping()
        self.assertEqual(names_to_ids[VM], VM, "an unmanaged guest's id is its name")
        self.assertEqual({v: k for k, v in names_to_ids.items()}, ids_to_names)

    def test_state_and_presence(self):
        vmc = proxy()
        self.assertEqual(vmc.getState(VM), "Unknown")
        presence = vmc.getPresence(VM)
        self.assertEqual(presence["vm"], VM)
        self.assertEqual(presence["presence"], "alive")
        self.assertIsInstance(presence["since"], xmlrpc.client.DateTime)
        self.assertIsInstance(presence["lastHeard"], xmlrpc.client.DateTime)
        self.assertEqual(presence["state"], "Unknown")

    def test_vm_info_carries_what_the_guest_said_in_hello(self):
        vmc = proxy()
        info = vmc.getVMInfo(VM)
        self.assertEqual((info["name"], info["backend"], info["presence"]), (VM, "unmanaged", "alive"))
        guest = info["guest"]
        self.assertEqual(guest["id"], info["id"])
        self.assertTrue(guest["agentVersion"] and guest["kernel"] and guest["hostname"], guest)
        self.assertGreater(guest["bootTime"], 0)
        with self.assertRaises(xmlrpc.client.Fault):
            vmc.getVMInfo("no-such-vm")

    def test_datetimes_decode_as_datetime_in_utc(self):
        vmc = proxy(use_builtin_types=True)
        heard = vmc.getPresence(VM)["lastHeard"]
        import datetime
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        self.assertLess(abs((now - heard).total_seconds()), 60, f"{heard} is UTC")

    def test_lifecycle_of_an_unmanaged_guest_is_not_supported(self):
        vmc = proxy()
        for method in ["start", "shutdown", "sleep", "reset", "powerOff", "pause",
                       "resume", "unpause", "saveState", "discardState"]:
            fault = self.assertFault(NOT_SUPPORTED, getattr(vmc, method), VM)
            self.assertIn("unmanaged", fault.faultString, method)
        self.assertFault(NOT_SUPPORTED, vmc.takeSnapshot, VM, "snap")
        self.assertFault(NOT_SUPPORTED, vmc.takeSnapshot, VM, "snap", "a description")
        self.assertFault(NOT_SUPPORTED, vmc.saveSnapshot, VM, "snap")
        self.assertFault(NOT_SUPPORTED, vmc.restoreSnapshot, VM, "snap")
        self.assertFault(NOT_SUPPORTED, vmc.deleteSnapshot, VM, "snap")
        self.assertFault(NOT_SUPPORTED, vmc.getPerformanceData, VM)
        self.assertFault(NOT_SUPPORTED, vmc.getStats, VM)
        self.assertEqual(vmc.listSnapshots(VM), [])
        self.assertEqual(vmc.getState(VM), "Unknown", "nothing changed")

    def test_create_vm(self):
        vmc = proxy()
        fault = self.assertFault(NOT_SUPPORTED, vmc.createVM, "new-vm", "/images/disk.qcow2")
        self.assertIn("createVM", fault.faultString)
        self.assertFault(VM_EXISTS, vmc.createVM, VM, "/images/disk.qcow2")
        self.assertFault(BAD_ARGUMENT, vmc.createVM, "bad name!", "/images/disk.qcow2")
        self.assertFault(BAD_ARGUMENT, vmc.createVM, "new-vm", "relative/disk.qcow2")
        self.assertNotIn("new-vm", vmc.listVMs())

    def test_unknown_vm_is_a_fault_with_its_code(self):
        vmc = proxy()
        for call, args in [
            (vmc.getState, ("nope",)), (vmc.start, ("nope",)), (vmc.removeVM, ("nope",)),
            (vmc.ping, ("nope",)), (vmc.runCmd, ("nope", "true")), (vmc.getPresence, ("nope",)),
            (vmc.listSnapshots, ("nope",)), (vmc.getPerformanceData, ("nope",)),
            (vmc.takeSnapshot, ("nope", "s")), (vmc.cpFileToVM, ("nope", "/etc/hostname")),
        ]:
            fault = self.assertFault(UNKNOWN_VM, call, *args)
            self.assertIn('"nope"', fault.faultString)

    def test_ping(self):
        vmc = proxy()
        self.assertIs(vmc.ping(VM), True)
        self.assertIs(vmc.ping(VM, 2), True)
        self.assertIs(vmc.ping(VM, 2.5), True)
        self.assertFault(BAD_ARGUMENT, vmc.ping, VM, 0)
        self.assertFault(BAD_ARGUMENT, vmc.ping, VM, -1.0)
        self.assertFault(INVALID_PARAMS, vmc.ping, VM, "soon")

    def test_remove_vm_forgets_an_unmanaged_guest_until_it_speaks_again(self):
        vmc = proxy()
        self.assertIs(vmc.removeVM(SPARE_VM), True)
        wait_until(f"{SPARE_VM} to say it is alive again",
                   lambda: SPARE_VM in vmc.listVMs())


class Commands(ApiTest):
    def test_run_cmd_then_results_asked_twice(self):
        vmc = proxy()
        cmd_id = sh(vmc, "echo hello; echo oops >&2; exit 3")
        self.assertIsInstance(cmd_id, str)
        first = vmc.getCmdResults(cmd_id, PATIENCE)
        self.assertEqual(first["cmd-id"], cmd_id)
        self.assertEqual(first["out"], "hello\n")
        self.assertEqual(first["err"], "oops\n")
        self.assertIs(first["finished"], True)
        self.assertEqual(first["exitCodeOrSignal"], 3)
        self.assertEqual(first["state"], "finished")
        self.assertEqual(first["outcome"], "exited")
        self.assertEqual(first["vm"], VM)
        for key in RU_KEYS:
            self.assertIn(key, first["resources"])
        self.assertIsInstance(first["resources"]["ru_utime"], float)
        self.assertIsInstance(first["resources"]["ru_maxrss"], int)
        self.assertGreater(first["resources"]["ru_maxrss"], 0)
        again = vmc.getCmdResults(cmd_id)
        self.assertEqual(again, first, "results are not read-once")

    def test_a_signal_is_told_apart_from_an_exit(self):
        vmc = proxy()
        result = vmc.getCmdResults(sh(vmc, "kill -TERM $$"), PATIENCE)
        self.assertIs(result["finished"], False)
        self.assertEqual(result["exitCodeOrSignal"], 15)
        self.assertEqual(result["outcome"], "signalled")

    def test_args_keep_spaces_and_quotes(self):
        vmc = proxy()
        args = ["%s|", "a b", '"double"', "'single'", "$HOME", "", "tab\there", "ünï"]
        cmd_id = vmc.runCmd(VM, "/usr/bin/printf", args)
        result = vmc.getCmdResults(cmd_id, PATIENCE)
        self.assertEqual(result["out"], "a b|\"double\"|'single'|$HOME||tab\there|ünï|")

    def test_env_path_and_stdin(self):
        vmc = proxy()
        stdin = os.path.join(FILES, "stdin.txt")
        with open(stdin, "w") as f:
            f.write("line one\nline two\n")
        cmd_id = vmc.runCmd(VM, "/bin/sh", ["-c", 'echo "$GREETING"; pwd; wc -l'],
                            {"GREETING": "hi there", "EMPTY": ""}, FILES, stdin)
        result = vmc.getCmdResults(cmd_id, PATIENCE)
        self.assertEqual(result["out"].split("\n")[:2], ["hi there", os.path.realpath(FILES)])
        self.assertEqual(result["out"].split("\n")[2].strip(), "2")

    def test_nil_means_the_default(self):
        vmc = proxy()
        cmd_id = vmc.runCmd(VM, "/bin/echo", ["nil", "ok"], None, None, None)
        self.assertEqual(vmc.getCmdResults(cmd_id, PATIENCE)["out"], "nil ok\n")
        self.assertEqual(vmc.getCmdOutput(cmd_id, None, None, None)["offset"], 0)
        self.assertIn("ping(", vmc.help(None))

    def test_results_of_a_running_command_are_not_finished_and_details_are_live(self):
        vmc = proxy()
        cmd_id = sh(vmc, "i=0; while [ $i -lt 40 ]; do i=$((i+1)); echo tick; sleep 0.1; done")
        fault = self.assertFault(NOT_FINISHED, vmc.getCmdResults, cmd_id)
        self.assertIn(cmd_id, fault.faultString)
        details = wait_until("the command to run",
                             lambda: (lambda d: d if d["state"] == "running" else None)(
                                 vmc.getCmdDetails(cmd_id)))
        self.assertEqual(details["cmd-id"], cmd_id)
        self.assertEqual(details["vm"], VM)
        self.assertEqual(details["cmd"], "/bin/sh")
        self.assertIsInstance(details["createdAt"], xmlrpc.client.DateTime)
        self.assertIsInstance(details["startedAt"], xmlrpc.client.DateTime)
        self.assertNotIn("finishedAt", details)
        self.assertIsInstance(details["pid"], int)
        self.assertEqual(details["live"]["state"], "running")
        for key in RU_KEYS:
            self.assertIn(key, details["resources"], "live usage while it runs")
        result = vmc.getCmdResults(cmd_id, PATIENCE)
        self.assertEqual(result["out"], "tick\n" * 40)
        done = vmc.getCmdDetails(cmd_id)
        self.assertEqual(done["state"], "finished")
        self.assertIsInstance(done["finishedAt"], xmlrpc.client.DateTime)
        self.assertEqual(done["exitCodeOrSignal"], 0)

    def test_cancel(self):
        vmc = proxy()
        cmd_id = sh(vmc, "echo started; sleep 60")
        wait_until("the command to run", lambda: vmc.getCmdDetails(cmd_id)["state"] == "running")
        self.assertIs(vmc.cancelCmd(cmd_id), True)
        result = vmc.getCmdResults(cmd_id, PATIENCE)
        self.assertEqual(result["state"], "cancelled")
        self.assertIs(result["finished"], False)

    def test_output_is_read_as_base64_bytes_from_an_offset(self):
        vmc = proxy()
        cmd_id = vmc.runCmd(VM, "/usr/bin/printf", ["\\000\\033[31mred\\377 and more"])
        wanted = b"\x00\x1b[31mred\xff and more"
        data, offset = b"", 0
        while True:
            page = vmc.getCmdOutput(cmd_id, "out", offset, 4)
            self.assertIsInstance(page["data"], xmlrpc.client.Binary)
            self.assertEqual(page["offset"], offset)
            self.assertLessEqual(len(page["data"].data), 4)
            data += page["data"].data
            offset = page["nextOffset"]
            if page["finished"] and not page["data"].data:
                break
            if not page["data"].data:
                time.sleep(0.1)
        self.assertEqual(data, wanted)
        self.assertEqual(page["totalBytes"], len(wanted))
        # The text result of the same command still parses: what XML cannot carry
        # is U+FFFD there.
        out = vmc.getCmdResults(cmd_id)["out"]
        self.assertEqual(out, "\ufffd\ufffd[31mred\ufffd and more")
        self.assertEqual(vmc.getCmdOutput(cmd_id)["data"].data, wanted)
        self.assertEqual(vmc.getCmdOutput(cmd_id, "err")["data"].data, b"")
        past = vmc.getCmdOutput(cmd_id, "out", 1000)
        self.assertEqual((past["data"].data, past["nextOffset"]), (b"", 1000))
        self.assertFault(BAD_ARGUMENT, vmc.getCmdOutput, cmd_id, "stdout")
        self.assertFault(BAD_ARGUMENT, vmc.getCmdOutput, cmd_id, "out", -1)
        self.assertFault(BAD_ARGUMENT, vmc.getCmdOutput, cmd_id, "out", 0, 0)

    def test_i8_offsets_beyond_32_bits(self):
        vmc = proxy()
        cmd_id = vmc.runCmd(VM, "/bin/true")
        vmc.getCmdResults(cmd_id, PATIENCE)
        # xmlrpc.client cannot send an i8, but it reads one; send the call by hand.
        body = ("<?xml version='1.0'?><methodCall><methodName>getCmdOutput</methodName>"
                f"<params><param><value><string>{cmd_id}</string></value></param>"
                "<param><value><string>out</string></value></param>"
                "<param><value><i8>5000000000</i8></value></param></params></methodCall>")
        status, answer = post(body.encode())
        self.assertEqual(status, 200)
        self.assertIn(b"<i8>5000000000</i8>", answer)
        (page,), _ = xmlrpc.client.loads(answer)
        self.assertEqual(page["nextOffset"], 5_000_000_000)
        self.assertEqual(page["offset"], 5_000_000_000)

    def test_list_finished_cmds(self):
        vmc = proxy()
        cmd_id = vmc.runCmd(VM, "/bin/echo", ["listed"])
        vmc.getCmdResults(cmd_id, PATIENCE)
        finished = vmc.listFinishedCmds()
        self.assertIn(cmd_id, finished)
        summary = finished[cmd_id]
        self.assertEqual(summary["cmd-id"], cmd_id)
        self.assertEqual((summary["vm"], summary["cmd"], summary["args"]),
                         (VM, "/bin/echo", ["listed"]))
        self.assertEqual((summary["state"], summary["finished"], summary["exitCodeOrSignal"]),
                         ("finished", True, 0))
        self.assertIsInstance(summary["finishedAt"], xmlrpc.client.DateTime)
        self.assertEqual(len(vmc.listFinishedCmds(1)), 1)
        self.assertFault(BAD_ARGUMENT, vmc.listFinishedCmds, 0)

    def test_unknown_command_is_a_fault_with_its_code(self):
        vmc = proxy()
        for call in [vmc.getCmdResults, vmc.getCmdDetails, vmc.cancelCmd, vmc.getCmdOutput]:
            fault = self.assertFault(UNKNOWN_COMMAND, call, "cmd-nope")
            self.assertIn("cmd-nope", fault.faultString)

    def test_multicast_on_a_glob(self):
        vmc = proxy()
        glob = VM[:-1] + "[" + VM[-1] + OTHER_VM[-1] + "]"
        fanout = vmc.runCmdOnVMs(glob, "/bin/sh", ["-c", "echo from $VMC_TEST"],
                                 {"VMC_TEST": "fan"})
        self.assertIsInstance(fanout["fanoutId"], str)
        self.assertEqual(sorted(fanout["cmds"]), sorted([VM, OTHER_VM]))
        self.assertEqual(fanout["failed"], {})
        for vm, cmd_id in fanout["cmds"].items():
            result = vmc.getCmdResults(cmd_id, PATIENCE)
            self.assertEqual((result["vm"], result["out"]), (vm, "from fan\n"))
        self.assertEqual(vmc.getCmdDetails(cmd_id)["fanoutId"], fanout["fanoutId"])
        self.assertFault(BAD_ARGUMENT, vmc.runCmdOnVMs, "no-such-vm-*", "/bin/true")

    def test_wrong_types_missing_and_extra_arguments(self):
        vmc = proxy()
        fault = self.assertFault(INVALID_PARAMS, vmc.runCmd, VM)
        self.assertIn("runCmd(toVmName, cmd, args=(), env={}, path=None, fileForStdin='')",
                      fault.faultString)
        fault = self.assertFault(INVALID_PARAMS, vmc.runCmd, VM, "/bin/echo", "not a list")
        self.assertIn("args", fault.faultString)
        self.assertFault(INVALID_PARAMS, vmc.runCmd, VM, "/bin/echo", [1, 2])
        self.assertFault(INVALID_PARAMS, vmc.runCmd, VM, "/bin/echo", [], {"N": 1})
        self.assertFault(INVALID_PARAMS, vmc.runCmd, VM, "/bin/echo", [], [])
        self.assertFault(INVALID_PARAMS, vmc.getState)
        self.assertFault(INVALID_PARAMS, vmc.getState, VM, "extra")
        self.assertFault(INVALID_PARAMS, vmc.getState, 42)
        self.assertFault(INVALID_PARAMS, vmc.getState, None)
        self.assertFault(INVALID_PARAMS, vmc.getState, {"vm": VM})
        self.assertFault(INVALID_PARAMS, vmc.listVMs, VM)
        self.assertFault(INVALID_PARAMS, vmc.getCmdOutput, "cmd-x", "out", 1.5)
        self.assertFault(BAD_ARGUMENT, vmc.runCmd, VM, "")
        self.assertFault(BAD_ARGUMENT, vmc.runCmd, VM, "/bin/true", [], {"A=B": "x"})


class Multicall(ApiTest):
    def test_multicall_answers_each_call_in_order(self):
        vmc = proxy()
        multi = xmlrpc.client.MultiCall(vmc)
        multi.version()
        multi.getState(VM)
        multi.getState("nope")
        multi.listVMsWithState()
        results = multi()
        self.assertEqual(results[0], vmc.version())
        self.assertEqual(results[1], "Unknown")
        with self.assertRaises(xmlrpc.client.Fault) as caught:
            results[2]
        self.assertEqual(caught.exception.faultCode, UNKNOWN_VM)
        self.assertIn(VM, results[3])

    def test_bad_entries_fault_alone(self):
        answers = proxy().system.multicall([
            {"methodName": "version", "params": []},
            "not a call",
            {"methodName": "system.multicall", "params": [[]]},
            {"methodName": "noSuchMethod", "params": []},
            {"methodName": "getState", "params": []},
        ])
        self.assertEqual(len(answers), 5)
        self.assertIsInstance(answers[0], list)
        codes = [a["faultCode"] for a in answers[1:]]
        self.assertEqual(codes, [INVALID_PARAMS, INVALID_PARAMS, UNKNOWN_METHOD, INVALID_PARAMS])


class Transfers(ApiTest):
    def host_file(self, name, size):
        path = os.path.join(HOST_FILES, name)
        data = os.urandom(size)
        with open(path, "wb") as f:
            f.write(data)
        return path, hashlib.sha256(data).hexdigest()

    def test_copy_to_and_from_a_guest_with_sha256_verified(self):
        vmc = proxy()
        local, digest = self.host_file("to-guest.bin", 3 * 1024 * 1024 + 17)
        remote = os.path.join(FILES, "on-guest.bin")
        sent = vmc.cpFileToVM(VM, local, remote)
        self.assertEqual((sent["state"], sent["direction"]), ("done", "to-guest"))
        self.assertEqual((sent["size"], sent["bytesDone"]), (os.path.getsize(local),) * 2)
        self.assertEqual(sent["sha256"], digest)
        self.assertEqual((sent["localPath"], sent["remotePath"], sent["vm"]), (local, remote, VM))
        self.assertIsInstance(sent["finishedAt"], xmlrpc.client.DateTime)
        with open(remote, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), digest)

        back = os.path.join(HOST_FILES, "back.bin")
        got = vmc.cpFileFromVM(VM, remote, back)
        self.assertEqual((got["state"], got["direction"]), ("done", "from-guest"))
        self.assertEqual(got["sha256"], digest)
        with open(back, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), digest)

    def test_the_other_path_defaults_to_the_same_path(self):
        vmc = proxy()
        path = os.path.join(FILES, "same-path.txt")
        with open(path, "w") as f:
            f.write("same path on both sides\n")
        digest = hashlib.sha256(b"same path on both sides\n").hexdigest()
        sent = vmc.cpFileToVM(VM, path)
        self.assertEqual((sent["remotePath"], sent["sha256"]), (path, digest))
        got = vmc.cpFileFromVM(VM, path, None)
        self.assertEqual((got["localPath"], got["sha256"]), (path, digest))

    def test_started_copies_report_progress(self):
        vmc = proxy()
        local, digest = self.host_file("progress.bin", 5 * 1024 * 1024)
        remote = os.path.join(FILES, "progress.bin")
        transfer_id = vmc.startCpFileToVM(VM, local, remote)
        self.assertIsInstance(transfer_id, str)
        done = wait_until("the copy to end", lambda: (lambda t: t if t["state"] == "done" else None)(
            vmc.getTransferProgress(transfer_id)))
        self.assertEqual((done["transferId"], done["bytesDone"], done["sha256"]),
                         (transfer_id, 5 * 1024 * 1024, digest))
        back = os.path.join(HOST_FILES, "progress-back.bin")
        transfer_id = vmc.startCpFileFromVM(VM, remote, back)
        done = wait_until("the copy back to end", lambda: (lambda t: t if t["state"] == "done"
                                                         else None)(
            vmc.getTransferProgress(transfer_id)))
        self.assertEqual(done["sha256"], digest)

    def test_copy_errors_are_faults_with_their_codes(self):
        vmc = proxy()
        local, _ = self.host_file("small.txt", 10)
        self.assertFault(BAD_ARGUMENT, vmc.cpFileToVM, VM, "relative.txt")
        self.assertFault(BAD_ARGUMENT, vmc.cpFileToVM, VM, local, "relative.txt")
        self.assertFault(BAD_ARGUMENT, vmc.cpFileToVM, VM, "/no/such/file.txt",
                         os.path.join(FILES, "x"))
        fault = self.assertFault(TRANSFER_FAILED, vmc.cpFileFromVM, VM,
                                 os.path.join(FILES, "missing.txt"),
                                 os.path.join(HOST_FILES, "missing.txt"))
        self.assertIn("not-found", fault.faultString)
        fault = self.assertFault(TRANSFER_FAILED, vmc.cpFileToVM, VM, local, "/etc/vmc-outside")
        self.assertIn("outside-allowed-roots", fault.faultString)
        self.assertFault(UNKNOWN_TRANSFER, vmc.getTransferProgress, "xfer-nope")


class Http(ApiTest):
    def assertServerAnswers(self):
        self.assertRegex(proxy().version(), r"^\d")

    def assertMalformed(self, body, **kwargs):
        status, answer = post(body, **kwargs)
        self.assertEqual(status, 200, answer[:200])
        with self.assertRaises(xmlrpc.client.Fault) as caught:
            xmlrpc.client.loads(answer)
        self.assertEqual(caught.exception.faultCode, MALFORMED_REQUEST)
        self.assertServerAnswers()

    def test_malformed_xml_is_a_fault_and_the_server_still_answers(self):
        self.assertMalformed(b"<?xml version='1.0'?><methodCall><methodName>listVMs")
        self.assertMalformed(b"this is not XML")
        self.assertMalformed(b"")
        self.assertMalformed(b"\xff\xfe\x00<")
        self.assertMalformed(b"<methodResponse><params></params></methodResponse>")

    def test_deep_nesting_is_refused(self):
        depth = 200_000
        body = ("<methodCall><methodName>help</methodName><params><param>"
                + "<value><array><data>" * depth + "</data></array></value>" * depth
                + "</param></params></methodCall>").encode()
        self.assertMalformed(body)

    def test_an_oversized_body_is_413_and_the_server_still_answers(self):
        url = urllib.parse.urlsplit(URL)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=PATIENCE)
        try:
            conn.putrequest("POST", "/RPC2")
            conn.putheader("Content-Type", "text/xml")
            conn.putheader("Content-Length", str(17 * 1024 * 1024))
            conn.endheaders()
            try:
                conn.send(b"<methodCall>" + b" " * (1024 * 1024))
            except OSError:
                pass  # the server may have answered and closed already
            response = conn.getresponse()
            self.assertEqual(response.status, 413)
        finally:
            conn.close()
        self.assertServerAnswers()

    def test_a_chunked_body_without_content_length_is_served(self):
        url = urllib.parse.urlsplit(URL)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=PATIENCE)
        try:
            body = xmlrpc.client.dumps((VM,), "getState").encode()
            conn.request("POST", "/RPC2", body=iter([body[:20], body[20:]]),
                         headers={"Content-Type": "text/xml"}, encode_chunked=True)
            response = conn.getresponse()
            self.assertEqual(response.status, 200)
            (state,), _ = xmlrpc.client.loads(response.read())
            self.assertEqual(state, "Unknown")
        finally:
            conn.close()

    def test_other_http_methods_are_405(self):
        status, _ = post(None, method="GET")
        self.assertEqual(status, 405)
        self.assertServerAnswers()

    def test_a_client_without_nil_reads_every_answer(self):
        vmc = proxy(allow_none=False)
        cmd_id = vmc.runCmd(VM, "/bin/true")
        result = vmc.getCmdResults(cmd_id, PATIENCE)
        self.assertNotIn("error", result, "an absent value is an absent member")
        vmc.getCmdDetails(cmd_id)
        vmc.getPresence(VM)


if __name__ == "__main__":
    unittest.main()
