"""A static identity inventory: a YAML file mapping IP addresses to cluster owners.

This is the walking skeleton's stand-in for the Kubernetes watcher: the same owner fields, no
time. Format::

    owners:
      - ip: 10.244.1.7
        kind: pod                 # pod | service | node | host-network
        namespace: shop
        name: cart-7d9c6-x2x1q    # pod, service or node name
        workload: cart
        workload_kind: Deployment
        service: cart             # service selecting the pod, if any
        node: node-1

Unknown keys and duplicate addresses are errors naming the entry.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from flowtally.settings import SettingsError
from sensors.schema import address16


class OwnerKind(StrEnum):
    """What kind of cluster object holds an address."""

    POD = "pod"
    SERVICE = "service"
    NODE = "node"
    HOST_NETWORK = "host-network"


class Owner(BaseModel):
    """One address and the cluster object that holds it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ip: str
    kind: OwnerKind = OwnerKind.POD
    namespace: str = ""
    name: str = ""
    workload: str = ""
    workload_kind: str = ""
    service: str = ""
    node: str = ""

    @field_validator("ip")
    @classmethod
    def _normalise_ip(cls, value: str) -> str:
        return str(ipaddress.ip_address(value.strip()))

    def address16(self) -> bytes:
        """The address as 16 bytes, IPv4 in IPv4-mapped form (as in the raw schema)."""
        return address16(self.ip)


class Inventory(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    owners: tuple[Owner, ...] = ()

    @field_validator("owners")
    @classmethod
    def _unique(cls, owners: tuple[Owner, ...]) -> tuple[Owner, ...]:
        seen: dict[str, int] = {}
        for i, owner in enumerate(owners):
            if owner.ip in seen:
                raise ValueError(f"address {owner.ip} appears twice (entries {seen[owner.ip]} and {i})")
            seen[owner.ip] = i
        return owners


class InventoryError(SettingsError):
    """An inventory file that cannot be used (a configuration error: the stage stops)."""


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate an inventory file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InventoryError(f"inventory file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not text
        raise InventoryError(f"inventory file {path} cannot be read: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    except yaml.YAMLError as exc:
        raise InventoryError(f"inventory file {path} is not valid YAML: {exc}") from None
    try:
        return Inventory.model_validate(data or {})
    except ValidationError as exc:
        raise InventoryError(f"inventory file {path}: {exc}") from None

