"""Boot the host's systemd as PID 1 of a throw-away container, for tests/test_systemd_live.py.

No container runtime is needed: only root, util-linux (``unshare``, ``nsenter``),
overlayfs and cgroup file systems the test may write to. How it works:

1. A cgroup named after the container is made under this process's cgroup in every
   cgroup hierarchy, and the container's first process moves into them before it
   unshares its cgroup namespace, so the container sees those cgroups as its roots and
   its systemd can manage them without touching the host's.
2. ``unshare --pid --fork --mount --uts --ipc --cgroup --propagation private`` runs a
   shell script (:data:`_BOOT_SCRIPT`) that builds the root: an overlay over ``/`` whose
   upper layer is a tmpfs (nothing the container writes reaches the host's disk), a
   fresh ``proc`` with ``/proc/sys`` read-only (so systemd-sysctl & co change nothing
   global), a read-only ``sysfs``, new cgroup mounts, a minimal tmpfs ``/dev`` and a
   tmpfs ``/run``; then ``pivot_root`` and ``exec /lib/systemd/systemd``. The network
   namespace is the host's: the container reaches services on the host's 127.0.0.1
   and the test reaches the container's.
3. The container boots :data:`TARGET`, a small target; the units that only make sense
   on a real machine (udev, kernel modules, getty, the host's timers, ...) are masked
   in the overlay.
4. :meth:`Container.shutdown` powers it off, kills whatever is left (killing a PID
   namespace's init kills the namespace) and removes the cgroups. The mounts live only
   in the container's mount namespace, so they disappear with its last process.

``python -m tests.systemd_container`` boots one and prints ``systemctl status``: handy
when a unit misbehaves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import time
import typing as t
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
TARGET = "syncer-live.target"
# A clean root environment for commands run inside (the caller's PATH may point into /root).
ROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
# Units wanted by these targets are masked, except KEEP: the container only needs
# systemd itself and journald (for `journalctl` and services' stdout).
_MASK_WANTS_OF = ("sysinit.target", "sockets.target", "timers.target", "paths.target", "basic.target")
_KEEP = {"systemd-journald.service", "systemd-journald.socket", "systemd-journald-dev-log.socket"}
_MASK_ALSO = ("systemd-remount-fs.service", "tmp.mount", "systemd-tmpfiles-setup.service", "systemd-tmpfiles-clean.timer")
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

_BOOT_SCRIPT = r"""
set -eu
work=$1/mnt; seed=$1/seed; name=$2; shift 2
root=$work/root
mkdir -p "$work"
mount -t tmpfs -o mode=0755 syncer-live "$work"
mkdir -p "$work/upper" "$work/work" "$root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/upper,workdir=$work/work" "$root"
mount -t proc proc "$root/proc"
mount --bind "$root/proc/sys" "$root/proc/sys"
mount -o remount,bind,ro "$root/proc/sys"
mount -t sysfs -o ro sysfs "$root/sys"
mount -t tmpfs -o mode=0755 cgroup "$root/sys/fs/cgroup"
# cgroup mounts: "dir type options" lines on stdin
while read -r dir type options; do
    mkdir -p "$root/sys/fs/cgroup/$dir"
    mount -t "$type" -o "$options" "$type" "$root/sys/fs/cgroup/$dir"
done
mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
for dev in DEVICES; do
    touch "$root/dev/$dev"
    mount --bind "/dev/$dev" "$root/dev/$dev"
done
mkdir -p "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
cp -a "$seed/." "$root/"
hostname "$name"
cd "$root"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
exec env -i container="$name" "$@"
""".replace("DEVICES", " ".join(_DEVICES))


def unavailable_reason() -> str | None:
    """Why a container cannot be booted here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (to mount and to boot systemd as PID 1 in new namespaces)"
    if not SYSTEMD.is_file():
        return f"needs systemd ({SYSTEMD} is missing)"
    for tool in ("unshare", "nsenter", "pivot_root", "runuser"):
        if not shutil.which(tool):
            return f"needs util-linux's {tool}"
    if "overlay" not in Path("/proc/filesystems").read_text().split():
        return "needs overlayfs (not in /proc/filesystems)"
    hierarchies = _hierarchies()
    if not hierarchies:
        return "needs cgroup file systems under /sys/fs/cgroup"
    for h in hierarchies:
        if not os.access(h.own, os.W_OK):
            return f"needs writable cgroups ({h.own} is read-only)"
    return None


