"""The ``local`` backend: "instances" are fresh network namespaces on this machine, attached to a
bridge, whose boot runs the user data exactly as a cloud VM's cloud-init would (as root, in the
instance's namespace, with ``MESHGPU_HOME`` set to the instance's own directory: namespaces share
this machine's filesystem). For labs and CI: the real provisioning path end to end, nothing sent
anywhere but the bridge and loopback.

Settings (``meshgpu backend add local -o key=value``):

* ``bridge``: an existing bridge to attach instances to (addresses are taken from its IPv4
  subnet; an agent bound to the bridge's address is reachable from them); without it the plugin
  creates ``mgl-<hash>`` with ``subnet`` (default ``10.215.0.0/24``: a private test range);
* ``gpus``: the fake GPUs each instance shows (``MESHGPU_FAKE_GPUS`` syntax, e.g.
  ``1xH100:80GB``), the offer's GPUs; ``instance_types``: several, ``name=gpus`` separated by
  ``;`` (``small=1xA10:24GB;big=2xH100:80GB``); ``price`` (USD/h, default 0), ``cpus``,
  ``memory_gb``, ``disk_gb``: what each offer says;
* ``state_dir`` (default ``/var/lib/meshgpu/local-backend``): each instance's record, home
  directory and boot log -- ``list`` reads it, so every voter on this machine sees the same
  instances.

Root is needed (``ip netns``).

``placement: cluster`` (``cluster_placement``): every instance is on the one bridge of this
machine, so a fleet's instances are always one cluster; ``Bootstrap.placement_group`` needs no
cloud object here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import secrets as _secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from meshgpu.fleets.backends import (
    BackendError,
    Bootstrap,
    CredentialsError,
    InstanceRef,
    Offer,
    Requirements,
    filter_offers,
)

DEFAULT_SUBNET = "10.215.0.0/24"
DEFAULT_STATE = "/var/lib/meshgpu/local-backend"


def create(name: str, config: dict[str, Any], secrets: dict[str, Any]) -> LocalBackend:
    return LocalBackend(name, config)


create.cluster_placement = True  # type: ignore[attr-defined]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=30)
    if check and r.returncode != 0:
        raise BackendError(f"{' '.join(args)}: {(r.stderr or r.stdout).strip()[-300:]}")
    return r


def _gpu_parts(spec: str) -> tuple[int, str, float]:
    """``2xH100:80GB`` -> (2, "H100", 80)."""
    spec = spec.strip()
    if not spec:
        return 0, "", 0.0
    first = spec.split(",")[0]
    count, _, rest = first.partition("x") if "x" in first.split(":")[0] else ("1", "", first)
    name, _, mem = rest.partition(":")
    gb = float(mem.upper().removesuffix("GB") or 0) if mem else 0.0
    return int(count), name, gb


class LocalBackend:
    cluster_placement = True  # one bridge on one machine: trivially co-located

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.name = name
        self.state_dir = Path(config.get("state_dir") or DEFAULT_STATE)
        self.bridge = str(config.get("bridge") or "")
        self.subnet = str(config.get("subnet") or DEFAULT_SUBNET)
        self.price = float(config.get("price") or 0.0)
        self.cpus = int(config.get("cpus") or os.cpu_count() or 1)
        self.memory_gb = float(config.get("memory_gb") or 8)
        self.disk_gb = float(config.get("disk_gb") or 100)
        types = str(config.get("instance_types") or "")
        if types:
            self.types = dict(t.split("=", 1) for t in types.split(";") if "=" in t)
        else:
            self.types = {"local": str(config.get("gpus") or "")}
        for t, g in self.types.items():
            try:
                _gpu_parts(g)
            except ValueError:
                raise BackendError(
                    f"instance type {t}: cannot read its GPUs {g!r} (e.g. 1xH100:80GB)"
                ) from None

    # -- the protocol ----------------------------------------------------------------------

    def check(self) -> None:
        if os.geteuid() != 0:
            raise CredentialsError("the local backend needs root (it creates network namespaces)")
        if shutil.which("ip") is None:
            raise BackendError("the local backend needs iproute2 (apt-get install iproute2)")
        if self.bridge and _run("ip", "link", "show", self.bridge, check=False).returncode:
            raise BackendError(f"no bridge {self.bridge} on this machine (ip link show)")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BackendError(f"cannot use state_dir {self.state_dir}: {e.strerror}") from None

    def offers(self, req: Requirements) -> list[Offer]:
        out = []
        for t, g in sorted(self.types.items()):
            count, gpu, mem = _gpu_parts(g)
            for spot in (False, True):
                out.append(
                    Offer(
                        backend=self.name,
                        instance_type=t,
                        region="local",
                        price=round(self.price * (0.4 if spot else 1.0), 4) * max(1, count),
                        spot=spot,
                        gpu_name=gpu,
                        gpu_count=count,
                        gpu_memory_gb=mem,
                        cpus=self.cpus,
                        memory_gb=self.memory_gb,
                        disk_gb=self.disk_gb,
                    )
                )
        return filter_offers(out, req)

    def create(self, offer: Offer, bootstrap: Bootstrap) -> InstanceRef:
        self.check()
        iid = "mgl" + _secrets.token_hex(4)
        home = self.state_dir / iid
        home.mkdir(parents=True)
        with self._lock():
            bridge, gateway, prefix = self._bridge()
            address = self._free_address(gateway, prefix)
            rec = {
                "instance_id": iid,
                "address": address,
                "bridge": bridge,
                "tags": dict(bootstrap.tags),
                "offer": offer.to_dict(),
                "created_at": time.time(),
            }
            (home / "instance.json").write_text(json.dumps(rec))
        try:
            self._netns(iid, bridge, address, prefix, gateway)
        except BaseException:
            self.terminate(InstanceRef(self.name, iid))
            raise
        script = home / "user-data.sh"
        script.write_text(bootstrap.user_data)
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(home),
            "MESHGPU_HOME": str(home / "agent"),
            "MESHGPU_NO_SYSTEMD": "1",
            "MESHGPU_FAKE_GPUS": self.types.get(offer.instance_type, ""),
            "LANG": "C.UTF-8",
        }
        log = open(home / "boot.log", "ab")  # noqa: SIM115 - the child keeps it
        # cloud-init runs the user data once, at boot, detached from whoever asked for the VM
        subprocess.Popen(
            ["ip", "netns", "exec", iid, "sh", str(script)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        return InstanceRef(self.name, iid, "local", address, "running", dict(bootstrap.tags))

    def terminate(self, ref: InstanceRef) -> None:
        iid = ref.instance_id
        if not iid.startswith("mgl") or "/" in iid:
            raise BackendError(f"{iid} is not a local instance")
        if _run("ip", "netns", "pids", iid, check=False).returncode == 0:
            for _ in range(3):
                pids = _run("ip", "netns", "pids", iid, check=False).stdout.split()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(OSError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.2)
            _run("ip", "netns", "del", iid, check=False)
        _run("ip", "link", "del", f"{iid}h", check=False)
        shutil.rmtree(self.state_dir / iid, ignore_errors=True)

    def list(self, tags: dict[str, str]) -> list[InstanceRef]:
        out = []
        if not self.state_dir.is_dir():
            return out
        for rec_path in sorted(self.state_dir.glob("mgl*/instance.json")):
            try:
                rec = json.loads(rec_path.read_text())
            except (OSError, ValueError):
                continue
            have = rec.get("tags", {})
            if any(have.get(k) != v for k, v in tags.items()):
                continue
            alive = Path(f"/run/netns/{rec['instance_id']}").exists()
            out.append(
                InstanceRef(
                    self.name,
                    rec["instance_id"],
                    "local",
                    rec.get("address", ""),
                    "running" if alive else "terminated",
                    have,
                )
            )
        return out

    # -- the machinery -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Any:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _bridge(self) -> tuple[str, str, int]:
        """(bridge, its address, prefix length), creating the plugin's own bridge if needed."""
        bridge = self.bridge
        if not bridge:
            bridge = "mgl-" + hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:8]
            if _run("ip", "link", "show", bridge, check=False).returncode != 0:
                net = ipaddress.ip_network(self.subnet)
                gw = str(net.network_address + net.num_addresses - 2)
                _run("ip", "link", "add", bridge, "type", "bridge")
                _run("ip", "addr", "add", f"{gw}/{net.prefixlen}", "dev", bridge)
                _run("ip", "link", "set", bridge, "up")
        r = _run("ip", "-j", "-4", "addr", "show", "dev", bridge)
        infos = json.loads(r.stdout or "[]")
        for info in infos:
            for a in info.get("addr_info", []):
                if a.get("family") == "inet":
                    return bridge, a["local"], int(a["prefixlen"])
        raise BackendError(f"bridge {bridge} has no IPv4 address: give it one (ip addr add)")

    def _free_address(self, gateway: str, prefix: int) -> str:
        net = ipaddress.ip_network(f"{gateway}/{prefix}", strict=False)
        used = {gateway}
        for rec_path in self.state_dir.glob("mgl*/instance.json"):
            with contextlib.suppress(OSError, ValueError):
                used.add(json.loads(rec_path.read_text()).get("address", ""))
        # addresses the bridge's neighbours answer on are taken too (e.g. test namespaces)
        neigh = _run("ip", "-4", "neigh", "show", "dev", self.bridge or "lo", check=False)
        used |= {line.split()[0] for line in neigh.stdout.splitlines() if line.strip()}
        hosts = list(net.hosts())
        # from the top of the range, below the gateway: test namespaces count from the bottom
        for a in reversed(hosts[len(hosts) // 2 :]):
            if str(a) not in used:
                return str(a)
        raise BackendError(f"no free address left in {net}")

    def _netns(self, iid: str, bridge: str, address: str, prefix: int, gateway: str) -> None:
        _run("ip", "netns", "add", iid)
        _run("ip", "link", "add", f"{iid}h", "type", "veth", "peer", "name", f"{iid}i")
        _run("ip", "link", "set", f"{iid}i", "netns", iid)
        _run("ip", "-n", iid, "link", "set", f"{iid}i", "name", "eth0")
        _run("ip", "link", "set", f"{iid}h", "master", bridge)
        _run("ip", "link", "set", f"{iid}h", "up")
        _run("ip", "-n", iid, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
        _run("ip", "-n", iid, "link", "set", "eth0", "up")
        _run("ip", "-n", iid, "link", "set", "lo", "up")
        _run("ip", "-n", iid, "route", "add", "default", "via", gateway)
