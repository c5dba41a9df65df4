"""The ``aws`` backend: EC2 through apache-libcloud's EC2 driver.

Settings (``meshgpu backend add aws -o key=value``): ``region`` (default ``us-east-1``),
``image`` (the AMI: a Linux with Python >= 3.11 and the NVIDIA driver, e.g. a Deep Learning AMI;
required to create), ``security_group`` (default ``meshgpu``: created on first use with the
peer, API and SSH ports open to ``allow_cidr``, default ``10.0.0.0/8``), ``subnet`` (a subnet
id, optional), ``key_name`` (an EC2 key pair for debugging, optional), ``endpoint`` (another
EC2 endpoint, e.g. ``http://127.0.0.1:5000`` for moto), ``prices`` (``type=usd;...``: this
account's prices, overriding the catalogue's). Secrets: ``access_key``, ``secret_key``.

Offers come from a small catalogue of GPU instance types below (on-demand prices of us-east-1;
spot at the catalogue's typical discount): EC2 has no price API in libcloud, and the pricing
API is a separate service. A third party with better prices ships its own plugin.

``placement: cluster`` (``cluster_placement``): a fleet's instances are launched into one EC2
*cluster* placement group (``Bootstrap.placement_group``), created on first use, idempotently
(described first; a concurrent create's ``InvalidPlacementGroup.Duplicate`` is success) and
tagged with the cluster and fleet; the controller pins the fleet's later instances to the first
one's availability zone (``Offer.zone`` -> ``Placement.AvailabilityZone``), as a cluster
placement group is one zone.
"""

from __future__ import annotations

from typing import Any

from meshgpu.fleets.backends import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    BackendError,
    BackendUnavailable,
    Bootstrap,
    CapacityError,
    CredentialsError,
    InstanceRef,
    Offer,
    Requirements,
    filter_offers,
)

# type: (gpu name, count, GPU GB, vCPUs, RAM GB, on-demand USD/h, spot USD/h)
CATALOG: dict[str, tuple[str, int, float, int, float, float, float]] = {
    "g4dn.xlarge": ("T4", 1, 16, 4, 16, 0.526, 0.21),
    "g5.xlarge": ("A10G", 1, 24, 4, 16, 1.006, 0.45),
    "g6.xlarge": ("L4", 1, 24, 4, 16, 0.805, 0.38),
    "g5.12xlarge": ("A10G", 4, 24, 48, 192, 5.672, 2.4),
    "p3.2xlarge": ("V100", 1, 16, 8, 61, 3.06, 1.1),
    "p4d.24xlarge": ("A100", 8, 40, 96, 1152, 32.77, 14.0),
    "p5.48xlarge": ("H100", 8, 80, 192, 2048, 98.32, 40.0),
}
CAPACITY_CODES = (
    "InsufficientInstanceCapacity",
    "InstanceLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    "Unsupported",
    "VcpuLimitExceeded",
)
PORTS = (22, 7480, 7481, 7482)  # SSH, API, peer, jobs' SSH


def create(name: str, config: dict[str, Any], secrets: dict[str, Any]) -> AwsBackend:
    return AwsBackend(name, config, secrets)


create.cluster_placement = True  # type: ignore[attr-defined]


