"""The node's in-memory view of the store's users and devices.

A hello must not wait for a disk: credentials, device ownership and device
records are answered from here, synchronously. The hub changes this view and
writes through to the store (in the background, in call order: the SQLite
store runs its calls one after another on one thread); other processes (the
CLI) change the store, and the hub brings their changes in through the change
feed with ``reload_user`` / ``reload_device``.
"""

from __future__ import annotations

import dataclasses

from .store import DeviceRecord, Store


class Registry:
    def __init__(self) -> None:
        self.users: set[str] = set()
        self.devices: dict[str, DeviceRecord] = {}  # revoked devices included: their ids stay taken
        self._by_credential: dict[str, str] = {}
        self._credential_of: dict[str, str] = {}
        self._by_user: dict[str, dict[str, DeviceRecord]] = {}

    async def load(self, store: Store) -> None:
        self.users = {user.id for user in await store.list_users()}
        self.devices.clear()
        self._by_credential.clear()
        self._credential_of.clear()
        self._by_user.clear()
        for device in await store.list_devices(include_revoked=True):
            self.put(device)

    def owner_of(self, device_id: str) -> str | None:
        device = self.devices.get(device_id)
        return None if device is None else device.user

    def get(self, device_id: str) -> DeviceRecord | None:
        return self.devices.get(device_id)

    def by_credential(self, credential_hash: str) -> DeviceRecord | None:
        device_id = self._by_credential.get(credential_hash)
        return None if device_id is None else self.devices.get(device_id)

    def put(self, device: DeviceRecord) -> None:
        # Records are changed in place too, so the hash to forget is looked up by device, not read from them.
        old_hash = self._credential_of.pop(device.id, None)
        if old_hash is not None:
            self._by_credential.pop(old_hash, None)
        self.devices[device.id] = device
        self._by_user.setdefault(device.user, {})[device.id] = device
        if device.credential_hash is not None and device.revoked_at is None:
            self._by_credential[device.credential_hash] = device.id
            self._credential_of[device.id] = device.credential_hash

    def user_devices(self, user: str) -> list[DeviceRecord]:
        found = [d for d in self._by_user.get(user, {}).values() if d.revoked_at is None]
        found.sort(key=lambda d: (d.created, d.id))
        return found

    def snapshot(self, device_id: str) -> DeviceRecord:
        """A copy to hand to the store (which may keep it) while this view goes on changing."""
        device = self.devices[device_id]
        return dataclasses.replace(device, capabilities=tuple(device.capabilities), metadata=dict(device.metadata))
