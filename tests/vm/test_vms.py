"""The whole chain on real VMs: XML-RPC -> vmc-host -> QEMU -> guest kernel -> vmc-guest.

Run by tests/vm/run.sh, which builds the guest image (deploy/guest-image/), starts
a real vmc-host with the QEMU backend on a real broker, and tells this module:

  VMC_XMLRPC_URL            http://127.0.0.1:PORT
  VMC_TEST_IMAGE            the guest image directory (createVM's hddImagePath)
  VMC_TEST_TAG              a prefix for VM names, unique to this run
  VMC_TEST_STATE_DIR        vmc-host's state directory (VMs in qemu/vms/<name>/)
  VMC_TEST_FILES            a scratch directory of the host's
  VMC_TEST_BEACON_INTERVAL  the beacon interval host and guests use, seconds

Standard library only: unittest, xmlrpc.client. The tests of one class share
booted VMs (a boot costs seconds under TCG) and run in their numbered order; each
step first waits for what it needs, so a failure names the step that failed. Every
step's duration is printed at the end (figures, not assertions).
"""

import hashlib
import os
import time
import unittest
import xmlrpc.client

URL = os.environ.get("VMC_XMLRPC_URL", "http://127.0.0.1:50505")
IMAGE = os.environ.get("VMC_TEST_IMAGE", "")
TAG = os.environ.get("VMC_TEST_TAG", "vmtest")
STATE_DIR = os.environ.get("VMC_TEST_STATE_DIR", "/var/lib/vmc-host")
FILES = os.environ.get("VMC_TEST_FILES", "/tmp")
BEACON = float(os.environ.get("VMC_TEST_BEACON_INTERVAL", "1"))

VM = f"{TAG}-a"
OTHER_VM = f"{TAG}-b"
# A boot, an ACPI shutdown, a reconnect after a restore: generous under TCG on a
# busy two-core machine; waits end as soon as their condition holds.
PATIENCE = 120.0
BIG_FILE_BYTES = 64 << 20

TIMINGS = []


class TimeoutTransport(xmlrpc.client.Transport):
    """A transport whose calls give up after a while instead of hanging the run."""

    def make_connection(self, host):
        connection = super().make_connection(host)
        connection.timeout = 2 * PATIENCE
        return connection


def proxy():
    return xmlrpc.client.ServerProxy(URL, allow_none=True, transport=TimeoutTransport())


def wait_until(what, condition, patience=PATIENCE, every=0.2):
    """Polls condition() until it answers something true; fails naming `what` and
    the last answer."""
    deadline = time.monotonic() + patience
    last = None
    while True:
        try:
            last = condition()
        except (OSError, xmlrpc.client.Error) as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {patience:.0f} s for {what}; last answer: {last!r}")
        time.sleep(every)


