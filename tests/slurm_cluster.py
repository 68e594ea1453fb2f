"""A real, throw-away Slurm cluster on this machine for the Slurm tests (pytest plugin and helper).

Starts Debian's ``munged``, ``slurmctld`` and ``slurmd`` (packages ``munge`` and ``slurm-wlm``, Slurm 22.05) with
every path under one temporary directory: munge key, socket and seed, ``slurm.conf`` (clients find it through
``SLURM_CONF``), ``gres.conf``, controller state, slurmd spool, pid and log files. No system Slurm or munge
configuration is read and nothing is written under /etc, /run or /var, so the cluster coexists with a system
Slurm and with other test sessions (its ports are picked free at start).

Nodes and partitions:

* ``debug`` (default): one node named after this host with ``nproc`` CPUs and two "GPUs". The GPUs are GRES
  entries backed by device files created in the temp dir (``/dev/null``'s numbers), so that the scripts' own
  ``--gpus-per-node`` requests are scheduled as on a GPU cluster; the jobs still see no CUDA device.
* ``multi``: two more nodes, ``<host>-n1`` and ``<host>-n2`` (one CPU and one "GPU" each), each served by its own
  slurmd on its own port, when this Slurm build allows several slurmd on one host (Debian's does). Their
  ``NodeAddr`` is 127.0.0.1: the node names do not resolve.

Plugins are the ones that need no cgroups or database: ``ProctrackType=proctrack/linuxproc``,
``TaskPlugin=task/none``, ``SelectType=select/cons_tres`` (``CR_CPU``), ``JobAcctGatherType=jobacct_gather/none``,
no accounting storage (``sacct`` does not work; job states come from ``scontrol``, which keeps finished jobs
for ``MinJobAge`` seconds). ``CgroupPlugin`` is left unset: 22.05 does not know ``disabled`` and slurmd then
fails to start. The job credential lifetime (``cred_expire``) is 5 s instead of 120 s: Slurm holds a requeued
job back for that long before it may start again (``Reason=BeginTime``).

Requirements: the two packages and root (slurmd starts job steps as the submitting user). Without the packages,
the fixture skips the tests with a one-line reason, unless ``FCANET_REQUIRE_SLURM=1`` (set by ``.ci/run``):
then it fails. The daemons run in the foreground as children of the test process and are stopped by pid
(after cancelling every job of this cluster) when the session ends.

Use in a test module (without importing this module there: as a plugin it is imported by pytest, which
rewrites its asserts; its helpers are reachable through the fixture object)::

    pytest_plugins = ("slurm_cluster",)

    def test_x(slurm_cluster):
        job = slurm_cluster.sbatch(["--wrap", "hostname"])
        assert slurm_cluster.wait(job)["JobState"] == "COMPLETED"

Or by hand (a cluster for experiments, stopped with Ctrl-C)::

    python tests/slurm_cluster.py /tmp/mycluster
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Sequence

import pytest

REQUIRED = ("munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "scontrol", "squeue", "scancel")
REQUIRE_ENV = "FCANET_REQUIRE_SLURM"
CRED_EXPIRE_S = 5
# Job states after which a job never runs again by itself (a requeued job passes through PENDING instead).
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "PREEMPTED"})


class SlurmError(RuntimeError):
    """A Slurm command failed, or the cluster did not come up / a job did not finish in time."""


def missing_requirements() -> str | None:
    """Why a cluster cannot be started here (one line), or None."""
    missing = [tool for tool in REQUIRED if shutil.which(tool, path=_sbin_path()) is None]
    if missing:
        return (f"Slurm tests need Debian's slurm-wlm and munge packages (missing {', '.join(missing)}; "
                f"apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        return "Slurm tests need root (slurmd starts the job steps as the submitting user)"
    return None


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now (bound to port 0, then released)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def free_port() -> int:
    """A TCP port free right now (e.g. a job's rendezvous port)."""
    return _free_ports(1)[0]


def nproc() -> int:
    """The CPUs this process may run on (what ``nproc`` prints): the debug node's CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _parse_record(line: str) -> dict[str, str]:
    """``scontrol show -o`` output (``Key=Value Key=Value ...``) as a dict. Values may contain '=' (e.g.
    ``Command=... a=b``): a token without '=' continues the previous value."""
    out: dict[str, str] = {}
    last = None
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep and key and (key[0].isupper() or key in out or last is None):
            out[key] = value
            last = key
        elif last is not None:
            out[last] += " " + token
    return out


@dataclass
class _Daemon:
    name: str
    proc: subprocess.Popen
    log: Path


@dataclass
class SlurmCluster:
    """A running cluster: ``root`` (its temp dir), ``env`` (``SLURM_CONF`` set: use it for every Slurm command),
    ``node`` and ``cpus`` (the debug node's name and CPU count), ``multi_nodes`` (the 2 nodes of partition
    ``multi``, or empty)."""

    root: Path
    env: dict[str, str]
    node: str
    cpus: int = field(default_factory=nproc)  # the debug node's CPUs
    multi_nodes: list[str] = field(default_factory=list)
    multi_reason: str | None = None  # why there is no 'multi' partition
    daemons: list[_Daemon] = field(default_factory=list)

    free_port = staticmethod(free_port)

    # -- commands --------------------------------------------------------------------------------
    def run(self, args: Sequence[str], check: bool = True, timeout: float = 60.0, cwd=None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a Slurm client command (``["scontrol", ...]``) against this cluster."""
        full_env = {**self.env, **(env or {}), "SLURM_CONF": self.env["SLURM_CONF"]}
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=full_env)
        if check and proc.returncode != 0:
            message = proc.stderr.strip() or proc.stdout.strip()
            raise SlurmError(f"{shlex.join(args)}: exit {proc.returncode}: {message}")
        return proc

    def sbatch(self, args: Sequence[str], cwd=None, env: dict | None = None) -> str:
        """``sbatch --parsable ARGS``; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (of the first record: an array's first task)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout.strip()
        if not out:
            raise SlurmError(f"job {job_id}: no such job")
        return _parse_record(out.splitlines()[0])

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """Every record of ``scontrol show job -o JOB`` (one per array task)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout.strip()
        return [_parse_record(line) for line in out.splitlines() if line.strip()]

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def wait(self, job_id: str, timeout: float = 120.0, states: Iterable[str] = FINAL_STATES,
             poll: float = 0.3) -> dict[str, str]:
        """Wait until every record of ``job_id`` (all array tasks) is in one of ``states``; returns the first
        record. Raises :class:`SlurmError` with the job records and log tails on timeout."""
        states = frozenset(states)
        deadline = time.time() + timeout
        while True:
            records = self.jobs(job_id)
            if records and all(r.get("JobState") in states for r in records):
                return records[0]
            if time.time() > deadline:
                raise SlurmError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: "
                                 + "; ".join(f"{r.get('JobId')}_{r.get('ArrayTaskId', '')}={r.get('JobState')} "
                                             f"({r.get('Reason')})" for r in records) + "\n" + self.log_tails())
            time.sleep(poll)

    def cancel_all(self, timeout: float = 90.0) -> None:
        """Cancel every job of this cluster and wait until none is left running."""
        ids = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
        if ids:
            self.run(["scancel", *ids], check=False)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.run(["squeue", "-h", "-t", "RUNNING,COMPLETING,CONFIGURING", "-o", "%i"],
                            check=False).stdout.split():
                return
            time.sleep(0.5)

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path}:\n" + "\n".join(tail))
        return "\n".join(out)

    # -- lifecycle -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel all jobs, then stop the daemons this object started (by pid; SIGKILL after 20 s)."""
        if any(d.name == "slurmctld" and d.proc.poll() is None for d in self.daemons):
            with contextlib.suppress(SlurmError, subprocess.SubprocessError, OSError):
                self.cancel_all()
        for daemon in reversed(self.daemons):  # slurmd(s), then slurmctld, then munged
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGTERM)
            try:
                daemon.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()
        self.daemons.clear()