@dataclasses.dataclass(frozen=True)
class _Hierarchy:
    """One mounted cgroup hierarchy: where it is, and this process's cgroup in it."""

    mountpoint: Path  # e.g. /sys/fs/cgroup/memory
    fstype: str  # cgroup or cgroup2
    options: str  # super options to mount it again (controllers, name=systemd)
    own: Path  # this process's cgroup directory in it

    @property
    def subdir(self) -> str:
        """The mount point's path under /sys/fs/cgroup ('' when it is /sys/fs/cgroup itself)."""
        relative = self.mountpoint.relative_to("/sys/fs/cgroup")
        return "" if relative == Path() else str(relative)


def _hierarchies() -> list[_Hierarchy]:
    """The cgroup hierarchies mounted under /sys/fs/cgroup that a container needs (cpuset left out:
    a new cpuset cgroup has no CPUs, and systemd does not need it)."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        mountpoint, fstype, super_options = Path(fields[4]), fields[sep + 1], fields[sep + 3]
        if fstype not in ("cgroup", "cgroup2") or not mountpoint.is_relative_to("/sys/fs/cgroup"):
            continue
        if fstype == "cgroup2":
            key, options = "", "nsdelegate" if "nsdelegate" in super_options else "defaults"
        else:
            names = [o for o in super_options.split(",") if o not in ("rw", "ro") and not o.startswith("release_agent")]
            if "cpuset" in names:
                continue
            key, options = ",".join(names), ",".join(names)
        path = own.get(key)
        if path is None:
            continue
        found.append(_Hierarchy(mountpoint, fstype, options, mountpoint / path.lstrip("/")))
    # a unified hierarchy at /sys/fs/cgroup itself is mounted first (the others go inside it)
    return sorted(found, key=lambda h: len(h.mountpoint.parts))


@dataclasses.dataclass
class Container:
    """A booted container: its systemd's PID on the host, and the cgroups made for it."""

    name: str
    workdir: Path
    process: subprocess.Popen[bytes]
    cgroups: list[Path]
    console: Path
    pid: int = 0

    def command(self, *argv: str, env: dict[str, str] | None = None) -> list[str]:
        """argv that runs ``argv`` inside, as root, in a clean environment (plus ``env``)."""
        variables = {**ROOT_ENV, **(env or {})}
        return [
            "nsenter", "-t", str(self.pid), "-m", "-u", "-i", "-p", "-C", "-r", "-w",
            "env", "-i", *(f"{k}={v}" for k, v in variables.items()), *argv,
        ]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None,  # noqa: A002 - subprocess's name
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.command(*argv, env=env), text=True, capture_output=True, timeout=timeout, input=input, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"in the container, {' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def sh(self, script: str, **kwargs: t.Any) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside (``set -e``), as root."""
        return self.run("/bin/sh", "-ec", script, **kwargs)

    def popen(self, *argv: str, env: dict[str, str] | None = None, **kwargs: t.Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(*argv, env=env), text=True, **kwargs)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside (through the container's root, as root)."""
        target = Path(f"/proc/{self.pid}/root") / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def copy_in(self, source: Path, folder: str) -> str:
        """Copy a host file or folder into ``folder`` inside; returns its path there."""
        target = Path(f"/proc/{self.pid}/root") / folder.lstrip("/") / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
        return f"{folder.rstrip('/')}/{source.name}"

    def read(self, path: str) -> str:
        return (Path(f"/proc/{self.pid}/root") / path.lstrip("/")).read_text()

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show`` properties of ``unit`` as a dict."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_until(
        self, predicate: t.Callable[[], t.Any], what: str, timeout: float = 30, interval: float = 0.1
    ) -> t.Any:
        """Poll ``predicate`` until truthy (for a state systemd reaches on its own clock)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.diagnostics()}")
            time.sleep(interval)

    def diagnostics(self) -> str:
        """What is running and the journal's tail, for a failure message."""
        if self.process.poll() is not None:
            return f"the container's systemd has exited ({self.process.returncode}):\n{self.console_text()}"
        units = self.systemctl("list-units", "--all", "--no-legend", "syncer*", check=False).stdout
        journal = self.run("journalctl", "--no-pager", "-n", "60", check=False).stdout
        return f"units:\n{units}\njournal:\n{journal}"

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def shutdown(self, timeout: float = 15) -> None:
        """Power off, then make sure no process, cgroup or mount is left."""
        try:
            if self.pid and self.process.poll() is None:
                subprocess.run(self.command("systemctl", "poweroff"), capture_output=True, timeout=10, check=False)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout)
        finally:
            if self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)  # the namespace's init: takes every process inside with it
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(10)
            _remove_cgroups(self.cgroups)


