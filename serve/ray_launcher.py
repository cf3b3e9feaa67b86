"""`tandem serve --launcher ray`: the same processes, each owned by a Ray actor.

Data flow: the driver (this process) joins or starts a Ray cluster, reserves one placement-group
bundle per process ({"GPU": 1} per worker where the deployment uses GPUs, CPU bundles otherwise;
the router always on a CPU bundle), and creates one `RoleActor` per process in its bundle. The
actor runs the role's unchanged command line (`python -m tandem prefill ...`) as a subprocess in
its own process group, so a Ray deployment and a local one run the very same server code.

Failure handling is Ray's: an actor's monitor thread exits the actor's process when its
subprocess dies, Ray restarts the actor (up to --max-restarts, `max_restarts`), and the restarted
actor sleeps an exponential backoff (counted in a file on its node) before starting the command
again. The driver only polls each actor's status without blocking: a new pid means a new
incarnation, a status call that cannot be answered means the actor is restarting, and calls that
keep failing at once mean Ray gave up on it.

Ports: chosen by the driver and fixed per process, so a restarted actor (pinned to the same
bundle, hence node) comes back at the address the router already knows. On a remote cluster the
workers listen on 0.0.0.0 and advertise their node's IP.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import asdict

from tandem.serve.config import ProcSpec, ServeConfig
from tandem.serve.procs import signal_group, spawn
from tandem.serve.supervisor import Member, Poll, backoff

STATUS_PATIENCE_S = 3.0     # no status answer for this long: the actor is being restarted


class RoleActor:
    """Owns one role's subprocess (wrapped with ray.remote by the launcher)."""

    def __init__(self, spec: dict, log_path: str, run_dir: str, remote: bool):
        import ray

        self.spec = ProcSpec(**spec)
        self.log_path = log_path
        self.stopping = False
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        os.makedirs(run_dir, exist_ok=True)
        # starts of this process so far, on this node: the backoff survives the actor's restarts
        counter = os.path.join(run_dir, f"{self.spec.name}.starts")
        starts = int(open(counter).read() or 0) if os.path.exists(counter) else 0
        with open(counter, "w") as f:
            f.write(str(starts + 1))
        if starts:
            time.sleep(backoff(starts))
        argv, env = list(self.spec.argv), dict(self.spec.env)
        if remote:
            # reachable from the driver and the other nodes: listen everywhere, name the node
            self.spec.host = ray.util.get_node_ip_address()
            argv += ["--host", "0.0.0.0"]
            if self.spec.role != "router":
                argv += ["--advertise-host", self.spec.host]
        if ray.get_gpu_ids():
            env.pop("CUDA_VISIBLE_DEVICES", None)     # Ray set it to this bundle's GPU
        with open(log_path, "ab") as f:
            f.write(f"[serve] start {starts + 1} of {self.spec.name} in Ray actor pid {os.getpid()}\n".encode())
        self.proc = spawn(ProcSpec(**{**asdict(self.spec), "argv": argv}).command(), env, log_path)
        threading.Thread(target=self._monitor, daemon=True).start()

    def _monitor(self) -> None:
        rc = self.proc.wait()
        if not self.stopping:
            with open(self.log_path, "ab") as f:
                f.write(f"[serve] {self.spec.name} exited ({rc}); the actor exits so Ray restarts it\n".encode())
            os._exit(1)     # an actor failure: Ray restarts it (max_restarts)

    def status(self) -> dict:
        rc = self.proc.poll()
        return {"pid": self.proc.pid, "running": rc is None, "returncode": rc, "host": self.spec.host}

    def stop(self, grace: float) -> int | None:
        self.stopping = True
        signal_group(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
            signal_group(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


class RayLauncher:
    restarts_itself = True

    def __init__(self, cfg: ServeConfig, out=print):
        try:
            import ray
        except ImportError:
            raise SystemExit("--launcher ray needs Ray: pip install 'tandem[ray]'") from None
        from ray.util.placement_group import placement_group

        self.ray, self.cfg = ray, cfg
        n_workers = cfg.prefill + cfg.decode
        self.remote = cfg.ray_address is not None
        if not ray.is_initialized():
            kw = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            if self.remote:
                ray.init(address=cfg.ray_address, **kw)
            else:
                out("[serve] starting a local Ray instance ...")
                # CPU bundles are bookkeeping here (the workers are subprocesses that share the
                # cores), so a small machine still fits one bundle per process.
                # address="local": a new instance even where RAY_ADDRESS names a running cluster
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, n_workers + 1),
                         num_gpus=len(cfg.gpus), object_store_memory=128 << 20, **kw)
        gpu = bool(cfg.gpus)
        bundles = [{"GPU": 1, "CPU": 1} if gpu else {"CPU": 1} for _ in range(n_workers)] + [{"CPU": 1}]
        self.pg = placement_group(bundles, strategy="PACK")
        out(f"[serve] waiting for a Ray placement group of {len(bundles)} bundles "
            f"({'one GPU per worker' if gpu else 'CPU'}) ...")
        ray.get(self.pg.ready(), timeout=300)
        self.actor_cls = ray.remote(RoleActor)
        self.actors: dict[str, object] = {}
        self.pending: dict[str, tuple] = {}           # name -> (in-flight status() ref, sent at)
        self.stop_refs: dict[str, object] = {}
        self.last: dict[str, Poll] = {}
        self.errors: dict[str, int] = {}
        self.run_dir = os.path.join(cfg.log_dir, ".ray-run")
        self.next_bundle = 0

    def start(self, m: Member) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray = self.ray
        bundle = len(self.pg.bundle_specs) - 1 if m.spec.role == "router" else self.next_bundle
        if m.spec.role != "router":
            self.next_bundle += 1
        gpu = m.spec.role != "router" and bool(self.cfg.gpus)
        actor = self.actor_cls.options(
            max_restarts=self.cfg.max_restarts, max_task_retries=0, num_cpus=1,
            num_gpus=1 if gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle),
        ).remote(asdict(m.spec), m.log_path, self.run_dir, self.remote)
        st = ray.get(actor.status.remote(), timeout=600)
        m.pid, m.spec.host = st["pid"], st["host"]
        self.actors[m.name] = actor
        self.last[m.name] = Poll("running", st["pid"])

    def poll(self, m: Member) -> Poll:
        """Never blocks: reads the last status() answer and sends the next question."""
        ray = self.ray
        actor = self.actors.get(m.name)
        if actor is None:
            return Poll("exited", None, "not started")
        if m.name in self.stop_refs:
            done, _ = ray.wait([self.stop_refs[m.name]], timeout=0)
            return Poll("exited", m.pid, "stopped") if done else Poll("running", m.pid)
        ref, sent = self.pending.get(m.name, (None, 0.0))
        if ref is None:
            self.pending[m.name] = (actor.status.remote(), time.monotonic())
            return self.last[m.name]
        done, _ = ray.wait([ref], timeout=0)
        if not done:
            # a live actor answers within milliseconds; one being restarted answers once it is up
            slow = time.monotonic() - sent > STATUS_PATIENCE_S
            return Poll("restarting") if slow else self.last[m.name]
        del self.pending[m.name]
        try:
            st = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            # in flight when the actor died (it is restarting), or Ray gave up on it: a call to an
            # actor that is dead for good fails at once, again and again
            self.errors[m.name] = self.errors.get(m.name, 0) + 1
            dead = self.errors[m.name] >= 3
            self.last[m.name] = (Poll("dead", None, f"Ray gave up on it (max_restarts "
                                      f"{self.cfg.max_restarts}): {str(e).splitlines()[0][:200]}")
                                 if dead else Poll("restarting"))
            return self.last[m.name]
        self.errors[m.name] = 0
        if st["running"]:
            self.last[m.name] = Poll("running", st["pid"])
        else:
            # the subprocess exited and the actor is about to exit for Ray to restart it
            self.last[m.name] = Poll("restarting", st["pid"], f"return code {st['returncode']}")
        return self.last[m.name]

    def terminate(self, m: Member) -> None:
        actor = self.actors.get(m.name)
        if actor is not None and m.name not in self.stop_refs:
            self.stop_refs[m.name] = actor.stop.remote(self.cfg.drain_timeout + 4.0)

    def kill(self, m: Member) -> None:
        actor = self.actors.get(m.name)
        if actor is not None:
            # the subprocess dies with its actor (PR_SET_PDEATHSIG)
            self.ray.kill(actor, no_restart=True)
            self.last[m.name] = Poll("exited", None, "killed")

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors.values():
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            remove_placement_group(self.pg)
        finally:
            self.ray.shutdown()