def _write_config(root: Path, host: str, ports: list[int], multi: bool) -> None:
    cpus = nproc()
    munge_sock = root / "munge" / "munge.socket"
    dev = root / "dev"
    dev.mkdir()
    # Fake GPU device files: Slurm wants character devices; /dev/null's numbers. Without mknod (no
    # CAP_MKNOD) the real /dev/null and /dev/zero serve, read-only as far as Slurm is concerned.
    devices = []
    for i in range(4):
        path = dev / f"gpu{i}"
        try:
            os.mknod(path, 0o600 | 0o020000, os.makedev(1, 3))
            devices.append(str(path))
        except OSError:
            devices = []
            break
    if not devices:
        devices = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random"]
    ctld_port, slurmd_port, *node_ports = ports
    lines = [
        "# Throw-away test cluster written by tests/slurm_cluster.py",
        "ClusterName=fcanettest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire (default 120 s) is also how long a requeued job waits before it may start again.
        f"AuthInfo=socket={munge_sock},cred_expire={CRED_EXPIRE_S}",
        f"SlurmUser={_user()}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool' / '%n'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        # Schedule often: dependent jobs and array tasks start within a second, not at the next 60 s pass.
        "SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=100000",
        "KillWait=30",
        "MinJobAge=600",
        "GresTypes=gpu",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:2 State=UNKNOWN",
    ]
    gres = [f"NodeName={host} Name=gpu File={devices[0]}", f"NodeName={host} Name=gpu File={devices[1]}"]
    if multi:
        for i, port in enumerate(node_ports[:2], start=1):
            name = f"{host}-n{i}"
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=1 Gres=gpu:1 "
                         "State=UNKNOWN")
            gres.append(f"NodeName={name} Name=gpu File={devices[1 + i]}")
    lines.append(f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP")
    if multi:
        lines.append(f"PartitionName=multi Nodes={host}-n1,{host}-n2 MaxTime=INFINITE State=UP")
    (root / "slurm.conf").write_text("\n".join(lines) + "\n")
    (root / "gres.conf").write_text("\n".join(gres) + "\n")


def _user() -> str:
    import pwd
    return pwd.getpwuid(os.geteuid()).pw_name


def _node_states(cluster: SlurmCluster) -> dict[str, str]:
    out = cluster.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout
    return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)