def boot(name: str, workdir: Path, units: dict[str, str] | None = None, timeout: float = 30) -> Container:
    """Boot a container named ``name`` with extra unit files ``units`` (name -> text) in
    /etc/systemd/system. ``workdir`` is a host folder for the seed files and the console
    log; the container's own files never reach it. Always pair with
    :meth:`Container.shutdown` (see the ``container`` fixture)."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    _seed(workdir / "seed", units or {})
    hierarchies = _hierarchies()
    cgroups = [h.own / name for h in hierarchies]
    for path in cgroups:
        path.mkdir()
    console = workdir / "console.log"
    mounts = "".join(f"{h.subdir or '.'} {h.fstype} {h.options}\n" for h in hierarchies)

    def join_cgroups() -> None:  # in the child, before unshare: its cgroups become the namespace's roots
        for path in cgroups:
            (path / "cgroup.procs").write_text("0")

    container = None
    try:
        with console.open("wb") as out:
            process = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup", "--propagation", "private",
                 "/bin/sh", "-c", _BOOT_SCRIPT, "boot", str(workdir), name,
                 str(SYSTEMD), "--system", f"--unit={TARGET}", "--show-status=no"],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, preexec_fn=join_cgroups,
            )
        container = Container(name=name, workdir=workdir, process=process, cgroups=cgroups, console=console)
        assert process.stdin is not None
        process.stdin.write(mounts.encode())
        process.stdin.close()
        container.pid = _wait_for_systemd(process, console, timeout)
        container.systemctl("start", TARGET)  # waits for the boot to finish
        return container
    except BaseException:
        if container is not None:
            container.shutdown()
        else:
            _remove_cgroups(cgroups)
        raise


def _wait_for_systemd(process: subprocess.Popen[bytes], console: Path, timeout: float) -> int:
    """The host PID of the container's systemd, once it answers on its private socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the container did not boot (exit {process.returncode}):\n{console.read_text(errors='replace')}")
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        for pid in children.read_text().split() if children.exists() else ():
            with contextlib.suppress(FileNotFoundError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd" and Path(
                    f"/proc/{pid}/root/run/systemd/private"
                ).exists():
                    return int(pid)
        time.sleep(0.05)
    raise RuntimeError(f"systemd did not come up within {timeout:.0f}s:\n{console.read_text(errors='replace')}")


def _seed(seed: Path, units: dict[str, str]) -> None:
    """Files copied into the container's root before it boots: the boot target, the
    masks (links to /dev/null) and the caller's units."""
    etc = seed / "etc/systemd/system"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / TARGET).write_text("[Unit]\nDescription=syncer live test\nRequires=basic.target\nAfter=basic.target\n")
    masked = set(_MASK_ALSO)
    for folder in ("/etc/systemd/system", "/lib/systemd/system"):
        for target in _MASK_WANTS_OF:
            wants = Path(f"{folder}/{target}.wants")
            if wants.is_dir():
                masked.update(p.name for p in wants.iterdir())
    for unit in sorted(masked - _KEEP):
        (etc / unit).symlink_to("/dev/null")
    for unit, text in units.items():  # a unit, or a drop-in ("x.service.d/y.conf")
        (etc / unit).parent.mkdir(parents=True, exist_ok=True)
        (etc / unit).write_text(text)


def _remove_cgroups(cgroups: list[Path]) -> None:
    """Kill what is left in the container's cgroups, then remove them, deepest first."""
    for top in cgroups:
        if not top.exists():
            continue
        for _ in range(50):
            folders = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
            procs = [f / "cgroup.procs" for f in [top, *folders]]
            pids = {pid for path in procs if path.exists() for pid in path.read_text().split()}
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            try:
                for folder in [*folders, top]:
                    folder.rmdir()
                break
            except OSError:
                time.sleep(0.1)  # processes still dying
        else:
            raise RuntimeError(f"could not remove cgroup {top}")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        box = boot(f"syncer-live-{os.getpid()}", Path(tmp))
        try:
            print(box.systemctl("status", check=False).stdout)
            print(box.systemctl("list-units", "--failed", check=False).stdout)
        finally:
            box.shutdown()
            print(box.console_text()[-3000:])