class timed:
    """Records how long a named step took."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.secs = time.monotonic() - self.start
        TIMINGS.append((self.name, self.secs, exc[0] is None))
        return False


def vm_dir(vm):
    return os.path.join(STATE_DIR, "qemu", "vms", vm)


def qemu_pid(vm):
    try:
        with open(os.path.join(vm_dir(vm), "qemu.pid")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def process_runs(pid):
    """Whether `pid` runs: it exists and is not a zombie (a daemonized QEMU is
    nobody's child here, and whatever reaps orphans may take its time)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Guest:
    """Runs shell commands on a VM's guest through runCmd/getCmdResults."""

    def __init__(self, vmc, vm):
        self.vmc, self.vm = vmc, vm

    def run(self, script, timeout=PATIENCE):
        """The results of `sh -c script`; fails unless it exited 0."""
        cmd_id = self.vmc.runCmd(self.vm, "/bin/sh", ["-c", script])
        result = self.vmc.getCmdResults(cmd_id, timeout)
        if not (result["finished"] and result["exitCodeOrSignal"] == 0):
            raise AssertionError(f"`{script}` on {self.vm} failed: {result}")
        return result

    def out(self, script, timeout=PATIENCE):
        return self.run(script, timeout)["out"].strip()

    def out_when_reachable(self, script, patience=PATIENCE):
        """`out(script)` once the guest answers: after a restore or a resume the
        agent may still be reconnecting, and a command sent meanwhile fails."""
        return wait_until(
            f"{self.vm}'s guest to run `{script}`",
            lambda: self.out(script, timeout=15) or " ",
            patience,
            every=0.5,
        ).strip()

    def boot(self):
        """(boot id, uptime): the kernel makes a new random boot id at every boot."""
        boot_id, uptime = self.out_when_reachable(
            "cat /proc/sys/kernel/random/boot_id /proc/uptime").split()[:2]
        return boot_id, float(uptime)


class RealVms(unittest.TestCase):
    """One VM (and for the multicast a second one) through its whole life."""

    vmc = None

    @classmethod
    def setUpClass(cls):
        if not os.path.isfile(os.path.join(IMAGE, "manifest.json")):
            raise AssertionError(f"VMC_TEST_IMAGE={IMAGE!r} is not a guest image directory")
        cls.vmc = proxy()
        cls.guest = Guest(cls.vmc, VM)

    @classmethod
    def tearDownClass(cls):
        # Whatever failed, no VM of ours keeps running; a VM left over keeps its
        # files (serial console, QEMU log) for run.sh to show, and goes with them.
        for vm in (VM, OTHER_VM):
            try:
                if vm in cls.vmc.listVMs() and cls.vmc.getState(vm) not in ("PoweredOff", "Saved"):
                    cls.vmc.powerOff(vm)
            except (OSError, xmlrpc.client.Error) as e:
                print(f"cleanup: powerOff({vm}) failed: {e}")
        width = max((len(name) for name, _, _ in TIMINGS), default=0)
        print("\nTimings (TCG):")
        for name, secs, ok in TIMINGS:
            print(f"  {name:<{width}}  {secs:6.1f} s{'' if ok else '  (failed)'}")

    def presence(self, vm=VM):
        return self.vmc.getPresence(vm)["presence"]

    def state(self, vm=VM):
        return self.vmc.getState(vm)

    def wait_alive(self, vm=VM, what=None):
        wait_until(what or f"{vm}'s guest to say HELLO (presence alive)",
                   lambda: self.presence(vm) == "alive")

    def wait_state(self, state, vm=VM):
        wait_until(f"{vm} to be {state}", lambda: self.state(vm) == state)

    # --- the steps, in order

    def test_01_create_and_boot_two_vms(self):
        with timed("createVM x2"):
            created = {vm: self.vmc.createVM(vm, IMAGE) for vm in (VM, OTHER_VM)}
        for vm, view in created.items():
            self.assertEqual(view["name"], vm)
            self.assertEqual(view["backend"], "qemu")
            self.assertEqual(view["state"], "PoweredOff")
            mac = view["id"]
            self.assertRegex(mac, r"^52:54:00(:[0-9A-F]{2}){3}$", "the id is the NIC's MAC")
        self.assertNotEqual(created[VM]["id"], created[OTHER_VM]["id"])
        with timed("boot to HELLO (two VMs at once)"):
            for vm in (VM, OTHER_VM):
                self.assertIn(self.vmc.start(vm), ("Running", "Starting"))
            for vm in (VM, OTHER_VM):
                self.wait_alive(vm)
        for vm in (VM, OTHER_VM):
            mac = created[vm]["id"]
            self.assertEqual(self.vmc.getIdsToNamesMapping().get(mac), vm)
            self.assertEqual(self.vmc.getNamesToIdsMapping().get(vm), mac)
            self.assertEqual(self.state(vm), "Running")
            self.assertIn(vm, self.vmc.listRunningVMs())
            # The guest's own view: its NIC has that MAC.
            eth0 = Guest(self.vmc, vm).out("cat /sys/class/net/eth0/address")
            self.assertEqual(eth0.upper(), mac)

    def test_02_a_multicast_command_reaches_both(self):
        self.wait_alive(VM)
        self.wait_alive(OTHER_VM)
        with timed("runCmdOnVMs on two VMs"):
            fanout = self.vmc.runCmdOnVMs(f"{TAG}-*", "/bin/sh",
                                          ["-c", "cat /sys/class/net/eth0/address"])
            self.assertEqual(fanout["failed"], {}, fanout)
            self.assertEqual(sorted(fanout["cmds"]), sorted([VM, OTHER_VM]))
            ids = self.vmc.getNamesToIdsMapping()
            for vm, cmd_id in fanout["cmds"].items():
                result = self.vmc.getCmdResults(cmd_id, PATIENCE)
                self.assertEqual(result["exitCodeOrSignal"], 0, result)
                self.assertEqual(result["out"].strip().upper(), ids[vm], "each VM answered")
        # The second VM has served: power it off and remove it (one VM from here on).
        with timed("powerOff + removeVM (second VM)"):
            self.assertEqual(self.vmc.powerOff(OTHER_VM), "PoweredOff")
            self.assertTrue(self.vmc.removeVM(OTHER_VM))
        self.assertNotIn(OTHER_VM, self.vmc.listVMs())
        self.assertFalse(os.path.exists(vm_dir(OTHER_VM)), "removeVM cleans the VM's files")

    def test_03_commands_and_their_resources(self):
        self.wait_alive()
        with timed("runCmd uname -a"):
            result = self.guest.run("uname -a")
        self.assertIn("Linux vmc-guest", result["out"])
        with timed("runCmd CPU-bound (sha256 of 16 MiB)"):
            result = self.guest.run(
                "dd if=/dev/zero bs=1M count=16 2>/dev/null | sha256sum")
        self.assertEqual(result["out"].split()[0], hashlib.sha256(bytes(16 << 20)).hexdigest())
        usage = result["resources"]
        cpu = usage["ru_utime"] + usage["ru_stime"]
        self.assertGreater(cpu, 0.0, f"the command's CPU time is measured: {usage}")
        self.assertGreater(usage["ru_maxrss"], 0, usage)
        details = self.vmc.getCmdDetails(result["cmd-id"])
        self.assertEqual(details["state"], "finished")
        self.assertGreater(details["resources"]["ru_utime"] + details["resources"]["ru_stime"], 0)

    def test_04_a_64_mib_file_both_ways(self):
        self.wait_alive()
        local = os.path.join(FILES, "big.bin")
        back = os.path.join(FILES, "big.back")
        with open(local, "wb") as f:
            for _ in range(BIG_FILE_BYTES >> 20):
                f.write(os.urandom(1 << 20))
        digest = sha256_file(local)
        with timed("cpFileToVM 64 MiB"):
            transfer = self.vmc.cpFileToVM(VM, local, "/data/big.bin")
        self.assertEqual(transfer["state"], "done", transfer)
        self.assertEqual(transfer["size"], BIG_FILE_BYTES)
        self.assertEqual(transfer["sha256"], digest)
        with timed("sha256sum 64 MiB in the guest"):
            self.assertEqual(self.guest.out("sha256sum /data/big.bin").split()[0], digest)
        with timed("cpFileFromVM 64 MiB"):
            transfer = self.vmc.cpFileFromVM(VM, "/data/big.bin", back)
        self.assertEqual(transfer["state"], "done", transfer)
        self.assertEqual(sha256_file(back), digest)
        # The snapshots below save the guest's memory: keep its page cache small.
        self.guest.run("rm /data/big.bin && sync && echo 1 >/proc/sys/vm/drop_caches")
        os.remove(local)
        os.remove(back)

    def test_05_pause_and_resume(self):
        self.wait_alive()
        with timed("pause"):
            self.assertEqual(self.vmc.pause(VM), "Paused")
        self.assertFalse(self.vmc.ping(VM, 2.0), "a paused guest does not answer")
        # Longer than the 4.5 beacon intervals after which a silent guest is lost.
        silence = 6 * BEACON + 1
        deadline = time.monotonic() + silence
        seen = set()
        while time.monotonic() < deadline:
            seen.add(self.presence())
            self.assertEqual(self.state(), "Paused")
            time.sleep(0.25)
        self.assertNotIn("lost", seen, "presence must not turn lost while the VM is paused")
        self.assertNotIn("suspect", seen, "presence must not turn suspect while the VM is paused")
        with timed("resume until ping answers"):
            self.assertEqual(self.vmc.resume(VM), "Running")
            wait_until("the resumed guest to answer ping", lambda: self.vmc.ping(VM, 2.0))
        self.assertEqual(self.presence(), "alive")

    def test_05b_a_running_guest_that_falls_silent_is_lost(self):
        self.wait_alive()
        stop_secs = 6 * BEACON + 2
        # A command that SIGSTOPs the agent which runs it, and SIGCONTs it later (the
        # agent kills whatever a command leaves behind, so it cannot be backgrounded).
        stopper = self.vmc.runCmd(VM, "/bin/sh", [
            "-c", f"a=$(pidof vmc-guest); sleep 1; kill -STOP $a; sleep {stop_secs}; kill -CONT $a"])
        with timed("silent guest until presence lost"):
            wait_until("presence to turn lost while the running guest's agent is stopped",
                       lambda: self.presence() == "lost", patience=stop_secs)
        self.assertEqual(self.state(), "Running")
        with timed("stopped agent continued until presence alive"):
            self.wait_alive(what="the continued agent to be heard again")
        self.assertEqual(self.vmc.getCmdResults(stopper, PATIENCE)["exitCodeOrSignal"], 0)

    def test_06_snapshots(self):
        self.wait_alive()
        self.guest.run("echo before >/data/f && sync")
        with timed("takeSnapshot (with memory)"):
            self.vmc.takeSnapshot(VM, "s1", "before the change")
        snapshots = self.vmc.listSnapshots(VM)
        self.assertEqual([s["name"] for s in snapshots], ["s1"])
        self.assertEqual(snapshots[0]["description"], "before the change")
        self.assertGreater(snapshots[0]["vmStateBytes"], 0, "a running VM's snapshot has memory")
        self.guest.run("echo after >/data/f && sync")
        self.assertEqual(self.guest.out("cat /data/f"), "after")
        with timed("restoreSnapshot until the guest answers"):
            self.assertEqual(self.vmc.restoreSnapshot(VM, "s1"), "Running")
            self.assertEqual(self.guest.out_when_reachable("cat /data/f"), "before",
                             "the change made after the snapshot is gone")
        with timed("deleteSnapshot"):
            self.vmc.deleteSnapshot(VM, "s1")
        self.assertEqual(self.vmc.listSnapshots(VM), [])

    def test_07_save_state_and_continue(self):
        self.wait_alive()
        boot_before, before = self.guest.boot()
        pid = qemu_pid(VM)
        self.assertIsNotNone(pid, "a running VM has a QEMU process")
        with timed("saveState"):
            self.assertEqual(self.vmc.saveState(VM), "Saved")
        self.assertEqual(self.state(), "Saved")
        self.assertFalse(process_runs(pid), f"QEMU {pid} is gone after saveState")
        # A beacon still in flight when the VM stopped must not make it look alive.
        seen, end = set(), time.monotonic() + 2.5
        while time.monotonic() < end:
            seen.add(self.presence())
            time.sleep(0.05)
        self.assertEqual(seen, {"gone"}, "the guest of a Saved VM stays gone")
        with timed("start from the saved state until the guest answers"):
            self.assertEqual(self.vmc.start(VM), "Running")
            boot_after, after = self.guest.boot()
        self.assertEqual(boot_after, boot_before, "the guest continued the same boot")
        self.assertGreaterEqual(after, before, "the guest continued: its uptime did not reset")
        # Save again and discard: the next start boots afresh.
        self.assertEqual(self.vmc.saveState(VM), "Saved")
        with timed("discardState"):
            self.assertEqual(self.vmc.discardState(VM), "PoweredOff")
        with timed("fresh boot to HELLO"):
            self.vmc.start(VM)
            boot_fresh, _ = self.guest.boot()
        self.assertNotEqual(boot_fresh, boot_before, "after discardState the guest booted afresh")

    def test_08_acpi_shutdown(self):
        self.wait_alive()
        with timed("shutdown (ACPI) until BYE and PoweredOff"):
            self.vmc.shutdown(VM)
            # Presence and state in one answer: the agent's BYE makes the guest gone
            # while its VM still runs (the guest powers off about a second later);
            # a VM seen off first would mean presence only followed the state.
            def gone():
                answer = self.vmc.getPresence(VM)
                return answer if answer["presence"] == "gone" else None

            seen = wait_until("the guest's BYE (presence gone)", gone, every=0.05)
            self.assertIn(seen["state"], ("Running", "Stopping"),
                          f"presence was gone only once the VM was off: no BYE? {seen}")
            self.wait_state("PoweredOff")
        self.assertIsNone(qemu_pid(VM), "QEMU is gone")

    def test_09_reset_then_power_off_and_remove(self):
        if self.state() != "Running":
            self.vmc.start(VM)
        with timed("boot to HELLO"):
            self.wait_alive()
            boot_before, _ = self.guest.boot()
        with timed("reset until HELLO again"):
            self.vmc.reset(VM)
            boot_after, _ = self.guest.boot()
        self.assertNotEqual(boot_after, boot_before, "the guest booted again")
        self.assertEqual(self.presence(), "alive")
        # A command still running when the VM is powered off can never report: the
        # host ends it as lost, saying why, instead of leaving it running forever.
        doomed = self.vmc.runCmd(VM, "/bin/sleep", ["600"])
        wait_until("the sleep to run", lambda: self.vmc.getCmdDetails(doomed)["state"] == "running")
        with timed("powerOff"):
            self.assertEqual(self.vmc.powerOff(VM), "PoweredOff")
        details = wait_until("the command cut off by powerOff to end",
                             lambda: (lambda d: d if d["state"] == "lost" else None)(
                                 self.vmc.getCmdDetails(doomed)), patience=10)
        self.assertIn("powered off", details["error"])
        self.assertTrue(os.path.isdir(vm_dir(VM)))
        with timed("removeVM"):
            self.assertTrue(self.vmc.removeVM(VM))
        self.assertNotIn(VM, self.vmc.listVMs())
        self.assertFalse(os.path.exists(vm_dir(VM)), "removeVM cleans the VM's files")

    def test_10_a_name_whose_mac_is_taken_gets_the_next_free_one(self):
        # A VM's MAC is 52:54:00 and three bytes of its name's SHA-256, so two of a
        # few thousand names share one: find such a pair among this run's names.
        seen = {}
        for i in range(1_000_000):
            name = f"{TAG}-m{i}"
            key = hashlib.sha256(name.encode()).digest()[:3]
            if key in seen:
                first, second = seen[key], name
                break
            seen[key] = name
        mac = lambda digest: "52:54:00:" + ":".join(f"{b:02X}" for b in digest[:3])
        view = self.vmc.createVM(first, IMAGE)
        try:
            self.assertEqual(view["id"], mac(hashlib.sha256(first.encode()).digest()))
            other = self.vmc.createVM(second, IMAGE)
            try:
                # Taken by the first: the second gets the SHA-256 of "name#1".
                self.assertEqual(other["id"], mac(hashlib.sha256(f"{second}#1".encode()).digest()))
                self.assertNotEqual(other["id"], view["id"])
                self.assertEqual(self.vmc.getVMInfo(second)["id"], other["id"])
                self.assertEqual(self.vmc.getVMInfo(first)["id"], view["id"])
                self.assertEqual(self.vmc.getState(second), "PoweredOff")
            finally:
                self.vmc.removeVM(second)
        finally:
            self.vmc.removeVM(first)


if __name__ == "__main__":
    unittest.main()