def start_cluster(root: Path, multi: bool = True, timeout: float = 60.0) -> SlurmCluster:
    """Start munged, slurmctld and the slurmd(s) under ``root`` (created; must be empty or absent) and wait
    until every node is idle. On failure everything started is stopped and :class:`SlurmError` raised."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "log", "run", "munge"):
        (root / sub).mkdir()
    root.chmod(0o755)  # munged refuses a socket directory others cannot traverse
    host = socket.gethostname().split(".")[0]
    _write_config(root, host, _free_ports(4), multi)

    sbin = _sbin_path()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(root / "slurm.conf"), PATH=sbin)
    cluster = SlurmCluster(root=root, env=env, node=host)

    def spawn(name: str, argv: list[str]) -> None:
        log = root / "log" / f"{name}.stdout"
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=root, start_new_session=True)
        cluster.daemons.append(_Daemon(name, proc, log))

    try:
        # munge: a fresh random key (0600 in a 0700 dir, as munged demands), socket in a traversable dir.
        keydir = root / "munge" / "key"
        keydir.mkdir(mode=0o700)
        key = keydir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(1024))
        os.close(fd)
        spawn("munged", [shutil.which("munged", path=sbin), "--foreground", "--force", f"--key-file={key}",
                         f"--socket={root / 'munge' / 'munge.socket'}", f"--pid-file={root / 'run' / 'munged.pid'}",
                         f"--seed-file={keydir / 'munged.seed'}", f"--log-file={root / 'log' / 'munged.log'}"])
        _wait_for(lambda: (root / "munge" / "munge.socket").exists(), 20, "munged socket", cluster)
        conf = str(root / "slurm.conf")
        spawn("slurmctld", [shutil.which("slurmctld", path=sbin), "-D", "-i", "-f", conf])
        nodes = [host] + ([f"{host}-n1", f"{host}-n2"] if multi else [])
        for node in nodes:
            # -N: which node of slurm.conf this slurmd serves (needed once one host runs several).
            spawn(f"slurmd-{node}", [shutil.which("slurmd", path=sbin), "-D", "-N", node, "-f", conf])

        def all_idle() -> bool:
            states = _node_states(cluster)
            return all(states.get(n, "").rstrip("*~#") == "idle" for n in nodes)

        def debug_idle() -> bool:
            return _node_states(cluster).get(host, "").rstrip("*~#") == "idle"

        if not multi:
            _wait_for(debug_idle, timeout, f"node {host} idle", cluster)
            cluster.multi_reason = "started without the 'multi' partition"
        else:
            try:
                _wait_for(all_idle, timeout, "all nodes idle", cluster)
                cluster.multi_nodes = nodes[1:]
            except SlurmError:
                # This build cannot run several slurmd on one host: the single-node tests still can.
                _wait_for(debug_idle, 5, f"node {host} idle", cluster)
                cluster.multi_reason = ("several slurmd on one host did not come up (node states "
                                        f"{_node_states(cluster)})")
        return cluster
    except BaseException:
        cluster.stop()
        raise


def _wait_for(pred, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.time() + timeout
    while not pred():
        dead = [d.name for d in cluster.daemons if d.proc.poll() is not None]
        if dead:
            raise SlurmError(f"{', '.join(dead)} exited while waiting for {what}\n{cluster.log_tails()}"
                             + "".join(f"\n--- {d.log}:\n{d.log.read_text(errors='replace')[-2000:]}"
                                       for d in cluster.daemons if d.name in dead))
        if time.time() > deadline:
            raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.log_tails()}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    """A running cluster for the whole test session (started on first use, stopped at the end)."""
    reason = missing_requirements()
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1)", pytrace=False)
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()


if __name__ == "__main__":
    problem = missing_requirements()
    if problem:
        sys.exit(f"error: {problem}")
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(f"/tmp/slurm-cluster-{os.getpid()}")
    c = start_cluster(where)
    print(f"cluster up: export SLURM_CONF={c.env['SLURM_CONF']}   (nodes: {c.node} {' '.join(c.multi_nodes)}); "
          "Ctrl-C stops it", flush=True)
    # SIGTERM too (a background job ignores SIGINT)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