class AwsBackend:
    cluster_placement = True  # EC2 cluster placement groups

    def __init__(self, name: str, config: dict[str, Any], secrets: dict[str, Any]) -> None:
        self.name = name
        self.region = str(config.get("region") or "us-east-1")
        self.image = str(config.get("image") or "")
        self.security_group = str(config.get("security_group") or "meshgpu")
        self.allow_cidr = str(config.get("allow_cidr") or "10.0.0.0/8")
        self.subnet = str(config.get("subnet") or "")
        self.key_name = str(config.get("key_name") or "")
        self.endpoint = str(config.get("endpoint") or "")
        self.prices: dict[str, float] = {}
        for part in str(config.get("prices") or "").split(";"):
            if "=" in part:
                t, _, p = part.partition("=")
                try:
                    self.prices[t.strip()] = float(p)
                except ValueError:
                    raise BackendError(f"prices: {part!r} is not type=USD") from None
        key, secret = secrets.get("access_key"), secrets.get("secret_key")
        if not key or not secret:
            raise CredentialsError(
                "the aws backend needs access_key and secret_key (--secret access_key=AKIA... "
                "--secret secret_key=...)"
            )
        self._key, self._secret = str(key), str(secret)
        self._driver: Any = None

    @property
    def driver(self) -> Any:
        if self._driver is None:
            from urllib.parse import urlsplit

            from libcloud.compute.providers import Provider, get_driver

            kw: dict[str, Any] = {"region": self.region, "signature_version": "4"}
            if self.endpoint:
                u = urlsplit(self.endpoint)
                kw.update(host=u.hostname, port=u.port, secure=u.scheme == "https")
            cls = get_driver(Provider.EC2)
            self._driver = cls(self._key, self._secret, **kw)
            self._driver.connection.timeout = 20
            self._driver.connection.responseCls = _response_cls()
        return self._driver

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        from libcloud.common.types import InvalidCredsError

        try:
            return fn(*args, **kw)
        except InvalidCredsError as e:
            raise CredentialsError(
                f"AWS refused the credentials ({what}): {e.value if hasattr(e, 'value') else e}: "
                "check access_key/secret_key (meshgpu backend add aws ... again)"
            ) from None
        except (TimeoutError, ConnectionError, OSError) as e:
            raise BackendUnavailable(f"EC2 did not answer ({what}): {e}") from None
        except Exception as e:  # noqa: BLE001 - libcloud raises plain Exceptions with the code
            text = str(e)
            if any(c in text for c in CAPACITY_CODES):
                raise CapacityError(f"{what}: {text[:300]}") from None
            raise BackendError(f"EC2 {what}: {text[:300]}") from None

    # -- the protocol ----------------------------------------------------------------------

    def check(self) -> None:
        self._call("DescribeSecurityGroups", self.driver.ex_get_security_groups)

    def offers(self, req: Requirements) -> list[Offer]:
        out = []
        for t, (gpu, n, gmem, cpus, ram, od, spot) in CATALOG.items():
            price = self.prices.get(t, od)
            for is_spot in (False, True):
                out.append(
                    Offer(
                        backend=self.name,
                        instance_type=t,
                        region=self.region,
                        price=round(spot * price / od, 4) if is_spot else price,
                        spot=is_spot,
                        gpu_name=gpu,
                        gpu_count=n,
                        gpu_memory_gb=gmem,
                        cpus=cpus,
                        memory_gb=ram,
                        disk_gb=100,
                    )
                )
        return filter_offers(out, req)

    def create(self, offer: Offer, bootstrap: Bootstrap) -> InstanceRef:
        from libcloud.compute.base import NodeImage, NodeSize

        if not self.image:
            raise BackendError(
                "the aws backend has no image: meshgpu backend add aws -o image=ami-... "
                "(a Linux AMI with Python >= 3.11 and the NVIDIA driver)"
            )
        self._ensure_security_group()
        size = NodeSize(offer.instance_type, offer.instance_type, 0, 0, 0, offer.price, self.driver)
        kw: dict[str, Any] = {
            "name": bootstrap.name,
            "size": size,
            "image": NodeImage(self.image, self.image, self.driver),
            "ex_userdata": bootstrap.user_data,
            "ex_metadata": dict(bootstrap.tags),
            "ex_security_groups": [self.security_group],
        }
        if self.key_name:
            kw["ex_keyname"] = self.key_name
        if self.subnet:
            kw.pop("ex_security_groups")
            kw["ex_subnet"] = self._call("DescribeSubnets", self._subnet)
        if offer.spot:
            kw["ex_spot"] = True
            kw["ex_spot_max_price"] = offer.price
        if bootstrap.placement_group:
            self._ensure_placement_group(bootstrap.placement_group, bootstrap.tags)
            kw["ex_placement_group"] = bootstrap.placement_group
        if offer.zone:
            from libcloud.compute.drivers.ec2 import ExEC2AvailabilityZone

            zone = ExEC2AvailabilityZone(offer.zone, "available", self.region)
            kw["location"] = _Zone(zone)
        node = self._call(f"RunInstances {offer.instance_type}", self.driver.create_node, **kw)
        return self._ref(node)

    def terminate(self, ref: InstanceRef) -> None:
        from libcloud.compute.base import Node

        node = Node(ref.instance_id, "", "", [], [], self.driver)
        try:
            self._call("TerminateInstances", self.driver.destroy_node, node)
        except BackendError as e:
            if "InvalidInstanceID.NotFound" in str(e):
                return  # already gone
            raise

    def list(self, tags: dict[str, str]) -> list[InstanceRef]:
        filters = {f"tag:{k}": v for k, v in tags.items()}
        nodes = self._call("DescribeInstances", self.driver.list_nodes, ex_filters=filters)
        return [self._ref(n) for n in nodes]

    # -- helpers -------------------------------------------------------------------------------

    def _ref(self, node: Any) -> InstanceRef:
        ips = list(node.private_ips or []) + list(node.public_ips or [])
        tags = dict(node.extra.get("tags") or {})
        state = str(node.extra.get("status") or node.state)
        zone = str(node.extra.get("availability") or "")
        return InstanceRef(
            self.name, node.id, self.region, ips[0] if ips else "", state, tags, zone=zone
        )

    def _ensure_placement_group(self, name: str, tags: dict[str, str]) -> None:
        """The cluster placement group ``name``, made once (tagged with the controller's own
        tags: cluster and fleet, not the instance's id)."""
        # all groups, filtered here: libcloud 3.9's ex_list_placement_groups(names=...) builds
        # its parameters wrongly ("GroupName.%s" % index + 1)
        groups = self._call("DescribePlacementGroups", self.driver.ex_list_placement_groups)
        if any(g.name == name for g in groups):
            return
        params: dict[str, Any] = {
            "Action": "CreatePlacementGroup",
            "GroupName": name,
            "Strategy": "cluster",
            "TagSpecification.1.ResourceType": "placement-group",
        }
        own = {k: v for k, v in tags.items() if k != TAG_INSTANCE}
        for i, (k, v) in enumerate(sorted(own.items()), 1):
            params[f"TagSpecification.1.Tag.{i}.Key"] = k
            params[f"TagSpecification.1.Tag.{i}.Value"] = v
        try:
            self._call(
                "CreatePlacementGroup",
                lambda: self.driver.connection.request(self.driver.path, params=params),
            )
        except BackendError as e:
            if "InvalidPlacementGroup.Duplicate" not in str(e):
                raise  # made by a concurrent create of the same fleet: fine

    def _subnet(self) -> Any:
        found = self.driver.ex_list_subnets(subnet_ids=[self.subnet])
        if not found:
            raise BackendError(f"no subnet {self.subnet} in {self.region}")
        return found[0]

    def _ensure_security_group(self) -> None:
        groups = self._call("DescribeSecurityGroups", self.driver.ex_get_security_groups)
        if any(g.name == self.security_group for g in groups):
            return
        made = self._call(
            "CreateSecurityGroup",
            self.driver.ex_create_security_group,
            self.security_group,
            "meshgpu agents: peer, API and SSH ports",
        )
        gid = made.get("group_id") if isinstance(made, dict) else None
        for port in PORTS:
            self._call(
                "AuthorizeSecurityGroupIngress",
                self.driver.ex_authorize_security_group_ingress,
                gid,
                port,
                port,
                [self.allow_cidr],
            )


class _Zone:
    """A location for libcloud's ``create_node``: only its availability zone is read."""

    def __init__(self, zone: Any) -> None:
        self.availability_zone = zone


def _response_cls() -> Any:
    """libcloud's EC2 response, reading an error by its Code and Message elements (its own
    parser expects exactly those two, and fails on answers that carry more, e.g. a RequestId)."""
    import xml.etree.ElementTree as ET

    from libcloud.common.types import InvalidCredsError
    from libcloud.compute.drivers.ec2 import EC2Response

    class Response(EC2Response):  # type: ignore[misc]
        def parse_error(self) -> Any:
            try:
                body = ET.XML(self.body)
            except ET.ParseError:
                return super().parse_error()
            errors = body.findall(".//Errors/Error") or body.findall(".//Error")
            if not errors:
                return super().parse_error()
            out = []
            for err in errors:
                code = (err.findtext("Code") or "").strip()
                message = (err.findtext("Message") or "").strip()
                out.append(f"{code}: {message}")
                if code in ("AuthFailure", "InvalidClientTokenId", "SignatureDoesNotMatch"):
                    raise InvalidCredsError(out[-1])
            return "\n".join(out)

    return Response


__all__ = ["TAG_CLUSTER", "AwsBackend", "create"]
