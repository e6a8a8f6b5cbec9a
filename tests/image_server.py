"""The serving images built on this machine and run as SageMaker runs them (tests/images/, and the image server the
hostile-input catalogue also runs against).

Building: build_tools/build_local.sh, buildah on the local stand-in base. Unless ``EXTRA_CA_CERTS`` names other
certificates, the stand-in base trusts this machine's CA bundle, so that a build behind a TLS proxy the machine
trusts can download (the product layers add no certificate: tests/images/ checks it).

Running (:class:`ImageServer`): a buildah working container of the image whose root file system is mounted read-only
(``buildah run`` has no ``--read-only``: its overlay mount is remounted read-only before the run), and ``buildah run
--isolation chroot`` of the image's entry point with SageMaker's argument ``serve`` (and ``--port``: the container
shares this machine's network), the demo model mounted read-only at /opt/ml/model, /tmp and /run in memory, the
settings as environment variables, and the image's own user. Chroot isolation has no PID namespace: the server's
processes are this machine's processes, told apart by the container's mount namespace.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from testsupport.server import ServerProcess
from testsupport.server import worker_pids as server_worker_pids

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "build_tools" / "build_local.sh"
DEMO_MODEL_DIR = REPO / "model" / "demo"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
MODEL_MOUNT = "/opt/ml/model"  # where SageMaker extracts the model
IN_MEMORY = ("/tmp", "/run")  # the only places the server can write (the root file system is read-only)
BUILD_TIMEOUT_SECONDS = 3600
# build_local.sh's last line on stderr
BUILT = re.compile(r"^built (?P<image>\S+) on (?P<base>\S+) in \d+ s; size: (?P<size>.+)$", re.MULTILINE)
_names = itertools.count()


def images_unavailable() -> str | None:
    """Why the images cannot be built and run here, or None."""
    if os.geteuid() != 0:
        return f"building and running the images (buildah, debootstrap) needs root; the tests run as uid {os.geteuid()}"
    missing = [tool for tool in ("buildah", "debootstrap")
               if shutil.which(tool) is None and not os.access(f"/usr/sbin/{tool}", os.X_OK)]
    if missing:
        return (f"not installed: {', '.join(missing)} (tests/run.sh installs them as root: apt-get install "
                f"{' '.join(missing)})")
    return None


def buildah(*args: str, timeout: float = 300) -> str:
    result = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)}: {result.stderr.strip()[-2000:]}")
    return result.stdout.strip()


@dataclass(frozen=True)
class BuiltImage:
    folder: str  # container-serving or container-serving-optimized
    name: str  # the local image, as build_local.sh printed it
    base: str  # the stand-in base it was built on
    seconds: float  # build_local.sh's wall time
    size: str  # as buildah reports it
    ca_certificates: Path | None  # EXTRA_CA_CERTS given to the build


def build_image(folder: str) -> BuiltImage:
    """``build_tools/build_local.sh folder``, timed."""
    certificates = os.environ.get("EXTRA_CA_CERTS") or (str(HOST_CA_BUNDLE) if HOST_CA_BUNDLE.is_file() else "")
    env = {**os.environ, "EXTRA_CA_CERTS": certificates}
    start = time.monotonic()
    result = subprocess.run([str(BUILD_SCRIPT), folder], capture_output=True, text=True, env=env,
                            timeout=BUILD_TIMEOUT_SECONDS, check=False)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"build_local.sh {folder} failed ({result.returncode}):\n{result.stderr[-6000:]}")
    built = BUILT.search(result.stderr)
    assert built is not None, result.stderr[-2000:]
    name = result.stdout.strip().splitlines()[-1]
    assert name == built["image"], (name, built["image"])
    return BuiltImage(folder, name, built["base"], seconds, built["size"], Path(certificates) if certificates else None)


class WorkingContainer:
    """A buildah working container of ``image`` with its root file system mounted (read-only unless asked)."""

    def __init__(self, image: str, read_only: bool = True) -> None:
        self.name = f"maskrcnn-serving-test-{os.getpid()}-{next(_names)}"
        buildah("from", "--pull=never", "--name", self.name, image)
        try:
            self.root = Path(buildah("mount", self.name))
            if read_only:
                subprocess.run(["mount", "-o", "remount,ro", str(self.root)], check=True, timeout=60)
            inspected = json.loads(buildah("inspect", "--type", "container", self.name))
        except BaseException:
            self.remove()
            raise
        self.config: dict = inspected["OCIv1"]["config"]

    def environment(self) -> dict[str, str]:
        """The image's ENV."""
        return dict(entry.split("=", 1) for entry in self.config.get("Env", []))

    def upper_dir(self) -> Path:
        """The overlay's writable layer: every file the container changed would be in it."""
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4] == str(self.root):
                return Path(re.search(r"upperdir=([^,]+)", line).group(1))
        raise RuntimeError(f"{self.root} is not mounted")

    def remove(self) -> None:
        buildah("rm", self.name)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (parents from /proc/*/stat: buildah is multithreaded, so a thread's
    ``children`` list is not enough)."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent_of[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]


def mount_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


class ImageServer(ServerProcess):
    """``<entry point> serve`` in a working container of ``image``; settings from ``env``. The venv's
    :class:`ServerProcess` interface (start, wait_ready, alive, worker_pids, log, stop), plus the container's
    processes and ``serve``'s exit status."""

    front = "nginx"  # installed in the images: serve runs it in front of gunicorn

    def __init__(self, image: str, log_path: Path, env: Mapping[str, str], model_dir: Path = DEMO_MODEL_DIR) -> None:
        super().__init__(model_dir, log_path, workers=int(env.get("MODEL_SERVER_WORKERS", "1")))
        self.image = image
        self.settings = dict(env)
        self.container: WorkingContainer | None = None
        self.serve_pid: int | None = None
        self.namespace: str | None = None
        self.started = 0.0
        self.cold_start: float | None = None  # seconds from `buildah run` to the first /ping 200

    def run_command(self) -> list[str]:
        settings = [flag for name, value in self.settings.items() for flag in ("-e", f"{name}={value}")]
        memory = [flag for path in IN_MEMORY for flag in ("--mount", f"type=tmpfs,destination={path}")]
        return ["buildah", "run", "--isolation", "chroot", "-v", f"{self.model_dir}:{MODEL_MOUNT}:ro", *memory,
                *settings, self.container.name, "--", *self.container.config["Entrypoint"], "serve", "--port",
                str(self.port)]

    def start(self) -> ImageServer:
        self.container = WorkingContainer(self.image)
        self.command = self.run_command()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open while the server runs
        self.started = time.monotonic()
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        return self

    def find_serve(self) -> int | None:
        """``serve``'s pid (the entry point's process below buildah's), once it runs."""
        if self.serve_pid is None and self.process is not None:
            for pid in descendants(self.process.pid):
                try:
                    argv = cmdline(pid)
                except OSError:
                    continue
                if argv[-3:] == ["serve", "--port", str(self.port)] and not argv[0].startswith("buildah"):
                    self.serve_pid, self.namespace = pid, mount_namespace(pid)
        return self.serve_pid

    def wait_ready(self, workers: int | None = None, exclude: set[int] = frozenset(), timeout: float = 300.0,
                   on_ping: Callable[[float, int, dict | None], None] | None = None) -> set[int]:
        def record(elapsed: float, status: int, body: dict | None) -> None:
            if status == 200 and self.cold_start is None:
                self.cold_start = time.monotonic() - self.started
            if on_ping is not None:
                on_ping(elapsed, status, body)

        ready = super().wait_ready(workers, exclude, timeout, record)
        self.find_serve()
        return ready

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def worker_pids(self) -> set[int]:
        return server_worker_pids(self.find_serve())

    def processes(self) -> list[int]:
        """The container's processes now: every process in its mount namespace."""
        if self.namespace is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "mnt") == self.namespace:
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def describe(self, pids: list[int]) -> list[str]:
        """``pid uid command`` of each of ``pids`` still running."""
        lines = []
        for pid in pids:
            try:
                uid = Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[0]
                lines.append(f"{pid} uid={uid} {' '.join(cmdline(pid))[:120]}")
            except (OSError, IndexError):
                continue
        return lines

    def wait_gone(self, timeout: float) -> float | None:
        """Seconds until the container has no process left (None if some remain after ``timeout``)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.processes() and not self.alive():
                return time.monotonic() - start
            time.sleep(0.1)
        return None

    def exit_status(self) -> int | str | None:
        """How ``serve`` ended, as buildah reports it: its exit code, or the signal that ended it (``"killed"``);
        None while it runs. (With the read-only root, buildah itself then fails while removing its mount points,
        which leaves its own exit code meaningless.)"""
        if self.alive():
            return None
        reports = re.findall(r"^subprocess exited (with status (\d+)|on (\w+))$", self.log(), re.MULTILINE)
        if not reports:
            return 0
        _, status, signal_name = reports[0]
        return int(status) if status else signal_name

    def stop(self, graceful: bool = True, timeout: float = 40.0) -> int | str | None:
        """SIGTERM (graceful) or SIGKILL to ``serve``; then SIGKILL every process of the container still there, and
        remove the container. Returns :meth:`exit_status`."""
        if self.find_serve() is not None and self.alive():
            try:
                os.kill(self.serve_pid, signal.SIGTERM if graceful else signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait_gone(timeout)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        if self.process is not None:
            if self.alive():
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        if self._log is not None:
            self._log.close()
        if self.container is not None:
            self.container.remove()
            self.container = None
        return self.exit_status()
